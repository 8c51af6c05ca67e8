//! Multiply-adds per second of a prompt's products at Gemma 3 270M's
//! shapes (1500 rows): the quantized prefill panels ([`QuantLinear`] with
//! [`QuantLinear::with_prefill`]: 8-bit integer dot products) against the
//! f32 GEMM on the dequantized weight (what prefill used before).
//!
//! `cargo run --release -p pipeline-kernels --example prefill_speed`

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use pipeline_kernels::gemv::QuantLinear;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    println!("kernels: {}", pipeline_kernels::cpu_paths());
    let rows = 1500;
    let shapes = [
        (2048, 640, GgmlDType::Q5_0, "gate / up"),
        (640, 2048, GgmlDType::Q5_0, "down"),
        (640, 2048, GgmlDType::Q8_0, "down (Q8_0)"),
        (640, 2048, GgmlDType::Q4K, "down (Q4_K)"),
        (640, 2048, GgmlDType::Q6K, "down (Q6_K)"),
        (640, 1024, GgmlDType::Q4K, "o (Q4_K)"),
        (1024, 640, GgmlDType::Q5_0, "q"),
        (256, 640, GgmlDType::Q8_0, "v (Q8_0)"),
    ];
    for (out, inp, dtype, what) in shapes {
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (out, inp), &Device::Cpu)?, dtype)?;
        let deq = q.dequantize(&Device::Cpu)?;
        let lin = QuantLinear::with_prefill(q, &Device::Cpu)?;
        let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let x = Tensor::from_vec(x, (rows, inp), &Device::Cpu)?;
        let wt = deq.t()?;
        // Best of 10 calls each (other tenants of a VM make single calls noisy).
        let best = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            f()?;
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t = Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let quantized = best(&|| lin.forward(&x))?;
        let f32 = best(&|| x.broadcast_matmul(&wt))?;
        let macs = (rows * out * inp) as f64;
        println!(
            "{what:>12} {dtype:?} {rows}×{inp} · {inp}×{out}: quantized {:6.2} ms {:5.1} GMAC/s, f32 {:6.2} ms {:5.1} GMAC/s, {:.2}×",
            quantized * 1e3,
            macs / quantized / 1e9,
            f32 * 1e3,
            macs / f32 / 1e9,
            f32 / quantized
        );
    }
    // A prompt's attention in one layer (Gemma 3 270M: 4 query heads over
    // one key/value head of 256), global and with the 512-position window.
    let (t, d, heads) = (rows, 256, 4);
    let q = Tensor::from_vec(
        (0..heads * t * d).map(|i| ((i * 7919) % 1000) as f32 * 1e-4).collect(),
        (1, heads * t, d),
        &Device::Cpu,
    )?;
    let k =
        Tensor::from_vec((0..t * d).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3).collect(), (1, t, d), &Device::Cpu)?;
    for window in [None, Some(512)] {
        let band = pipeline_kernels::attention::Band { t, start: 0, window };
        let mut best = [f64::MAX; 2];
        for _ in 0..5 {
            let at = Instant::now();
            let p = pipeline_kernels::attention::probs(&q, &k, band)?;
            let mid = Instant::now();
            pipeline_kernels::attention::apply(&p, &k, band)?;
            best[0] = best[0].min((mid - at).as_secs_f64());
            best[1] = best[1].min(mid.elapsed().as_secs_f64());
        }
        let mut fused = f64::MAX;
        for _ in 0..5 {
            let at = Instant::now();
            pipeline_kernels::attention::attend(&q, &k, &k, band)?;
            fused = fused.min(at.elapsed().as_secs_f64());
        }
        let visible: usize = (0..t).map(|p| window.map_or(p + 1, |w| (p + 1).min(w))).sum();
        let macs = (heads * visible * d) as f64;
        println!(
            "attention {t} positions, window {window:?}: scores {:6.2} ms {:5.1} GMAC/s, p·v {:6.2} ms {:5.1} GMAC/s; fused (attend) {:6.2} ms",
            best[0] * 1e3,
            macs / best[0] / 1e9,
            best[1] * 1e3,
            macs / best[1] / 1e9,
            fused * 1e3
        );
    }
    Ok(())
}
