//! The sweep side of `run`, `plan` and `compare`: which recipes a command
//! works on, and the per-variant output.

use anyhow::{Result, bail};
use pipeline::Recipe;
use pipeline::error::RecipeError;
use pipeline::executor::{Claim, Executor, Status};
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
    let variants = sweep::variants(&args.recipe, &args.set, &axes)?;
    match &args.variant {
        None => Ok(Target::Sweep(variants)),
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

/// `pipeline run` of a sweep: each variant in turn, passing over those
/// another process has claimed.
pub fn run(exec: &Executor, variants: &[Variant], until: Option<&str>) -> Result<()> {
    let t0 = std::time::Instant::now();
    let (mut ran, mut cached, mut elsewhere) = (Vec::new(), Vec::new(), Vec::new());
    for v in variants {
        let plan = exec.plan(&v.recipe, until)?;
        if plan.stages.iter().all(|s| s.status == Status::Cached) {
            eprintln!("pipeline: variant {} ({}) is cached", v.index, v.label);
            cached.push(v.index);
            continue;
        }
        let guard = match exec.claim(&sweep::claim_name(&plan))? {
            Claim::Ours(g) => g,
            Claim::Theirs(who) => {
                eprintln!("pipeline: variant {} ({}) is being run by {who}; passing over it", v.index, v.label);
                elsewhere.push(v.index);
                continue;
            }
        };
        eprintln!("pipeline: variant {}/{}: {}", v.index, variants.len(), v.label);
        exec.run(&v.recipe, until)?;
        drop(guard);
        ran.push(v.index);
    }
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
    let mut line = format!("pipeline: sweep done in {:.1}s: ran {}", t0.elapsed().as_secs_f64(), ran.len());
    if !ran.is_empty() {
        line += &format!(" ({})", list(&ran));
    }
    line += &format!(", {} cached", cached.len());
    if !elsewhere.is_empty() {
        line += &format!(", {} run elsewhere ({})", elsewhere.len(), list(&elsewhere));
    }
    eprintln!("{line}");
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
    let mut results = sweep::results(&exec, &variants, eval.as_deref())?;
    let metric = match by {
        Some(m) => {
            if !results.iter().any(|r| r.metrics.contains_key(&m)) && results.iter().any(|r| !r.metrics.is_empty()) {
                let known: std::collections::BTreeSet<&String> =
                    results.iter().flat_map(|r| r.metrics.keys()).collect();
                bail!(
                    RecipeError::new(format!("--by {m}: no variant has this metric"))
                        .help(format!("one of: {}", known.into_iter().cloned().collect::<Vec<_>>().join(", ")))
                );
            }
            Some(m)
        }
        None => sweep::default_metric(&results).map(str::to_string),
    };
    if let Some(m) = &metric {
        sweep::rank(&mut results, m);
    }
    let rows = sweep::table(&results);
    let name = variants[0].recipe.recipe.name.clone();
    let dir = out.unwrap_or_else(|| std::path::PathBuf::from("sweeps").join(&name));
    std::fs::create_dir_all(&dir)?;
    let ranked = metric.as_deref().map(|m| format!(", best first by `{m}`")).unwrap_or_default();
    let scored = eval.as_deref().map(|e| format!(", scored by `{e}`")).unwrap_or_default();
    let mut md = format!("# Sweep of `{name}`\n\n{} variants{scored}{ranked}.\n\n", variants.len());
    md += &sweep::markdown(&rows);
    let missing: Vec<String> =
        results.iter().filter_map(|r| r.missing.as_ref().map(|m| format!("- variant {}: {m}", r.index))).collect();
    if !missing.is_empty() {
        md += &format!("\nNot finished:\n{}\n", missing.join("\n"));
    }
    md += "\nLoss curves: `loss.svg`. Per-variant metrics, by group too: `compare.json`.\n";
    std::fs::write(dir.join("compare.md"), &md)?;
    let json = serde_json::json!({"recipe": name, "evaluate_stage": eval, "ranked_by": metric, "variants": results});
    std::fs::write(dir.join("compare.json"), serde_json::to_vec_pretty(&json)?)?;
    let curves: Vec<(String, Vec<_>)> =
        results.iter().map(|r| (format!("{}: {}", r.index, r.label), r.log.clone())).collect();
    pipeline_train::plot::loss_curves(&dir.join("loss.svg"), &format!("{name}: training loss by variant"), &curves)?;
    print!("{}", sweep::text(&rows));
    for m in &missing {
        eprintln!("{m}");
    }
    eprintln!("compare: wrote {}/compare.md, compare.json, loss.svg{ranked}", dir.display());
    Ok(())
}
