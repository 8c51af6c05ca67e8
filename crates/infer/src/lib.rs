//! Inference on the models of `pipeline-model`:
//!
//! - [`chat`]: chat templates rendered as transformers renders them
//!   (minijinja with Python-compatible filters), and assistant-turn spans;
//! - [`generate`]: prefill + decoding through the KV cache, sampling, stop
//!   tokens and strings, streaming, batched decoding;
//! - [`toolcall`]: tool calls parsed out of generated text;
//! - [`tooluse`]: tool-use data in OpenAI's shape (`tools`, `tool_calls`,
//!   `tool` messages), from the shapes datasets come in;
//! - [`catalogue`]: the tools a dataset knows, and whether a call passes
//!   their schema;
//! - [`toolbox`]: implementations of a dataset's tools, to execute calls;
//! - [`constrain`]: constrained decoding of tool calls against a catalogue;
//! - [`eval`]: scoring answers (tool-call verdicts, ROUGE-L) and tallies;
//! - [`runner`]: a split's rows scored and answered by one model (the
//!   evaluation loop: shared-prefix KV caches, batched decoding).

pub mod catalogue;
pub mod chat;
pub mod constrain;
pub mod error;
pub mod eval;
pub mod generate;
pub mod runner;
pub mod toolbox;
pub mod toolcall;
pub mod tooluse;

pub use error::{Error, Result};
