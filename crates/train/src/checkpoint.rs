//! Training checkpoints in a stage's work dir.
//!
//! `checkpoints/step-000040/` holds `adapter.safetensors` (the LoRA
//! matrices), `optimizer.safetensors` (AdamW moments and step count) and
//! `state.json` (step, loss log). A checkpoint is written into a `.tmp`
//! directory, `state.json` last, then renamed into place: a directory named
//! `step-N` is always complete. The newest two are kept.

use std::path::{Path, PathBuf};

use pipeline_fs::IoContext;

use crate::error::{Result, bad_file};
use serde::{Deserialize, Serialize};

/// One row of the loss log (also a line of `loss.csv`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Supervised tokens in this step.
    pub tokens: u64,
    /// Validation loss, when evaluated at this step.
    pub eval_loss: Option<f64>,
    /// When the step finished (seconds since the Unix epoch); absent in
    /// logs read back from `loss.csv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    pub log: Vec<LogRow>,
    /// Validation loss before the first step.
    #[serde(default)]
    pub initial_eval_loss: Option<f64>,
}

pub fn dir(work: &Path) -> PathBuf {
    work.join("checkpoints")
}

/// The newest complete checkpoint: (step, directory).
pub fn latest(work: &Path) -> Option<(u64, PathBuf)> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir(work)).ok()? {
        let p = e.ok()?.path();
        let Some(step) =
            p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse().ok())
        else {
            continue;
        };
        if p.join("state.json").is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, p));
        }
    }
    best
}

/// Writes checkpoint `step`: `write_files` fills the directory, then
/// `state.json` is written and the directory renamed into place. Returns
/// the checkpoint's directory.
pub fn save(work: &Path, state: &State, write_files: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = dir(work);
    std::fs::create_dir_all(&root).on("create", &root)?;
    let name = format!("step-{:06}", state.step);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).on("clear", &tmp)?;
    }
    std::fs::create_dir_all(&tmp).on("create", &tmp)?;
    write_files(&tmp)?;
    pipeline_fs::fault::point("lora-train.mid-checkpoint");
    pipeline_fs::write_atomic(&tmp.join("state.json"), &serde_json::to_vec(state).expect("serializes"))?;
    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).on("replace", &dest)?;
    }
    std::fs::rename(&tmp, &dest).on("write checkpoint", &dest)?;
    // Keep the newest two.
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&root)
        .on("list", &root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
        })
        .collect();
    steps.sort();
    for old in steps.iter().rev().skip(2) {
        std::fs::remove_dir_all(old).ok();
    }
    Ok(dest)
}

/// Reads `state.json` of a checkpoint directory.
pub fn load_state(dir: &Path) -> Result<State> {
    let p = dir.join("state.json");
    serde_json::from_slice(&std::fs::read(&p).on("read", &p)?)
        .map_err(|e| bad_file(&p, format!("corrupt checkpoint state: {e}")))
}

/// A checkpoint directory as one byte string (its name, then each file's
/// name and bytes), for a data-parallel run's rank 0 to hand its checkpoint
/// to the other ranks, whose machines may not share its disk.
pub fn pack(dir: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut put = |name: &str, data: &[u8]| {
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((data.len() as u64).to_le_bytes());
        out.extend(data);
    };
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| bad_file(dir, "not a checkpoint directory"))?;
    put("", name.as_bytes());
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).on("list", dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files {
        let n = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        put(&n, &std::fs::read(&f).on("read", &f)?);
    }
    Ok(out)
}

/// Writes what [`pack`] made into `work`'s checkpoints (as [`save`] does:
/// `state.json` last, then renamed into place); returns the directory.
pub fn unpack(work: &Path, packed: &[u8]) -> Result<PathBuf> {
    let corrupt = || bad_file(work, "a packed checkpoint from rank 0 is cut short");
    let mut entries = Vec::new();
    let mut rest = packed;
    while !rest.is_empty() {
        let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>> {
            if rest.len() < n {
                return Err(corrupt());
            }
            let (a, b) = rest.split_at(n);
            *rest = b;
            Ok(a.to_vec())
        };
        let n = u32::from_le_bytes(take(&mut rest, 4)?.try_into().expect("4 bytes")) as usize;
        let name = String::from_utf8(take(&mut rest, n)?).map_err(|_| corrupt())?;
        let len = u64::from_le_bytes(take(&mut rest, 8)?.try_into().expect("8 bytes")) as usize;
        entries.push((name, take(&mut rest, len)?));
    }
    let Some((first, dir_name)) = entries.first() else { return Err(corrupt()) };
    let dir_name = String::from_utf8(dir_name.clone()).map_err(|_| corrupt())?;
    if !first.is_empty() || !dir_name.starts_with("step-") || dir_name.contains(['/', '\\']) {
        return Err(corrupt());
    }
    let root = dir(work);
    let tmp = root.join(format!("{dir_name}.tmp"));
    std::fs::create_dir_all(&tmp).on("create", &tmp)?;
    let mut state = None;
    for (name, data) in &entries[1..] {
        if name.contains(['/', '\\']) || name.is_empty() {
            return Err(corrupt());
        }
        if name == "state.json" {
            state = Some(data);
            continue;
        }
        std::fs::write(tmp.join(name), data).on("write", &tmp.join(name))?;
    }
    pipeline_fs::write_atomic(&tmp.join("state.json"), state.ok_or_else(corrupt)?)?;
    let dest = root.join(&dir_name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).on("replace", &dest)?;
    }
    std::fs::rename(&tmp, &dest).on("write checkpoint", &dest)?;
    Ok(dest)
}
