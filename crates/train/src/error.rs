//! What can go wrong training.

use std::path::{Path, PathBuf};

/// An error of `pipeline-train`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    #[error(transparent)]
    Model(#[from] pipeline_model::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A checkpoint or examples file that is not what it should be.
    #[error("{}: {message}", file.display())]
    BadFile { file: PathBuf, message: String },
    /// A configuration that cannot train (no examples, no module matched, …).
    #[error("{0}")]
    Config(String),
    /// The loss stopped being a number; `kept` names the newest checkpoint
    /// a rerun resumes from, when the run writes checkpoints.
    #[error(
        "the loss became {value} at step {step} (example {example}); stopped.{}",
        kept.as_ref().map(|k| format!(" The last good checkpoint ({k}) is kept and a rerun resumes from it: lower `learning_rate` or set `max_grad_norm` first")).unwrap_or_default()
    )]
    Diverged { value: f64, step: u64, example: String, kept: Option<String> },
    /// An [`crate::Observer`] failed (e.g. pushing a checkpoint).
    #[error(transparent)]
    Observer(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot draw {}: {message}", file.display())]
    Plot { file: PathBuf, message: String },
    #[error("cannot write the training logs in {}: {message}", dir.display())]
    Logs { dir: PathBuf, message: String },
    /// The ranks of a data-parallel run could not be joined or disagree.
    #[error("data-parallel training: {0}")]
    Collective(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::BadFile`].
pub(crate) fn bad_file(file: impl AsRef<Path>, message: impl std::fmt::Display) -> Error {
    Error::BadFile { file: file.as_ref().to_path_buf(), message: message.to_string() }
}
