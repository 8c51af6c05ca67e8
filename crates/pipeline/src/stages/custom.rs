//! Stage kinds added by programs that use `pipeline` as a library.
//!
//! A program registers a kind before parsing recipes:
//!
//! ```ignore
//! pipeline::stages::register::<WordCount>("word-count");
//! ```
//!
//! and recipes may then hold `[stages.x] kind = "word-count"`. The table's
//! other keys are deserialized into the registered type, which implements
//! [`Stage`] like the built-in kinds (its `params` and `version` go into the
//! cache key) and names the stages it reads in [`CustomStage::inputs`].
//! See `examples/custom_stage.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;

use super::Stage;

/// A stage kind defined outside this crate.
pub trait CustomStage: Stage + Send + Sync {
    /// The stages this one reads: (parameter name, stage name). Their
    /// finished directories are `ctx.input(parameter)` in `run`.
    fn inputs(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

type Build = fn(toml::Value) -> Result<Arc<dyn CustomStage>, toml::de::Error>;

static REGISTRY: RwLock<BTreeMap<String, Build>> = RwLock::new(BTreeMap::new());

/// Adds `kind` (see [`super::register`], which checks that it is not a
/// built-in kind).
pub(super) fn add<P: CustomStage + DeserializeOwned + 'static>(kind: &str) {
    fn build<P: CustomStage + DeserializeOwned + 'static>(
        v: toml::Value,
    ) -> Result<Arc<dyn CustomStage>, toml::de::Error> {
        Ok(Arc::new(P::deserialize(v)?))
    }
    REGISTRY.write().expect("registry lock").insert(kind.to_string(), build::<P>);
}

/// Whether `kind` was registered.
pub fn is_registered(kind: &str) -> bool {
    REGISTRY.read().expect("registry lock").contains_key(kind)
}

/// The registered kinds, for messages.
pub fn kinds() -> Vec<String> {
    REGISTRY.read().expect("registry lock").keys().cloned().collect()
}

/// A `[stages.NAME]` table of a registered kind.
#[derive(Clone)]
pub struct CustomSpec {
    pub kind: String,
    pub stage: Arc<dyn CustomStage>,
    inputs: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for CustomSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomSpec").field("kind", &self.kind).field("inputs", &self.inputs).finish()
    }
}

impl CustomSpec {
    /// Builds the stage from its table (without `kind`).
    pub fn build(kind: &str, params: toml::Table) -> Result<CustomSpec, toml::de::Error> {
        let build = *REGISTRY.read().expect("registry lock").get(kind).expect("registered kind");
        let stage = build(toml::Value::Table(params))?;
        let inputs = stage.inputs();
        Ok(CustomSpec { kind: kind.to_string(), stage, inputs })
    }

    /// (parameter, stage) of each input.
    pub fn inputs(&self) -> &[(&'static str, String)] {
        &self.inputs
    }
}
