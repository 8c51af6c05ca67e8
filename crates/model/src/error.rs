//! What can go wrong reading models and adapters, and running them.

use std::path::{Path, PathBuf};

/// An error of `pipeline-model`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    /// A tensor operation failed (shapes, devices, dtypes).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A model or adapter file that is not what it should be: not JSON, not
    /// GGUF, a missing key or tensor.
    #[error("{}: {message}", file.display())]
    BadFile { file: PathBuf, message: String },
    /// A file the model needs is not there (weights, tokenizer), with what
    /// to do.
    #[error("{0}")]
    Missing(String),
    /// Something the files ask for that this crate does not implement (an
    /// architecture, an adapter feature), named with what is supported.
    #[error("{0}")]
    Unsupported(String),
    /// An adapter that does not fit the model it is applied to.
    #[error("{0}")]
    Mismatch(String),
    /// A device that does not exist or that this build cannot use.
    #[error("{0}")]
    Device(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::BadFile`].
pub(crate) fn bad_file(file: impl AsRef<Path>, message: impl std::fmt::Display) -> Error {
    Error::BadFile { file: file.as_ref().to_path_buf(), message: message.to_string() }
}
