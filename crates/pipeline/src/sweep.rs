//! Sweeps: variants of one recipe along axes of its keys.
//!
//! ```toml
//! [sweep]
//! "stages.train.learning_rate" = [1e-4, 2e-4, 4e-4]
//! "stages.train.rank" = [8, 16]
//! ```
//!
//! or `pipeline run R --sweep stages.train.rank=8,16`. Each axis is a recipe
//! key (as `--set` names it) and the values it takes; the variants are every
//! combination, in order (the last axis varies fastest). A variant *is* the
//! recipe with those `--set` overrides, so its cache keys are those of the
//! same recipe edited by hand, and variants share every entry their edits
//! do not reach (the data stages of a learning-rate sweep, the base model's
//! evaluation).
//!
//! Running a sweep runs its variants one after another. Processes sharing a
//! cache (or a remote `--cache-dir`) each claim a variant before running it
//! and pass over variants claimed by another live process, so several
//! machines split a sweep between them; [`Executor::claim`] says how.

use std::path::Path;
use std::str::FromStr;

use crate::error::RecipeError;
use crate::executor::{Executor, Plan};
use crate::recipe::{Override, Recipe};

/// One axis: a recipe key and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub keys: Vec<String>,
    pub values: Vec<toml::Value>,
}

impl Axis {
    pub fn key(&self) -> String {
        self.keys.join(".")
    }
}

impl FromStr for Axis {
    type Err = RecipeError;

    /// `KEY=V1,V2,…` (each value read as `--set` reads one), or
    /// `KEY=[V1, V2]` as a TOML list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            RecipeError::new(format!("--sweep `{s}` is not KEY=V1,V2,…"))
                .help("write e.g. --sweep stages.train.learning_rate=1e-4,2e-4 (or KEY=[…] for values with commas)")
        };
        let (key, list) = s.split_once('=').ok_or_else(usage)?;
        let whole: Override = format!("{key}={list}").parse().map_err(|_| usage())?;
        let values = match whole.value {
            toml::Value::Array(items) if list.trim_start().starts_with('[') => items,
            _ => list
                .split(',')
                .map(|v| format!("{key}={v}").parse::<Override>().map(|o| o.value))
                .collect::<Result<_, _>>()
                .map_err(|_| usage())?,
        };
        Axis::new(whole.keys, values, "--sweep")
    }
}

impl Axis {
    fn new(keys: Vec<String>, values: Vec<toml::Value>, origin: &str) -> Result<Axis, RecipeError> {
        let key = keys.join(".");
        if values.is_empty() {
            return Err(RecipeError::new(format!("{origin} `{key}` has no values")).key(key));
        }
        if keys.first().is_some_and(|k| k == "sweep") {
            return Err(RecipeError::new(format!("{origin} `{key}`: a sweep cannot vary itself")).key(key));
        }
        Ok(Axis { keys, values })
    }
}

/// The axes of a recipe: its `[sweep]` table, then `extra` (an axis given
/// again replaces the recipe's).
pub fn axes(recipe: &Recipe, extra: &[Axis]) -> Result<Vec<Axis>, RecipeError> {
    let mut out = Vec::new();
    for (key, values) in &recipe.sweep {
        let values =
            values.iter().map(|v| toml::Value::try_from(v.clone())).collect::<Result<Vec<_>, _>>().map_err(|e| {
                RecipeError::new(format!("[sweep] `{key}`: {e}")).in_file(&recipe.path).key(format!("sweep.{key}"))
            })?;
        let axis = Axis::new(key.split('.').map(str::to_string).collect(), values, "[sweep]")
            .map_err(|e| e.in_file(&recipe.path))?;
        out.push(axis);
    }
    for a in extra {
        out.retain(|b: &Axis| b.keys != a.keys);
        out.push(a.clone());
    }
    Ok(out)
}

/// One variant of a sweep.
#[derive(Debug, Clone)]
pub struct Variant {
    /// 1-based, in sweep order.
    pub index: usize,
    /// `learning_rate=0.0002 rank=8`: each axis by its last key (from the
    /// list's name through an index: `keep.1.fraction`; the whole key where
    /// two axes end alike); list and table values by their position.
    pub label: String,
    /// The value of each axis, as overrides of the recipe.
    pub settings: Vec<Override>,
    pub recipe: Recipe,
}

/// Every combination of `axes` applied to the recipe at `path` (after
/// `set`), in order: the first axis varies slowest.
pub fn variants(path: &Path, set: &[Override], axes: &[Axis]) -> Result<Vec<Variant>, RecipeError> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| RecipeError::new(format!("cannot read the recipe: {e}")).in_file(path).help("check the path"))?;
    // An axis by its last key; through a list index, from the list's name
    // (`keep.1.fraction`); by its whole key where two would read alike.
    let name = |a: &Axis| match a.keys.iter().rposition(|k| k.parse::<usize>().is_ok()) {
        Some(i) if i > 0 => a.keys[i - 1..].join("."),
        _ => a.keys.last().cloned().unwrap_or_default(),
    };
    let short: Vec<String> = axes
        .iter()
        .map(|a| {
            let clash = axes.iter().filter(|b| name(b) == name(a)).count() > 1;
            if clash { a.key() } else { name(a) }
        })
        .collect();
    let total: usize = axes.iter().map(|a| a.values.len()).product();
    let mut out = Vec::with_capacity(total);
    for n in 0..total {
        // Mixed-radix digits of n, the last axis fastest.
        let mut rest = n;
        let mut picks = vec![0; axes.len()];
        for (i, a) in axes.iter().enumerate().rev() {
            picks[i] = rest % a.values.len();
            rest /= a.values.len();
        }
        let mut settings = Vec::new();
        let mut label = Vec::new();
        for ((a, &k), name) in axes.iter().zip(&picks).zip(&short) {
            let value = a.values[k].clone();
            label.push(format!("{name}={}", show_value(&value, k)));
            settings.push(Override { keys: a.keys.clone(), raw: format!("{}={value}", a.key()), value });
        }
        let all: Vec<Override> = set.iter().cloned().chain(settings.iter().cloned()).collect();
        let label = label.join(" ");
        let mut recipe = Recipe::parse(&source, path, &all)
            .map_err(|e| RecipeError { message: format!("sweep variant {} ({label}): {}", n + 1, e.message), ..e })?;
        recipe.sweep.clear();
        recipe.variant = Some(label.clone());
        out.push(Variant { index: n + 1, label, settings, recipe });
    }
    Ok(out)
}

/// A value in a label: scalars as written, lists and tables by position.
fn show_value(v: &toml::Value, index: usize) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(_) | toml::Value::Table(_) => format!("#{}", index + 1),
        other => other.to_string(),
    }
}

/// The name a variant's claim goes by: a hash of every stage key of its
/// plan, so every process that plans the same variant agrees on it.
pub fn claim_name(plan: &Plan) -> String {
    let mut h = blake3::Hasher::new();
    for s in &plan.stages {
        h.update(s.name.as_bytes());
        h.update(b"=");
        h.update(s.key.as_str().as_bytes());
        h.update(b"\n");
    }
    format!("variant-{}", &h.finalize().to_hex()[..32])
}

/// How many variants use each key, for `plan`'s "shared by" column.
pub fn sharing(plans: &[Plan]) -> std::collections::HashMap<String, usize> {
    let mut n = std::collections::HashMap::new();
    for p in plans {
        for s in &p.stages {
            *n.entry(s.key.as_str().to_string()).or_insert(0) += 1;
        }
    }
    n
}

/// The plans of every variant (up to `until`).
pub fn plans(exec: &Executor, variants: &[Variant], until: Option<&str>) -> anyhow::Result<Vec<Plan>> {
    variants.iter().map(|v| exec.plan(&v.recipe, until)).collect()
}

/// The variables schedulers give each task of an array job its index in,
/// in the order they are read: ours (a variant's number, 1-based, as
/// `--variant N`), then Slurm's, Kubernetes Indexed Jobs' and SkyPilot's
/// (0-based).
pub const SCHEDULER_VARIABLES: &[(&str, &str)] = &[
    ("PIPELINE_VARIANT", "pipeline"),
    ("SLURM_ARRAY_TASK_ID", "Slurm array job"),
    ("JOB_COMPLETION_INDEX", "Kubernetes Indexed Job"),
    ("SKYPILOT_NODE_RANK", "SkyPilot"),
];

/// Where a worker of an array job starts in the sweep: the task index its
/// scheduler set, from `var` (the environment's lookup; see
/// [`SCHEDULER_VARIABLES`]), as the position of the first variant it runs
/// (0-based, taken modulo the variant count, so any index is a start);
/// `None` when no scheduler variable is set. From there it runs every
/// variant in turn, passing over those claimed elsewhere ([`run`]): each of
/// any number of workers starts on its own variant, and together they run
/// each variant once.
pub fn scheduler_start(var: impl Fn(&str) -> Option<String>) -> Result<Option<(usize, &'static str)>, RecipeError> {
    for (name, scheduler) in SCHEDULER_VARIABLES {
        let Some(value) = var(name) else { continue };
        let index: usize = value.trim().parse().map_err(|_| {
            RecipeError::new(format!("--variant auto: {name}={value:?} is not a task index"))
                .help(format!("{name} must be a whole number ({scheduler} sets it for each task)"))
        })?;
        let start = if *name == "PIPELINE_VARIANT" {
            index.checked_sub(1).ok_or_else(|| {
                RecipeError::new("--variant auto: PIPELINE_VARIANT=0")
                    .help("variants are numbered from 1, as `pipeline plan` lists them")
            })?
        } else {
            index
        };
        return Ok(Some((start, scheduler)));
    }
    Ok(None)
}

/// What [`run`] did with each variant (by index).
#[derive(Debug, Clone, Default)]
pub struct SweepRun {
    /// Run (or finished) by this process.
    pub ran: Vec<usize>,
    /// Every stage was cached already.
    pub cached: Vec<usize>,
    /// Claimed by another live process, and left to it.
    pub elsewhere: Vec<usize>,
    pub seconds: f64,
}

impl SweepRun {
    /// One line: `sweep done in 12.3s: ran 2 (1, 3), 1 cached, 1 run elsewhere (2)`.
    pub fn summary(&self) -> String {
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
        let mut line = format!("sweep done in {:.1}s: ran {}", self.seconds, self.ran.len());
        if !self.ran.is_empty() {
            line += &format!(" ({})", list(&self.ran));
        }
        line += &format!(", {} cached", self.cached.len());
        if !self.elsewhere.is_empty() {
            line += &format!(", {} run elsewhere ({})", self.elsewhere.len(), list(&self.elsewhere));
        }
        line
    }
}

/// Runs each variant in turn (up to stage `until`), claiming it first and
/// passing over those another process has claimed, so that any number of
/// processes sharing the cache finish the sweep between them. One line per
/// variant goes to the [`report`](crate::report).
pub fn run(exec: &Executor, variants: &[Variant], until: Option<&str>) -> anyhow::Result<SweepRun> {
    use crate::executor::{Claim, Status};
    use crate::report::println;
    let t0 = std::time::Instant::now();
    let mut out = SweepRun::default();
    for v in variants {
        let plan = exec.plan(&v.recipe, until)?;
        if plan.stages.iter().all(|s| s.status == Status::Cached) {
            println(&format!("pipeline: variant {} ({}) is cached", v.index, v.label));
            out.cached.push(v.index);
            continue;
        }
        let guard = match exec.claim(&claim_name(&plan))? {
            Claim::Ours(g) => g,
            Claim::Theirs(who) => {
                println(&format!("pipeline: variant {} ({}) is being run by {who}; passing over it", v.index, v.label));
                out.elsewhere.push(v.index);
                continue;
            }
        };
        println(&format!("pipeline: variant {}/{}: {}", v.index, variants.len(), v.label));
        exec.run(&v.recipe, until)?;
        drop(guard);
        out.ran.push(v.index);
    }
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// What one variant gave: its evaluation metrics and its training.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    pub index: usize,
    pub label: String,
    /// Axis key → value, as written in the recipe.
    pub settings: Vec<(String, String)>,
    /// The evaluation's metrics (of the adapter, else the base model);
    /// empty until the variant's `evaluate` stage has finished.
    pub metrics: std::collections::BTreeMap<String, pipeline_infer::eval::Metric>,
    /// Per `query_type` (or the evaluation's `group_by`).
    pub groups: std::collections::BTreeMap<String, std::collections::BTreeMap<String, pipeline_infer::eval::Metric>>,
    /// The `lora-train` stage's run time (its last run, when resumed).
    pub train_seconds: Option<f64>,
    pub eval_loss_after: Option<f64>,
    #[serde(skip)]
    pub log: Vec<pipeline_train::checkpoint::LogRow>,
    /// Why there are no metrics yet.
    pub missing: Option<String>,
}

/// Reads the finished results of each variant: the evaluating stage named
/// `eval_stage`, else the recipe's first (its adapter's column), and the
/// training it evaluates (else the recipe's first training), each through
/// its kind's [`StageKind::sweep_metrics`](crate::stages::StageKind::sweep_metrics).
pub fn results(exec: &Executor, variants: &[Variant], eval_stage: Option<&str>) -> anyhow::Result<Vec<VariantResult>> {
    use crate::executor::Finished;
    use crate::stages::kind::Artifact;
    use crate::stages::registry::StageSpec;
    let mut out = Vec::new();
    for v in variants {
        let recipe = &v.recipe;
        let is_eval = |n: &str, s: &StageSpec| s.evaluates().is_some() && !Recipe::is_implied(n);
        let eval = match eval_stage {
            Some(name) => {
                let found = recipe.stages.iter().find(|(n, s)| n.as_str() == name && is_eval(n, s));
                if found.is_none() {
                    let evals: Vec<&str> =
                        recipe.stages.iter().filter(|(n, s)| is_eval(n, s)).map(|(n, _)| n.as_str()).collect();
                    anyhow::bail!(
                        "--eval {name}: the recipe has no evaluate stage of that name (its evaluate stages: {})",
                        if evals.is_empty() { "none".to_string() } else { evals.join(", ") }
                    );
                }
                found
            }
            None => recipe.stages.iter().find(|(n, s)| is_eval(n, s)),
        };
        let train = eval.and_then(|(_, s)| s.evaluates()?.adapter).or_else(|| {
            let trains = |s: &StageSpec| s.model_artifact().is_some_and(|(a, _)| a == Artifact::Adapter);
            recipe.stages.iter().find(|(_, s)| trains(s)).map(|(n, _)| n.as_str())
        });
        let mut r = VariantResult {
            index: v.index,
            label: v.label.clone(),
            settings: v.settings.iter().map(|o| (o.keys.join("."), o.value.to_string())).collect(),
            metrics: Default::default(),
            groups: Default::default(),
            train_seconds: None,
            eval_loss_after: None,
            log: Vec::new(),
            missing: None,
        };
        if let Some(t) = train {
            if let Finished::Entry(dir) = exec.finished(recipe, t)? {
                let m = recipe.stages[t].sweep_metrics(&dir)?;
                (r.train_seconds, r.eval_loss_after, r.log) = (m.train_seconds, m.eval_loss_after, m.log);
            }
        }
        match eval {
            None => r.missing = Some("the recipe has no evaluate stage".into()),
            Some((name, spec)) => match exec.finished(recipe, name)? {
                Finished::Entry(dir) => {
                    let m = spec.sweep_metrics(&dir)?;
                    (r.metrics, r.groups) = (m.metrics, m.groups);
                }
                Finished::NotYet(why) => r.missing = Some(format!("`{name}` not finished ({why})")),
            },
        }
        out.push(r);
    }
    Ok(out)
}

/// `pipeline compare`'s result: the variants' results, ranked.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The recipe's name.
    pub name: String,
    /// The evaluate stage scored (`None`: the recipe's first).
    pub eval: Option<String>,
    /// The metric ranked by, best first (`None`: no variant has finished).
    pub metric: Option<String>,
    pub results: Vec<VariantResult>,
}

/// Reads every variant's results ([`results`]) and ranks them by `by`, else
/// by [`default_metric`]; a `by` no finished variant has is an error
/// listing those they have.
pub fn compare(
    exec: &Executor,
    variants: &[Variant],
    eval: Option<&str>,
    by: Option<&str>,
) -> anyhow::Result<Comparison> {
    let mut results = results(exec, variants, eval)?;
    let metric = match by {
        Some(m) => {
            if !results.iter().any(|r| r.metrics.contains_key(m)) && results.iter().any(|r| !r.metrics.is_empty()) {
                let known: std::collections::BTreeSet<&String> =
                    results.iter().flat_map(|r| r.metrics.keys()).collect();
                return Err(RecipeError::new(format!("--by {m}: no variant has this metric"))
                    .help(format!("one of: {}", known.into_iter().cloned().collect::<Vec<_>>().join(", ")))
                    .into());
            }
            Some(m.to_string())
        }
        None => default_metric(&results).map(str::to_string),
    };
    if let Some(m) = &metric {
        rank(&mut results, m);
    }
    let name = variants.first().map(|v| v.recipe.recipe.name.clone()).unwrap_or_default();
    Ok(Comparison { name, eval: eval.map(str::to_string), metric, results })
}

impl Comparison {
    /// The variants without metrics yet, and why: `variant 2: …`.
    pub fn missing(&self) -> Vec<String> {
        self.results.iter().filter_map(|r| r.missing.as_ref().map(|m| format!("variant {}: {m}", r.index))).collect()
    }

    /// Writes `compare.md`, `compare.json` and `loss.svg` (every variant's
    /// training loss) into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let ranked = self.metric.as_deref().map(|m| format!(", best first by `{m}`")).unwrap_or_default();
        let scored = self.eval.as_deref().map(|e| format!(", scored by `{e}`")).unwrap_or_default();
        let mut md = format!("# Sweep of `{}`\n\n{} variants{scored}{ranked}.\n\n", self.name, self.results.len());
        md += &markdown(&table(&self.results));
        let missing = self.missing();
        if !missing.is_empty() {
            md += &format!(
                "\nNot finished:\n{}\n",
                missing.iter().map(|m| format!("- {m}")).collect::<Vec<_>>().join("\n")
            );
        }
        md += "\nLoss curves: `loss.svg`. Per-variant metrics, by group too: `compare.json`.\n";
        std::fs::write(dir.join("compare.md"), &md)?;
        let json = serde_json::json!({
            "recipe": self.name, "evaluate_stage": self.eval, "ranked_by": self.metric, "variants": self.results,
        });
        std::fs::write(dir.join("compare.json"), serde_json::to_vec_pretty(&json)?)?;
        let curves: Vec<(String, Vec<_>)> =
            self.results.iter().map(|r| (format!("{}: {}", r.index, r.label), r.log.clone())).collect();
        let title = format!("{}: training loss by variant", self.name);
        pipeline_train::plot::loss_curves(&dir.join("loss.svg"), &title, &curves)?;
        Ok(())
    }
}

/// Metrics where lower is better.
pub fn lower_is_better(metric: &str) -> bool {
    matches!(metric, "loss" | "perplexity")
}

/// The metric a comparison ranks by when none is named: the first of call
/// executes, full-call exact match, ROUGE-L, eval loss that every finished
/// variant has.
pub fn default_metric(results: &[VariantResult]) -> Option<&'static str> {
    let done: Vec<&VariantResult> = results.iter().filter(|r| !r.metrics.is_empty()).collect();
    ["call_executes", "exact_match", "rouge_l", "loss"]
        .into_iter()
        .find(|m| !done.is_empty() && done.iter().all(|r| r.metrics.contains_key(*m)))
}

/// Sorts best first by `metric` (finished variants first, then in sweep order).
pub fn rank(results: &mut [VariantResult], metric: &str) {
    let lower = lower_is_better(metric);
    results.sort_by(|a, b| {
        let (x, y) = (a.metrics.get(metric).map(|m| m.value), b.metrics.get(metric).map(|m| m.value));
        match (x, y) {
            (Some(x), Some(y)) => {
                let o = if lower { x.total_cmp(&y) } else { y.total_cmp(&x) };
                o.then(a.index.cmp(&b.index))
            }
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.index.cmp(&b.index),
        }
    });
}

/// The comparison's columns: (metric key, header).
pub const COLUMNS: &[(&str, &str)] = &[
    ("decision_accuracy", "decision"),
    ("correct_tool", "correct tool"),
    ("call_executes", "call executes"),
    ("schema_valid_call", "schema-valid call"),
    ("no_call_when_not_needed", "no call when none needed"),
    ("exact_match", "exact match"),
    ("rouge_l", "ROUGE-L"),
    ("loss", "eval loss"),
];

/// The comparison as rows of cells (header first): rank, variant, the
/// metrics any variant has, training time.
pub fn table(results: &[VariantResult]) -> Vec<Vec<String>> {
    let cols: Vec<&(&str, &str)> =
        COLUMNS.iter().filter(|(k, _)| results.iter().any(|r| r.metrics.contains_key(*k))).collect();
    let mut header = vec!["#".to_string(), "variant".to_string()];
    header.extend(cols.iter().map(|(_, h)| h.to_string()));
    header.push("train min".into());
    let mut rows = vec![header];
    for r in results {
        let mut row = vec![r.index.to_string(), r.label.clone()];
        for (k, _) in &cols {
            row.push(match r.metrics.get(*k) {
                Some(m) if lower_is_better(k) || *k == "rouge_l" => format!("{:.4}", m.value),
                Some(m) => format!("{:.1} %", 100.0 * m.value),
                None => "–".into(),
            });
        }
        row.push(r.train_seconds.map_or("–".into(), |s| format!("{:.1}", s / 60.0)));
        rows.push(row);
    }
    rows
}

/// [`table`] as Markdown.
pub fn markdown(rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    for (i, row) in rows.iter().enumerate() {
        s += &format!("| {} |\n", row.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
        if i == 0 {
            s += &format!(
                "|{}\n",
                row.iter().enumerate().map(|(j, _)| if j == 1 { "---|" } else { "---:|" }).collect::<String>()
            );
        }
    }
    s
}

/// [`table`] as aligned text.
pub fn text(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..n).map(|j| rows.iter().filter_map(|r| r.get(j)).map(|c| c.chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(j, c)| if j == 1 { format!("{c:<w$}", w = widths[j]) } else { format!("{c:>w$}", w = widths[j]) })
            .collect();
        s += cells.join("  ").trim_end();
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_tasks_start_where_their_scheduler_says() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(scheduler_start(env(&[])).unwrap(), None);
        assert_eq!(scheduler_start(env(&[("SLURM_ARRAY_TASK_ID", "5")])).unwrap(), Some((5, "Slurm array job")));
        assert_eq!(
            scheduler_start(env(&[("JOB_COMPLETION_INDEX", "0")])).unwrap(),
            Some((0, "Kubernetes Indexed Job"))
        );
        assert_eq!(scheduler_start(env(&[("SKYPILOT_NODE_RANK", "3")])).unwrap(), Some((3, "SkyPilot")));
        // Ours is a variant number (1-based) and wins over a scheduler's.
        let both = env(&[("SLURM_ARRAY_TASK_ID", "5"), ("PIPELINE_VARIANT", "2")]);
        assert_eq!(scheduler_start(both).unwrap(), Some((1, "pipeline")));
        let err = scheduler_start(env(&[("SLURM_ARRAY_TASK_ID", "x")])).unwrap_err().to_string();
        assert!(err.contains("SLURM_ARRAY_TASK_ID") && err.contains("not a task index"), "{err}");
        assert!(scheduler_start(env(&[("PIPELINE_VARIANT", "0")])).is_err());
    }

    #[test]
    fn axes_from_the_command_line() {
        let a: Axis = "stages.train.learning_rate=1e-4,2e-4".parse().unwrap();
        assert_eq!(a.keys, ["stages", "train", "learning_rate"]);
        assert_eq!(a.values, [toml::Value::Float(1e-4), toml::Value::Float(2e-4)]);
        let b: Axis = "stages.train.targets=[\"all-linear\", [\"q_proj\", \"v_proj\"]]".parse().unwrap();
        assert_eq!(b.values.len(), 2);
        assert!(b.values[1].is_array());
        let c: Axis = "stages.chat.train_on=all-assistant,first-assistant".parse().unwrap();
        assert_eq!(c.values[1], toml::Value::String("first-assistant".into()));
        assert!("stages.train.rank".parse::<Axis>().is_err());
        assert!("sweep.x=1,2".parse::<Axis>().is_err());
    }

    #[test]
    fn labels_name_each_axis_by_its_last_key_and_lists_by_position() {
        assert_eq!(show_value(&toml::Value::Float(0.0002), 0), "0.0002");
        assert_eq!(show_value(&toml::Value::Array(vec![]), 1), "#2");
        assert_eq!(show_value(&toml::Value::String("drop".into()), 0), "drop");
    }
}
