//! Cache keys: what makes two stage runs "the same".
//!
//! A stage's output is reused when, and only when, its [`CacheKey`] matches
//! a finished entry in the store. The key is a blake3 hash of the stage's
//! [`Fingerprint`], which holds exactly the things that can change the output:
//!
//! 1. **`kind`** and **`version`**: which code produced it. Each stage kind has
//!    an explicit implementation version (`Stage::VERSION`); bump it whenever
//!    a change to the code would change the bytes a stage writes for the same
//!    inputs (a bug fix in tokenization, a new output file). Old entries then
//!    stop matching instead of being silently reused.
//! 2. **`params`**: the stage's parameters in canonical form: parsed through
//!    the recipe types, so *defaults are filled in* (writing `max_len = 2048`
//!    or relying on the default gives the same key) and formatting, key order
//!    and comments in the TOML do not matter. Parameters that reference other
//!    stages are *removed*: stage names are labels, not content (renaming a
//!    stage must not invalidate it).
//! 3. **`inputs`**: for each referenced stage, by the parameter that holds it
//!    (`dataset`, `conversations`, …), that stage's own key. Keys therefore
//!    chain: any change upstream changes every key downstream, which is what
//!    makes editing one byte of a data file re-run everything after it.
//! 4. **`outside`**: the *content* hash of anything read from outside the
//!    cache: data files, `tokenizer.json`, the chat template text, model
//!    weights; for a hub source, the resolved revision plus file hashes.
//!
//! Deliberately **not** hashed: the stage's name, the recipe's file name or
//! location, absolute paths, modification times, the wall clock, the host.
//! The same recipe on another machine, or in another directory, finds the
//! same keys, which is what lets a shared (remote) cache work. Modification
//! times are only used by [`super::hash::HashMemo`] to avoid re-reading a
//! large file whose content hash is already known; they never enter a key.
//!
//! The fingerprint is serialized as JSON with sorted object keys (serde_json
//! with maps as `BTreeMap`), prefixed with a domain tag, and hashed with
//! blake3. The fingerprint itself is stored next to each entry (in its
//! manifest) so `pipeline plan` can explain *what* changed when a key misses.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Domain separation for the hash, bumped if the fingerprint layout changes.
const KEY_DOMAIN: &str = "pipeline/stage-key/v1\n";

/// Everything that determines a stage's output. See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub kind: String,
    pub version: u32,
    /// Canonical parameters, defaults filled in, references removed.
    pub params: serde_json::Value,
    /// Parameter name of each input → key of the stage it names.
    pub inputs: BTreeMap<String, CacheKey>,
    /// Label of each outside input (e.g. `file:train.jsonl`) → content hash.
    pub outside: BTreeMap<String, String>,
}

impl Fingerprint {
    /// The key: blake3 over the domain tag and the canonical JSON.
    pub fn key(&self) -> CacheKey {
        let mut hasher = blake3::Hasher::new();
        hasher.update(KEY_DOMAIN.as_bytes());
        hasher.update(canonical_json(&serde_json::to_value(self).expect("fingerprint serializes")).as_bytes());
        CacheKey(hasher.finalize().to_hex().to_string())
    }

    /// Human-readable differences from an older fingerprint of the same
    /// stage, used by `plan` to say why a stage must run.
    pub fn diff(&self, old: &Fingerprint) -> Vec<String> {
        let mut why = Vec::new();
        if self.kind != old.kind {
            why.push(format!("kind changed ({} → {})", old.kind, self.kind));
        }
        if self.version != old.version {
            why.push(format!("implementation of {} changed (v{} → v{})", self.kind, old.version, self.version));
        }
        diff_json("", &old.params, &self.params, &mut why);
        for (role, key) in &self.inputs {
            match old.inputs.get(role) {
                Some(k) if k == key => {}
                _ => why.push(format!("input `{role}` changed")),
            }
        }
        for (label, hash) in &self.outside {
            match old.outside.get(label) {
                Some(h) if h == hash => {}
                Some(_) => why.push(format!("{label} changed")),
                None => why.push(format!("new {label}")),
            }
        }
        for label in old.outside.keys().filter(|l| !self.outside.contains_key(*l)) {
            why.push(format!("{label} no longer used"));
        }
        why
    }
}

fn diff_json(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_json(&p, x, y, out),
                    (None, Some(y)) => out.push(format!("parameter `{p}` added ({y})")),
                    (Some(x), None) => out.push(format!("parameter `{p}` removed (was {x})")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("parameter `{path}` changed ({a} → {b})")),
        _ => {}
    }
}

/// JSON with object keys sorted at every level and no whitespace.
pub fn canonical_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_sorted(v, &mut out);
    out
}

fn write_sorted(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).expect("string serializes"));
                out.push(':');
                write_sorted(&m[*k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A stage's cache key: 64 hex digits of blake3.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheKey(pub String);

impl CacheKey {
    /// The first 12 hex digits, for display.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(params: serde_json::Value) -> Fingerprint {
        Fingerprint {
            kind: "tokenize".into(),
            version: 1,
            params,
            inputs: BTreeMap::from([("conversations".into(), CacheKey("ab".into()))]),
            outside: BTreeMap::from([("tokenizer.json".into(), "cd".into())]),
        }
    }

    #[test]
    fn key_ignores_object_key_order() {
        let a = fp(serde_json::json!({"max_len": 512, "truncation": "keep-tail"}));
        let b = fp(serde_json::from_str(r#"{"truncation": "keep-tail", "max_len": 512}"#).unwrap());
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn key_changes_with_each_component() {
        let base = fp(serde_json::json!({"max_len": 512}));
        let mut v = base.clone();
        v.version = 2;
        let mut p = base.clone();
        p.params = serde_json::json!({"max_len": 513});
        let mut i = base.clone();
        i.inputs.insert("conversations".into(), CacheKey("ac".into()));
        let mut o = base.clone();
        o.outside.insert("tokenizer.json".into(), "ce".into());
        let keys = [base.key(), v.key(), p.key(), i.key(), o.key()];
        for (n, a) in keys.iter().enumerate() {
            for b in &keys[n + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(base.key().0.len(), 64);
    }

    #[test]
    fn diff_names_the_changed_parameter_and_input() {
        let old = fp(serde_json::json!({"max_len": 512}));
        let mut new = fp(serde_json::json!({"max_len": 1024}));
        new.inputs.insert("conversations".into(), CacheKey("zz".into()));
        let why = new.diff(&old);
        assert_eq!(why, vec!["parameter `max_len` changed (512 → 1024)", "input `conversations` changed"]);
    }
}
