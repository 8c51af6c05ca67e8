//! Linear layers with LoRA, and the frozen-weight matmul they are built on.
//!
//! `y = x·Wᵀ + (α/r)·dropout(x)·Aᵀ·Bᵀ`, with `W` frozen (a plain tensor) and
//! `A` (r×in), `B` (out×r) trainable `Var`s. `B` starts at zero, so a fresh
//! adapter leaves the model unchanged (PEFT's default initialisation; `A` is
//! Kaiming-uniform, seeded).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, Var};

/// `x·Wᵀ` for a frozen `W`: backward gives `x` its gradient and skips the
/// (large, useless) gradient of `W` that candle's matmul would compute.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.broadcast_matmul(&w.t()?);
    }
    // The product of the detached input is not part of the graph; the op
    // below puts it there with the backward we want.
    let y = x.detach().broadcast_matmul(&w.t()?)?;
    x.apply_op2(&y, FrozenGrad { w: w.clone() })
}

/// Forward: returns its second argument (the precomputed product).
/// Backward: `∂x = grad·W`, nothing for the product.
struct FrozenGrad {
    w: Tensor,
}

impl CustomOp2 for FrozenGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        contiguous(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        contiguous(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        contiguous(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.broadcast_matmul(&self.w)?), None))
    }
}

/// The product is a fresh matmul output: contiguous from offset 0, so a
/// clone of its storage is exactly the result.
fn contiguous(l: &Layout) -> Result<()> {
    if l.is_contiguous() && l.start_offset() == 0 {
        Ok(())
    } else {
        Err(candle_core::Error::Msg("frozen-linear: the product must be contiguous".into()))
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

/// A linear layer (no bias in the architectures here) that LoRA may adapt.
pub struct LoraLinear {
    /// Frozen base weight, `[out, in]`.
    pub weight: Tensor,
    /// Frozen bias, `[out]` (Qwen2's q/k/v).
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// Draws dropout masks. `None` at evaluation time.
pub trait DropoutMask {
    /// A `{0, 1/(1-p)}` mask shaped like `x`, or `None` to skip dropout.
    fn mask(&self, shape: &Shape, p: f32, device: &candle_core::Device) -> Result<Option<Tensor>>;
}

impl LoraLinear {
    pub fn new(weight: Tensor) -> Self {
        LoraLinear { weight, bias: None, lora: None }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).expect("2-d weight")
    }
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).expect("2-d weight")
    }

    /// `x: [..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor, dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        let mut y = frozen_linear(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let Some(lora) = &self.lora else { return Ok(y) };
        let x = match dropout.map(|d| d.mask(x.shape(), lora.dropout, x.device())).transpose()?.flatten() {
            Some(mask) if lora.dropout > 0.0 => x.mul(&mask)?,
            _ => x.clone(),
        };
        let delta = x.broadcast_matmul(&lora.a.as_tensor().t()?)?.broadcast_matmul(&lora.b.as_tensor().t()?)?;
        y + (delta * lora.scale)?
    }

    /// `W + scale·B·A`: the merged weight.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.clone()),
            Some(l) => self.weight.add(&(l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?),
        }
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
