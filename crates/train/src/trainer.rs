//! The training loop: LoRA on a causal LM, one example per micro-batch.
//!
//! [`Trainer::run`] reads top to bottom: evaluate once, then for each
//! optimizer step accumulate the gradients of `gradient_accumulation`
//! examples, clip their global norm, take an AdamW step at the scheduled
//! learning rate, log, evaluate and checkpoint now and then. Everything
//! random is derived from the seed (see the crate docs), so a run resumed
//! from a checkpoint ([`Trainer::resume`]) computes what the uninterrupted
//! run computes.
//!
//! ```no_run
//! # fn main() -> pipeline_train::Result<()> {
//! use pipeline_train::{TrainConfig, Trainer, TokenizedSplit};
//! let files = pipeline_model::ModelFiles::from_dir("gemma", "models/gemma-3-270m".as_ref())?;
//! let model = pipeline_model::load(&files, &candle_core::Device::Cpu, 2048)?;
//! let train = TokenizedSplit::load("train.safetensors".as_ref())?;
//! let mut trainer = Trainer::new(model, train, None, TrainConfig { max_steps: Some(60), ..TrainConfig::default() })?;
//! trainer.run(None, &mut ())?;
//! trainer.save_adapter("adapter".as_ref(), "google/gemma-3-270m")?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use pipeline_fs::IoContext;

use crate::error::{Error, Result, bad_file};
use candle_core::{Tensor, Var};
use pipeline_model::CausalLm;
use pipeline_model::adapter::{self, AdapterConfig, LoraTensors};
use serde::Serialize;

use crate::checkpoint::{self, LogRow, State};
use crate::collective::{Collective, Single, my_share};
use crate::optim::{AdamW, Schedule, learning_rate};
use crate::{DataOrder, SeededDropout, TokenizedSplit, attach_lora, example_grads, example_loss};

/// Which modules get LoRA matrices, and their shape.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Short module names (`q_proj`, …); default: every linear layer.
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f64,
    /// Scale by α/√r instead of α/r (rsLoRA).
    pub rslora: bool,
}

impl Default for LoraConfig {
    /// PEFT's usual choice for small models: r = 16, α = 32 on all linears.
    fn default() -> Self {
        let targets = pipeline_model::TARGETS.iter().map(|s| s.to_string()).collect();
        LoraConfig { targets, rank: 16, alpha: 32.0, dropout: 0.05, rslora: false }
    }
}

impl LoraConfig {
    /// The adapter files' configuration for a base model id.
    pub fn adapter_config(&self, base: &str, targets: Vec<String>) -> AdapterConfig {
        AdapterConfig::lora(base, self.rank, self.alpha, self.dropout, targets, self.rslora)
    }
}

/// Everything a training run is configured by (no recipe involved: the
/// `lora-train` stage maps its parameters onto this). Defaults follow
/// PEFT + TRL.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Learning-rate schedule after warmup.
    pub schedule: Schedule,
    /// Warmup steps; when 0, `warmup_ratio` of all steps.
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    /// Examples per optimizer step.
    pub gradient_accumulation: usize,
    /// How the examples of one optimizer step are averaged.
    pub loss_averaging: LossAveraging,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Passes over the training examples.
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    /// Validation loss every N steps (0: only before and after training).
    pub eval_every: usize,
    /// A resumable checkpoint every N steps (when `run` is given a work dir).
    pub checkpoint_every: usize,
    /// Keep only each layer's input in the forward pass and recompute the
    /// layer in the backward pass (much less memory, one more forward pass).
    pub gradient_checkpointing: bool,
    /// Seed of the data order, dropout masks and LoRA initialisation.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora: LoraConfig::default(),
            learning_rate: 2e-4,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            schedule: Schedule::default(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            gradient_accumulation: 1,
            loss_averaging: LossAveraging::Example,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            eval_every: 0,
            checkpoint_every: 20,
            gradient_checkpointing: false,
            seed: 42,
        }
    }
}

/// How the loss of one optimizer step averages its examples' tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LossAveraging {
    /// Each example's mean over its supervised tokens, then the mean over
    /// the step's examples: every example weighs the same, however long
    /// its answer (transformers before 4.46 with gradient accumulation).
    #[default]
    Example,
    /// The mean over every supervised token of the step's examples: every
    /// token weighs the same (transformers since 4.46, `num_items_in_batch`).
    /// A long answer no longer dilutes its first tokens against a short one.
    Token,
}

impl LossAveraging {
    /// Whether this is the default (left out of cache keys).
    pub fn is_default(&self) -> bool {
        *self == LossAveraging::Example
    }
}

/// Told about a run as it goes (progress, remote copies of checkpoints).
pub trait Observer {
    /// Training starts at `step` (non-zero after a resume) of `total`.
    fn started(&mut self, _step: u64, _total: u64) {}
    /// After each optimizer step; `tokens_per_s` over this run so far.
    fn step(&mut self, _row: &LogRow, _tokens_per_s: f64) -> Result<(), ObserverError> {
        Ok(())
    }
    /// After a checkpoint was written to `dir`.
    fn checkpoint(&mut self, _dir: &Path) -> Result<(), ObserverError> {
        Ok(())
    }
}

/// What an observer may fail with (any error; `anyhow::Error` converts
/// with `.into()`).
pub type ObserverError = Box<dyn std::error::Error + Send + Sync>;

/// No observer.
impl Observer for () {}

/// What a finished run reports (the `lora-train` stage's metrics).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub trainable_parameters: usize,
    pub modules: usize,
    /// Mean training loss of the last ten steps.
    pub train_loss_last10: f64,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    pub resumed_from_step: Option<u64>,
    pub seconds_this_run: f64,
    pub tokens_per_s_this_run: f64,
    /// Data-parallel ranks the run was trained on (1: one process).
    pub world_size: usize,
}

/// One LoRA training run: the model with its adapter, the optimizer, the
/// data, and where the run stands.
pub struct Trainer {
    cfg: TrainConfig,
    model: Box<dyn CausalLm>,
    /// (PEFT-style name `<module>.lora_A` / `.lora_B`, variable).
    params: Vec<(String, Var)>,
    modules: Vec<String>,
    opt: AdamW,
    train: TokenizedSplit,
    eval: Option<TokenizedSplit>,
    order: DataOrder,
    state: State,
    total_steps: u64,
    warmup: u64,
    resumed_from: Option<u64>,
    /// The ranks this run is split over ([`Single`]: one process).
    world: Rc<dyn Collective>,
}

impl Trainer {
    /// Attaches fresh LoRA matrices to `model` and prepares a run over
    /// `train` (validation loss on `eval`, when given).
    pub fn new(
        mut model: Box<dyn CausalLm>,
        train: TokenizedSplit,
        eval: Option<TokenizedSplit>,
        cfg: TrainConfig,
    ) -> Result<Trainer> {
        if train.is_empty() {
            return Err(Error::Config("no training examples".into()));
        }
        let longest = train.longest().max(eval.as_ref().map_or(0, TokenizedSplit::longest));
        if longest > model.max_position_embeddings() {
            return Err(Error::Config(format!(
                "examples are up to {longest} tokens but the model's context is {}; lower `max_len` of the tokenize stage",
                model.max_position_embeddings()
            )));
        }
        let l = &cfg.lora;
        let scale = l.adapter_config("", vec![]).scale();
        let (params, modules) = attach_lora(model.as_mut(), &l.targets, l.rank, scale, l.dropout as f32, cfg.seed)?;
        if modules.is_empty() {
            return Err(Error::Config(format!("targets {:?} match no module of this model", l.targets)));
        }
        let per_epoch = train.len().div_ceil(cfg.gradient_accumulation) as u64;
        let total_steps = cfg.max_steps.map_or(per_epoch * cfg.epochs as u64, |s| s as u64);
        let warmup = if cfg.warmup_steps > 0 {
            cfg.warmup_steps as u64
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as u64
        };
        let opt = AdamW::new(cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay);
        let order = DataOrder::new(cfg.seed, train.len());
        let state = State { step: 0, log: vec![], initial_eval_loss: None };
        Ok(Trainer {
            cfg,
            model,
            params,
            modules,
            opt,
            train,
            eval,
            order,
            state,
            total_steps,
            warmup,
            resumed_from: None,
            world: Rc::new(Single),
        })
    }

    /// Splits each optimizer step's examples over `world`'s ranks
    /// (data-parallel training): rank `r` computes micro-batches `m` with
    /// `m % size == r`, and their gradients are summed over the ranks before
    /// the optimizer step. Every rank computes the same step, so N ranks
    /// give the adapter one process gives, up to the order of the gradient
    /// sums (see `docs/distributed.md`). Only rank 0 should be given a
    /// work dir and an observer.
    pub fn with_world(mut self, world: Rc<dyn Collective>) -> Trainer {
        if world.size() > 1 {
            tracing::info!(
                ranks = world.size(),
                engine = world.engine(),
                bytes_per_step = self.all_reduced_bytes_per_step(),
                "data-parallel training"
            );
        }
        self.world = world;
        self
    }

    /// What one optimizer step all-reduces: every LoRA gradient (f32) and,
    /// in f64, each micro-batch's loss, scored and read tokens, and which
    /// parameters have a gradient.
    pub fn all_reduced_bytes_per_step(&self) -> usize {
        4 * self.trainable_parameters() + 8 * (3 * self.cfg.gradient_accumulation + self.params.len())
    }

    /// Continues from the newest checkpoint in `work`, if it has one;
    /// returns its step.
    ///
    /// With several ranks, rank 0's newest checkpoint is sent to the others
    /// (their `work` is their own scratch directory), so that every rank
    /// starts from the same step whether or not they share a disk.
    pub fn resume(&mut self, work: &Path) -> Result<Option<u64>> {
        if self.world.size() > 1 {
            let mut packed = match (self.world.rank(), checkpoint::latest(work)) {
                (0, Some((_, dir))) => checkpoint::pack(&dir)?,
                _ => vec![],
            };
            self.world.broadcast_bytes(&mut packed)?;
            if packed.is_empty() {
                return Ok(None);
            }
            if self.world.rank() != 0 {
                checkpoint::unpack(work, &packed)?;
            }
        }
        let Some((step, dir)) = checkpoint::latest(work) else { return Ok(None) };
        let device = self.model.device().clone();
        let saved = candle_core::safetensors::load(dir.join("adapter.safetensors"), &device)?;
        for (name, var) in &self.params {
            let t = saved.get(name).ok_or_else(|| bad_file(&dir, format!("the checkpoint lacks `{name}`")))?;
            var.set(t)?;
        }
        self.opt.load(&dir.join("optimizer.safetensors"), &device)?;
        self.state = checkpoint::load_state(&dir)?;
        self.resumed_from = Some(step);
        tracing::info!(step, "resumed from checkpoint");
        Ok(Some(step))
    }

    /// Trains to the last step. With `work`, writes a checkpoint every
    /// `checkpoint_every` steps and at the end (call [`Trainer::resume`]
    /// first to continue an interrupted run).
    pub fn run(&mut self, work: Option<&Path>, observer: &mut dyn Observer) -> Result<Summary> {
        if self.state.initial_eval_loss.is_none() {
            self.state.initial_eval_loss = self.eval_loss()?;
        }
        tracing::info!(
            steps = self.total_steps,
            trainable = self.trainable_parameters(),
            modules = self.modules.len(),
            "training"
        );
        observer.started(self.state.step, self.total_steps);
        let started = Instant::now();
        let mut tokens_seen = 0u64;
        while self.state.step < self.total_steps {
            let (mut row, tokens) = self.step().map_err(|e| match (e, work) {
                (Error::Diverged { value, step, example, .. }, Some(w)) => {
                    let kept = checkpoint::latest(w).map_or("none".to_string(), |(s, _)| format!("step {s}"));
                    Error::Diverged { value, step, example, kept: Some(kept) }
                }
                (e, _) => e,
            })?;
            tokens_seen += tokens;
            let done = row.step;
            let every = self.cfg.eval_every as u64;
            if done == self.total_steps || (every > 0 && done % every == 0) {
                row.eval_loss = self.eval_loss()?;
            }
            observer.step(&row, tokens_seen as f64 / started.elapsed().as_secs_f64()).map_err(Error::Observer)?;
            self.state.log.push(row);
            if let Some(work) = work
                && (done % self.cfg.checkpoint_every.max(1) as u64 == 0 || done == self.total_steps)
            {
                let dir = self.save_checkpoint(work)?;
                observer.checkpoint(&dir).map_err(Error::Observer)?;
            }
            pipeline_fs::fault::point(&format!("lora-train.step-{done}"));
        }
        let seconds = started.elapsed().as_secs_f64();
        let last: Vec<f64> = self.state.log.iter().rev().take(10).map(|r| r.loss).collect();
        Ok(Summary {
            steps: self.total_steps,
            trainable_parameters: self.trainable_parameters(),
            modules: self.modules.len(),
            train_loss_last10: last.iter().sum::<f64>() / last.len().max(1) as f64,
            eval_loss_before: self.state.initial_eval_loss,
            eval_loss_after: self.state.log.last().and_then(|r| r.eval_loss),
            resumed_from_step: self.resumed_from,
            seconds_this_run: seconds,
            tokens_per_s_this_run: tokens_seen as f64 / seconds.max(1e-9),
            world_size: self.world.size(),
        })
    }

    /// One optimizer step over `gradient_accumulation` examples; returns its
    /// log row (without validation loss) and the tokens it read.
    pub fn step(&mut self) -> Result<(LogRow, u64)> {
        let step = self.state.step;
        let lr = learning_rate(
            self.cfg.schedule,
            self.cfg.learning_rate,
            step as usize,
            self.total_steps as usize,
            self.warmup as usize,
        );
        let accum = self.cfg.gradient_accumulation as u64;
        let examples: Vec<(u64, usize)> = (0..accum).map(|micro| self.order.get(step * accum + micro)).collect();
        // Each example's weight in the step's loss.
        let weights: Vec<f64> = match self.cfg.loss_averaging {
            LossAveraging::Example => vec![1.0 / accum as f64; examples.len()],
            LossAveraging::Token => {
                let scored = |idx: usize| self.train.example(idx).1[1..].iter().filter(|&&m| m == 1).count() as f64;
                let counts: Vec<f64> = examples.iter().map(|&(_, idx)| scored(idx)).collect();
                let total = counts.iter().sum::<f64>().max(1.0);
                counts.iter().map(|n| n / total).collect()
            }
        };
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        // Each micro-batch's loss, scored tokens and read tokens (zero where
        // another rank computes it).
        let mut per_micro = vec![0f64; 3 * examples.len()];
        let (rank, size) = (self.world.rank(), self.world.size());
        for (micro, (&(_, idx), &weight)) in examples.iter().zip(&weights).enumerate() {
            if !my_share(micro, rank, size) {
                continue;
            }
            let (ids, mask) = self.train.example(idx);
            let dropout = SeededDropout::new(self.cfg.seed, step, micro as u64);
            let (value, n, micro_grads) = example_grads(
                self.model.as_ref(),
                ids,
                mask,
                Some(&dropout),
                weight,
                &self.params,
                self.cfg.gradient_checkpointing,
            )?;
            per_micro[3 * micro..3 * micro + 3].copy_from_slice(&[value, n as f64, ids.len() as f64]);
            if !value.is_finite() {
                continue; // reported below, by every rank once the sums are made
            }
            for (name, g) in micro_grads {
                let sum = match grads.remove(&name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                grads.insert(name, sum);
            }
        }
        if size > 1 {
            self.world.all_reduce_sum_f64(&mut per_micro)?;
            self.sum_over_ranks(&mut grads)?;
        }
        // Summed in micro-batch order, whichever rank computed each: the
        // logged loss does not depend on the number of ranks.
        let (mut loss_sum, mut supervised, mut tokens) = (0f64, 0u64, 0u64);
        for (micro, &weight) in weights.iter().enumerate() {
            let [value, n, read] = per_micro[3 * micro..3 * micro + 3] else { unreachable!() };
            if !value.is_finite() {
                let example = self.train.ids[examples[micro].1].clone();
                return Err(Error::Diverged { value, step: step + 1, example, kept: None });
            }
            loss_sum += value * weight;
            supervised += n as u64;
            tokens += read as u64;
        }
        let epoch = examples.last().map_or(0, |&(e, _)| e);
        let grad_norm = crate::optim::clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        self.opt.step(&self.params, &grads, lr)?;
        self.state.step = step + 1;
        let row = LogRow {
            step: step + 1,
            epoch,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens: supervised,
            eval_loss: None,
            time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs_f64()),
        };
        Ok((row, tokens))
    }

    /// Token-weighted mean loss over the validation examples (no dropout),
    /// the examples split over the ranks.
    pub fn eval_loss(&self) -> Result<Option<f64>> {
        let Some(eval) = &self.eval else { return Ok(None) };
        let (rank, size) = (self.world.rank(), self.world.size());
        // (loss, scored tokens) of each example, zero where another rank
        // computes it; summed in example order below.
        let mut per_example = vec![0f64; 2 * eval.len()];
        for i in (0..eval.len()).filter(|&i| my_share(i, rank, size)) {
            let (ids, mask) = eval.example(i);
            let (loss, n) = example_loss(self.model.as_ref(), ids, mask, None)?;
            per_example[2 * i] = loss.to_scalar::<f32>()? as f64;
            per_example[2 * i + 1] = n as f64;
        }
        self.world.all_reduce_sum_f64(&mut per_example)?;
        let (mut total, mut count) = (0f64, 0usize);
        for pair in per_example.chunks(2) {
            total += pair[0] * pair[1];
            count += pair[1] as usize;
        }
        Ok(Some(total / count.max(1) as f64))
    }

    /// Replaces each rank's gradient sums by their sum over all ranks (one
    /// flat f32 all-reduce, in parameter order); a parameter no rank has a
    /// gradient for stays without one, as on one process.
    fn sum_over_ranks(&self, grads: &mut HashMap<String, Tensor>) -> Result<()> {
        let sizes: Vec<usize> = self.params.iter().map(|(_, v)| v.elem_count()).collect();
        let mut flat = Vec::with_capacity(sizes.iter().sum());
        let mut present = vec![0f64; self.params.len()];
        for ((name, _), (&n, has)) in self.params.iter().zip(sizes.iter().zip(present.iter_mut())) {
            match grads.get(name) {
                Some(g) => {
                    flat.extend(g.flatten_all()?.to_vec1::<f32>()?);
                    *has = 1.0;
                }
                None => flat.resize(flat.len() + n, 0.0),
            }
        }
        self.world.all_reduce_sum_f32(&mut flat)?;
        self.world.all_reduce_sum_f64(&mut present)?;
        grads.clear();
        let mut at = 0;
        for ((name, var), (&n, &has)) in self.params.iter().zip(sizes.iter().zip(present.iter())) {
            if has > 0.0 {
                let t = Tensor::from_slice(&flat[at..at + n], var.shape(), var.device())?;
                grads.insert(name.clone(), t);
            }
            at += n;
        }
        Ok(())
    }

    /// Writes a checkpoint of the current step into `work`.
    pub fn save_checkpoint(&self, work: &Path) -> Result<PathBuf> {
        checkpoint::save(work, &self.state, |dir| {
            let named: HashMap<String, Tensor> =
                self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            candle_core::safetensors::save(&named, dir.join("adapter.safetensors"))?;
            self.opt.save(&dir.join("optimizer.safetensors"))
        })
    }

    /// The adapter as PEFT files describe it, for base model id `base`.
    pub fn adapter(&self, base: &str) -> (AdapterConfig, LoraTensors) {
        let mut targets: Vec<String> =
            self.modules.iter().filter_map(|m| m.rsplit('.').next().map(str::to_string)).collect();
        targets.sort();
        targets.dedup();
        let cfg = self.cfg.lora.adapter_config(base, targets);
        let mut tensors = LoraTensors::new();
        // `attach_lora` lists each module's A, then its B.
        for pair in self.params.chunks(2) {
            let module = pair[0].0.trim_end_matches(".lora_A").to_string();
            tensors.insert(module, (pair[0].1.as_tensor().clone(), pair[1].1.as_tensor().clone()));
        }
        (cfg, tensors)
    }

    /// Writes the adapter in PEFT's layout (`adapter_model.safetensors`,
    /// `adapter_config.json`) into `dir` (created if missing).
    pub fn save_adapter(&self, dir: &Path, base: &str) -> Result<()> {
        let (cfg, tensors) = self.adapter(base);
        std::fs::create_dir_all(dir).on("create", dir)?;
        Ok(adapter::save(dir, &cfg, &tensors, None)?)
    }

    pub fn state(&self) -> &State {
        &self.state
    }
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }
    /// Optimizer steps in one pass over the training examples.
    pub fn steps_per_epoch(&self) -> u64 {
        self.train.len().div_ceil(self.cfg.gradient_accumulation) as u64
    }
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }
    /// The adapted modules' paths (`model.layers.3.self_attn.q_proj`).
    pub fn modules(&self) -> &[String] {
        &self.modules
    }
    pub fn trainable_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::threads::Threads;

    /// A tiny random Gemma 3 in `dir` (the tokenizer files are stand-ins:
    /// training reads token ids only).
    fn write_tiny_model(dir: &Path) {
        let tok = dir.join("tokenizer");
        std::fs::create_dir_all(&tok).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::write(tok.join(f), "{}").unwrap();
        }
        pipeline_model::testing::TinyGemma3::new(96).write(&dir.join("model"), &tok, 3).unwrap();
    }

    fn tiny_model(dir: &Path) -> Box<dyn CausalLm> {
        let files = pipeline_model::ModelFiles::from_dir("tiny", &dir.join("model")).unwrap();
        pipeline_model::load(&files, &candle_core::Device::Cpu, 64).unwrap()
    }

    fn split(n: usize, seed: u64) -> TokenizedSplit {
        use rand::Rng;
        let mut rng = crate::rng_for(seed, "test-split", 0, 0);
        TokenizedSplit::from_examples((0..n).map(|i| {
            let len = rng.random_range(6..20);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..96)).collect();
            let mask: Vec<u8> = (0..len).map(|p| u8::from(p >= len / 3)).collect();
            (format!("ex-{i}"), ids, mask)
        }))
    }

    fn config(accumulation: usize, steps: usize) -> TrainConfig {
        let lora = LoraConfig { rank: 4, ..LoraConfig::default() };
        TrainConfig {
            lora,
            learning_rate: 1e-2,
            schedule: crate::optim::Schedule::Constant,
            gradient_accumulation: accumulation,
            max_steps: Some(steps),
            eval_every: 2,
            checkpoint_every: 2,
            ..TrainConfig::default()
        }
    }

    /// The log and the adapter's values (modules in order) of one run.
    type Outcome = (Vec<LogRow>, Vec<f32>);

    /// The log (without wall-clock times) and the adapter's values.
    fn outcome(t: &Trainer) -> Outcome {
        let values = t.params.iter().flat_map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (t.state().log.iter().map(|r| LogRow { time: None, ..r.clone() }).collect(), values)
    }

    fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
        assert_eq!(a.0, b.0, "{what}: the logs");
        assert!(a.1 == b.1, "{what}: the adapters differ");
    }

    /// `ranks` threads train together; rank 0 checkpoints into `work`.
    fn data_parallel(dir: &Path, ranks: usize, cfg: &TrainConfig, work: &Path, resume: bool) -> Vec<Outcome> {
        std::thread::scope(|s| {
            let handles: Vec<_> = Threads::group(ranks)
                .into_iter()
                .map(|world| {
                    let cfg = cfg.clone();
                    s.spawn(move || {
                        let rank = world.rank();
                        let scratch = tempfile::tempdir().unwrap();
                        let own = if rank == 0 { work.to_path_buf() } else { scratch.path().to_path_buf() };
                        let mut t = Trainer::new(tiny_model(dir), split(10, 1), Some(split(3, 2)), cfg)
                            .unwrap()
                            .with_world(Rc::new(world));
                        if resume {
                            t.resume(&own).unwrap();
                        }
                        t.run((rank == 0).then_some(own.as_path()), &mut ()).unwrap();
                        outcome(&t)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn assert_close(a: &Outcome, b: &Outcome, what: &str) {
        assert_eq!(a.0.len(), b.0.len(), "{what}: steps");
        for (x, y) in a.0.iter().zip(&b.0) {
            assert_eq!((x.step, x.epoch, x.tokens), (y.step, y.epoch, y.tokens), "{what}");
            assert!(
                (x.loss - y.loss).abs() <= 1e-5 * x.loss.abs(),
                "{what}: step {} loss {} vs {}",
                x.step,
                x.loss,
                y.loss
            );
            if let (Some(p), Some(q)) = (x.eval_loss, y.eval_loss) {
                assert!((p - q).abs() <= 1e-5 * p.abs(), "{what}: eval loss {p} vs {q}");
            }
        }
        let scale = a.1.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.1.iter().zip(&b.1).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-5 * scale, "{what}: the adapters differ by {worst} (largest value {scale})");
    }

    /// Two and three ranks, each computing its share of every optimizer
    /// step's examples, train the adapter one process trains; the first
    /// step's loss is the same to the bit (it is summed in example order),
    /// the rest differ only by the order the gradient sums were added in.
    #[test]
    fn ranks_sharing_each_step_train_what_one_process_trains() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path());
        for accumulation in [4, 3] {
            let cfg = config(accumulation, 4);
            let mut one = Trainer::new(tiny_model(dir.path()), split(10, 1), Some(split(3, 2)), cfg.clone()).unwrap();
            one.run(None, &mut ()).unwrap();
            let one = outcome(&one);
            for ranks in [2, 3] {
                let work = tempfile::tempdir().unwrap();
                let all = data_parallel(dir.path(), ranks, &cfg, work.path(), false);
                for (rank, o) in all.iter().enumerate() {
                    assert_close(&one, o, &format!("accumulation {accumulation}, rank {rank} of {ranks}"));
                    assert_same(o, &all[0], "every rank ends with the same adapter");
                }
                assert_eq!(all[0].0[0].loss, one.0[0].loss, "the first step's loss, to the bit");
                assert!(checkpoint::latest(work.path()).is_some(), "rank 0 wrote checkpoints");
            }
        }
    }

    /// A loss that stops being a number stops the run at the same step and
    /// example on one process and on every rank of two.
    #[test]
    fn divergence_is_reported_alike_by_one_process_and_by_every_rank() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path());
        let cfg = TrainConfig { learning_rate: 1e30, max_grad_norm: 0.0, ..config(4, 6) };
        let diverged = |r: Result<Summary>| match r {
            Err(Error::Diverged { step, example, .. }) => (step, example),
            other => panic!("expected divergence, got {:?}", other.map(|s| s.steps)),
        };
        let mut one = Trainer::new(tiny_model(dir.path()), split(10, 1), None, cfg.clone()).unwrap();
        let want = diverged(one.run(None, &mut ()));
        std::thread::scope(|s| {
            for world in Threads::group(2) {
                let (cfg, want) = (cfg.clone(), want.clone());
                let dir = dir.path();
                s.spawn(move || {
                    let mut t =
                        Trainer::new(tiny_model(dir), split(10, 1), None, cfg).unwrap().with_world(Rc::new(world));
                    assert_eq!(diverged(t.run(None, &mut ())), want);
                });
            }
        });
    }

    /// Rank 0's checkpoint reaches the other ranks: stopped at step 2 and
    /// resumed, two ranks end where an uninterrupted run ends.
    #[test]
    fn a_resumed_data_parallel_run_starts_every_rank_from_rank_0s_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path());
        let work = tempfile::tempdir().unwrap();
        let straight = data_parallel(dir.path(), 2, &config(4, 4), tempfile::tempdir().unwrap().path(), false);
        data_parallel(dir.path(), 2, &config(4, 2), work.path(), false);
        // The same run to step 4, from the checkpoint at 2 (a constant
        // learning rate: a 2-step run's checkpoint is a 4-step run's).
        let resumed = data_parallel(dir.path(), 2, &config(4, 4), work.path(), true);
        assert_eq!(resumed[0].0.len(), 4, "the log continues the checkpoint's");
        assert_same(&resumed[0], &resumed[1], "both ranks resumed from the same state");
        assert_close(&straight[0], &resumed[0], "resumed");
    }
}
