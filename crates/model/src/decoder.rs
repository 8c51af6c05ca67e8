//! What the decoder-only architectures share: an architecture file
//! implements [`Decoder`] (its embeddings, one decoder layer, the final norm
//! and the head), and [`CausalLm`] follows from it: the layer loop over a
//! sequence, a cached continuation or a batched decoding step, LoRA module
//! names, layer-by-layer access for activation checkpointing.

use candle_core::{Device, Result, Tensor};

use crate::kv::{KvCache, Rows, Seq};
use crate::lora::{DropoutMask, LoraLinear};
use crate::{CausalLm, TARGETS};

/// Which generation of the Qwen-style decoder ([`crate::qwen`]) a model
/// runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    #[default]
    Qwen2,
    Qwen3,
    /// The Llama family's decoder ([`crate::llama`]).
    Llama,
}

/// The parts of a decoder-only transformer that differ between
/// architectures.
pub trait Decoder {
    fn device(&self) -> &Device;
    /// The context length the model was trained for.
    fn max_position_embeddings(&self) -> usize;
    /// The longest sequence the rotary tables were built for.
    fn max_positions(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// Each layer's adaptable linears, in [`TARGETS`] order
    /// (q, k, v, o, gate, up, down).
    fn layer_linears(&mut self) -> Vec<[&mut LoraLinear; 7]>;
    /// Token embeddings (scaled as the architecture does).
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor>;
    /// Decoder layer `i` on rows `x` belonging to `seqs` (one sequence, or
    /// one new token each of several cached sequences).
    fn layer(&self, i: usize, x: &Tensor, seqs: &mut [Seq<'_>], dropout: Option<&dyn DropoutMask>) -> Result<Tensor>;
    fn final_norm(&self, x: &Tensor) -> Result<Tensor>;
    /// Mean cross-entropy of the predictions at rows of `hidden`.
    fn loss(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor>;
    /// Logits for rows of `hidden`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
}

/// The layer loop: embeddings, every layer, the final norm.
fn run<D: Decoder>(m: &D, ids: &[u32], mut rows: Rows<'_, '_>, dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
    let mut x = m.embed_tokens(ids)?;
    for i in 0..m.num_layers() {
        x = m.layer(i, &x, &mut rows.seqs(i, ids.len()), dropout)?;
    }
    m.final_norm(&x)
}

impl<D: Decoder> CausalLm for D {
    fn device(&self) -> &Device {
        Decoder::device(self)
    }

    fn max_position_embeddings(&self) -> usize {
        Decoder::max_position_embeddings(self)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let layers = self.layer_linears().into_iter().enumerate();
        layers
            .flat_map(|(i, linears)| {
                linears.into_iter().zip(TARGETS).map(move |(l, name)| {
                    let block = if ["gate_proj", "up_proj", "down_proj"].contains(&name) { "mlp" } else { "self_attn" };
                    (format!("model.layers.{i}.{block}.{name}"), l)
                })
            })
            .collect()
    }

    fn hidden(&self, ids: &[u32], dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        run(self, ids, Rows::One { start: 0, cache: None }, dropout)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(Decoder::num_layers(self))
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        Decoder::embed_tokens(self, ids)
    }

    fn num_layers(&self) -> usize {
        Decoder::num_layers(self)
    }

    fn layer_forward(&self, i: usize, x: &Tensor, dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        Decoder::layer(self, i, x, &mut [Seq { len: x.dim(0)?, start: 0, kv: None }], dropout)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Decoder::final_norm(self, x)
    }

    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        run(self, ids, Rows::One { start: cache.len(), cache: Some(cache) }, None)
    }

    fn forward_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        run(self, ids, Rows::Step(caches), None)
    }

    fn max_positions(&self) -> usize {
        Decoder::max_positions(self)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Decoder::logits(self, hidden)
    }

    fn loss(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        Decoder::loss(self, hidden, targets)
    }
}
