//! The command line. Each subcommand is a thin wrapper over the library.
//!
//! Exit codes: 0 success, 2 recipe or usage errors, 1 runtime failures.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use pipeline::error::RecipeError;
use pipeline::executor::{CacheLocation, Done, Executor, Status, execution_order};
use pipeline::recipe::{Override, Recipe};

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
    #[command(flatten)]
    pub cache: CacheArgs,
}

impl RecipeArgs {
    fn executor(&self) -> Result<Executor> {
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
    fn params(&self) -> Result<pipeline_infer::generate::GenerationParams> {
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
    fn choice(&self) -> pipeline::session::ModelChoice {
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
        #[command(flatten)]
        generation: GenerationArgs,
        /// Print one JSON object per prompt (text, parsed tool calls, speed).
        #[arg(long)]
        json: bool,
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
        /// Recompute each layer's activations in the backward pass instead
        /// of keeping them (lora-train's `gradient_checkpointing = true`).
        #[arg(long)]
        gradient_checkpointing: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
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
    pipeline::allocator::tune();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // SAFETY: nothing has started a thread yet.
    unsafe { pipeline::threads::pin_thread_count() };
    crate::console::init();
    match pipeline::threads::run(|| dispatch(cli.command)) {
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
            let exec = args.executor()?;
            eprintln!("pipeline: {} ({})", recipe.recipe.name, args.recipe.display());
            if let Some(r) = exec.remote() {
                eprintln!("pipeline: remote cache {} (local copy {})", r.url(), args.cache.local_cache.display());
            }
            let t0 = std::time::Instant::now();
            let outcomes = exec.run(&recipe, until.as_deref())?;
            let count = |d: Done| outcomes.iter().filter(|o| o.done == d).count();
            let (ran, pulled, remote) = (count(Done::Ran), count(Done::Pulled), count(Done::Remote));
            let mut remote_note = String::new();
            if pulled > 0 {
                remote_note += &format!(", {pulled} pulled from the remote cache");
            }
            if remote > 0 {
                remote_note += &format!(", {remote} finished remotely and not needed here");
            }
            eprintln!(
                "pipeline: done in {:.2}s: {ran} ran, {} cached{remote_note}",
                t0.elapsed().as_secs_f64(),
                count(Done::Cached),
            );
            Ok(())
        }
        Command::Plan { args, json } => {
            let recipe = load(&args)?;
            let plan = args.executor()?.plan(&recipe, None)?;
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
                    Ok((r, order)) => {
                        let implied = order.iter().filter(|s| Recipe::is_implied(s)).count();
                        let extra = if implied > 0 { format!(" + {implied} implied") } else { String::new() };
                        println!("ok: {} ({}: {} stages{extra})", path.display(), r.recipe.name, order.len() - implied)
                    }
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
            print!("{}", pipeline::recipe::json_schema());
            Ok(())
        }
        Command::Gc { recipes, all, dry_run, cache } => gc(&recipes, all, dry_run, &cache.location()),
        Command::Dev(DevCommand::RandomModel { arch, tokenizer, vocab, seed, out }) => {
            use pipeline_model::qwen::Variant;
            use pipeline_model::testing::{TinyGemma3, TinyQwen};
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
        Command::Bench(BenchCommand::Train {
            model,
            max_len,
            steps,
            device,
            dataset,
            json,
            gradient_checkpointing,
            cache,
        }) => {
            let opts = crate::bench::TrainOptions {
                model,
                max_len,
                steps: steps.max(1),
                device,
                dataset,
                cache: cache.location(),
                gradient_checkpointing,
            };
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
        Command::Bench(BenchCommand::Generate {
            model,
            prompt_tokens,
            new_tokens,
            f32,
            batch,
            device,
            dataset,
            json,
            cache,
        }) => {
            let opts = crate::bench::GenerateOptions {
                model,
                prompt_tokens: prompt_tokens.max(32),
                new_tokens: new_tokens.max(2),
                f32,
                batch: batch as usize,
                device,
                dataset,
                cache: cache.location(),
            };
            let r = crate::bench::generate(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "bench generate ({}, {} weights): prefill {:.1} tokens/s ({} tokens), decode {:.1} tokens/s ({} \
                     tokens), peak RSS {:.2} GiB",
                    r.device,
                    r.weights,
                    r.prefill_tokens_per_s,
                    r.prompt_tokens,
                    r.decode_tokens_per_s,
                    r.new_tokens,
                    r.peak_rss_bytes as f64 / (1u64 << 30) as f64
                );
                if let (Some(n), Some(t)) = (r.batch, r.batch_decode_tokens_per_s) {
                    println!("  batched decoding: {n} sequences, {t:.1} tokens/s in all");
                }
            }
            Ok(())
        }
        Command::Generate { model, prompt, prompts, system, generation, json, batch } => {
            let params = generation.params()?;
            let conversations = match (prompt, prompts) {
                (Some(p), None) => vec![("1".to_string(), vec![pipeline_infer::chat::Message::new("user", &p)], None)],
                (None, Some(file)) => pipeline::session::read_prompts(&file)?,
                _ => return Err(RecipeError::new("give --prompt TEXT or --prompts FILE.jsonl").into()),
            };
            let mut session = pipeline::session::Session::load(&model.choice())?;
            eprintln!("pipeline: {}", session.description);
            let mut rendered = Vec::with_capacity(conversations.len());
            for (id, mut messages, tools) in conversations {
                if let Some(sys) = &system {
                    messages.insert(0, pipeline_infer::chat::Message::new("system", sys));
                }
                rendered.push((id, session.prompt(&messages, tools.as_ref())?));
            }
            if json {
                // Not streamed: decode `batch` prompts at a time.
                for group in rendered.chunks(batch as usize) {
                    let prompts: Vec<Vec<u32>> = group.iter().map(|(_, p)| p.clone()).collect();
                    for ((id, prompt), g) in group.iter().zip(session.generate_batch(&prompts, &params)?) {
                        let calls = pipeline_infer::toolcall::parse(&g.text);
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": id, "text": g.text, "tool_calls": calls.calls,
                                "invalid_tool_calls": calls.invalid, "finish": g.finish,
                                "prompt_tokens": prompt.len(), "new_tokens": g.tokens.len(),
                                "prefill_tokens_per_s": g.prefill_tokens as f64 / g.prefill_s.max(1e-9),
                                "decode_tokens_per_s": g.tokens.len() as f64 / g.decode_s.max(1e-9),
                            })
                        );
                    }
                }
                return Ok(());
            }
            for (_, prompt) in rendered {
                let mut out = std::io::stdout();
                session.generate(&prompt, &params, &mut |t| {
                    use std::io::Write;
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                })?;
                println!();
            }
            Ok(())
        }
        Command::Chat { model, system, generation } => {
            let params = generation.params()?;
            let session = pipeline::session::Session::load(&model.choice())?;
            chat_repl(session, system, &params)
        }
        Command::Export { args, to, force, link } => {
            let recipe = load(&args)?;
            let exec = args.executor()?;
            exec.pull_finished(&recipe, None)?;
            let done = pipeline::export::export(&exec, &recipe, &to, force, link)?;
            for (stage, dir, n) in &done.stages {
                eprintln!("  exported {stage:<16} {n:>3} files → {}", dir.display());
            }
            if !done.missing.is_empty() {
                eprintln!(
                    "  not run yet (skipped): {}; run `pipeline run {}` first",
                    done.missing.join(", "),
                    args.recipe.display()
                );
            }
            if done.stages.is_empty() {
                bail!("nothing to export: no finished stage of kind {}", pipeline::stages::registry::exported_kinds().join(", "));
            }
            Ok(())
        }
        Command::Show { args, stage } => {
            let recipe = load(&args)?;
            let exec = args.executor()?;
            if !recipe.stages.contains_key(&stage) {
                let e = RecipeError::new(format!("no stage named `{stage}`")).in_file(&args.recipe);
                let names = recipe.stages.keys().map(String::as_str);
                return Err(match pipeline::error::did_you_mean(&stage, names) {
                    Some(s) => e.help(format!("did you mean `{s}`?")),
                    None => e,
                }
                .into());
            }
            exec.pull_finished(&recipe, Some(&stage))?;
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

fn gc(recipes: &[PathBuf], all: bool, dry_run: bool, cache: &CacheLocation) -> Result<()> {
    if recipes.is_empty() && !all {
        return Err(RecipeError::new("name the recipes whose cache entries to keep")
            .help("pipeline gc recipes/*.toml (or --all to empty the cache)")
            .into());
    }
    // Only the local copy: entries in a remote cache are never deleted here.
    let exec = cache.open()?;
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

/// The interactive loop of `pipeline chat`.
fn chat_repl(
    mut session: pipeline::session::Session,
    mut system: Option<String>,
    params: &pipeline_infer::generate::GenerationParams,
) -> Result<()> {
    use pipeline_infer::chat::Message;
    use std::io::{BufRead, Write};
    eprintln!("pipeline chat: {} (/reset, /system TEXT, /exit)", session.description);
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!(">>> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/reset" => {
                history.clear();
                continue;
            }
            l if l.starts_with("/system") => {
                system = Some(l["/system".len()..].trim().to_string()).filter(|s| !s.is_empty());
                history.clear();
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let mut messages: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
        messages.extend(history.iter().cloned());
        let prompt = session.prompt(&messages, None)?;
        let g = session.generate(&prompt, params, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        history.push(Message::new("assistant", &g.text));
    }
    Ok(())
}
