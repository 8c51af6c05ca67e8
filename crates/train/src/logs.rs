//! Training logs in the formats people read: Hugging Face Trainer's
//! `trainer_state.json` (its `log_history`), and TensorBoard event files
//! with the tags HF's `TensorBoardCallback` writes (`train/loss`,
//! `train/learning_rate`, `train/grad_norm`, `train/epoch`, `eval/loss`).
//!
//! Both are written from the loss log ([`LogRow`]s), so a finished
//! training's files hold exactly what `loss.csv` holds; [`TensorBoard`]
//! also follows a run live, one event per step.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tfrecord::protobuf::{Event, event::What};
use tfrecord::{EventWriter, EventWriterConfig};

use crate::checkpoint::LogRow;
use crate::error::{Error, Result};

/// How a run was laid out (what `trainer_state.json` records beside the log).
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub epochs: usize,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    /// Examples per optimizer step (the gradient accumulation; batch 1).
    pub examples_per_step: usize,
}

impl RunShape {
    /// HF's fractional epoch after `step` optimizer steps.
    fn epoch(&self, step: u64) -> f64 {
        let e = step as f64 / self.steps_per_epoch.max(1) as f64;
        (e * 1e4).round() / 1e4
    }
}

/// `trainer_state.json` as HF Trainer writes it (readable by
/// `transformers.TrainerState.load_from_json`): one `log_history` entry per
/// optimizer step (`loss`, `learning_rate`, `grad_norm`, `epoch`, `step`),
/// one per evaluation (`eval_loss`), and the closing train summary.
pub fn trainer_state(log: &[LogRow], initial_eval_loss: Option<f64>, shape: RunShape) -> Value {
    let mut history = Vec::new();
    if let Some(loss) = initial_eval_loss {
        history.push(json!({"epoch": 0.0, "eval_loss": loss, "step": 0}));
    }
    for r in log {
        history.push(json!({
            "epoch": shape.epoch(r.step),
            "grad_norm": r.grad_norm,
            "learning_rate": r.lr,
            "loss": r.loss,
            "step": r.step,
        }));
        if let Some(loss) = r.eval_loss {
            history.push(json!({"epoch": shape.epoch(r.step), "eval_loss": loss, "step": r.step}));
        }
    }
    let last = log.last().map_or(0, |r| r.step);
    if let (Some(first), Some(end)) = (log.first(), log.last()) {
        let mean = log.iter().map(|r| r.loss).sum::<f64>() / log.len() as f64;
        let runtime = match (first.time, end.time) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        history.push(json!({
            "epoch": shape.epoch(last),
            "step": last,
            "total_flos": 0.0,
            "train_loss": mean,
            "train_runtime": runtime,
        }));
    }
    json!({
        "best_global_step": null,
        "best_metric": null,
        "best_model_checkpoint": null,
        "epoch": shape.epoch(last),
        "eval_steps": shape.eval_every,
        "global_step": last,
        "is_hyper_param_search": false,
        "is_local_process_zero": true,
        "is_world_process_zero": true,
        "log_history": history,
        "logging_steps": 1,
        "max_steps": shape.total_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": shape.epochs,
        "save_steps": shape.checkpoint_every,
        "stateful_callbacks": {},
        "total_flos": 0.0,
        "train_batch_size": shape.examples_per_step,
        "trial_name": null,
        "trial_params": null,
    })
}

/// A TensorBoard event file (`events.out.tfevents.<time>.pipeline.<pid>`)
/// in a log directory, written as a run goes.
pub struct TensorBoard {
    writer: EventWriter<BufWriter<File>>,
    path: PathBuf,
    shape: RunShape,
}

impl TensorBoard {
    /// Starts a new event file in `dir` (created if missing); TensorBoard
    /// reads every event file of a directory as one run.
    pub fn create(dir: &Path, shape: RunShape) -> Result<TensorBoard> {
        let err = |e: tfrecord::Error| Error::Logs { dir: dir.to_path_buf(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| Error::Logs { dir: dir.to_path_buf(), message: e.to_string() })?;
        // TensorBoard reads every file whose name holds `tfevents`.
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let path = dir.join(format!("events.out.tfevents.{secs}.pipeline.{}", std::process::id()));
        let mut writer = EventWriter::create(&path, EventWriterConfig { auto_flush: true }).map_err(err)?;
        // The first record names the format version, as TensorFlow's writer does.
        let version = Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
            source_metadata: None,
        };
        writer.write_event(version).map_err(err)?;
        Ok(TensorBoard { writer, path, shape })
    }

    /// The validation loss before training (step 0).
    pub fn initial_eval(&mut self, loss: f64) -> Result<()> {
        self.scalar("eval/loss", 0, None, loss)
    }

    /// One optimizer step's scalars.
    pub fn row(&mut self, r: &LogRow) -> Result<()> {
        self.scalar("train/loss", r.step, r.time, r.loss)?;
        self.scalar("train/learning_rate", r.step, r.time, r.lr)?;
        self.scalar("train/grad_norm", r.step, r.time, r.grad_norm)?;
        self.scalar("train/epoch", r.step, r.time, self.shape.epoch(r.step))?;
        if let Some(loss) = r.eval_loss {
            self.scalar("eval/loss", r.step, r.time, loss)?;
        }
        Ok(())
    }

    fn scalar(&mut self, tag: &str, step: u64, time: Option<f64>, value: f64) -> Result<()> {
        let meta = tfrecord::EventMeta::new(step as i64, time.unwrap_or_else(now));
        self.writer
            .write_scalar(tag, meta, value as f32)
            .map_err(|e| Error::Logs { dir: self.path.clone(), message: e.to_string() })
    }
}

/// Writes a whole log as one TensorBoard event file in `dir`.
pub fn write_tensorboard(dir: &Path, log: &[LogRow], initial_eval_loss: Option<f64>, shape: RunShape) -> Result<()> {
    let mut tb = TensorBoard::create(dir, shape)?;
    if let Some(loss) = initial_eval_loss {
        tb.initial_eval(loss)?;
    }
    for r in log {
        tb.row(r)?;
    }
    Ok(())
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, eval: Option<f64>) -> LogRow {
        LogRow {
            step,
            epoch: 0,
            loss: 2.0 / step as f64,
            lr: 1e-4,
            grad_norm: 0.5,
            tokens: 10,
            eval_loss: eval,
            time: Some(1e9 + step as f64),
        }
    }

    #[test]
    fn trainer_state_has_one_history_entry_per_step_and_per_evaluation() {
        let shape = RunShape {
            steps_per_epoch: 4,
            total_steps: 8,
            epochs: 2,
            eval_every: 4,
            checkpoint_every: 2,
            examples_per_step: 4,
        };
        let log: Vec<LogRow> = (1..=8).map(|s| row(s, (s % 4 == 0).then_some(1.0))).collect();
        let state = trainer_state(&log, Some(3.0), shape);
        let history = state["log_history"].as_array().unwrap();
        // 1 initial evaluation + 8 steps + 2 evaluations + the summary.
        assert_eq!(history.len(), 12);
        assert_eq!(history[0]["eval_loss"], 3.0);
        assert_eq!(history[1]["step"], 1);
        assert_eq!(history[1]["epoch"], 0.25);
        assert_eq!(history[5]["eval_loss"], 1.0);
        assert_eq!(history[11]["train_runtime"], 7.0);
        assert_eq!(state["global_step"], 8);
        assert_eq!(state["epoch"], 2.0);
    }

    #[test]
    fn event_files_are_named_as_tensorboard_looks_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let shape = RunShape {
            steps_per_epoch: 2,
            total_steps: 2,
            epochs: 1,
            eval_every: 0,
            checkpoint_every: 1,
            examples_per_step: 1,
        };
        write_tensorboard(dir.path(), &[row(1, None), row(2, Some(0.7))], Some(1.0), shape).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(std::fs::metadata(&files[0]).unwrap().len() > 100);
    }
}
