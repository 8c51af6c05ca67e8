//! Linear layers with LoRA, and the frozen-weight matmul they are built on.
//!
//! `y = x·Wᵀ + (α/r)·dropout(x)·Aᵀ·Bᵀ`, with `W` frozen (a plain tensor) and
//! `A` (r×in), `B` (out×r) trainable `Var`s. `B` starts at zero, so a fresh
//! adapter leaves the model unchanged (PEFT's default initialisation; `A` is
//! Kaiming-uniform, seeded).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, Var};

use pipeline_kernels::gemv::{QuantLinear, try_map};
pub use pipeline_kernels::keep::Keep;

/// `x·Wᵀ` for a frozen `W`: backward gives `x` its gradient and skips the
/// (large, useless) gradient of `W` that candle's matmul would compute. The
/// op computes the product itself, so the graph keeps only `x` alive.
///
/// A bf16 `W` (mixed-precision training) goes through
/// [`pipeline_kernels::bf16`] on the CPU, both ways.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() != x.dtype() && w.device().is_cpu() {
        let w = w.contiguous()?;
        if !x.track_op() {
            return on_rows(x, w.dim(0)?, |x2| pipeline_kernels::bf16::linear(x2, &w));
        }
        return on_rows(x, w.dim(0)?, |x2| x2.contiguous()?.apply_op1(FrozenLinear { w }));
    }
    if !x.track_op() {
        return x.broadcast_matmul(&w.t()?);
    }
    let w = w.contiguous()?;
    on_rows(x, w.dim(0)?, |x2| x2.contiguous()?.apply_op1(FrozenLinear { w }))
}

/// Logits `hidden·Wᵀ` of an LM head `w` (kept quantized too when read from
/// a GGUF for inference). Up to [`MAX_DECODE_BATCH`] rows (a decoding
/// step, or a prompt's last position) each row is multiplied on its own
/// (quantized kernels, or [`pipeline_kernels::gemv::f32_rows`]), so a sequence's
/// logits do not depend on the batch it is decoded in; more rows go through
/// one f32 GEMM.
pub fn head_logits(hidden: &Tensor, w: &Tensor, quantized: Option<&QuantLinear>) -> Result<Tensor> {
    let few = hidden.dim(0)? <= MAX_DECODE_BATCH;
    match quantized {
        Some(q) if few => q.forward(hidden),
        None if few && cpu_f32(hidden) && w.dtype() == DType::F32 => pipeline_kernels::gemv::f32_rows(hidden, w),
        _ => frozen_linear(hidden, w),
    }
}

/// Whether `x` is an f32 tensor on the CPU, where the row-by-row decoding
/// kernels apply.
fn cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `f` applied to `x: [..., in]` seen as a matrix of rows `[N, in]`; its
/// `[N, out]` result reshaped to `[..., out]`.
fn on_rows(x: &Tensor, out: usize, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().expect("at least 1-d");
    let y = f(&x.reshape(((), k))?)?;
    *dims.last_mut().expect("at least 1-d") = out;
    y.reshape(dims)
}

/// Forward: `x·Wᵀ` (2-d `x`). Backward: `∂x = grad·W`, nothing for `W`.
struct FrozenLinear {
    w: Tensor,
}

/// `x·Wᵀ` on one backend's storage.
fn matmul_wt<S: BackendStorage>(x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<(S, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let n = lw.dims()[0];
    Ok((x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)?, Shape::from((m, n))))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, lw) = self.w.storage_and_layout();
        match &*w {
            Storage::Cpu(CpuStorage::BF16(wd)) => {
                let (m, k) = l.shape().dims2()?;
                let n = lw.dims()[0];
                let x = pipeline_kernels::bf16::contiguous(s.as_slice::<f32>()?, l)?;
                let w = pipeline_kernels::bf16::contiguous(wd, lw)?;
                let mut y = vec![0f32; m * n];
                pipeline_kernels::bf16::times_transposed(m, n, k, x, w, &mut y);
                Ok((CpuStorage::F32(y), Shape::from((m, n))))
            }
            Storage::Cpu(w) => matmul_wt(s, l, w, lw),
            _ => candle_core::bail!("frozen-linear: input on the CPU, weight elsewhere"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, lw) = self.w.storage_and_layout();
        match &*w {
            Storage::Cuda(w) => matmul_wt(s, l, w, lw),
            _ => candle_core::bail!("frozen-linear: input on CUDA, weight elsewhere"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let (w, lw) = self.w.storage_and_layout();
        match &*w {
            Storage::Metal(w) => matmul_wt(s, l, w, lw),
            _ => candle_core::bail!("frozen-linear: input on Metal, weight elsewhere"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(pipeline_kernels::bf16::matmul(grad, &self.w)?))
    }
}

/// The trainable low-rank update of one linear layer.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    /// α/r (or α/√r with rsLoRA).
    pub scale: f64,
    pub dropout: f32,
}

/// Inputs with at most this many rows use a layer's quantized weight when it
/// has one: a matrix-vector product is bound by reading the weight, which
/// the quantized form makes 4–8× smaller. Larger products are bound by
/// arithmetic: they use the quantized weight when it is repacked for
/// prefill (Q8_0 / Q5_0, [`QuantLinear::prefills`]: 8-bit integer products,
/// as llama.cpp runs a prompt), the f32 matmul otherwise.
pub const QUANTIZED_MAX_ROWS: usize = 4;

/// A batched decoding step (one new token for each of up to this many
/// sequences) uses the quantized weights whatever its row count, so that
/// each sequence gets the numbers it would get alone; the quantized kernel
/// reads each weight once for all rows. (Gemma 3 270M, 2 cores: at 16 rows
/// the quantized LM head takes 2/3 of the f32 time, the 640×2048 layers
/// about the same.)
pub const MAX_DECODE_BATCH: usize = pipeline_kernels::gemv::MAX_DECODE_ROWS;

/// A linear layer that LoRA may adapt.
pub struct LoraLinear {
    /// Frozen base weight, `[out, in]` (f32, or bf16 in mixed precision).
    pub weight: Tensor,
    /// The same weight quantized, as read from a GGUF file (inference only).
    pub quantized: Option<std::sync::Arc<pipeline_kernels::gemv::QuantLinear>>,
    /// Frozen bias, `[out]` (Qwen2's q/k/v).
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// Draws dropout masks while training.
///
/// Forward passes take `Option<&dyn DropoutMask>`: `Some` is training mode
/// (gradients flow into the LoRA matrices), `None` is inference mode (the
/// LoRA matrices are used detached, so no autograd graph is built), like
/// PyTorch's `train()` / `eval()`.
pub trait DropoutMask {
    /// Which of `n` elements dropout with probability `p` keeps, or `None`
    /// to skip dropout.
    fn mask(&self, n: usize, p: f32) -> Option<Keep>;
}

/// Training mode without dropout (e.g. gradient checks).
pub struct NoDropout;

impl DropoutMask for NoDropout {
    fn mask(&self, _: usize, _: f32) -> Option<Keep> {
        None
    }
}

impl LoraLinear {
    pub fn new(weight: Tensor) -> Self {
        LoraLinear { weight, quantized: None, bias: None, lora: None }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).expect("2-d weight")
    }
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).expect("2-d weight")
    }

    /// `x: [..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor, dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        let [y] = LoraLinear::forward_in([self], x, dropout, false)?;
        Ok(y)
    }

    /// Several layers that take the same input (q, k, v; gate, up), in a
    /// forward pass (`step = false`) or a batched decoding step: the
    /// quantized weights, when every layer has them and the pass uses them,
    /// are multiplied in one parallel pass ([`QuantLinear::forward_many`]).
    pub fn forward_in<const N: usize>(
        ms: [&LoraLinear; N],
        x: &Tensor,
        dropout: Option<&dyn DropoutMask>,
        step: bool,
    ) -> Result<[Tensor; N]> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        let qs = ms.map(|m| m.quantized.as_deref());
        let prefills = qs.iter().all(|q| q.is_some_and(QuantLinear::prefills));
        let quantized = step || (dropout.is_none() && (rows <= QUANTIZED_MAX_ROWS || prefills));
        match qs {
            qs if quantized && qs.iter().all(Option::is_some) => {
                let bases = QuantLinear::forward_many(qs.map(|q| q.expect("checked")), x)?;
                let mut ms = ms.into_iter();
                try_map(bases, |y| ms.next().expect("N layers").adapt(y, x, dropout))
            }
            // A decoding step on f32 weights: row by row (see `f32_rows`).
            _ if step && dropout.is_none() && cpu_f32(x) && ms.iter().all(|m| m.weight.dtype() == DType::F32) => {
                try_map(ms, |m| m.adapt(pipeline_kernels::gemv::f32_rows(x, &m.weight)?, x, None))
            }
            _ => try_map(ms, |m| m.linear(x, dropout)),
        }
    }

    /// `x·Wᵀ + bias + LoRA(x)` with the f32 weight: one fused op on the CPU
    /// ([`pipeline_kernels::fused_lora`]), composed ops elsewhere.
    fn linear(&self, x: &Tensor, dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        let Some(lora) = self.lora.as_ref().filter(|_| x.device().is_cpu() && x.dtype() == DType::F32) else {
            return self.adapt(frozen_linear(x, &self.weight)?, x, dropout);
        };
        let (a, b, mask) = match dropout {
            None => (lora.a.as_tensor().detach(), lora.b.as_tensor().detach(), None),
            Some(d) => {
                let mask = d.mask(x.elem_count(), lora.dropout).filter(|_| lora.dropout > 0.0);
                (lora.a.as_tensor().clone(), lora.b.as_tensor().clone(), mask)
            }
        };
        on_rows(x, self.out_features(), |x2| {
            pipeline_kernels::fused_lora::lora_linear(x2, &a, &b, &self.weight, self.bias.as_ref(), mask, lora.scale)
        })
    }

    /// The base output `y` plus bias and the LoRA update of `x`.
    fn adapt(&self, mut y: Tensor, x: &Tensor, dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let Some(lora) = &self.lora else { return Ok(y) };
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        if dropout.is_none() && cpu_f32(x) && rows <= MAX_DECODE_BATCH {
            // Decoding: each row's update alone, as it is when decoded alone.
            let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
            let delta = on_rows(x, self.out_features(), |x2| {
                pipeline_kernels::fused_lora::lora_update_rows(x2, a, b, lora.scale)
            })?;
            return y + delta;
        }
        let (a, b, x) = match dropout {
            None => (lora.a.as_tensor().detach(), lora.b.as_tensor().detach(), x.clone()),
            Some(d) => {
                let x = match d.mask(x.elem_count(), lora.dropout) {
                    Some(mask) if lora.dropout > 0.0 => x.mul(&mask.to_tensor(x.shape(), x.device())?)?,
                    _ => x.clone(),
                };
                (lora.a.as_tensor().clone(), lora.b.as_tensor().clone(), x)
            }
        };
        let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        y + (delta * lora.scale)?
    }
}

/// Kaiming-uniform init of `A` as PyTorch's `nn.Linear` (a = √5):
/// U(-1/√in, 1/√in), from a seeded generator.
pub fn init_lora_a(
    rank: usize,
    in_features: usize,
    rng: &mut impl rand::Rng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let bound = 1.0 / (in_features as f32).sqrt();
    let data: Vec<f32> = (0..rank * in_features).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(data, (rank, in_features), device)
}

/// A zero `B` (out×r).
pub fn init_lora_b(out_features: usize, rank: usize, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::zeros((out_features, rank), DType::F32, device)
}
