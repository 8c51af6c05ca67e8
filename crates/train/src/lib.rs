//! LoRA training: the [`Trainer`] (the loop, configured by a plain
//! [`TrainConfig`]), the optimizer and schedules ([`optim`]), checkpoints
//! ([`checkpoint`]), the examples it reads ([`TokenizedSplit`]),
//! deterministic data order and dropout, one example's loss and gradients
//! (whole graph or with activation checkpointing), the loss plot, and the
//! logs HF Trainer and TensorBoard users read ([`logs`]).
//!
//! Determinism is what makes resume exact: the data order of an epoch and
//! every dropout mask are *derived* from (seed, epoch) and (seed, step,
//! micro-batch), not drawn from a running generator, so a run resumed at step
//! N computes exactly what an uninterrupted run computes from step N.

pub mod checkpoint;
pub mod collective;
pub mod error;
pub mod examples;
pub mod logs;
pub mod optim;
pub mod plot;
pub mod trainer;

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use collective::{Collective, Single};
pub use error::{Error, Result};
pub use examples::TokenizedSplit;
pub use trainer::{LoraConfig, LossAveraging, Observer, Summary, TrainConfig, Trainer};

use pipeline_model::CausalLm;
use pipeline_model::lora::{DropoutMask, Keep};

/// A generator for (seed, purpose, a, b), independent of any other.
pub fn rng_for(seed: u64, purpose: &str, a: u64, b: u64) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(&a.to_le_bytes());
    h.update(&b.to_le_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

/// Which training example the `g`-th micro-batch (0-based, over all epochs)
/// reads: a seeded shuffle per epoch.
pub struct DataOrder {
    seed: u64,
    n: usize,
    epoch: Option<(u64, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(seed: u64, n: usize) -> DataOrder {
        DataOrder { seed, n, epoch: None }
    }

    /// (epoch, example index) of micro-batch `g`.
    pub fn get(&mut self, g: u64) -> (u64, usize) {
        let epoch = g / self.n as u64;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.n).collect();
            order.shuffle(&mut rng_for(self.seed, "data-order", epoch, 0));
            self.epoch = Some((epoch, order));
        }
        (epoch, self.epoch.as_ref().unwrap().1[(g % self.n as u64) as usize])
    }
}

/// Dropout masks from a generator seeded for one micro-batch.
pub struct SeededDropout {
    rng: RefCell<ChaCha8Rng>,
}

impl SeededDropout {
    pub fn new(seed: u64, step: u64, micro: u64) -> SeededDropout {
        SeededDropout { rng: RefCell::new(rng_for(seed, "dropout", step, micro)) }
    }

    /// Where the generator stands; [`SeededDropout::seek`] returns there, so
    /// a recomputed layer draws the masks it drew the first time.
    pub fn position(&self) -> u128 {
        self.rng.borrow().get_word_pos()
    }

    pub fn seek(&self, position: u128) {
        self.rng.borrow_mut().set_word_pos(position)
    }
}

impl DropoutMask for SeededDropout {
    /// Element `i` is kept when the 16-bit part `i % 4` of the generator's
    /// draw `i / 4` (a u64) is at least `p·65536`. The draws are made in
    /// parallel tasks, each seeking the generator to its first draw, so the
    /// mask is the one a single pass makes (and training's results do not
    /// depend on the thread count).
    fn mask(&self, n: usize, p: f32) -> Option<Keep> {
        use rayon::prelude::*;
        if p <= 0.0 {
            return None;
        }
        // Mask words per task: 16 draws (32 generator words) fill one.
        const WORDS: usize = 1024;
        let threshold = (p * 65536.0) as u64;
        let mut rng = self.rng.borrow_mut();
        let start = rng.get_word_pos();
        let draws = n.div_ceil(4);
        let mut bits = vec![0u64; n.div_ceil(64)];
        let at_start: &ChaCha8Rng = &*rng;
        bits.par_chunks_mut(WORDS).enumerate().for_each(|(task, words)| {
            let mut r = at_start.clone();
            r.set_word_pos(start + (task * WORDS * 32) as u128);
            for (w, word) in words.iter_mut().enumerate() {
                let first = (task * WORDS + w) * 16;
                for d in 0..16.min(draws - first) {
                    let x: u64 = r.random();
                    for k in 0..4 {
                        *word |= u64::from((x >> (16 * k)) & 0xffff >= threshold) << (d * 4 + k);
                    }
                }
            }
        });
        rng.set_word_pos(start + 2 * draws as u128);
        Some(Keep::from_bits(bits, n, p))
    }
}

/// Attaches fresh LoRA matrices to the modules whose short name (`q_proj`)
/// is in `targets`: `A` seeded per module, `B` zero. Returns the trainable
/// variables as (`<module>.lora_A` / `.lora_B`, var) and the module paths.
pub fn attach_lora(
    model: &mut dyn CausalLm,
    targets: &[String],
    rank: usize,
    scale: f64,
    dropout: f32,
    seed: u64,
) -> Result<(Vec<(String, candle_core::Var)>, Vec<String>)> {
    use pipeline_model::lora::{Lora, init_lora_a, init_lora_b};
    let device = model.device().clone();
    let mut params = Vec::new();
    let mut modules = Vec::new();
    for (i, (name, linear)) in model.linears_mut().into_iter().enumerate() {
        let short = name.rsplit('.').next().unwrap_or_default();
        if !targets.iter().any(|t| t == short) {
            continue;
        }
        let mut rng = rng_for(seed, "lora-init", i as u64, 0);
        let a = candle_core::Var::from_tensor(&init_lora_a(rank, linear.in_features(), &mut rng, &device)?)?;
        let b = candle_core::Var::from_tensor(&init_lora_b(linear.out_features(), rank, &device)?)?;
        params.push((format!("{name}.lora_A"), a.clone()));
        params.push((format!("{name}.lora_B"), b.clone()));
        linear.lora = Some(Lora { a, b, scale, dropout });
        modules.push(name);
    }
    Ok((params, modules))
}

/// The training loss of one example: mean cross-entropy over the tokens the
/// mask marks, with logits computed only at those positions. Returns the
/// loss and the number of scored tokens.
pub fn example_loss(
    model: &dyn CausalLm,
    ids: &[u32],
    mask: &[u8],
    dropout: Option<&dyn DropoutMask>,
) -> Result<(Tensor, usize)> {
    // Position p predicts token p+1; it is scored when token p+1 is supervised.
    let hidden = model.hidden(&ids[..ids.len() - 1], dropout)?;
    Ok(model.masked_loss(&hidden, ids, mask)?)
}

/// The gradients of one example's loss times `scale`, by parameter name,
/// with the loss value and the number of scored tokens.
///
/// With `checkpointing` (PEFT/transformers' gradient checkpointing),
/// activations are kept only at layer boundaries: a first pass keeps each
/// layer's input, then the layers are recomputed one at a time, last first,
/// with the same dropout masks, and backpropagated from the gradient that
/// flows into their output. Memory holds one layer's activations instead of
/// every layer's, for one extra forward pass.
pub fn example_grads(
    model: &dyn CausalLm,
    ids: &[u32],
    mask: &[u8],
    dropout: Option<&SeededDropout>,
    scale: f64,
    params: &[(String, candle_core::Var)],
    checkpointing: bool,
) -> Result<(f64, usize, HashMap<String, Tensor>)> {
    let mut grads = HashMap::new();
    if !checkpointing {
        let (loss, n) = example_loss(model, ids, mask, dropout.map(|d| d as &dyn DropoutMask))?;
        let value = loss.to_scalar::<f32>()? as f64;
        let store = (loss * scale)?.backward()?;
        for (name, var) in params {
            if let Some(g) = store.get(var) {
                grads.insert(name.clone(), g.clone());
            }
        }
        return Ok((value, n, grads));
    }
    let mask_of = dropout.map(|d| d as &dyn DropoutMask);
    // Forward, keeping each layer's input (detached: no graph is kept).
    let layers = model.num_layers();
    let mut inputs = Vec::with_capacity(layers);
    let mut rng_at = Vec::with_capacity(layers);
    let mut x = model.embed_tokens(&ids[..ids.len() - 1])?;
    for i in 0..layers {
        rng_at.push(dropout.map(SeededDropout::position));
        let y = model.layer_forward(i, &x, mask_of)?.detach();
        inputs.push(std::mem::replace(&mut x, y));
    }
    // The head, from the last layer's output.
    let top = candle_core::Var::from_tensor(&x)?;
    let hidden = model.final_norm(top.as_tensor())?;
    let (loss, n) = model.masked_loss(&hidden, ids, mask)?;
    let value = loss.to_scalar::<f32>()? as f64;
    let Some(mut upstream) = (loss * scale)?.backward()?.remove(top.as_tensor()) else {
        return Ok((value, n, grads)); // nothing scored
    };
    // The layers, last first.
    while let Some(input) = inputs.pop() {
        let i = inputs.len();
        if let (Some(d), Some(pos)) = (dropout, rng_at[i]) {
            d.seek(pos);
        }
        // The embeddings are frozen: no gradient is needed below layer 0.
        let var = if i > 0 { Some(candle_core::Var::from_tensor(&input)?) } else { None };
        let x = match &var {
            Some(v) => v.as_tensor().clone(),
            None => input,
        };
        let y = model.layer_forward(i, &x, mask_of)?;
        let mut store = (y * &upstream)?.sum_all()?.backward()?;
        for (name, var) in params {
            if let Some(g) = store.remove(var.as_tensor()) {
                grads.insert(name.clone(), g);
            }
        }
        if let Some(v) = &var {
            upstream = store.remove(v.as_tensor()).expect("a layer's output depends on its input");
        }
    }
    Ok((value, n, grads))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel masks are those of one pass over the generator (each
    /// element's own 16 bits, in order), and leave the generator where that
    /// pass would: at every size, across task boundaries, mask after mask.
    #[test]
    fn dropout_masks_equal_a_single_pass_over_the_generator() {
        let (p, threshold) = (0.3f32, (0.3f32 * 65536.0) as u64);
        let dropout = SeededDropout::new(7, 3, 1);
        let mut reference = rng_for(7, "dropout", 3, 1);
        for n in [1, 3, 4, 63, 64, 65, 130, 16 * 1024 * 64 + 5, 100_000] {
            let mask = dropout.mask(n, p).unwrap();
            let mut x = vec![1f32; n];
            mask.mul_into(&vec![1f32; n], &mut x);
            let (mut bits, mut left) = (0u64, 0);
            for (i, &v) in x.iter().enumerate() {
                if left == 0 {
                    (bits, left) = (reference.random::<u64>(), 4);
                }
                let kept = bits & 0xffff >= threshold;
                (bits, left) = (bits >> 16, left - 1);
                assert_eq!(v != 0.0, kept, "n = {n}, element {i}");
            }
            assert_eq!(dropout.position(), reference.get_word_pos(), "n = {n}: the generator's position");
        }
    }
}
