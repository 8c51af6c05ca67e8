//! `pipeline`: turn a TOML recipe into a fine-tuned, quantized, ready-to-serve
//! small language model.
//!
//! The crate is a library with a thin binary (`src/main.rs`). Read it top-down:
//!
//! - [`recipe`]: the TOML recipe: its types (which also generate
//!   `schema/recipe.schema.json`), parsing with located errors, `--set` overrides.
//! - [`cache`]: content-addressed stage keys ([`cache::key`]) and the on-disk
//!   store where finished stages are published atomically ([`cache::store`]).
//! - [`executor`]: the DAG of stages (petgraph), `plan` and `run`.
//! - [`stages`]: one module per stage kind (`fetch-dataset`, `format-chat`,
//!   `tokenize`, …), each a small [`stages::Stage`] implementation.
//! - [`train`]: LoRA training pieces (AdamW, schedules, checkpoints, loss plot);
//!   [`adapter`]: PEFT adapter files.
//! - [`data`]: reading rows from hub datasets and local jsonl/json/csv/parquet.
//! - [`chat`]: chat templates (minijinja, HF-compatible) and turn spans.
//! - [`model`]: the architectures on candle (Gemma 3), LoRA layers, weight loading.
//! - [`model_source`]: resolving `[model] base` to files on disk.
//! - [`gguf_writer`] writes GGUF files; [`kquants`]: llama.cpp's K-quant encoders.
//! - [`cli`]: the command line (`pipeline run|plan|validate|schema|gc|show`);
//!   [`threads`]: the thread pool every command runs in.

pub mod adapter;
pub mod allocator;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod executor;
pub mod export;
pub mod fault;
pub mod generate;
pub mod gguf_writer;
pub mod kquants;
pub mod model;
pub mod model_source;
pub mod progress;
pub mod recipe;
pub mod session;
pub mod stages;
pub mod threads;
pub mod toolcall;
pub mod train;

pub use error::RecipeError;
pub use executor::{Executor, Plan, StagePlan, Status};
pub use recipe::Recipe;
