//! The commands: one function each, parsing nothing (see `args.rs`) and
//! computing nothing (see the crates): they call the library and format its
//! answers.
//!
//! Exit codes: 0 success, 2 recipe or usage errors, 1 runtime failures.

use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use clap::Parser;

use pipeline::error::RecipeError;
use pipeline::executor::{CacheLocation, Done, Finished, Status, execution_order};
use pipeline::recipe::{Override, Recipe};
use pipeline_train::Collective;

use crate::args::*;

/// Runs the CLI and maps errors to exit codes.
pub fn main() -> ExitCode {
    // `pipeline plan R | head`: end quietly when the reader goes away, as
    // Unix tools do (Rust ignores SIGPIPE, and println! would panic).
    #[cfg(unix)]
    // SAFETY: nothing has started a thread yet; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
    crate::console::init(cli.verbose);
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

/// The one recipe a command works on (a sweep's variant with `--variant`).
fn load(args: &RecipeArgs) -> Result<Recipe> {
    crate::sweep::one(args)
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run { args, until } => run(args, until),
        Command::Plan { args, json } => plan(args, json),
        Command::Fetch { args } => fetch(args),
        Command::Validate { recipes, set } => validate(recipes, set),
        Command::Schema => {
            print!("{}", pipeline::recipe::json_schema());
            Ok(())
        }
        Command::Gc { recipes, all, dry_run, remote, cache } => gc(&recipes, all, dry_run, remote, &cache.location()),
        Command::Dev(DevCommand::RandomModel { arch, tokenizer, vocab, seed, dtype, out }) => {
            random_model(arch, tokenizer, vocab, seed, &dtype, out)
        }
        Command::Bench(command) => crate::bench::run(command),
        Command::Generate { model, prompt, prompts, system, tools, generation, json, constrain_calls, batch } => {
            let tools = tools.as_deref().map(read_tools).transpose()?;
            generate(model, prompt, prompts, system, tools, generation, json, constrain_calls, batch)
        }
        Command::Chat { model, system, tools, generation } => {
            let tools = tools.as_deref().map(read_tools).transpose()?;
            let params = generation.params()?;
            let session = pipeline::session::Session::load(&model.choice())?;
            chat_repl(session, system, tools, &params)
        }
        Command::Export { args, to, force, link } => export(args, to, force, link),
        Command::Compare { args, eval, by, out } => crate::sweep::compare(&args, eval, by, out),
        Command::Show { args, stage } => show(args, stage),
        Command::EvalServer { args, stage, url, model, limit, predictions, json } => {
            eval_server(args, stage, pipeline::server_eval::ServerOptions { url, model, limit }, predictions, json)
        }
    }
}

/// `pipeline run`: runs the stages whose results are not cached.
fn run(args: RecipeArgs, until: Option<String>) -> Result<()> {
    let world = pipeline::distributed::world()?;
    if world.size() == 1 {
        return run_recipe(args, until, world);
    }
    // A data-parallel job: rank 0 reports; a failing rank ends them all.
    if world.rank() != 0 {
        pipeline::report::set_reporter(Box::new(pipeline::report::Silent));
    }
    match run_recipe(args, until, world.clone()) {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("error (rank {} of {}): {}", world.rank(), world.size(), render_error(&e));
            world.abort(1)
        }
    }
}

fn run_recipe(args: RecipeArgs, until: Option<String>, world: Rc<dyn Collective>) -> Result<()> {
    let recipe = match crate::sweep::target(&args)? {
        crate::sweep::Target::Recipe(r) => r,
        crate::sweep::Target::Sweep(_) if world.size() > 1 => bail!(
            RecipeError::new("a data-parallel job trains one variant of a sweep")
                .help("pass --variant N (or --variant auto in an array job) to each job's ranks")
        ),
        crate::sweep::Target::Sweep(variants) => {
            let exec = args.executor()?;
            eprintln!("pipeline: sweep of {} ({} variants)", variants[0].recipe.recipe.name, variants.len());
            return crate::sweep::run(&exec, &variants, until.as_deref());
        }
    };
    let exec = args.executor()?.with_world(world.clone());
    if world.rank() != 0 {
        exec.run(&recipe, until.as_deref())?;
        return Ok(());
    }
    eprintln!("pipeline: {} ({})", recipe.recipe.name, args.recipe.display());
    if world.size() > 1 {
        eprintln!("pipeline: data-parallel over {} ranks ({})", world.size(), world.engine());
    }
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

/// `pipeline plan`: what `run` would do, and why.
fn plan(args: RecipeArgs, json: bool) -> Result<()> {
    let recipe = match crate::sweep::target(&args)? {
        crate::sweep::Target::Recipe(r) => r,
        crate::sweep::Target::Sweep(variants) => return crate::sweep::plan(&args.executor()?, &variants, json),
    };
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

/// `pipeline fetch`: planning resolves every `hf://` source (datasets are
/// downloaded then, models' small files too); the base model's weights,
/// otherwise fetched when a stage reads them, are downloaded here.
fn fetch(args: RecipeArgs) -> Result<()> {
    let recipes = match crate::sweep::target(&args)? {
        crate::sweep::Target::Recipe(r) => vec![r],
        crate::sweep::Target::Sweep(variants) => variants.into_iter().map(|v| v.recipe).collect(),
    };
    let exec = args.executor()?;
    for recipe in &recipes {
        exec.plan(recipe, None)?;
        let model = pipeline::model_source::resolve_with_weights(&recipe.settings())?;
        println!(
            "{}: {} ({} weights file(s) in {})",
            recipe.recipe.name,
            model.source,
            model.weights.len(),
            model.dir.display()
        );
    }
    Ok(())
}

/// `pipeline validate`: parses and checks recipes without running anything.
fn validate(recipes: Vec<PathBuf>, set: Vec<Override>) -> Result<()> {
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

/// `pipeline dev random-model`: a random-weight checkpoint of a real
/// architecture, in a shape its family names.
fn random_model(shape: String, tokenizer: PathBuf, vocab: usize, seed: u64, dtype: &str, out: PathBuf) -> Result<()> {
    let dtype = if dtype == "bf16" { candle_core::DType::BF16 } else { candle_core::DType::F32 };
    pipeline_model::Arch::write_random(&shape, vocab, &out, &tokenizer, seed, dtype)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// A `--tools FILE.json`, as OpenAI tools.
fn read_tools(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--tools: cannot read {}", path.display()))?;
    pipeline_infer::tooluse::read_tools(&text).map_err(|e| {
        RecipeError::new(format!("--tools {}: {e}", path.display()))
            .help("give a JSON list of OpenAI tools: [{\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}]")
            .into()
    })
}

/// The line that reports an answer's tool calls (`→ name({…})`).
fn print_calls(message: &pipeline_infer::chat::Message) {
    for c in message.tool_calls.iter().flat_map(|t| t.as_array().cloned().unwrap_or_default()) {
        eprintln!("→ tool call {}({})", c["function"]["name"].as_str().unwrap_or_default(), c["function"]["arguments"]);
    }
}

/// `pipeline generate`: answers for prompts, streamed or as JSON lines.
#[allow(clippy::too_many_arguments)]
fn generate(
    model: ModelArgs,
    prompt: Option<String>,
    prompts: Option<PathBuf>,
    system: Option<String>,
    tools: Option<serde_json::Value>,
    generation: GenerationArgs,
    json: bool,
    constrain_calls: bool,
    batch: u64,
) -> Result<()> {
    let params = generation.params()?;
    let conversations = match (prompt, prompts) {
        (Some(p), None) => vec![("1".to_string(), vec![pipeline_infer::chat::Message::new("user", &p)], None)],
        (None, Some(file)) => pipeline::session::read_prompts(&file)?,
        _ => return Err(RecipeError::new("give --prompt TEXT or --prompts FILE.jsonl").into()),
    };
    let conversations: Vec<_> =
        conversations.into_iter().map(|(id, messages, own)| (id, messages, own.or_else(|| tools.clone()))).collect();
    let mut session = pipeline::session::Session::load(&model.choice())?;
    eprintln!("pipeline: {}", session.description);
    if constrain_calls {
        constrain_to_listed_tools(&mut session, &conversations, system.as_deref())?;
    }
    let mut rendered = Vec::with_capacity(conversations.len());
    for (id, mut messages, tools) in conversations {
        if let Some(sys) = &system {
            messages.insert(0, pipeline_infer::chat::Message::new("system", sys));
        }
        rendered.push((id, session.prompt(&messages, tools.as_ref())?));
    }
    if json {
        return print_json_answers(&mut session, &rendered, &params, batch as usize);
    }
    for (_, prompt) in rendered {
        let mut out = std::io::stdout();
        let g = session.generate(&prompt, &params, &mut |t| {
            use std::io::Write;
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        print_calls(&pipeline_infer::tooluse::assistant_message(&g.text));
    }
    Ok(())
}

/// `generate --constrain-calls`: calls decoded under the grammar of the
/// tools the prompts (and the system prompt) list.
fn constrain_to_listed_tools(
    session: &mut pipeline::session::Session,
    conversations: &[(String, Vec<pipeline_infer::chat::Message>, Option<serde_json::Value>)],
    system: Option<&str>,
) -> Result<()> {
    let mut catalogue = pipeline_infer::catalogue::Catalogue::default();
    for (_, messages, tools) in conversations {
        messages.iter().for_each(|m| catalogue.add_text(&m.content));
        if let Some(t) = tools {
            catalogue.add_list(t);
        }
    }
    if let Some(sys) = system {
        catalogue.add_text(sys);
    }
    if catalogue.is_empty() {
        return Err(RecipeError::new("--constrain-calls: the prompts list no tools")
            .help("give the tools in a <tools>[…]</tools> block of a message, or as `tools` in --prompts lines")
            .into());
    }
    eprintln!("pipeline: tool calls constrained to {} tools", catalogue.len());
    session.grammar = Some(pipeline_infer::constrain::CallGrammar::new(catalogue));
    Ok(())
}

/// `generate --json`: one JSON line per prompt (not streamed), `batch`
/// prompts decoded at a time.
fn print_json_answers(
    session: &mut pipeline::session::Session,
    rendered: &[(String, Vec<u32>)],
    params: &pipeline_infer::generate::GenerationParams,
    batch: usize,
) -> Result<()> {
    for group in rendered.chunks(batch) {
        let prompts: Vec<Vec<u32>> = group.iter().map(|(_, p)| p.clone()).collect();
        for ((id, prompt), g) in group.iter().zip(session.generate_batch(&prompts, params)?) {
            let calls = pipeline_infer::toolcall::parse(&g.text);
            let answer = pipeline_infer::tooluse::assistant_message(&g.text);
            println!(
                "{}",
                serde_json::json!({
                    "id": id, "text": g.text, "content": answer.content, "tool_calls": answer.tool_calls,
                    "invalid_tool_calls": calls.invalid, "finish": g.finish,
                    "prompt_tokens": prompt.len(), "new_tokens": g.tokens.len(),
                    "prefill_tokens_per_s": g.prefill_tokens as f64 / g.prefill_s.max(1e-9),
                    "decode_tokens_per_s": g.tokens.len() as f64 / g.decode_s.max(1e-9),
                })
            );
        }
    }
    Ok(())
}

/// `pipeline export`: copies the finished artifacts out of the cache.
fn export(args: RecipeArgs, to: PathBuf, force: bool, link: bool) -> Result<()> {
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
        bail!(
            "nothing to export: no finished stage of kind {}",
            pipeline::stages::registry::exported_kinds().join(", ")
        );
    }
    Ok(())
}

/// `pipeline eval-server`: a served model scored on an evaluate stage's rows.
fn eval_server(
    args: RecipeArgs,
    stage: String,
    opts: pipeline::server_eval::ServerOptions,
    predictions: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let recipe = load(&args)?;
    let exec = args.executor()?;
    let s = pipeline::server_eval::evaluate_server(&exec, &recipe, &stage, &opts)?;
    if let Some(path) = &predictions {
        let lines: String = s.predictions.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"url": opts.url, "stage": stage, "split": s.split, "overall": s.overall,
                "by_group": s.groups, "calls_left_in_content": s.calls_left_in_content, "seconds": s.seconds})
        );
        return Ok(());
    }
    println!("{} ({} split, {} rows) through {}:", stage, s.split, s.predictions.len(), opts.url);
    let mut columns = vec![("overall", &s.overall)];
    columns.extend(s.groups.iter().map(|(g, m)| (g.as_str(), m)));
    print!("{}", pipeline_infer::eval::text_table(&columns));
    if s.calls_left_in_content > 0 {
        println!(
            "{} answers hold a <tool_call> the server did not parse (not counted as calls)",
            s.calls_left_in_content
        );
    }
    Ok(())
}

/// `pipeline show`: prints the directory of a stage's finished result.
fn show(args: RecipeArgs, stage: String) -> Result<()> {
    let recipe = load(&args)?;
    match args.executor()?.finished(&recipe, &stage)? {
        Finished::Entry(dir) => println!("{}", dir.display()),
        Finished::NotYet(why) => bail!(
            "stage `{stage}` has no finished result for this recipe ({why}); run `pipeline run {} --until {stage}`",
            args.recipe.display()
        ),
    }
    Ok(())
}

/// `pipeline gc`: removes the cache entries no named recipe uses.
fn gc(recipes: &[PathBuf], all: bool, dry_run: bool, remote: bool, cache: &CacheLocation) -> Result<()> {
    if recipes.is_empty() && !all && !remote {
        return Err(RecipeError::new("name the recipes whose cache entries to keep")
            .help(
                "pipeline gc recipes/*.toml (or --all to empty the cache, --remote for the remote's abandoned uploads)",
            )
            .into());
    }
    let executor = cache.open()?;
    if remote {
        let r = executor.remote().ok_or_else(|| {
            RecipeError::new("--remote: the cache is not remote")
                .help("name it with --cache-dir s3://… (or gs://, az://, http(s)://)")
        })?;
        let swept = r.sweep_uploads(None, pipeline_cache::remote::UPLOAD_IDLE, dry_run)?;
        for u in &swept.uploads {
            if dry_run {
                println!("would remove {}/{u}", r.url());
            }
        }
        eprintln!(
            "gc: {} {} abandoned upload{} ({:.1} MB) in {}",
            if dry_run { "would remove" } else { "removed" },
            swept.uploads.len(),
            if swept.uploads.len() == 1 { "" } else { "s" },
            swept.bytes as f64 / 1e6,
            r.url()
        );
        if recipes.is_empty() && !all {
            return Ok(());
        }
    }
    let keep = recipes.iter().map(|p| Recipe::load(p, &[])).collect::<Result<Vec<_>, _>>()?;
    let done = executor.gc(&keep, dry_run)?;
    if dry_run {
        for dir in &done.removed {
            println!("would remove {}", dir.display());
        }
    }
    eprintln!(
        "gc: {} {}, kept {}{}",
        if dry_run { "would remove" } else { "removed" },
        done.removed.len(),
        done.kept,
        if done.busy > 0 { format!(", skipped {} in use", done.busy) } else { String::new() }
    );
    Ok(())
}

/// What a line typed into `pipeline chat` asks for.
enum ChatLine {
    /// A user turn or a tool result was added: answer it.
    Answer,
    /// A command that needs no answer, or an empty line.
    Nothing,
    Exit,
}

/// Applies one typed line to the conversation: a command (`/reset`,
/// `/system TEXT`, `/tool RESULT`, `/exit`) or a user turn.
fn chat_line(line: &str, system: &mut Option<String>, history: &mut Vec<pipeline_infer::chat::Message>) -> ChatLine {
    use pipeline_infer::chat::Message;
    match line.trim() {
        "" => ChatLine::Nothing,
        "/exit" | "/quit" | "/bye" => ChatLine::Exit,
        "/reset" => {
            history.clear();
            ChatLine::Nothing
        }
        l if l.starts_with("/system") => {
            *system = Some(l["/system".len()..].trim().to_string()).filter(|s| !s.is_empty());
            history.clear();
            ChatLine::Nothing
        }
        l if l.starts_with("/tool") => {
            // The result of the last call, as a `tool` message.
            let last_call = history.last().and_then(|a| a.tool_calls.as_ref()?.get(0).cloned());
            let Some(call) = last_call else {
                eprintln!("(no tool call to answer)");
                return ChatLine::Nothing;
            };
            let mut m = Message::new("tool", l["/tool".len()..].trim());
            m.name = call["function"]["name"].as_str().map(str::to_string);
            m.tool_call_id = call["id"].as_str().map(str::to_string);
            history.push(m);
            ChatLine::Answer
        }
        _ => {
            history.push(Message::new("user", line));
            ChatLine::Answer
        }
    }
}

/// The interactive loop of `pipeline chat`.
fn chat_repl(
    mut session: pipeline::session::Session,
    mut system: Option<String>,
    tools: Option<serde_json::Value>,
    params: &pipeline_infer::generate::GenerationParams,
) -> Result<()> {
    use pipeline_infer::chat::Message;
    use std::io::{BufRead, Write};
    let commands =
        if tools.is_some() { "/reset, /system TEXT, /tool RESULT, /exit" } else { "/reset, /system TEXT, /exit" };
    eprintln!("pipeline chat: {} ({commands})", session.description);
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!(">>> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match chat_line(line.trim_end_matches(['\n', '\r']), &mut system, &mut history) {
            ChatLine::Exit => break,
            ChatLine::Nothing => continue,
            ChatLine::Answer => {}
        }
        let mut messages: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
        messages.extend(history.iter().cloned());
        let prompt = session.prompt(&messages, tools.as_ref())?;
        let g = session.generate(&prompt, params, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        // Kept as the server would return it: calls as `tool_calls`, which
        // the template renders as in training.
        let answer = pipeline_infer::tooluse::assistant_message(&g.text);
        print_calls(&answer);
        history.push(answer);
    }
    Ok(())
}
