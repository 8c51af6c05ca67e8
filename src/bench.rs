//! `pipeline bench …`: the options into [`pipeline::bench`], its results
//! printed as a table or JSON. The measuring lives in the library.

use anyhow::Result;
use pipeline::bench::{self, Runs};

use crate::args::{BenchCommand, BenchTrainArgs};

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train(args) => train(args),
        BenchCommand::Generate { model, prompt_tokens, new_tokens, f32, batch, device, dataset, json, cache } => {
            let opts = bench::GenerateOptions {
                model,
                prompt_tokens: prompt_tokens.max(32),
                new_tokens: new_tokens.max(2),
                f32,
                batch: batch as usize,
                device,
                dataset,
                cache: cache.location(),
            };
            print_generate(&bench::generate(&opts)?, json)
        }
        BenchCommand::Compare { model, llama_bench, prompt_tokens, new_tokens, repetitions, dataset, json, cache } => {
            let generate = bench::GenerateOptions {
                model,
                prompt_tokens: prompt_tokens.max(32),
                new_tokens: new_tokens.max(2),
                f32: false,
                batch: 1,
                device: "cpu".into(),
                dataset,
                cache: cache.location(),
            };
            let opts = bench::CompareOptions { generate, llama_bench, repetitions: repetitions as usize };
            print_compare(&bench::compare(&opts)?, json)
        }
    }
}

/// `bench train`, or with `--compare-peft` against PyTorch + PEFT.
fn train(a: BenchTrainArgs) -> Result<()> {
    let precision: pipeline::stages::lora_train::PrecisionChoice =
        serde_json::from_value(serde_json::Value::String(a.precision))?;
    let opts = bench::TrainOptions {
        precision: precision.resolve(&a.device),
        model: a.model,
        max_len: a.max_len,
        steps: a.steps.max(1),
        device: a.device,
        dataset: a.dataset,
        cache: a.cache.location(),
        gradient_checkpointing: a.gradient_checkpointing,
    };
    if a.compare_peft {
        print_train_compare(&bench::compare_train(&opts, a.python.as_deref(), a.repetitions as usize)?, a.json)
    } else {
        print_train(&bench::train(&opts)?, a.json)
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn cell(runs: &Runs) -> String {
    format!("{:.1} ± {:.1} tok/s", runs.mean, runs.stddev)
}

/// `bench train`.
fn print_train(r: &bench::TrainBench, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "bench train ({}, {} weights, max_len {}): {:.1} tokens/s, {:.2} s/step, mean {:.0} tokens/step, peak RSS \
         {:.2} GiB\n  cpu: {} ({})",
        r.device,
        r.precision,
        r.max_len,
        r.tokens_per_s,
        r.seconds_per_step,
        r.mean_tokens,
        gib(r.peak_rss_bytes),
        r.cpu,
        r.kernels
    );
    Ok(())
}

/// `bench train --compare-peft`.
fn print_train_compare(r: &bench::TrainCompareBench, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "bench train --compare-peft: {} ({} weights, max_len {}, {} steps of {:.0} tokens on average), {} \
         threads\n  cpu: {} ({})\n  reference: {}",
        r.model, r.precision, r.max_len, r.steps, r.mean_tokens, r.threads, r.cpu, r.kernels, r.peft_versions
    );
    println!("{:<16} {:>22} {:>22} {:>7}", "", "pipeline", "PyTorch + PEFT", "ratio");
    let t = &r.tokens_per_s;
    println!("{:<16} {:>22} {:>22} {:>6.2}×", "training", cell(&t.pipeline), cell(&t.peft), t.ratio);
    let m = &r.peak_rss_bytes;
    println!("{:<16} {:>18.2} GiB {:>18.2} GiB", "peak RSS", gib(m.pipeline), gib(m.peft));
    Ok(())
}

/// `bench generate`.
fn print_generate(r: &bench::GenerateBench, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "bench generate ({}, {} weights): prefill {:.1} tokens/s ({} tokens), decode {:.1} tokens/s ({} tokens), \
         peak RSS {:.2} GiB",
        r.device,
        r.weights,
        r.prefill_tokens_per_s,
        r.prompt_tokens,
        r.decode_tokens_per_s,
        r.new_tokens,
        gib(r.peak_rss_bytes)
    );
    if let (Some(n), Some(t)) = (r.batch, r.batch_decode_tokens_per_s) {
        println!("  batched decoding: {n} sequences, {t:.1} tokens/s in all");
    }
    Ok(())
}

/// `bench compare`.
fn print_compare(r: &bench::CompareBench, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!("bench compare: {} ({}), {} threads; kernels: {}", r.model, r.cpu, r.threads, r.kernels);
    println!("{:<24} {:>20} {:>22} {:>7}", "", "pipeline", format!("llama.cpp {}", r.llama_cpp_build), "ratio");
    for (what, v) in [
        (format!("prefill, {} tokens", r.prompt_tokens), &r.prefill),
        (format!("decode, {} tokens", r.new_tokens), &r.decode),
    ] {
        println!("{what:<24} {:>20} {:>22} {:>6.2}×", cell(&v.pipeline), cell(&v.llama_cpp), v.ratio);
    }
    Ok(())
}
