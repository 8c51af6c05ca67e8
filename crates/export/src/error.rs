//! What can go wrong exporting.

use std::path::{Path, PathBuf};

/// An error of `pipeline-export`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    #[error(transparent)]
    Model(#[from] pipeline_model::Error),
    #[error(transparent)]
    Infer(#[from] pipeline_infer::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A file of the model or adapter that is not what it should be.
    #[error("{}: {message}", file.display())]
    BadFile { file: PathBuf, message: String },
    /// An adapter merged onto a base it was not trained on.
    #[error("{0}")]
    Mismatch(String),
    /// A tensor or module the target format has no name for.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::BadFile`].
pub(crate) fn bad_file(file: impl AsRef<Path>, message: impl std::fmt::Display) -> Error {
    Error::BadFile { file: file.as_ref().to_path_buf(), message: message.to_string() }
}
