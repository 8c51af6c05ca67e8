//! AdamW with state we can save and restore exactly, and learning-rate
//! schedules (constant, linear, cosine; with warmup), as in PyTorch /
//! transformers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Result, bad_file};
use candle_core::{Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken so far.
    pub t: u64,
    /// First and second moments by parameter name.
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> AdamW {
        AdamW { beta1, beta2, eps, weight_decay, t: 0, m: BTreeMap::new(), v: BTreeMap::new() }
    }

    /// One update of every parameter with its gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let m = match self.m.get(name) {
                Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
                None => (g * (1.0 - b1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let mut p = var.as_tensor().clone();
            if self.weight_decay > 0.0 {
                p = (p * (1.0 - lr * self.weight_decay))?;
            }
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&(p - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// Saves the moments (`m.<name>`, `v.<name>`) and step count.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in &self.m {
            map.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            map.insert(format!("v.{k}"), t.clone());
        }
        let meta = [("t".to_string(), self.t.to_string())].into_iter().collect::<HashMap<_, _>>();
        let data: Vec<(String, candle_core::Tensor)> = map.into_iter().collect();
        safetensors::serialize_to_file(data.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), path)
            .map_err(|e| bad_file(path, format!("cannot write: {e}")))
    }

    /// Restores what [`AdamW::save`] wrote.
    pub fn load(&mut self, path: &Path, device: &candle_core::Device) -> Result<()> {
        let bytes = std::fs::read(path).on("read", path)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad_file(path, format!("not an optimizer state: {e}")))?;
        self.t = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("t"))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad_file(path, "optimizer state without a step count"))?;
        for (name, t) in candle_core::safetensors::load_buffer(&bytes, device)? {
            if let Some(k) = name.strip_prefix("m.") {
                self.m.insert(k.to_string(), t);
            } else if let Some(k) = name.strip_prefix("v.") {
                self.v.insert(k.to_string(), t);
            }
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (when
/// positive), as `torch.nn.utils.clip_grad_norm_` does; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// How the learning rate changes over training (after warmup).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// Linear decay to zero (transformers' default).
    #[default]
    Linear,
    /// Half-cosine decay to zero.
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based) of `total`:
/// linear warmup over `warmup` steps, then the schedule.
pub fn learning_rate(schedule: Schedule, peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress).max(0.0),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // get_linear_schedule_with_warmup(warmup=2, total=10)
        let lr = |s| learning_rate(Schedule::Linear, 1.0, s, 10, 2);
        assert_eq!([lr(0), lr(1), lr(2), lr(6)], [0.0, 0.5, 1.0, 0.5]);
        let cos = |s| learning_rate(Schedule::Cosine, 1.0, s, 10, 0);
        assert!((cos(5) - 0.5).abs() < 1e-12 && (cos(0) - 1.0).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 3.0, 7, 10, 2), 3.0);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        let dev = candle_core::Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let params = vec![("p".to_string(), p.clone())];
        let grads = HashMap::from([("p".to_string(), Tensor::new(&[0.5f32, 0.25], &dev).unwrap())]);
        let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.1);
        opt.step(&params, &grads, 0.01).unwrap();
        // First step: m̂ = g, v̂ = g², update = g/|g| = sign(g); decay 1 - lr·wd.
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w as f32).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
