//! `pipeline export`: the finished artifacts of a recipe (adapter, eval
//! report, merged model, GGUF files, Modelfile) copied out of the cache into
//! a directory people can read, one sub-directory per stage.
//!
//! Files are copied; with `link`, hard-linked to the store entries instead
//! (no extra disk, but the files are then shared with the cache: editing one
//! in place would change the cache entry too). An existing file with other
//! content is never overwritten (unless `force`); re-exporting the same
//! results is a no-op.
//!
//! Beside the adapter (`lora-train`) and the merged model (`merge`) goes a
//! model card, `README.md` ([`crate::model_card`]), so each directory is a
//! complete hub repository.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::executor::{Executor, Status};
use crate::model_card::{self, CardFacts, Evaluation};
use crate::recipe::Recipe;

/// What was exported: (stage, directory, files).
pub struct Exported {
    pub stages: Vec<(String, PathBuf, usize)>,
    /// Stages of an exported kind with no finished result.
    pub missing: Vec<String>,
}

pub fn export(exec: &Executor, recipe: &Recipe, dest: &Path, force: bool, link: bool) -> Result<Exported> {
    let plan = exec.plan(recipe, None)?;
    let mut out = Exported { stages: Vec::new(), missing: Vec::new() };
    for sp in &plan.stages {
        if !recipe.stages[&sp.name].is_exported() {
            continue;
        }
        if sp.status != Status::Cached {
            out.missing.push(sp.name.clone());
            continue;
        }
        let src = exec.store().entry_dir(&sp.key);
        let dir = dest.join(&sp.name);
        let files = pipeline_cache::store::list_files(&src)?;
        for rel in &files {
            let (from, to) = (src.join(rel), dir.join(rel));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if to.exists() {
                if same_content(&from, &to)? {
                    continue;
                }
                if !force {
                    bail!(
                        "{} exists with other content; export to another directory, or pass --force to replace it",
                        to.display()
                    );
                }
                std::fs::remove_file(&to)?;
            }
            if !(link && std::fs::hard_link(&from, &to).is_ok()) {
                std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
            }
        }
        let mut n = files.len();
        if let Some((artifact, trained_by)) = recipe.stages[&sp.name].model_artifact() {
            let train = trained_by.unwrap_or(&sp.name);
            let facts = card_facts(exec, recipe, &plan, train)?;
            write_new(&dir.join("README.md"), &model_card::render(recipe, artifact, &facts), force)?;
            n += 1;
        }
        out.stages.push((sp.name.clone(), dir, n));
    }
    Ok(out)
}

/// Writes `text` to `path` unless it holds other content (then only with `force`).
fn write_new(path: &Path, text: &str, force: bool) -> Result<()> {
    if path.exists() && std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    if path.exists() && !force {
        bail!(
            "{} exists with other content; export to another directory, or pass --force to replace it",
            path.display()
        );
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// What the model card of a model made by training stage `train` says: the
/// base model's identity, the datasets, the training that made the adapter
/// and the recipe's first finished evaluation of it.
fn card_facts(exec: &Executor, recipe: &Recipe, plan: &crate::executor::Plan, train: &str) -> Result<CardFacts> {
    let provenance = crate::model_source::resolve(&recipe.settings()).map(|m| m.provenance()).unwrap_or_default();
    let mut facts = CardFacts {
        base_model: model_card::base_model_id(recipe, provenance.hub_id),
        license: provenance.license,
        architecture: provenance.architecture,
        datasets: model_card::datasets(recipe),
        ..Default::default()
    };
    let entry =
        |name: &str| plan.stage(name).filter(|s| s.status == Status::Cached).map(|s| exec.store().entry_dir(&s.key));
    if let Some(dir) = entry(train) {
        let manifest = pipeline_cache::Manifest::read(&dir)?;
        facts.training = Some((manifest.fingerprint.params, manifest.metrics));
    }
    let eval = recipe
        .stages
        .iter()
        .find(|(name, s)| s.evaluates().is_some_and(|e| e.adapter == Some(train)) && !Recipe::is_implied(name));
    if let Some(dir) = eval.and_then(|(name, _)| entry(name)) {
        let report = crate::stages::evaluate::EvalReport::read(&dir)?;
        let overall = |m: &str| report.models.get(m).map(|r| r.overall.clone());
        if let Some(tuned) = overall("adapter") {
            facts.eval = Some(Evaluation {
                split: report.split.clone(),
                task: serde_json::to_value(report.task)?.as_str().unwrap_or_default().to_string(),
                tuned,
                base: overall("base"),
            });
        }
    }
    Ok(facts)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    Ok(pipeline_cache::hash::hash_file(a)? == pipeline_cache::hash::hash_file(b)?)
}
