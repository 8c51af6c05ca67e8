//! `lora-train`: train a LoRA adapter on the tokenize stage's examples.
//!
//! The loop, in order: load the base model, attach LoRA to the target
//! modules, resume from the newest checkpoint if the work dir has one, then
//! for each optimizer step accumulate gradients over micro-batches (one
//! example each), clip, AdamW, log, evaluate and checkpoint now and then.
//! Output (PEFT layout, loadable by `PeftModel.from_pretrained`):
//! `adapter_model.safetensors`, `adapter_config.json`, plus `base_weights.json`
//! (the base weights' blake3, for `merge`), `loss.csv` and `loss.svg`.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokenize::TokenizedSplit;
use super::{Env, RunContext, Stage};
use pipeline_model::adapter::{self, AdapterConfig, LoraTensors};
use pipeline_model::{self as model, CausalLm, TARGETS};
use pipeline_train::checkpoint::{self, LogRow, State};
use pipeline_train::optim::{AdamW, Schedule, learning_rate};
use pipeline_train::{DataOrder, SeededDropout, attach_lora, example_grads, example_loss};

/// Parameters of a `lora-train` stage. Defaults follow PEFT + TRL.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `tokenize` stage whose examples are trained on.
    pub tokens: String,
    /// Modules to adapt: `"all-linear"` or a list of `q_proj`, `k_proj`,
    /// `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    #[serde(default)]
    pub targets: Targets,
    /// LoRA rank r.
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// LoRA α; updates are scaled by α/r.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the LoRA input.
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Scale by α/√r instead of α/r (rsLoRA).
    #[serde(default)]
    pub rslora: bool,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_eps: f64,
    /// Learning-rate schedule after warmup.
    #[serde(default)]
    pub schedule: Schedule,
    /// Warmup steps (takes precedence over `warmup_ratio`).
    #[serde(default)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Examples per optimizer step (micro-batches of one example each).
    #[serde(default = "d_one")]
    pub gradient_accumulation: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[serde(default = "d_grad_norm")]
    pub max_grad_norm: f64,
    /// Passes over the training split.
    #[serde(default = "d_one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// The split trained on.
    #[serde(default = "d_train_split")]
    pub train_split: String,
    /// The split for validation loss (default: `validation` if present).
    #[serde(default)]
    pub eval_split: Option<String>,
    /// Validation loss every N steps (0: only before and after training).
    #[serde(default)]
    pub eval_every: usize,
    /// Use at most this many validation examples.
    #[serde(default)]
    pub eval_examples: Option<usize>,
    /// Write a resumable checkpoint every N steps.
    #[serde(default = "d_checkpoint")]
    pub checkpoint_every: usize,
    /// Gradient (activation) checkpointing: keep only each layer's input
    /// during the forward pass and recompute the layer in the backward pass.
    /// Much less memory on long sequences (Gemma 3 270M at 2048 tokens:
    /// 1.7 instead of 9 GiB) for one extra forward pass (~30 % slower).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn d_rank() -> usize {
    16
}
fn d_alpha() -> f64 {
    32.0
}
fn d_dropout() -> f64 {
    0.05
}
fn d_lr() -> f64 {
    2e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_one() -> usize {
    1
}
fn d_grad_norm() -> f64 {
    1.0
}
fn d_train_split() -> String {
    "train".into()
}
fn d_checkpoint() -> usize {
    20
}

/// `targets`: a preset name or a list of module names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Targets {
    /// `"all-linear"`.
    Preset(String),
    /// Module names, e.g. `["q_proj", "v_proj"]`.
    Modules(Vec<String>),
}

impl Default for Targets {
    fn default() -> Self {
        Targets::Preset("all-linear".into())
    }
}

impl Targets {
    /// The module names this selects.
    pub fn modules(&self) -> Vec<String> {
        match self {
            Targets::Preset(_) => TARGETS.iter().map(|s| s.to_string()).collect(),
            Targets::Modules(m) => m.clone(),
        }
    }
}

impl Params {
    pub fn check(&self) -> Result<(), (&'static str, String, String)> {
        let err = |k: &'static str, m: String, h: &str| Err((k, m, h.to_string()));
        match &self.targets {
            Targets::Preset(p) if p != "all-linear" => {
                return err("targets", format!("unknown preset `{p}`"), "use \"all-linear\" or a list of module names");
            }
            Targets::Modules(m) if m.is_empty() => {
                return err("targets", "no target modules".into(), "e.g. [\"q_proj\", \"v_proj\"]");
            }
            Targets::Modules(m) => {
                if let Some(bad) = m.iter().find(|t| !TARGETS.contains(&t.as_str())) {
                    let help = match crate::error::did_you_mean(bad, TARGETS) {
                        Some(s) => format!("did you mean `{s}`? (modules: {})", TARGETS.join(", ")),
                        None => format!("modules: {}", TARGETS.join(", ")),
                    };
                    return err(
                        "targets",
                        format!("`{bad}` matches no linear module of the supported architectures"),
                        &help,
                    );
                }
            }
            _ => {}
        }
        if self.rank == 0 {
            return err("rank", "rank must be at least 1".into(), "typical values: 8, 16, 32");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err("dropout", format!("dropout {} is not in [0, 1)", self.dropout), "");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return err("learning_rate", format!("learning_rate {} must be positive", self.learning_rate), "");
        }
        if self.gradient_accumulation == 0 {
            return err("gradient_accumulation", "must be at least 1".into(), "");
        }
        if self.epochs == 0 {
            return err("epochs", "must be at least 1".into(), "");
        }
        if self.max_steps == Some(0) {
            return err("max_steps", "must be at least 1".into(), "");
        }
        if self.checkpoint_every == 0 {
            return err("checkpoint_every", "must be at least 1".into(), "");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return err("warmup_ratio", format!("{} is not in [0, 1)", self.warmup_ratio), "");
        }
        Ok(())
    }

    fn eval_split_name(&self, dir: &std::path::Path) -> Option<String> {
        match &self.eval_split {
            Some(s) => Some(s.clone()),
            None => dir.join("validation.safetensors").is_file().then(|| "validation".to_string()),
        }
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        // 2: adapter_model.safetensors carries `{"format": "pt"}` metadata, as PEFT writes it.
        2
    }

    fn params(&self, env: &Env) -> Value {
        let mut v = serde_json::to_value(self).expect("params serialize");
        v["seed"] = env.recipe.recipe.seed.into();
        v["device"] = env.recipe.recipe.device.clone().into();
        v
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        env.base_model_inputs(false)
    }

    fn resume_point(&self, work: &std::path::Path) -> Option<u64> {
        checkpoint::latest(work).map(|(step, _)| step)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        Trainer::new(self, ctx)?.train()
    }
}

/// Everything one training run holds.
struct Trainer<'a> {
    p: &'a Params,
    ctx: &'a RunContext<'a>,
    model: Box<dyn CausalLm>,
    /// (PEFT-style name `<module>.lora_A` / `.lora_B`, variable).
    params: Vec<(String, Var)>,
    modules: Vec<String>,
    train: TokenizedSplit,
    eval: Option<TokenizedSplit>,
    seed: u64,
    total_steps: u64,
    warmup: u64,
}

impl<'a> Trainer<'a> {
    fn new(p: &'a Params, ctx: &'a RunContext<'a>) -> Result<Trainer<'a>> {
        let env = ctx.env;
        let seed = env.recipe.recipe.seed;
        let dir = ctx.input("tokens").join("tokens");
        let train = TokenizedSplit::load(&dir.join(format!("{}.safetensors", p.train_split)))
            .with_context(|| format!("stage `{}`: train_split `{}`", ctx.name, p.train_split))?;
        let eval = match p.eval_split_name(&dir) {
            Some(s) => {
                let mut split = TokenizedSplit::load(&dir.join(format!("{s}.safetensors")))
                    .with_context(|| format!("stage `{}`: eval_split `{s}`", ctx.name))?;
                if let Some(n) = p.eval_examples {
                    split.truncate(n);
                }
                Some(split)
            }
            None => None,
        };
        let longest = (0..train.len())
            .map(|i| train.example(i).0.len())
            .chain(eval.iter().flat_map(|e| (0..e.len()).map(|i| e.example(i).0.len())))
            .max()
            .unwrap_or(1);

        let device = model::device(&env.recipe.recipe.device)?;
        let resolved = env.model()?;
        let mut model = model::load(resolved, &device, longest)?;
        if longest > model.max_position_embeddings() {
            bail!(
                "examples are up to {longest} tokens but the model's context is {}; lower `max_len` of the tokenize stage",
                model.max_position_embeddings()
            );
        }

        let wanted = p.targets.modules();
        let scale = AdapterConfig::lora("", p.rank, p.alpha, p.dropout, vec![], p.rslora).scale();
        let (params, modules) = attach_lora(model.as_mut(), &wanted, p.rank, scale, p.dropout as f32, seed)?;
        if modules.is_empty() {
            bail!("targets {:?} match no module of this model", wanted);
        }

        let per_epoch = train.len().div_ceil(p.gradient_accumulation) as u64;
        let total_steps = p.max_steps.map_or(per_epoch * p.epochs as u64, |s| s as u64);
        let warmup = if p.warmup_steps > 0 {
            p.warmup_steps as u64
        } else {
            (p.warmup_ratio * total_steps as f64).ceil() as u64
        };
        Ok(Trainer { p, ctx, model, params, modules, train, eval, seed, total_steps, warmup })
    }

    fn train(self) -> Result<Value> {
        let p = self.p;
        let work = self.ctx.work.clone();
        let mut opt = AdamW::new(p.adam_beta1, p.adam_beta2, p.adam_eps, p.weight_decay);
        let mut state = State { step: 0, log: vec![], initial_eval_loss: None };
        let resumed_from = match checkpoint::latest(&work) {
            Some((step, dir)) => {
                self.restore(&dir, &mut opt)?;
                state = checkpoint::load_state(&dir)?;
                tracing::info!(step, "resumed from checkpoint");
                Some(step)
            }
            None => None,
        };
        if state.initial_eval_loss.is_none() {
            state.initial_eval_loss = self.eval_loss()?;
        }

        let trainable: usize = self.params.iter().map(|(_, v)| v.elem_count()).sum();
        tracing::info!(steps = self.total_steps, trainable, modules = self.modules.len(), "training");
        let pb = crate::report::bar(self.total_steps, "train");
        pb.set_position(state.step);
        let mut order = DataOrder::new(self.seed, self.train.len());
        let started = Instant::now();
        let mut tokens_seen = 0u64;
        let first_step = state.step;
        for step in state.step..self.total_steps {
            let lr = learning_rate(
                p.schedule,
                p.learning_rate,
                step as usize,
                self.total_steps as usize,
                self.warmup as usize,
            );
            let (row, n_tokens) = self.step(step, lr, &mut order, &mut opt)?;
            tokens_seen += n_tokens;
            let mut row = row;
            let done = step + 1;
            if p.eval_every > 0 && done % p.eval_every as u64 == 0 && done < self.total_steps {
                row.eval_loss = self.eval_loss()?;
            }
            if done == self.total_steps {
                row.eval_loss = self.eval_loss()?;
            }
            let rate = tokens_seen as f64 / started.elapsed().as_secs_f64();
            pb.set_message(format!("loss {:.4} lr {:.2e} {rate:.0} tok/s", row.loss, row.lr));
            pb.inc(1);
            // Without a terminal there is no bar: log about 20 lines per run instead.
            let every = (self.total_steps / 20).max(1);
            if !crate::report::draws_bars() && (done % every == 0 || done == self.total_steps) {
                let eta =
                    (self.total_steps - done) as f64 * started.elapsed().as_secs_f64() / (done - first_step) as f64;
                tracing::info!(
                    step = done,
                    of = self.total_steps,
                    loss = format!("{:.4}", row.loss),
                    lr = format!("{:.2e}", row.lr),
                    tokens_per_s = format!("{rate:.0}"),
                    eta_s = format!("{eta:.0}"),
                    eval_loss = row.eval_loss.map(|l| format!("{l:.4}")),
                    "training"
                );
            }
            state.log.push(row);
            state.step = done;
            if done % p.checkpoint_every as u64 == 0 || done == self.total_steps {
                let dir = checkpoint::save(&work, &state, |dir| {
                    candle_core::safetensors::save(&self.named_tensors(), dir.join("adapter.safetensors"))?;
                    opt.save(&dir.join("optimizer.safetensors"))
                })?;
                self.ctx.checkpoint_saved(&dir)?;
            }
            pipeline_fs::fault::point(&format!("lora-train.step-{done}"));
        }
        pb.finish();
        let seconds = started.elapsed().as_secs_f64();
        self.write_outputs(&state)?;

        let last = state.log.iter().rev().take(10).map(|r| r.loss).collect::<Vec<_>>();
        let final_eval = state.log.last().and_then(|r| r.eval_loss);
        Ok(serde_json::json!({
            "steps": self.total_steps,
            "trainable_parameters": trainable,
            "modules": self.modules.len(),
            "train_loss_last10": last.iter().sum::<f64>() / last.len().max(1) as f64,
            "eval_loss_before": state.initial_eval_loss,
            "eval_loss_after": final_eval,
            "resumed_from_step": resumed_from,
            "seconds_this_run": seconds,
            "tokens_per_s_this_run": tokens_seen as f64 / seconds.max(1e-9),
        }))
    }

    /// One optimizer step over `gradient_accumulation` examples.
    fn step(&self, step: u64, lr: f64, order: &mut DataOrder, opt: &mut AdamW) -> Result<(LogRow, u64)> {
        let accum = self.p.gradient_accumulation as u64;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut loss_sum, mut supervised, mut tokens, mut epoch) = (0f64, 0u64, 0u64, 0u64);
        for micro in 0..accum {
            let (e, idx) = order.get(step * accum + micro);
            epoch = e;
            let (ids, mask) = self.train.example(idx);
            let dropout = SeededDropout::new(self.seed, step, micro);
            let checkpointing = self.p.gradient_checkpointing;
            let (value, n, micro_grads) = example_grads(
                self.model.as_ref(),
                ids,
                mask,
                Some(&dropout),
                1.0 / accum as f64,
                &self.params,
                checkpointing,
            )?;
            if !value.is_finite() {
                let kept = checkpoint::latest(&self.ctx.work).map_or("none".to_string(), |(s, _)| format!("step {s}"));
                bail!(
                    "the loss became {value} at step {} (example {}); stopped. The last good checkpoint ({kept}) is kept \
                     and a rerun resumes from it: lower `learning_rate` or set `max_grad_norm` first",
                    step + 1,
                    self.train.ids[idx]
                );
            }
            loss_sum += value;
            supervised += n as u64;
            tokens += ids.len() as u64;
            for (name, gv) in micro_grads {
                let acc = match grads.remove(&name) {
                    Some(prev) => (prev + gv)?,
                    None => gv,
                };
                grads.insert(name, acc);
            }
        }
        // Clip the global norm as torch.nn.utils.clip_grad_norm_ does.
        let mut sq = 0f64;
        for g in grads.values() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let grad_norm = sq.sqrt();
        if self.p.max_grad_norm > 0.0 {
            let coef = self.p.max_grad_norm / (grad_norm + 1e-6);
            if coef < 1.0 {
                for g in grads.values_mut() {
                    *g = (&*g * coef)?;
                }
            }
        }
        opt.step(&self.params, &grads, lr)?;
        let row = LogRow {
            step: step + 1,
            epoch,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            tokens: supervised,
            eval_loss: None,
        };
        Ok((row, tokens))
    }

    /// Token-weighted mean loss over the validation split (no dropout).
    fn eval_loss(&self) -> Result<Option<f64>> {
        let Some(eval) = &self.eval else { return Ok(None) };
        let (mut total, mut count) = (0f64, 0usize);
        for i in 0..eval.len() {
            let (ids, mask) = eval.example(i);
            let (loss, n) = example_loss(self.model.as_ref(), ids, mask, None)?;
            total += loss.to_scalar::<f32>()? as f64 * n as f64;
            count += n;
        }
        Ok(Some(total / count.max(1) as f64))
    }

    /// The LoRA matrices under their checkpoint names.
    fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    fn restore(&self, dir: &std::path::Path, opt: &mut AdamW) -> Result<()> {
        let saved = candle_core::safetensors::load(dir.join("adapter.safetensors"), self.model.device())?;
        for (name, var) in &self.params {
            let t = saved.get(name).with_context(|| format!("checkpoint {} lacks `{name}`", dir.display()))?;
            var.set(t)?;
        }
        opt.load(&dir.join("optimizer.safetensors"), self.model.device())
    }

    fn write_outputs(&self, state: &State) -> Result<()> {
        let out = &self.ctx.out;
        let env = self.ctx.env;
        let resolved = env.model()?;
        let base = resolved.source.strip_prefix("hf://").unwrap_or(&resolved.source).to_string();
        let mut targets: Vec<String> =
            self.modules.iter().filter_map(|m| m.rsplit('.').next().map(str::to_string)).collect();
        targets.sort();
        targets.dedup();
        let mut cfg = AdapterConfig::lora(&base, self.p.rank, self.p.alpha, self.p.dropout, targets, self.p.rslora);
        cfg.revision = resolved.revision.clone();
        let base_weights_blake3 = resolved.weights.first().map(|w| env.hash_file(w)).transpose()?;
        let mut tensors = LoraTensors::new();
        // `attach_lora` lists each module's A, then its B.
        for pair in self.params.chunks(2) {
            let module = pair[0].0.trim_end_matches(".lora_A").to_string();
            tensors.insert(module, (pair[0].1.as_tensor().clone(), pair[1].1.as_tensor().clone()));
        }
        adapter::save(out, &cfg, &tensors, base_weights_blake3.as_deref())?;

        let mut csv = String::from("step,epoch,loss,lr,grad_norm,supervised_tokens,eval_loss\n");
        for r in &state.log {
            let eval = r.eval_loss.map(|l| format!("{l:.6}")).unwrap_or_default();
            csv +=
                &format!("{},{},{:.6},{:.6e},{:.6},{},{eval}\n", r.step, r.epoch, r.loss, r.lr, r.grad_norm, r.tokens);
        }
        std::fs::write(out.join("loss.csv"), csv)?;
        pipeline_train::plot::loss_curve(
            &out.join("loss.svg"),
            &format!("{} — LoRA r={} on {}", self.ctx.name, self.p.rank, base),
            &state.log,
            state.initial_eval_loss,
        )
    }
}
