//! The command line's arguments (clap): every command, its options and
//! their help text.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use pipeline::error::RecipeError;
use pipeline::executor::{CacheLocation, Executor};
use pipeline::recipe::Override;
use pipeline::sweep::Axis;

/// `--version`: the version, and the instruction paths the kernels take on
/// this CPU (the test suite tests those of the CPU it runs on and reports
/// the others as ignored).
fn long_version() -> &'static str {
    let text = format!("{}\nkernels on this CPU: {}", env!("CARGO_PKG_VERSION"), pipeline_model::cpu_paths());
    Box::leak(text.into_boxed_str())
}

#[derive(Debug, Parser)]
#[command(
    name = "pipeline",
    version,
    long_version = long_version(),
    about = "Turn a TOML recipe into a fine-tuned, quantized, ready-to-serve small language model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log what happens inside stages (`-v`: info, `-vv`: debug; `RUST_LOG`
    /// overrides). By default only a status line per stage, progress and
    /// warnings are shown.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// Options shared by commands that read a recipe and the cache.
#[derive(Debug, clap::Args)]
pub struct RecipeArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set stages.train.rank=8` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    pub set: Vec<Override>,
    /// Sweep a recipe key over values, e.g. `--sweep
    /// stages.train.learning_rate=1e-4,2e-4` (repeatable; adds to, or
    /// replaces an axis of, the recipe's `[sweep]` table). Every combination
    /// is a variant.
    #[arg(long = "sweep", value_name = "KEY=V1,V2,…", value_parser = parse_axis)]
    pub sweep: Vec<Axis>,
    /// Of a sweep, only this variant: its number or its label, as `plan`
    /// lists them. `auto`: a task of an array job (Slurm, a Kubernetes
    /// Indexed Job, SkyPilot, or `PIPELINE_VARIANT=N`) starts on the variant
    /// of its task index, then runs every variant no other task has claimed.
    #[arg(long, value_name = "N|LABEL|auto")]
    pub variant: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

impl RecipeArgs {
    pub fn executor(&self) -> Result<Executor> {
        self.cache.location().open()
    }
}

/// `--cache-dir` and `--local-cache`, for every command that uses the cache.
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// The cache: a directory, or an object-store URL (`s3://BUCKET/PREFIX`,
    /// `gs://…`, `az://…`, `http(s)://…` WebDAV, `file:///…`) whose entries
    /// and checkpoints are shared by every machine that names it.
    #[arg(long, env = "PIPELINE_CACHE_DIR", default_value = ".pipeline")]
    pub cache_dir: String,
    /// With a remote `--cache-dir`: the local working copy.
    #[arg(long, env = "PIPELINE_LOCAL_CACHE", default_value = ".pipeline", value_name = "DIR")]
    pub local_cache: PathBuf,
}

impl CacheArgs {
    pub fn location(&self) -> CacheLocation {
        CacheLocation { cache_dir: self.cache_dir.clone(), local_cache: self.local_cache.clone() }
    }
}

/// Which model `generate` and `chat` load.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// A model directory (HF layout) or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory to apply (unmerged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A recipe: its base model, its chat template and its trained adapter.
    #[arg(long, conflicts_with = "model")]
    pub recipe: Option<PathBuf>,
    /// The recipe's lora-train stage whose adapter to apply (default: the first).
    #[arg(long, requires = "recipe")]
    pub stage: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Decoding options.
#[derive(Debug, clap::Args)]
pub struct GenerationArgs {
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// A string that ends the answer (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl GenerationArgs {
    pub fn params(&self) -> Result<pipeline_infer::generate::GenerationParams> {
        let p = pipeline_infer::generate::GenerationParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ..Default::default()
        };
        if let Err((k, v, h)) = p.check() {
            return Err(RecipeError::new(format!("--{} {v}: {h}", k.replace('_', "-"))).into());
        }
        Ok(p)
    }
}

impl ModelArgs {
    pub fn choice(&self) -> pipeline::session::ModelChoice {
        pipeline::session::ModelChoice {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            recipe: self.recipe.clone(),
            stage: self.stage.clone(),
            cache: self.cache.location(),
            device: self.device.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a recipe: reuse cached stages, run (or resume) the rest.
    Run {
        #[command(flatten)]
        args: RecipeArgs,
        /// Stop after this stage (and what it needs).
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
    },
    /// Show what `run` would do: per stage, cached / run / resume, and why.
    Plan {
        #[command(flatten)]
        args: RecipeArgs,
        /// Print JSON: {"stages": [{"name", "kind", "key", "status", "reason"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Download what a recipe reads from the Hugging Face hub (the base
    /// model's weights, `hf://` datasets) into the cache (`HF_HOME`), so that
    /// it runs offline later (`HF_HUB_OFFLINE=1`). An interrupted download
    /// resumes where it stopped.
    Fetch {
        #[command(flatten)]
        args: RecipeArgs,
    },
    /// Check recipes without reading data or models.
    Validate {
        /// Recipe files.
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// Overrides to check together with the recipes.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
        set: Vec<Override>,
    },
    /// Print the JSON schema of recipes (editors validate with it).
    Schema,
    /// Remove cache entries that none of the given recipes uses.
    Gc {
        /// Recipes whose entries are kept.
        recipes: Vec<PathBuf>,
        /// Remove every entry (no recipe needed).
        #[arg(long, conflicts_with = "recipes")]
        all: bool,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Also remove the remote cache's abandoned uploads (of jobs killed
        /// mid-upload; one idle for a day under an entry with no manifest
        /// yet). Entries in the remote cache are never removed.
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Measure speed: tokens/s and peak memory.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Generate answers for one prompt or a jsonl of prompts (streamed).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The user message.
        #[arg(long, conflicts_with = "prompts")]
        prompt: Option<String>,
        /// A jsonl file: one `{"prompt": …}` or `{"messages": […]}` per line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// A system prompt put before each conversation.
        #[arg(long)]
        system: Option<String>,
        /// A JSON file of tools (OpenAI `tools`, or `{"tools": […]}`) offered
        /// with every prompt that lists none, rendered by the chat template as
        /// in training; answers that call them print their `tool_calls`.
        #[arg(long)]
        tools: Option<PathBuf>,
        #[command(flatten)]
        generation: GenerationArgs,
        /// Print one JSON object per prompt (text, `content` and OpenAI
        /// `tool_calls` as a server returns them, speed).
        #[arg(long)]
        json: bool,
        /// Decode tool calls under the grammar of the tools the prompts list
        /// (their `<tools>` blocks and `tools`, together): valid JSON, known
        /// tool and argument names, declared types, required arguments.
        #[arg(long)]
        constrain_calls: bool,
        /// With --json: prompts decoded together (one step runs a token of
        /// each; same answers as one by one, up to float rounding).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
    },
    /// Chat with a model in the terminal (history, streaming; /reset, /system TEXT, /exit).
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        system: Option<String>,
        /// A JSON file of tools (as for `generate`) offered in every turn; a
        /// call is printed, and `/tool RESULT` answers it.
        #[arg(long)]
        tools: Option<PathBuf>,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Developer tools.
    #[command(subcommand, hide = true)]
    Dev(DevCommand),
    /// Copy a recipe's finished artifacts (adapter, eval report, merged model,
    /// GGUF, Modelfile) into DIR/<stage>/.
    Export {
        #[command(flatten)]
        args: RecipeArgs,
        /// The output directory.
        #[arg(long, short = 'o')]
        to: PathBuf,
        /// Replace files that exist with other content.
        #[arg(long)]
        force: bool,
        /// Hard-link instead of copying (no extra disk; do not edit the files in place).
        #[arg(long)]
        link: bool,
    },
    /// Rank a sweep's variants by their evaluation: a table (best first),
    /// written with the variants' overlaid loss curves to DIR.
    Compare {
        #[command(flatten)]
        args: RecipeArgs,
        /// The evaluate stage whose report scores the variants (default:
        /// the recipe's first), e.g. one that decodes calls constrained.
        #[arg(long, value_name = "STAGE")]
        eval: Option<String>,
        /// The metric to rank by (default: call_executes, else exact_match,
        /// rouge_l, loss); any key of the evaluation's report.json.
        #[arg(long, value_name = "METRIC")]
        by: Option<String>,
        /// Where compare.md, compare.json and loss.svg go (default:
        /// sweeps/<recipe name>).
        #[arg(long, short = 'o', value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Score a served model (llama-server, Ollama, vLLM: any OpenAI-style
    /// `/v1/chat/completions`) on an evaluate stage's rows: each row's
    /// conversation as `messages` and its tools as `tools`, the answer's
    /// `tool_calls` scored as the stage scores generated calls.
    EvalServer {
        #[command(flatten)]
        args: RecipeArgs,
        /// The evaluate stage whose rows and metrics are used.
        #[arg(long, default_value = "eval")]
        stage: String,
        /// The server's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The `model` of each request (Ollama: the model's name).
        #[arg(long)]
        model: Option<String>,
        /// Only the first N rows.
        #[arg(long)]
        limit: Option<usize>,
        /// Write each row's answer and verdict to this jsonl file.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Print the scores as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the artifact directory of a finished stage.
    Show {
        #[command(flatten)]
        args: RecipeArgs,
        /// The stage's name in the recipe.
        stage: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// LoRA training steps (r=16 on all linear layers, batch 1) on tool-use examples.
    Train(BenchTrainArgs),
    /// Prefill and decode speed on a tool-use prompt.
    Generate {
        /// A model directory (HF layout) or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 1500)]
        prompt_tokens: usize,
        /// Tokens decoded after the prompt.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Decode a GGUF with its dequantized f32 weights instead of its quantized blocks.
        #[arg(long)]
        f32: bool,
        /// Also decode N sequences together (batched decoding, as `evaluate`
        /// does) and report their combined tokens/s.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The dataset whose traces make the prompt.
        #[arg(long, default_value = "hf://datasets/shawhin/tool-use-finetuning")]
        dataset: String,
        /// Print {"prefill_tokens_per_s", "decode_tokens_per_s", …} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Prefill and decode against llama.cpp's `llama-bench` on the same GGUF,
    /// measured one after the other in the same minutes, with the ratios.
    Compare {
        /// A .gguf file (llama.cpp runs the same file).
        #[arg(long)]
        model: PathBuf,
        /// The `llama-bench` program (default: `$PIPELINE_LLAMA_CPP_BIN/llama-bench`,
        /// then the build `scripts/fetch-test-tools.sh` recorded in
        /// `models/llama-cpp-bin`, then `llama-bench` on PATH).
        #[arg(long)]
        llama_bench: Option<PathBuf>,
        /// Prompt length in tokens (llama-bench `-p`).
        #[arg(long, default_value_t = 1500)]
        prompt_tokens: usize,
        /// Tokens decoded after the prompt (llama-bench `-n`, at depth `-d` = the prompt length).
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Runs of each engine, alternating (llama-bench with `-r 1` each); means and spreads are printed.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        repetitions: u64,
        /// The dataset whose traces make our prompt.
        #[arg(long, default_value = "hf://datasets/shawhin/tool-use-finetuning")]
        dataset: String,
        /// Print both engines' runs and the ratios as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
}

/// `pipeline bench train`'s options.
#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// A model directory (HF layout) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenize the examples at this maximum length.
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The dataset whose traces are trained on.
    #[arg(long, default_value = "hf://datasets/shawhin/tool-use-finetuning")]
    pub dataset: String,
    /// Print {"tokens_per_s", "peak_rss_bytes", "max_len", "mean_tokens", …} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Recompute each layer's activations in the backward pass instead
    /// of keeping them (lora-train's `gradient_checkpointing = true`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// The frozen base weights' format (lora-train's `precision`):
    /// f32, bf16 (mixed precision) or auto (bf16 where the CPU has
    /// native bf16 dot products).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "auto"])]
    pub precision: String,
    /// Also train the same examples, in the same order, with PyTorch +
    /// transformers + PEFT (bf16: under torch.autocast), alternating
    /// run by run, and print both speeds and the ratio.
    #[arg(long)]
    pub compare_peft: bool,
    /// The Python that has torch, transformers and peft (default:
    /// `$PIPELINE_TORCH_PYTHON`, then the environment
    /// `scripts/fetch-test-tools.sh` recorded in `models/torch-python`).
    #[arg(long, value_name = "PATH", requires = "compare_peft")]
    pub python: Option<PathBuf>,
    /// With --compare-peft: runs of each, alternating.
    #[arg(long, default_value_t = 2, requires = "compare_peft")]
    pub repetitions: u64,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a random-weight checkpoint in real HF layout (for tests, CI and
    /// speed measurements where the real weights are not available).
    RandomModel {
        /// The architecture and shape (each model family names its own).
        #[arg(long, value_parser = random_shapes())]
        arch: String,
        /// A directory holding tokenizer.json and tokenizer_config.json to copy.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Vocabulary size (must cover the tokenizer's ids).
        #[arg(long, default_value_t = 151_936)]
        vocab: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// How the weights are stored: f32, or bf16 (as Google ships Gemma 3).
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        /// Output directory.
        out: PathBuf,
    },
}

/// Every shape of `pipeline dev random-model`, with what it is, from the
/// model families.
fn random_shapes() -> clap::builder::PossibleValuesParser {
    let shapes = pipeline_model::Arch::random_shapes();
    clap::builder::PossibleValuesParser::new(
        shapes.into_iter().map(|(name, what)| clap::builder::PossibleValue::new(name).help(what)),
    )
}

fn parse_axis(s: &str) -> Result<Axis, String> {
    s.parse::<Axis>().map_err(|e| e.to_string())
}

fn parse_override(s: &str) -> Result<Override, String> {
    s.parse::<Override>().map_err(|e| e.to_string())
}
