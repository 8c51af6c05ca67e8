//! `pipeline export`: the finished artifacts of a recipe (adapter, eval
//! report, merged model, GGUF files, Modelfile) copied out of the cache into
//! a directory people can read, one sub-directory per stage.
//!
//! Files are copied; with `link`, hard-linked to the store entries instead
//! (no extra disk, but the files are then shared with the cache: editing one
//! in place would change the cache entry too). An existing file with other
//! content is never overwritten (unless `force`); re-exporting the same
//! results is a no-op.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::executor::{Executor, Status};
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
        out.stages.push((sp.name.clone(), dir, files.len()));
    }
    Ok(out)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    Ok(pipeline_cache::hash::hash_file(a)? == pipeline_cache::hash::hash_file(b)?)
}
