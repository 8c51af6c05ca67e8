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
        // Walk down tables, and lists by index (`stages.data.keep.1.fraction`).
        let err = |msg: String| RecipeError::new(format!("--set `{}`: {msg}", self.raw)).key(self.keys.join("."));
        let mut cur: &mut toml::Value =
            table.entry(self.keys[0].clone()).or_insert_with(|| toml::Value::Table(Default::default()));
        if self.keys.len() == 1 {
            *cur = self.value.clone();
            return Ok(());
        }
        for (i, k) in self.keys.iter().enumerate().skip(1) {
            let is_last = i + 1 == self.keys.len();
            let at = self.keys[..i].join(".");
            cur = match cur {
                toml::Value::Table(t) if is_last => {
                    t.insert(k.clone(), self.value.clone());
                    return Ok(());
                }
                toml::Value::Table(t) => t.entry(k.clone()).or_insert_with(|| toml::Value::Table(Default::default())),
                toml::Value::Array(items) => {
                    let n = items.len();
                    let slot = k.parse::<usize>().ok().and_then(|idx| items.get_mut(idx)).ok_or_else(|| {
                        err(format!("`{at}` is a list of {n}: index it with 0 to {}", n.saturating_sub(1)))
                    })?;
                    if is_last {
                        *slot = self.value.clone();
                        return Ok(());
                    }
                    slot
                }
                _ => return Err(err(format!("`{at}` is not a table"))),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_keys_in_tables_and_lists() {
        let mut t: toml::Table = toml::from_str(
            "[stages.data]\nkind = \"fetch-dataset\"\nkeep = [{ fraction = 0.2 }, { fraction = 1.0 }]\n",
        )
        .unwrap();
        for s in ["stages.data.keep.1.fraction=0.5", "stages.data.limit=3", "recipe.seed=8"] {
            s.parse::<Override>().unwrap().apply(&mut t).unwrap();
        }
        assert_eq!(t["stages"]["data"]["keep"][1]["fraction"].as_float(), Some(0.5));
        assert_eq!(t["stages"]["data"]["keep"][0]["fraction"].as_float(), Some(0.2));
        assert_eq!(t["stages"]["data"]["limit"].as_integer(), Some(3));
        assert_eq!(t["recipe"]["seed"].as_integer(), Some(8));
        let e = "stages.data.keep.5.fraction=1".parse::<Override>().unwrap().apply(&mut t).unwrap_err();
        assert!(e.message.contains("`stages.data.keep` is a list of 2: index it with 0 to 1"), "{}", e.message);
        let e = "stages.data.kind.x=1".parse::<Override>().unwrap().apply(&mut t).unwrap_err();
        assert!(e.message.contains("`stages.data.kind` is not a table"), "{}", e.message);
    }
}
