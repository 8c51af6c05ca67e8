//! The sweep side of `run`, `plan` and `compare`: which recipes a command
//! works on, and the per-variant output.

use anyhow::{Result, bail};
use pipeline::Recipe;
use pipeline::error::RecipeError;
use pipeline::executor::{Executor, Status};
use pipeline::sweep::{self, Variant};

use crate::args::RecipeArgs;

/// What a command works on: one recipe, or a sweep's variants.
pub enum Target {
    Recipe(Recipe),
    Sweep(Vec<Variant>),
}

/// The recipe with `--set`, or the variants of its sweep (only the one
/// `--variant` names, as a plain recipe).
pub fn target(args: &RecipeArgs) -> Result<Target> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let axes = sweep::axes(&recipe, &args.sweep)?;
    if axes.is_empty() {
        if args.variant.is_some() {
            bail!(
                RecipeError::new("--variant: the recipe has no sweep").help("add a [sweep] table or --sweep KEY=V1,V2")
            );
        }
        return Ok(Target::Recipe(recipe));
    }
    let mut variants = sweep::variants(&args.recipe, &args.set, &axes)?;
    match &args.variant {
        None => Ok(Target::Sweep(variants)),
        Some(auto) if auto == "auto" => {
            let start = sweep::scheduler_start(|name| std::env::var(name).ok())?;
            let Some((start, scheduler)) = start else {
                let names: Vec<&str> = sweep::SCHEDULER_VARIABLES.iter().map(|(n, _)| *n).collect();
                bail!(RecipeError::new("--variant auto: no scheduler set a task index").help(format!(
                    "it reads {}; run it as a task of an array job, or give --variant N",
                    names.join(", ")
                )));
            };
            // This worker's own variant first, then on from there.
            let first = start % variants.len();
            variants.rotate_left(first);
            eprintln!(
                "pipeline: {scheduler} task {start}: variant {} of {} first, then every unclaimed one",
                first + 1,
                variants.len()
            );
            Ok(Target::Sweep(variants))
        }
        Some(want) => {
            let found = variants.iter().find(|v| v.index.to_string() == *want || v.label == *want);
            match found {
                Some(v) => Ok(Target::Recipe(v.recipe.clone())),
                None => bail!(RecipeError::new(format!("--variant `{want}`: no such variant")).help(format!(
                    "name one by number (1-{}) or label: {}",
                    variants.len(),
                    variants.iter().map(|v| format!("\"{}\"", v.label)).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
    }
}

/// One recipe for commands that work on one (`export`, `show`).
pub fn one(args: &RecipeArgs) -> Result<Recipe> {
    match target(args)? {
        Target::Recipe(r) => Ok(r),
        Target::Sweep(v) => bail!(RecipeError::new(format!("the recipe sweeps {} variants", v.len())).help(format!(
            "pick one with --variant N or --variant \"LABEL\" (`pipeline plan {}` lists them)",
            args.recipe.display()
        ))),
    }
}

/// `pipeline plan` of a sweep: each variant's stages, and which variants
/// share each entry.
pub fn plan(exec: &Executor, variants: &[Variant], json: bool) -> Result<()> {
    let plans = sweep::plans(exec, variants, None)?;
    let shared = sweep::sharing(&plans);
    if json {
        let out: Vec<serde_json::Value> = variants
            .iter()
            .zip(&plans)
            .map(|(v, p)| {
                let stages: Vec<serde_json::Value> = p
                    .stages
                    .iter()
                    .map(|s| {
                        let mut j = serde_json::to_value(s).expect("serializes");
                        j["shared_by"] = shared[s.key.as_str()].into();
                        j
                    })
                    .collect();
                let settings: serde_json::Map<String, serde_json::Value> = v
                    .settings
                    .iter()
                    .map(|o| (o.keys.join("."), serde_json::to_value(&o.value).unwrap_or_default()))
                    .collect();
                serde_json::json!({"index": v.index, "label": v.label, "settings": settings, "stages": stages})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "variants": out }))?);
        return Ok(());
    }
    let distinct = shared.len();
    let total: usize = plans.iter().map(|p| p.stages.len()).sum();
    println!(
        "sweep: {} variants, {total} stage runs of which {distinct} distinct (the rest are shared)",
        variants.len()
    );
    for (v, p) in variants.iter().zip(&plans) {
        println!("\nvariant {}: {}", v.index, v.label);
        for s in &p.stages {
            let status = match (&s.status, s.step) {
                (Status::Resume, Some(step)) => format!("resume at step {step}"),
                (Status::Cached, _) => "cached".into(),
                (Status::Run, _) | (Status::Resume, None) => "run".into(),
            };
            let n = shared[s.key.as_str()];
            let share = if n == variants.len() {
                "shared by all".to_string()
            } else if n > 1 {
                format!("shared by {n}")
            } else {
                "own".to_string()
            };
            println!("  {:<16} {:<16} {}  {status:<8} {share}", s.name, s.kind, s.key.short());
        }
    }
    Ok(())
}

/// `pipeline run` of a sweep: [`sweep::run`], then its summary.
pub fn run(exec: &Executor, variants: &[Variant], until: Option<&str>) -> Result<()> {
    let done = sweep::run(exec, variants, until)?;
    eprintln!("pipeline: {}", done.summary());
    Ok(())
}

/// `pipeline compare`: ranks the variants by their evaluation and writes
/// compare.md, compare.json and loss.svg.
pub fn compare(
    args: &RecipeArgs,
    eval: Option<String>,
    by: Option<String>,
    out: Option<std::path::PathBuf>,
) -> Result<()> {
    let variants = match target(args)? {
        Target::Sweep(v) => v,
        Target::Recipe(_) => bail!(
            RecipeError::new("compare needs a sweep")
                .help("add a [sweep] table to the recipe, or --sweep KEY=V1,V2 (and no --variant)")
        ),
    };
    let exec = args.executor()?;
    let c = sweep::compare(&exec, &variants, eval.as_deref(), by.as_deref())?;
    let dir = out.unwrap_or_else(|| std::path::PathBuf::from("sweeps").join(&c.name));
    c.write(&dir)?;
    print!("{}", sweep::text(&sweep::table(&c.results)));
    for m in c.missing() {
        eprintln!("- {m}");
    }
    let ranked = c.metric.as_deref().map(|m| format!(", best first by `{m}`")).unwrap_or_default();
    eprintln!("compare: wrote {}/compare.md, compare.json, loss.svg{ranked}", dir.display());
    Ok(())
}
