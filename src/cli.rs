//! The command line. Each subcommand is a thin wrapper over the library.
//!
//! Exit codes: 0 success, 2 recipe or usage errors, 1 runtime failures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::error::RecipeError;
use crate::executor::{Executor, Status, execution_order};
use crate::recipe::{Override, Recipe};

#[derive(Debug, Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Turn a TOML recipe into a fine-tuned, quantized, ready-to-serve small language model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by commands that read a recipe and the cache.
#[derive(Debug, clap::Args)]
pub struct RecipeArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set stages.train.rank=8` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    pub set: Vec<Override>,
    /// The cache directory.
    #[arg(long, env = "PIPELINE_CACHE_DIR", default_value = ".pipeline")]
    pub cache_dir: PathBuf,
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
        #[arg(long, env = "PIPELINE_CACHE_DIR", default_value = ".pipeline")]
        cache_dir: PathBuf,
    },
    /// Measure speed: tokens/s and peak memory.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Developer tools.
    #[command(subcommand, hide = true)]
    Dev(DevCommand),
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
    Train {
        /// A model directory (HF layout) or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Tokenize the examples at this maximum length.
        #[arg(long, default_value_t = 512)]
        max_len: usize,
        /// Measured steps (after one warm-up step).
        #[arg(long, default_value_t = 8)]
        steps: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The dataset whose traces are trained on.
        #[arg(long, default_value = "hf://datasets/shawhin/tool-use-finetuning")]
        dataset: String,
        /// Print {"tokens_per_s", "peak_rss_bytes", "max_len", "mean_tokens", …} as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "PIPELINE_CACHE_DIR", default_value = ".pipeline")]
        cache_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a random-weight checkpoint in real HF layout (for tests, CI and
    /// speed measurements where the real weights are not available).
    RandomModel {
        /// gemma3, gemma3-270m (the real 270M shape), qwen3 or qwen2.
        #[arg(long)]
        arch: String,
        /// A directory holding tokenizer.json and tokenizer_config.json to copy.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Vocabulary size (must cover the tokenizer's ids).
        #[arg(long, default_value_t = 151_936)]
        vocab: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory.
        out: PathBuf,
    },
}

fn parse_override(s: &str) -> Result<Override, String> {
    s.parse::<Override>().map_err(|e| e.to_string())
}

/// Runs the CLI and maps errors to exit codes.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    crate::progress::init_logging();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            let recipe_error = e.chain().any(|c| c.is::<RecipeError>());
            ExitCode::from(if recipe_error { 2 } else { 1 })
        }
    }
}

/// `outer: inner: innermost`, as anyhow's `{:#}`, but without repeating a
/// context that the next message already contains.
fn render_error(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let mut out: Vec<&str> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if parts[i + 1..].iter().any(|later| later.contains(p.as_str())) {
            continue;
        }
        out.push(p);
    }
    out.join(": ")
}

fn load(args: &RecipeArgs) -> Result<Recipe> {
    Ok(Recipe::load(&args.recipe, &args.set)?)
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run { args, until } => {
            let recipe = load(&args)?;
            let exec = Executor::new(&args.cache_dir)?;
            eprintln!("pipeline: {} ({})", recipe.recipe.name, args.recipe.display());
            let t0 = std::time::Instant::now();
            let outcomes = exec.run(&recipe, until.as_deref())?;
            let ran = outcomes.iter().filter(|o| o.ran).count();
            eprintln!(
                "pipeline: done in {:.2}s: {ran} ran, {} cached",
                t0.elapsed().as_secs_f64(),
                outcomes.len() - ran
            );
            Ok(())
        }
        Command::Plan { args, json } => {
            let recipe = load(&args)?;
            let plan = Executor::new(&args.cache_dir)?.plan(&recipe, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                for s in &plan.stages {
                    let status = match (&s.status, s.step) {
                        (Status::Resume, Some(step)) => format!("resume at step {step}"),
                        (Status::Cached, _) => "cached".into(),
                        (Status::Run, _) | (Status::Resume, None) => "run".into(),
                    };
                    let reason = s.reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default();
                    println!("{:<16} {:<16} {}  {status}{reason}", s.name, s.kind, s.key.short());
                }
            }
            Ok(())
        }
        Command::Validate { recipes, set } => {
            let mut failed = 0;
            for path in &recipes {
                match Recipe::load(path, &set).and_then(|r| execution_order(&r, None).map(|o| (r, o))) {
                    Ok((r, order)) => println!("ok: {} ({}: {} stages)", path.display(), r.recipe.name, order.len()),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                return Err(RecipeError::new(format!("{failed} of {} recipes are invalid", recipes.len())).into());
            }
            Ok(())
        }
        Command::Schema => {
            print!("{}", crate::recipe::json_schema());
            Ok(())
        }
        Command::Gc { recipes, all, dry_run, cache_dir } => gc(&recipes, all, dry_run, &cache_dir),
        Command::Dev(DevCommand::RandomModel { arch, tokenizer, vocab, seed, out }) => {
            use crate::model::qwen::Variant;
            use crate::model::testing::{TinyGemma3, TinyQwen};
            match arch.as_str() {
                "gemma3" => TinyGemma3::new(vocab).write(&out, &tokenizer, seed)?,
                "gemma3-270m" => TinyGemma3::gemma3_270m(vocab).write(&out, &tokenizer, seed)?,
                "qwen3" => TinyQwen::new(Variant::Qwen3, vocab).write(&out, &tokenizer, seed)?,
                "qwen2" => TinyQwen::new(Variant::Qwen2, vocab).write(&out, &tokenizer, seed)?,
                other => bail!("unknown --arch `{other}`: use gemma3, gemma3-270m, qwen3 or qwen2"),
            }
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Bench(BenchCommand::Train { model, max_len, steps, device, dataset, json, cache_dir }) => {
            let opts = crate::bench::TrainOptions { model, max_len, steps: steps.max(1), device, dataset, cache_dir };
            let r = crate::bench::train(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "bench train ({}, max_len {}): {:.1} tokens/s, {:.2} s/step, mean {:.0} tokens/step, peak RSS {:.2} GiB",
                    r.device,
                    r.max_len,
                    r.tokens_per_s,
                    r.seconds_per_step,
                    r.mean_tokens,
                    r.peak_rss_bytes as f64 / (1u64 << 30) as f64
                );
            }
            Ok(())
        }
        Command::Show { args, stage } => {
            let recipe = load(&args)?;
            let exec = Executor::new(&args.cache_dir)?;
            if !recipe.stages.contains_key(&stage) {
                let e = RecipeError::new(format!("no stage named `{stage}`")).in_file(&args.recipe);
                let names = recipe.stages.keys().map(String::as_str);
                return Err(match crate::error::did_you_mean(&stage, names) {
                    Some(s) => e.help(format!("did you mean `{s}`?")),
                    None => e,
                }
                .into());
            }
            let plan = exec.plan(&recipe, Some(&stage))?;
            let sp = plan.stage(&stage).expect("planned");
            if sp.status != Status::Cached {
                bail!(
                    "stage `{stage}` has no finished result for this recipe ({}); run `pipeline run {} --until {stage}`",
                    sp.reason.as_deref().unwrap_or("not run"),
                    args.recipe.display()
                );
            }
            println!("{}", exec.store().entry_dir(&sp.key).display());
            Ok(())
        }
    }
}

fn gc(recipes: &[PathBuf], all: bool, dry_run: bool, cache_dir: &Path) -> Result<()> {
    if recipes.is_empty() && !all {
        return Err(RecipeError::new("name the recipes whose cache entries to keep")
            .help("pipeline gc recipes/*.toml (or --all to empty the cache)")
            .into());
    }
    let exec = Executor::new(cache_dir)?;
    let store = exec.store();
    let mut keep = std::collections::BTreeSet::new();
    for path in recipes {
        let recipe = Recipe::load(path, &[])?;
        let plan = exec.plan(&recipe, None).with_context(|| format!("cannot plan {}", path.display()))?;
        keep.extend(plan.stages.into_iter().map(|s| s.key));
    }
    let (mut removed, mut kept, mut busy) = (0, 0, 0);
    let entries = store.entries()?.into_iter().map(|k| (store.entry_dir(&k), k));
    let works = store.work_entries()?.into_iter().map(|k| (store.work_dir(&k), k));
    for (dir, key) in entries.chain(works) {
        if keep.contains(&key) {
            kept += 1;
            continue;
        }
        // Never remove what a running process is writing.
        let Some(_lock) = store.try_lock(&key)? else {
            busy += 1;
            continue;
        };
        if dry_run {
            println!("would remove {}", dir.display());
        } else {
            store.remove(&dir)?;
        }
        removed += 1;
    }
    store.empty_trash()?;
    eprintln!(
        "gc: {} {removed}, kept {kept}{}",
        if dry_run { "would remove" } else { "removed" },
        if busy > 0 { format!(", skipped {busy} in use") } else { String::new() }
    );
    Ok(())
}
