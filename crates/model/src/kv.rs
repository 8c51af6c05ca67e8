//! The key/value cache of incremental decoding.
//!
//! Each layer keeps its rotated keys and its values, `[kv_heads, T, head_dim]`,
//! in a buffer that grows by doubling, so a decode step appends one position
//! in place instead of copying the whole history. [`KvCache::truncate`]
//! forgets positions (e.g. to reuse a prompt's prefix after scoring a longer
//! text that starts with it); [`KvCache::prefix_copy`] starts a new sequence
//! from another's first positions (a shared system prompt).
//!
//! **Reuse is exact.** A position's numbers depend on the pass that computed
//! it, not only on its tokens: a pass of a few rows uses the quantized
//! weights and a longer one f32 GEMMs, and GEMM libraries pick kernels (and
//! so summation orders) by shape and ISA (on AVX-512, `gemm` switches to
//! horizontal dot products for small products). So a prefill
//! ([`super::CausalLm::prefill`]) always cuts a sequence at the same
//! absolute positions, multiples of [`super::PREFILL_CHUNK`], and a cache
//! remembers up to which such boundary its positions came from full
//! prefill chunks ([`KvCache::resume_point`]). Continuing a cache, a copied
//! prefix or a truncated one therefore runs exactly the passes a fresh
//! prefill of the same tokens runs, and gives the same bits on every ISA.
//!
//! A forward pass may hold rows of several sequences ([`Rows`]): one
//! sequence (prefill, training) or one new token for each of several cached
//! sequences (batched decoding). The linear layers see all rows at once;
//! attention runs per sequence ([`per_sequence`]).

use candle_core::{Result, Tensor};

/// Keys and values of one attention layer.
#[derive(Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerKv {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the first `len` positions.
    fn prefix_copy(&self, len: usize) -> Result<LayerKv> {
        let len = len.min(self.len);
        let mut out = LayerKv::default();
        if let (Some(k), Some(v), true) = (&self.k, &self.v, len > 0) {
            out.append(&k.narrow(1, 0, len)?, &v.narrow(1, 0, len)?)?;
        }
        Ok(out)
    }

    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`) and returns the keys and
    /// values of every cached position, `[kv_heads, len + t, head_dim]`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let need = self.len + t;
        let cap = self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(cap * 2).max(64);
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let (h, _, d) = like.dims3()?;
                let buf = Tensor::zeros((h, new_cap, d), like.dtype(), like.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let (kb, vb) = (self.k.as_ref().expect("allocated"), self.v.as_ref().expect("allocated"));
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((kb.narrow(1, 0, need)?, vb.narrow(1, 0, need)?))
    }
}

/// The cache of a whole model: one [`LayerKv`] per layer.
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Positions `0..exact` came from full, aligned prefill chunks: a
    /// multiple of [`super::PREFILL_CHUNK`], at most `len()`.
    exact: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> KvCache {
        KvCache { layers: (0..layers).map(|_| LayerKv::default()).collect(), exact: 0 }
    }

    /// Where a prefill of a sequence that starts with this cache's tokens
    /// resumes, at most `max`: the last chunk boundary up to which the
    /// positions are those a fresh prefill computes.
    pub fn resume_point(&self, max: usize) -> usize {
        aligned(self.exact.min(max))
    }

    /// Records that a prefill from [`KvCache::resume_point`] on has filled
    /// the cache up to its length.
    pub(super) fn prefilled(&mut self) {
        self.exact = aligned(self.len());
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new cache holding copies of this one's first `len` positions.
    pub fn prefix_copy(&self, len: usize) -> Result<KvCache> {
        let layers = self.layers.iter().map(|l| l.prefix_copy(len)).collect::<Result<_>>()?;
        Ok(KvCache { layers, exact: aligned(self.exact.min(len)) })
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
        self.exact = aligned(self.exact.min(len));
    }
}

/// `n` rounded down to a prefill chunk boundary.
fn aligned(n: usize) -> usize {
    n / super::PREFILL_CHUNK * super::PREFILL_CHUNK
}

/// Where the rows of one forward pass belong.
pub enum Rows<'c, 'd> {
    /// One sequence at positions `start..`, appending to `cache` if given.
    One { start: usize, cache: Option<&'c mut KvCache> },
    /// One new token for each cached sequence.
    Step(&'c mut [&'d mut KvCache]),
}

impl Rows<'_, '_> {
    /// The sequences of the pass as layer `layer` sees them (`t` rows in all).
    pub fn seqs(&mut self, layer: usize, t: usize) -> Vec<Seq<'_>> {
        match self {
            Rows::One { start, cache } => {
                vec![Seq { len: t, start: *start, kv: cache.as_deref_mut().map(|c| &mut c.layers[layer]) }]
            }
            Rows::Step(caches) => caches
                .iter_mut()
                .map(|c| {
                    let kv = &mut c.layers[layer];
                    Seq { len: 1, start: kv.len, kv: Some(kv) }
                })
                .collect(),
        }
    }
}

/// The rows of one sequence in a layer's forward pass: `len` rows at
/// positions `start..start + len`, appending to `kv` when decoding.
pub struct Seq<'a> {
    pub len: usize,
    pub start: usize,
    pub kv: Option<&'a mut LayerKv>,
}

/// Whether a pass is a decoding step: one new token for each cached
/// sequence (its linear layers then use quantized weights whatever the
/// row count, see `lora::MAX_DECODE_BATCH`).
pub fn is_step(seqs: &[Seq<'_>]) -> bool {
    seqs.iter().all(|s| s.len == 1 && s.kv.is_some())
}

/// `attend(q, k, v, seq)` for each sequence's rows of `q, k, v`
/// (`[heads, T, head_dim]`, sequences one after another along T), the
/// results (`[rows, …]`) stacked in the same order.
pub fn per_sequence(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &mut [Seq<'_>],
    mut attend: impl FnMut(Tensor, Tensor, Tensor, &mut Seq<'_>) -> Result<Tensor>,
) -> Result<Tensor> {
    if let [seq] = seqs {
        return attend(q.clone(), k.clone(), v.clone(), seq);
    }
    let mut outs = Vec::with_capacity(seqs.len());
    let mut offset = 0;
    for seq in seqs {
        let part = |x: &Tensor| x.narrow(1, offset, seq.len)?.contiguous();
        outs.push(attend(part(q)?, part(k)?, part(v)?, seq)?);
        offset += seq.len;
    }
    Tensor::cat(&outs, 0)
}
