//! GB/s of the quantized decoding products ([`pipeline_kernels::gemv`]) at
//! Gemma 3 270M's shapes (hidden 640, MLP 2048, vocabulary 262 144), one
//! input row, and of a decoding step's attention products. Decoding is
//! bound by how fast the weights stream in: the LM head (178 MB, never in
//! cache) is the line to hold against what the machine's memory gives two
//! threads (~30 GB/s on the 2-core build VMs).
//!
//! `cargo run --release -p pipeline-kernels --example gemv_speed`

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use pipeline_kernels::gemv::QuantLinear;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    println!("kernels: {}", pipeline_kernels::cpu_paths());
    let shapes = [
        (262_144, 640, GgmlDType::Q8_0, "LM head"),
        (2048, 640, GgmlDType::Q5_0, "gate / up"),
        (640, 2048, GgmlDType::Q5_0, "down"),
        (1024, 640, GgmlDType::Q5_0, "q"),
        (640, 2048, GgmlDType::Q4K, "down (Q4_K)"),
        (640, 2048, GgmlDType::Q6K, "down (Q6_K)"),
    ];
    for (out, inp, dtype, what) in shapes {
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (out, inp), &Device::Cpu)?, dtype)?;
        let bytes = q.storage_size_in_bytes() as f64;
        let lin = QuantLinear::new(q, &Device::Cpu)?;
        let x: Vec<f32> = (0..inp).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let x = Tensor::from_vec(x, (1, inp), &Device::Cpu)?;
        // Calls for ~1 s; the best and the median call are printed (other
        // tenants of a VM make single calls noisy). Small layers stay in
        // cache between calls, as they do not in a real decoding step (the
        // whole model streams by).
        let reps = (3e10 / bytes).ceil() as usize;
        lin.forward(&x)?;
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                lin.forward(&x).map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<candle_core::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        let (best, median) = (times[0], times[reps / 2]);
        println!(
            "{what:>12} {dtype:?} {out}×{inp}: best {:7.1} µs {:5.1} GB/s, median {:7.1} µs {:5.1} GB/s",
            best * 1e6,
            bytes / best / 1e9,
            median * 1e6,
            bytes / median / 1e9
        );
    }
    // A decoding step's attention in a global layer at depth 1500: one
    // query head's scores over the cached keys, then the weighted sum of
    // the values (Gemma 3: head size 256).
    let (keys, d) = (1500, 256);
    let q: Vec<f32> = (0..d).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let k: Vec<f32> = (0..keys * d).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
    let (mut scores, mut out) = (vec![0f32; keys], vec![0f32; d]);
    let mut best = [f64::MAX; 2];
    for _ in 0..2000 {
        let t = Instant::now();
        pipeline_kernels::vmath::dots(&q, &k, &mut scores);
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        pipeline_kernels::vmath::weighted_sum(&scores, &k, &mut out);
        best[1] = best[1].min(t.elapsed().as_secs_f64());
    }
    let bytes = (keys * d * 4) as f64;
    println!(
        "attention, {keys} keys × {d}: scores {:.1} µs ({:.1} GB/s), weighted sum {:.1} µs ({:.1} GB/s), one thread, best of 2000",
        best[0] * 1e6,
        bytes / best[0] / 1e9,
        best[1] * 1e6,
        bytes / best[1] / 1e9
    );
    Ok(())
}
