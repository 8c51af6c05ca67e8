//! `lora-train`: train a LoRA adapter on the tokenize stage's examples.
//!
//! The stage maps its parameters onto a [`TrainConfig`], loads the split
//! and the base model, and hands them to [`Trainer`] (the loop itself is in
//! `pipeline-train`), resuming from the newest checkpoint in its work dir.
//! Output (PEFT layout, loadable by `PeftModel.from_pretrained`):
//! `adapter_model.safetensors`, `adapter_config.json`, plus `base_weights.json`
//! (the base weights' blake3, for `merge`), `loss.csv` and `loss.svg`, and the
//! same log as HF Trainer's `trainer_state.json` and as TensorBoard event
//! files in `runs/`. With `[recipe] report_to = ["tensorboard"]` (the
//! default) a running training also writes events live into its work dir,
//! whose path is logged (`tensorboard --logdir …`).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use pipeline_model::adapter;
use pipeline_model::{Precision, TARGETS};
use pipeline_train::LossAveraging;
use pipeline_train::checkpoint::{self, LogRow};
use pipeline_train::logs::{self, RunShape, TensorBoard};
use pipeline_train::optim::Schedule;
use pipeline_train::trainer::ObserverError;
use pipeline_train::{LoraConfig, Observer, TokenizedSplit, TrainConfig, Trainer, plot};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokenize;
use super::{Env, Input, Kind, Rule, RunContext, Stage, StageKind};

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
    /// How one optimizer step averages its examples: `"example"` (default:
    /// each example's mean token loss, then the mean over examples) or
    /// `"token"` (the mean over all their supervised tokens, as transformers
    /// does since 4.46: a long answer no longer dilutes its first tokens,
    /// e.g. the decision to answer directly rather than call a tool).
    #[serde(default, skip_serializing_if = "LossAveraging::is_default")]
    pub loss_averaging: LossAveraging,
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
    /// Number format of the frozen base weights: `"f32"` (default),
    /// `"bf16"` (half their memory; mixed precision — activations, LoRA
    /// matrices, gradients and optimizer state stay f32), or `"auto"` (bf16
    /// where the device multiplies it natively: a CPU with AVX512-BF16, or
    /// CUDA). The cache key holds the precision as resolved on the machine.
    #[serde(default)]
    pub precision: PrecisionChoice,
}

/// `precision` as a recipe writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    #[default]
    F32,
    Bf16,
    Auto,
}

impl PrecisionChoice {
    /// The precision this choice means for a recipe's `device` on this
    /// machine.
    pub fn resolve(self, device: &str) -> Precision {
        match self {
            PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::Auto => {
                let cuda = device.starts_with("cuda") || (device == "auto" && candle_core::utils::cuda_is_available());
                let cpu = device == "cpu"
                    || (device == "auto"
                        && !candle_core::utils::cuda_is_available()
                        && !candle_core::utils::metal_is_available());
                if cuda {
                    Precision::Bf16
                } else if cpu {
                    Precision::auto(&candle_core::Device::Cpu)
                } else {
                    Precision::F32
                }
            }
        }
    }
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
    fn eval_split_name(&self, entry: &std::path::Path) -> Option<String> {
        match &self.eval_split {
            Some(s) => Some(s.clone()),
            None => super::tokenize::has_split(entry, "validation").then(|| "validation".to_string()),
        }
    }
}

impl StageKind for Params {
    const EXPORTED: bool = true;

    fn model_artifact(&self) -> Option<(super::kind::Artifact, Option<&str>)> {
        Some((super::kind::Artifact::Adapter, None))
    }

    /// Its run time, final eval loss and loss curve.
    fn sweep_metrics(&self, entry: &std::path::Path) -> Result<super::kind::SweepMetrics> {
        let manifest = pipeline_cache::Manifest::read(entry)?;
        Ok(super::kind::SweepMetrics {
            train_seconds: Some(manifest.duration_s),
            eval_loss_after: manifest.metrics["eval_loss_after"].as_f64(),
            log: std::fs::read_to_string(entry.join("loss.csv"))
                .map(|csv| pipeline_train::plot::read_loss_csv(&csv))
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    fn inputs(&self) -> Vec<Input<'_>> {
        vec![Input { role: "tokens", stage: &self.tokens, kinds: &[tokenize::Params::KIND] }]
    }

    fn check(&self) -> Result<(), Rule> {
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
}

impl Stage for Params {
    fn version(&self) -> u32 {
        // 2: adapter_model.safetensors carries `{"format": "pt"}` metadata, as PEFT writes it.
        2
    }

    fn params(&self, env: &Env) -> Value {
        let mut v = serde_json::to_value(self).expect("params serialize");
        v["seed"] = env.settings.seed.into();
        v["device"] = env.settings.device.clone().into();
        // The resolved precision, not the choice (`auto` differs between
        // machines); f32, the default, leaves the key as it was before the
        // option existed.
        v.as_object_mut().expect("params are a table").remove("precision");
        let precision = self.precision.resolve(&env.settings.device);
        if precision != Precision::F32 {
            v["precision"] = precision.name().into();
        }
        v
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        env.base_model_inputs(false)
    }

    fn resumable(&self) -> bool {
        true
    }

    fn resume_point(&self, work: &std::path::Path) -> Option<u64> {
        checkpoint::latest(work).map(|(step, _)| step)
    }

    fn data_parallel(&self) -> bool {
        true
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let tokens = ctx.input("tokens");
        let train = super::tokenize::read_split(tokens, &self.train_split)
            .with_context(|| format!("stage `{}`: train_split `{}`", ctx.name, self.train_split))?;
        let eval = match self.eval_split_name(tokens) {
            Some(s) => {
                let mut split = super::tokenize::read_split(tokens, &s)
                    .with_context(|| format!("stage `{}`: eval_split `{s}`", ctx.name))?;
                if let Some(n) = self.eval_examples {
                    split.truncate(n);
                }
                Some(split)
            }
            None => None,
        };
        // Rotary tables for the longest example (the trainer checks it fits).
        let longest = train.longest().max(eval.as_ref().map_or(0, TokenizedSplit::longest)).max(1);
        let base = ctx.env.model_weights()?;
        let device = pipeline_model::device(&ctx.env.settings.device)?;
        let precision = self.precision.resolve(&ctx.env.settings.device);
        tracing::info!("frozen base weights in {}; CPU kernels: {}", precision.name(), pipeline_model::cpu_paths());
        let model = pipeline_model::load_in(base, &device, longest, precision)?;

        let mut trainer =
            Trainer::new(model, train, eval, self.config(ctx.env.settings.seed))?.with_world(ctx.world.clone());
        trainer.resume(&ctx.work)?;
        if ctx.world.rank() != 0 {
            // Its share of every step; rank 0 logs, checkpoints and writes.
            trainer.run(None, &mut ())?;
            return Ok(Value::Null);
        }
        let shape = RunShape {
            steps_per_epoch: trainer.steps_per_epoch(),
            total_steps: trainer.total_steps(),
            epochs: self.epochs,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            examples_per_step: self.gradient_accumulation,
        };
        let live = if ctx.env.settings.report_to.contains(&crate::settings::ReportTo::Tensorboard) {
            let dir = ctx.work.join("runs");
            tracing::info!("training curves live: tensorboard --logdir {}", dir.display());
            Some(TensorBoard::create(&dir, shape)?)
        } else {
            None
        };
        let summary = trainer.run(Some(&ctx.work), &mut Progress::new(ctx, live))?;

        // Outputs: the adapter in PEFT's layout, the loss log and its plot.
        let base_id = base.source.strip_prefix("hf://").unwrap_or(&base.source).to_string();
        let (mut cfg, tensors) = trainer.adapter(&base_id);
        cfg.revision = base.revision.clone();
        let base_weights_blake3 = base.weights.first().map(|w| ctx.env.hash_file(w)).transpose()?;
        adapter::save(&ctx.out, &cfg, &tensors, base_weights_blake3.as_deref())?;
        let state = trainer.state();
        std::fs::write(ctx.out.join("loss.csv"), plot::loss_csv(&state.log))?;
        let trainer_state = logs::trainer_state(&state.log, state.initial_eval_loss, shape);
        std::fs::write(ctx.out.join("trainer_state.json"), serde_json::to_string_pretty(&trainer_state)? + "\n")?;
        logs::write_tensorboard(&ctx.out.join("runs"), &state.log, state.initial_eval_loss, shape)?;
        plot::loss_curve(
            &ctx.out.join("loss.svg"),
            &format!("{} — LoRA r={} on {}", ctx.name, self.rank, base_id),
            &state.log,
            state.initial_eval_loss,
        )?;
        let mut metrics = serde_json::to_value(summary)?;
        // The process's peak so far: training's, as what ran before it in
        // the same process (planning, small stages) peaks lower.
        if let Some(peak) = crate::report::peak_rss_bytes() {
            metrics["peak_rss_bytes"] = peak.into();
        }
        Ok(metrics)
    }
}

impl Params {
    /// The trainer's configuration these parameters describe.
    pub fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            lora: LoraConfig {
                targets: self.targets.modules(),
                rank: self.rank,
                alpha: self.alpha,
                dropout: self.dropout,
                rslora: self.rslora,
            },
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_eps: self.adam_eps,
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            warmup_ratio: self.warmup_ratio,
            gradient_accumulation: self.gradient_accumulation,
            loss_averaging: self.loss_averaging,
            max_grad_norm: self.max_grad_norm,
            epochs: self.epochs,
            max_steps: self.max_steps,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            gradient_checkpointing: self.gradient_checkpointing,
            seed,
        }
    }
}

/// The run's progress for the reporter and the live TensorBoard file;
/// checkpoints go to the remote cache.
struct Progress<'a> {
    ctx: &'a RunContext<'a>,
    /// Started with the run (its length is known then).
    bar: Option<Box<dyn crate::report::Progress>>,
    live: Option<TensorBoard>,
}

impl<'a> Progress<'a> {
    fn new(ctx: &'a RunContext<'a>, live: Option<TensorBoard>) -> Progress<'a> {
        Progress { ctx, bar: None, live }
    }
}

impl Observer for Progress<'_> {
    fn started(&mut self, step: u64, total: u64) {
        let bar = crate::report::bar(total, "train");
        bar.set_position(step);
        self.bar = Some(bar);
    }

    fn step(&mut self, row: &LogRow, tokens_per_s: f64) -> Result<(), ObserverError> {
        if let Some(bar) = &self.bar {
            let eval = row.eval_loss.map(|l| format!(" eval {l:.4}")).unwrap_or_default();
            bar.set_message(format!("loss {:.4} lr {:.2e} {tokens_per_s:.0} tok/s{eval}", row.loss, row.lr));
            bar.set_position(row.step);
        }
        if let Some(tb) = &mut self.live {
            tb.row(row)?;
        }
        Ok(())
    }

    fn checkpoint(&mut self, dir: &std::path::Path) -> Result<(), ObserverError> {
        Ok(self.ctx.checkpoint_saved(dir)?)
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
