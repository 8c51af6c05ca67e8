//! Benchmarks that print tokens/s and peak memory (never timed assertions
//! in tests).
//!
//! `pipeline bench train`: the real [`Trainer`] (LoRA r=16, α=32 on
//! q,k,v,o,gate,up,down, batch 1, AdamW, gradient clipping) on tool-use examples tokenized at `max_len` by the real data
//! stages (cached in the normal cache), the same setup as the PyTorch + PEFT
//! reference numbers in `../shared/reference/numbers.md`; with
//! `--compare-peft` it also runs that reference (`scripts/peft_bench.py`,
//! PyTorch + transformers + PEFT) on the same examples in the same minutes.
//! `pipeline bench generate` and `bench compare` (against llama.cpp's
//! `llama-bench`): prefill and decode.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::executor::Finished;
use crate::recipe::Recipe;
use pipeline_train::{TokenizedSplit, TrainConfig, Trainer};

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
    /// The frozen weights' format: `f32` or `bf16`.
    pub precision: String,
    /// The CPU's model name.
    pub cpu: String,
    /// The instruction paths the kernels took ([`pipeline_model::cpu_paths`]).
    pub kernels: String,
}

/// Options of `bench train`.
pub struct TrainOptions {
    pub model: PathBuf,
    pub max_len: usize,
    pub steps: usize,
    pub device: String,
    pub dataset: String,
    pub cache: crate::executor::CacheLocation,
    pub gradient_checkpointing: bool,
    pub precision: pipeline_model::Precision,
}

pub fn train(opts: &TrainOptions) -> Result<TrainBench> {
    let split = tokenized_examples(&opts.model, &opts.dataset, opts.max_len, &opts.cache)?;
    let device = pipeline_model::device(&opts.device)?;
    let files = crate::model_source::from_path(&opts.model)?;
    let model = pipeline_model::load_in(&files, &device, opts.max_len, opts.precision)?;
    // The trainer users run, as the quickstart configures it (r = 16, α = 32
    // on all linears, AdamW, clipping), with a constant learning rate.
    let cfg = TrainConfig {
        learning_rate: 1e-4,
        gradient_checkpointing: opts.gradient_checkpointing,
        max_steps: Some(opts.steps + 1),
        seed: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, split, None, cfg)?;

    // One warm-up step, then the measured ones.
    let pb = crate::report::bar(opts.steps as u64 + 1, "bench train");
    let (mut tokens, mut seconds) = (0u64, 0f64);
    for step in 0..=opts.steps {
        let t0 = Instant::now();
        let (_, n) = trainer.step()?;
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if step > 0 {
            tokens += n;
            seconds += dt;
            pb.set_message(format!("{:.0} tok/s", tokens as f64 / seconds));
        }
        pb.inc(1);
    }
    pb.finish();
    Ok(TrainBench {
        tokens_per_s: tokens as f64 / seconds,
        peak_rss_bytes: peak_rss_bytes(),
        max_len: opts.max_len,
        mean_tokens: tokens as f64 / opts.steps as f64,
        steps: opts.steps,
        seconds_per_step: seconds / opts.steps as f64,
        device: opts.device.clone(),
        precision: opts.precision.name().into(),
        cpu: cpu_name(),
        kernels: pipeline_model::cpu_paths(),
    })
}

/// What `bench train --compare-peft --json` prints: our trainer and
/// PyTorch + PEFT on the same examples, alternating run by run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainCompareBench {
    pub model: String,
    pub cpu: String,
    pub kernels: String,
    pub threads: usize,
    pub max_len: usize,
    pub steps: usize,
    pub mean_tokens: f64,
    pub precision: String,
    pub gradient_checkpointing: bool,
    /// torch, transformers and peft versions of the reference.
    pub peft_versions: String,
    pub tokens_per_s: PeftVersus,
    /// The largest peak of each side's runs.
    pub peak_rss_bytes: Both<u64>,
}

/// Training tokens/s of both.
#[derive(Debug, Clone, Serialize)]
pub struct PeftVersus {
    pub pipeline: Runs,
    pub peft: Runs,
    /// `pipeline.mean / peft.mean`.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Both<T> {
    pub pipeline: T,
    pub peft: T,
}

/// The reference script, embedded so that an installed binary runs it too.
const PEFT_BENCH: &str = include_str!("../../../scripts/peft_bench.py");

/// [`train`] and `scripts/peft_bench.py` (PyTorch + transformers + PEFT)
/// on the examples our trainer takes at steps 0..=steps (seed 0, batch 1,
/// the first a warm-up), in its order, alternating `repetitions` times.
pub fn compare_train(opts: &TrainOptions, python: Option<&Path>, repetitions: usize) -> Result<TrainCompareBench> {
    let python = find_torch_python(python)?;
    let split = tokenized_examples(&opts.model, &opts.dataset, opts.max_len, &opts.cache)?;
    let mut order = pipeline_train::DataOrder::new(0, split.len());
    let examples: Vec<serde_json::Value> = (0..=opts.steps as u64)
        .map(|step| {
            let (ids, mask) = split.example(order.get(step).1);
            serde_json::json!({"input_ids": ids, "loss_mask": mask})
        })
        .collect();
    let examples = serde_json::to_vec(&examples)?;
    let threads = candle_core::utils::get_num_threads();
    let pb = crate::report::bar(repetitions as u64 * 2, "bench train --compare-peft");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..repetitions.max(1) {
        pb.set_message("pipeline".into());
        ours.push(train(opts)?);
        pb.inc(1);
        pb.set_message("PyTorch + PEFT".into());
        theirs.push(run_peft_bench(&python, opts, threads, &examples)?);
        pb.inc(1);
    }
    pb.finish();
    let (first, reference) = (&ours[0], &theirs[0]);
    anyhow::ensure!(
        (first.mean_tokens - reference.mean_tokens).abs() < 0.5,
        "PEFT trained {:.1} tokens per step where we trained {:.1}: not the same examples",
        reference.mean_tokens,
        first.mean_tokens
    );
    let pipeline = Runs::new(ours.iter().map(|r| r.tokens_per_s).collect());
    let peft = Runs::new(theirs.iter().map(|r| r.tokens_per_s).collect());
    Ok(TrainCompareBench {
        model: opts.model.display().to_string(),
        cpu: first.cpu.clone(),
        kernels: first.kernels.clone(),
        threads,
        max_len: opts.max_len,
        steps: opts.steps,
        mean_tokens: first.mean_tokens,
        precision: first.precision.clone(),
        gradient_checkpointing: opts.gradient_checkpointing,
        peft_versions: reference.versions.clone(),
        tokens_per_s: PeftVersus { ratio: pipeline.mean / peft.mean, pipeline, peft },
        peak_rss_bytes: Both {
            pipeline: ours.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0),
            peft: theirs.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0),
        },
    })
}

/// What `scripts/peft_bench.py` prints.
#[derive(Debug, serde::Deserialize)]
struct PeftRun {
    tokens_per_s: f64,
    peak_rss_bytes: u64,
    mean_tokens: f64,
    versions: String,
}

fn run_peft_bench(python: &Path, opts: &TrainOptions, threads: usize, examples: &[u8]) -> Result<PeftRun> {
    use std::io::Write;
    let mut cmd = std::process::Command::new(python);
    cmd.arg("-c").arg(PEFT_BENCH).arg("--model").arg(&opts.model).arg("--examples").arg("-");
    cmd.args(["--threads", &threads.to_string(), "--precision", opts.precision.name()]);
    if opts.gradient_checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", python.display()))?;
    // Written beside the reads below, so that neither side waits on a full pipe.
    let mut stdin = child.stdin.take().expect("piped");
    let examples = examples.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&examples));
    let out = child.wait_with_output()?;
    let written = writer.join().expect("the writer thread does not panic");
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "the PEFT reference failed ({}):\n{}",
        out.status,
        stderr.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    written.context("writing the examples to the PEFT reference")?;
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
    serde_json::from_str(&line).with_context(|| format!("reading the PEFT reference's report: {line:?}"))
}

/// `--python`, else `$PIPELINE_TORCH_PYTHON`, else the environment
/// `scripts/fetch-test-tools.sh` recorded in `models/torch-python`.
fn find_torch_python(given: Option<&Path>) -> Result<PathBuf> {
    let recorded = || std::fs::read_to_string("models/torch-python").ok().map(|s| PathBuf::from(s.trim()));
    let python = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PIPELINE_TORCH_PYTHON").map(PathBuf::from))
        .or_else(recorded)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no Python with PyTorch + PEFT: install one with scripts/install-torch.sh (it prints its python), \
                 then pass --python PATH or set PIPELINE_TORCH_PYTHON=PATH"
            )
        })?;
    anyhow::ensure!(python.is_file(), "{}: no such file (scripts/install-torch.sh installs one)", python.display());
    Ok(python)
}

/// What `bench generate --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// `--batch N` (N > 1): sequences decoded together after the same
    /// prompt, and the new tokens per second of all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_decode_tokens_per_s: Option<f64>,
    /// `quantized` (a GGUF's own blocks while decoding) or `f32`.
    pub weights: String,
    pub peak_rss_bytes: u64,
    pub device: String,
    /// The CPU's model name.
    pub cpu: String,
    /// The instruction paths the kernels took ([`pipeline_model::cpu_paths`]).
    pub kernels: String,
}

/// Options of `bench generate`.
pub struct GenerateOptions {
    pub model: PathBuf,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Decode with the dequantized f32 weights even for a GGUF.
    pub f32: bool,
    /// Also decode this many sequences together (batched decoding).
    pub batch: usize,
    pub device: String,
    pub dataset: String,
    pub cache: crate::executor::CacheLocation,
}

/// Prefill of a tool-use prompt of `prompt_tokens` tokens (rendered traces
/// of the dataset, concatenated), then greedy decoding of `new_tokens`.
pub fn generate(opts: &GenerateOptions) -> Result<GenerateBench> {
    let split = tokenized_examples(&opts.model, &opts.dataset, 4096, &opts.cache)?;
    let prompt: Vec<u32> = split.input_ids.iter().copied().take(opts.prompt_tokens).collect();
    anyhow::ensure!(prompt.len() == opts.prompt_tokens, "the dataset has fewer than {} tokens", opts.prompt_tokens);
    let device = pipeline_model::device(&opts.device)?;
    let resolved = crate::model_source::from_path(&opts.model)?;
    let model = if opts.f32 {
        pipeline_model::load(&resolved, &device, pipeline_model::INFERENCE_POSITIONS)?
    } else {
        pipeline_model::load_for_inference(&resolved, &device)?
    };
    let tok_path = resolved.tokenizer_json()?;
    let tokenizer =
        tokenizers::Tokenizer::from_file(tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    // No stop tokens: always decode `new_tokens`.
    let generator = pipeline_infer::generate::Generator::new(model.as_ref(), &tokenizer, &[]);
    let params = |n| pipeline_infer::generate::GenerationParams { max_new_tokens: n, ..Default::default() };
    // Warm-up (thread pools, repacked weights), then the measured run.
    generator.generate(&prompt[..32], &params(4), 0, &mut |_| {})?;
    let g = generator.generate(&prompt, &params(opts.new_tokens), 0, &mut |_| {})?;
    // Batched: `batch` copies of the prefilled prompt, decoded together.
    let batch_decode = if opts.batch > 1 {
        let mut prefilled = model.new_cache();
        model.prefill(&prompt, &mut prefilled)?;
        let mut caches =
            (0..opts.batch).map(|_| prefilled.prefix_copy(prompt.len())).collect::<candle_core::Result<Vec<_>>>()?;
        let mut jobs: Vec<(&[u32], &mut pipeline_model::KvCache)> =
            caches.iter_mut().map(|c| (&prompt[..], c)).collect();
        let gens = generator.generate_batch(&mut jobs, &params(opts.new_tokens), 0)?;
        let seconds = gens.iter().map(|g| g.decode_s).fold(0f64, f64::max);
        Some(gens.iter().map(|g| g.tokens.len().saturating_sub(1)).sum::<usize>() as f64 / seconds)
    } else {
        None
    };
    Ok(GenerateBench {
        batch: batch_decode.map(|_| opts.batch),
        batch_decode_tokens_per_s: batch_decode,
        prefill_tokens_per_s: g.prefill_tokens as f64 / g.prefill_s,
        // The first new token comes from the prefill's logits.
        decode_tokens_per_s: (g.tokens.len().saturating_sub(1)) as f64 / g.decode_s,
        prompt_tokens: prompt.len(),
        new_tokens: g.tokens.len(),
        weights: if opts.f32 || !resolved.is_gguf() { "f32".into() } else { "quantized".into() },
        peak_rss_bytes: peak_rss_bytes(),
        device: opts.device.clone(),
        cpu: cpu_name(),
        kernels: pipeline_model::cpu_paths(),
    })
}

/// The CPU's model name (`/proc/cpuinfo`), with its core count.
fn cpu_name() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{name}, {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The benchmark dataset tokenized at `max_len` for `model` by the real
/// data stages (fetch → format → tokenize, cached like any recipe's), read
/// through the executor and the tokenize kind's reader.
fn tokenized_examples(
    model: &Path,
    dataset: &str,
    max_len: usize,
    cache: &crate::executor::CacheLocation,
) -> Result<TokenizedSplit> {
    let model = std::fs::canonicalize(model).with_context(|| format!("no model at {}", model.display()))?;
    let recipe = data_recipe(&model, dataset, max_len)?;
    let exec = cache.open()?;
    exec.run(&recipe, Some("tokens"))?;
    match exec.finished(&recipe, "tokens")? {
        Finished::Entry(entry) => crate::stages::tokenize::read_split(&entry, "train"),
        Finished::NotYet(why) => anyhow::bail!("the benchmark's examples were not tokenized: {why}"),
    }
}

/// The data stages of the tool-use recipes, as a recipe of their own.
fn data_recipe(model: &Path, dataset: &str, max_len: usize) -> Result<Recipe> {
    let doc = serde_json::json!({
        "recipe": {"name": "bench-train"},
        "model": {"base": model.display().to_string()},
        "stages": {
            "data": {"kind": "fetch-dataset", "source": dataset, "splits": ["train"]},
            "chat": {
                "kind": "format-chat", "dataset": "data", "messages_column": "trace", "first_user_is_system": true,
            },
            "tokens": {"kind": "tokenize", "conversations": "chat", "max_len": max_len},
        },
    });
    let doc = toml::Value::try_from(doc)?;
    Ok(Recipe::parse(&toml::to_string(&doc)?, Path::new("bench-train.toml"), &[])?)
}

/// Peak resident memory of this process (Linux: `VmHWM`), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    crate::report::peak_rss_bytes().unwrap_or(0)
}

/// What `bench compare --json` prints: both engines' runs on one GGUF, one
/// after the other in the same minutes, and our speed over theirs.
#[derive(Debug, Clone, Serialize)]
pub struct CompareBench {
    pub model: String,
    pub cpu: String,
    pub kernels: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// llama.cpp's build (`build_commit` of llama-bench's report).
    pub llama_cpp_build: String,
    pub prefill: Versus,
    pub decode: Versus,
}

/// One measure (tokens/s) of both engines.
#[derive(Debug, Clone, Serialize)]
pub struct Versus {
    pub pipeline: Runs,
    pub llama_cpp: Runs,
    /// `pipeline.mean / llama_cpp.mean`.
    pub ratio: f64,
}

/// Tokens/s of repeated runs.
#[derive(Debug, Clone, Serialize)]
pub struct Runs {
    pub mean: f64,
    pub stddev: f64,
    pub runs: Vec<f64>,
}

impl Runs {
    fn new(runs: Vec<f64>) -> Runs {
        let n = runs.len().max(1) as f64;
        let mean = runs.iter().sum::<f64>() / n;
        let var = runs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Runs { mean, stddev: var.sqrt(), runs }
    }
}

impl Versus {
    fn new(pipeline: Vec<f64>, llama_cpp: Vec<f64>) -> Versus {
        let (pipeline, llama_cpp) = (Runs::new(pipeline), Runs::new(llama_cpp));
        Versus { ratio: pipeline.mean / llama_cpp.mean, pipeline, llama_cpp }
    }
}

/// Options of `bench compare`.
pub struct CompareOptions {
    pub generate: GenerateOptions,
    pub llama_bench: Option<PathBuf>,
    pub repetitions: usize,
}

/// `bench generate` and llama.cpp's `llama-bench` (pp P, tg N at depth P) on the same
/// file and thread count, alternating run by run so that both see the same
/// machine (a neighbour's load, the clock) within a few seconds.
pub fn compare(opts: &CompareOptions) -> Result<CompareBench> {
    let g = &opts.generate;
    anyhow::ensure!(
        g.model.extension().is_some_and(|e| e == "gguf"),
        "bench compare needs a .gguf file (llama.cpp runs the same file): {}",
        g.model.display()
    );
    let llama_bench = find_llama_bench(opts.llama_bench.as_deref())?;
    let threads = candle_core::utils::get_num_threads();
    let pb = crate::report::bar(opts.repetitions as u64 * 2, "bench compare");
    let (mut ours, mut theirs) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    let mut build = String::new();
    for _ in 0..opts.repetitions {
        pb.set_message("pipeline".into());
        let r = generate(g)?;
        ours.0.push(r.prefill_tokens_per_s);
        ours.1.push(r.decode_tokens_per_s);
        pb.inc(1);
        pb.set_message("llama.cpp".into());
        let l = run_llama_bench(&llama_bench, &g.model, threads, g.prompt_tokens, g.new_tokens)?;
        theirs.0.push(l.prefill);
        theirs.1.push(l.decode);
        build = l.build;
        pb.inc(1);
    }
    pb.finish();
    Ok(CompareBench {
        model: g.model.display().to_string(),
        cpu: cpu_name(),
        kernels: pipeline_model::cpu_paths(),
        threads,
        prompt_tokens: g.prompt_tokens,
        new_tokens: g.new_tokens,
        llama_cpp_build: build,
        prefill: Versus::new(ours.0, theirs.0),
        decode: Versus::new(ours.1, theirs.1),
    })
}

/// `--llama-bench`, else `$PIPELINE_LLAMA_CPP_BIN/llama-bench`, else the
/// build recorded by `scripts/fetch-test-tools.sh`, else `llama-bench` on PATH.
fn find_llama_bench(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "--llama-bench {}: no such file", p.display());
        return Ok(p.to_path_buf());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PIPELINE_LLAMA_CPP_BIN").map(PathBuf::from).into_iter().collect();
    if let Ok(recorded) = std::fs::read_to_string("models/llama-cpp-bin") {
        dirs.push(PathBuf::from(recorded.trim()));
    }
    dirs.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    dirs.iter().map(|d| d.join("llama-bench")).find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "llama-bench not found: build it with scripts/build-llama-cpp.sh (it prints the bin directory), \
             then pass --llama-bench DIR/llama-bench or set PIPELINE_LLAMA_CPP_BIN=DIR"
        )
    })
}

/// One llama-bench run's tokens/s.
struct LlamaRun {
    prefill: f64,
    decode: f64,
    build: String,
}

/// Runs llama-bench once per test (`-r 1`, its own warm-up included):
/// prompt processing of `prompt` tokens, then generation of `decoded`
/// tokens after a context of `prompt` tokens (`-d`), which is what
/// `bench generate` decodes after; reads both tokens/s.
fn run_llama_bench(bin: &Path, model: &Path, threads: usize, prompt: usize, decoded: usize) -> Result<LlamaRun> {
    let (p, n) = (prompt.to_string(), decoded.to_string());
    let mut tests = Vec::new();
    for test in [["-p", &p, "-n", "0", "-d", "0"], ["-p", "0", "-n", &n, "-d", &p]] {
        let out = std::process::Command::new(bin)
            .args(["-m".as_ref(), model.as_os_str()])
            .args(["-t", &threads.to_string()])
            .args(test)
            .args(["-r", "1", "-o", "json"])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} {} failed ({}): {}",
            bin.display(),
            test.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
        let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("reading the JSON report of {} {}", bin.display(), test.join(" ")))?;
        tests.extend(json);
    }
    parse_llama_bench(&serde_json::to_string(&tests)?)
}

/// llama-bench's JSON report: one object per test, `n_prompt`/`n_gen` say
/// which, `avg_ts` is its tokens/s.
fn parse_llama_bench(json: &str) -> Result<LlamaRun> {
    let tests: Vec<serde_json::Value> = serde_json::from_str(json)?;
    let speed = |prefill: bool| {
        tests
            .iter()
            .find(|t| {
                let (p, g) = (t["n_prompt"].as_u64().unwrap_or(0), t["n_gen"].as_u64().unwrap_or(0));
                if prefill { p > 0 && g == 0 } else { g > 0 && p == 0 }
            })
            .and_then(|t| t["avg_ts"].as_f64())
            .ok_or_else(|| anyhow::anyhow!("no {} test with avg_ts", if prefill { "prompt" } else { "generation" }))
    };
    let build = tests.first().and_then(|t| t["build_commit"].as_str()).unwrap_or("unknown").to_string();
    Ok(LlamaRun { prefill: speed(true)?, decode: speed(false)?, build })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_bench_reports_are_read_by_test_kind() {
        let json = r#"[
          {"build_commit": "0c1e570", "n_prompt": 1500, "n_gen": 0, "avg_ts": 950.5},
          {"build_commit": "0c1e570", "n_prompt": 0, "n_gen": 64, "avg_ts": 94.25}
        ]"#;
        let r = parse_llama_bench(json).unwrap();
        assert_eq!((r.prefill, r.decode, r.build.as_str()), (950.5, 94.25, "0c1e570"));
        let err = parse_llama_bench(r#"[{"n_prompt": 0, "n_gen": 64, "avg_ts": 9.0}]"#).err().unwrap();
        assert!(err.to_string().contains("no prompt test"), "{err}");
        let v = Versus::new(vec![100.0, 120.0], vec![50.0, 50.0]);
        assert_eq!((v.ratio, v.pipeline.mean, v.llama_cpp.stddev), (2.2, 110.0, 0.0));
    }
}
