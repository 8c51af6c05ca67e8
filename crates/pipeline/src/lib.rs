//! `pipeline`: turn a TOML recipe into a fine-tuned, quantized, ready-to-serve
//! small language model.
//!
//! This crate is the orchestration layer over the crates that do the work
//! (`pipeline-model`, `-train`, `-infer`, `-export`, `-cache`, `-data`; see
//! ARCHITECTURE.md). Read it top-down:
//!
//! - [`recipe`]: the TOML recipe: its types (which also generate
//!   `schema/recipe.schema.json`), parsing with located errors, `--set` overrides.
//! - [`stages`]: the stage kinds, listed once in [`stages::registry`]; each
//!   module maps its parameters onto a call into the crates below.
//! - [`executor`]: the DAG of stages (petgraph), `plan`, `run`, the finished
//!   entry of a stage, garbage collection.
//! - [`sweep`]: variants of a recipe along axes of its keys, sharing the
//!   stages they do not change; claims let several processes split them.
//! - [`model_source`]: `[model] base` → files on disk (local or hub).
//! - [`session`]: a model + tokenizer + template loaded for generation;
//!   [`export`]: copying finished artifacts out of the cache, with a
//!   [`model_card`] beside the adapter and the merged model.
//! - [`server_eval`]: an evaluate stage's rows scored through a served
//!   model's OpenAI API (`tools` in, `tool_calls` out).
//! - [`bench`]: training and generation speed (tokens/s, peak memory), and
//!   the same work in PyTorch + PEFT or llama.cpp in the same minutes.
//! - [`report`]: where progress and result lines go (the library itself
//!   never prints); [`threads`] and [`allocator`]: process-wide settings a
//!   program using the library should apply first.

pub mod allocator;
pub mod bench;
pub mod distributed;
pub mod error;
pub mod executor;
pub mod export;
pub mod model_card;
pub mod model_source;
pub mod recipe;
pub mod report;
pub mod server_eval;
pub mod session;
pub mod settings;
pub mod stages;
pub mod sweep;
pub mod threads;

pub use error::RecipeError;
pub use executor::{Executor, Plan, StagePlan, Status};
pub use recipe::Recipe;
