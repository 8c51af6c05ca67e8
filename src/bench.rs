//! Benchmarks that print tokens/s and peak memory (never timed assertions
//! in tests).
//!
//! `pipeline bench train`: LoRA r=16, α=32 on q,k,v,o,gate,up,down, batch 1,
//! AdamW, on tool-use examples tokenized at `max_len` by the real data
//! stages (cached in the normal cache), the same setup as the PyTorch + PEFT
//! reference numbers in `../shared/reference/numbers.md`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::model_source::ResolvedModel;
use crate::recipe::Recipe;
use crate::stages::tokenize::TokenizedSplit;
use crate::train::optim::AdamW;
use crate::train::{DataOrder, SeededDropout, attach_lora, example_loss};

/// What `bench train --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub max_len: usize,
    pub mean_tokens: f64,
    pub steps: usize,
    pub seconds_per_step: f64,
    pub device: String,
}

/// Options of `bench train`.
pub struct TrainOptions {
    pub model: PathBuf,
    pub max_len: usize,
    pub steps: usize,
    pub device: String,
    pub dataset: String,
    pub cache_dir: PathBuf,
}

pub fn train(opts: &TrainOptions) -> Result<TrainBench> {
    let split = tokenized_examples(opts)?;
    let device = crate::model::device(&opts.device)?;
    let resolved = ResolvedModel::from_path(&opts.model)?;
    let mut model = crate::model::load(&resolved, &device, opts.max_len)?;
    let targets: Vec<String> = crate::model::TARGETS.iter().map(|s| s.to_string()).collect();
    let (params, _) = attach_lora(model.as_mut(), &targets, 16, 32.0 / 16.0, 0.05, 0)?;
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut order = DataOrder::new(0, split.len());

    // One warm-up step, then the measured ones.
    let pb = crate::progress::bar(opts.steps as u64 + 1, "bench train");
    let (mut tokens, mut seconds) = (0usize, 0f64);
    for step in 0..=opts.steps {
        let (_, idx) = order.get(step as u64);
        let (ids, mask) = split.example(idx);
        let t0 = Instant::now();
        let dropout = SeededDropout::new(0, step as u64, 0);
        let (loss, _) = example_loss(model.as_ref(), ids, mask, Some(&dropout))?;
        let grads = loss.backward()?;
        let grads = params.iter().filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone()))).collect();
        opt.step(&params, &grads, 1e-4)?;
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if step > 0 {
            tokens += ids.len();
            seconds += dt;
            pb.set_message(format!("{:.0} tok/s", tokens as f64 / seconds));
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(TrainBench {
        tokens_per_s: tokens as f64 / seconds,
        peak_rss_bytes: peak_rss_bytes(),
        max_len: opts.max_len,
        mean_tokens: tokens as f64 / opts.steps as f64,
        steps: opts.steps,
        seconds_per_step: seconds / opts.steps as f64,
        device: opts.device.clone(),
    })
}

/// Runs fetch → format → tokenize for the benchmark dataset (cached).
fn tokenized_examples(opts: &TrainOptions) -> Result<TokenizedSplit> {
    let model = std::fs::canonicalize(&opts.model).with_context(|| format!("no model at {}", opts.model.display()))?;
    let text = format!(
        r#"[recipe]
name = "bench-train"
[model]
base = {model:?}
[stages.data]
kind = "fetch-dataset"
source = {dataset:?}
splits = ["train"]
[stages.chat]
kind = "format-chat"
dataset = "data"
messages_column = "trace"
first_user_is_system = true
[stages.tokens]
kind = "tokenize"
conversations = "chat"
max_len = {max_len}
"#,
        model = model.display().to_string(),
        dataset = opts.dataset,
        max_len = opts.max_len
    );
    let recipe = Recipe::parse(&text, Path::new("bench-train.toml"), &[])?;
    let exec = crate::Executor::new(&opts.cache_dir)?;
    exec.run(&recipe, Some("tokens"))?;
    let plan = exec.plan(&recipe, Some("tokens"))?;
    let entry = exec.store().entry_dir(&plan.stage("tokens").expect("planned").key);
    TokenizedSplit::load(&entry.join("tokens/train.safetensors"))
}

/// Peak resident memory of this process (Linux: `VmHWM`), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
