//! What can go wrong rendering, tokenizing and generating.

/// An error of `pipeline-infer`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    #[error(transparent)]
    Model(#[from] pipeline_model::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A chat template that does not compile, raises, or cannot be used for
    /// training (no end-of-turn marker, turns it cannot locate).
    #[error("{0}")]
    Template(String),
    /// The tokenizer failed to encode or decode.
    #[error("{0}")]
    Tokenizer(String),
    /// A prompt the model cannot take (empty, longer than its context).
    #[error("{0}")]
    Prompt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
