//! `--set stages.train.rank=8`: command-line overrides of recipe keys.

use std::str::FromStr;

use crate::error::RecipeError;

/// One `KEY=VALUE` override. The value is read as a TOML value when it parses
/// as one (`8`, `true`, `0.1`, `"text"`, `["a", "b"]`), else as a bare string.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub keys: Vec<String>,
    pub value: toml::Value,
    /// The text as given, for messages.
    pub raw: String,
}

impl FromStr for Override {
    type Err = RecipeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            RecipeError::new(format!("--set `{s}` is not KEY=VALUE"))
                .help("write e.g. --set stages.train.rank=8 or --set model.base=hf://google/gemma-3-1b-it")
        };
        let (key, value) = s.split_once('=').ok_or_else(usage)?;
        let keys: Vec<String> = key.trim().split('.').map(|k| k.trim().to_string()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(usage());
        }
        let value = value.trim();
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        Ok(Override { keys, value: parsed, raw: s.to_string() })
    }
}

impl Override {
    /// Sets the value in a parsed recipe table, creating tables on the way.
    pub fn apply(&self, table: &mut toml::Table) -> Result<(), RecipeError> {
        let (last, parents) = self.keys.split_last().expect("non-empty keys");
        // `stages.NAME.KEY` must name a stage the recipe has: a typo would
        // otherwise create a stage without a kind.
        if let [first, stage, _, ..] = self.keys.as_slice() {
            let stages = table.get("stages").and_then(toml::Value::as_table);
            if first == "stages" && stages.is_some_and(|t| !t.contains_key(stage)) {
                let names: Vec<&str> = stages.map_or(Vec::new(), |t| t.keys().map(String::as_str).collect());
                let e = RecipeError::new(format!("`{}`: the recipe has no stage `{stage}`", self.raw))
                    .key(self.keys.join("."));
                return Err(match crate::error::did_you_mean(stage, names.iter().copied()) {
                    Some(s) => e.help(format!("did you mean `stages.{s}`?")),
                    None => e.help(format!("its stages: {}", names.join(", "))),
                });
            }
        }
        let mut t = table;
        for (i, k) in parents.iter().enumerate() {
            let entry = t.entry(k.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
            t = match entry {
                toml::Value::Table(inner) => inner,
                _ => {
                    return Err(RecipeError::new(format!(
                        "--set `{}`: `{}` is not a table",
                        self.raw,
                        self.keys[..=i].join(".")
                    ))
                    .key(self.keys.join(".")));
                }
            };
        }
        t.insert(last.clone(), self.value.clone());
        Ok(())
    }
}
