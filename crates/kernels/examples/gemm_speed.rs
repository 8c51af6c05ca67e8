//! GFLOP/s of the frozen-weight products at training shapes (Gemma 3 270M:
//! hidden 640, MLP 2048; 2048 tokens), f32 (`gemm` crate) against bf16
//! ([`pipeline_kernels::bf16`]), on every path this CPU has.
//!
//! `cargo run --release -p pipeline-kernels --example gemm_speed`

use half::bf16;
use pipeline_kernels::bf16::{Operand, gemm_with, paths};
use std::time::Instant;

fn main() {
    println!("kernels: {}", pipeline_kernels::cpu_paths());
    let shapes = [
        (2048, 2048, 640, "x·Wᵀ up/gate"),
        (2048, 640, 2048, "x·Wᵀ down / g·W up"),
        (64, 262_144, 640, "LM head chunk"),
    ];
    println!("bf16 paths: {:?}", paths());
    for &(m, n, k, what) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let w32: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let w16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            let reps = 3;
            for _ in 0..reps {
                f();
            }
            flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let f32_rate = time(&mut || unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                w32.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        });
        let mut line = format!("{what:>20} {m}×{n}×{k}: f32 gemm {f32_rate:6.1} GFLOP/s");
        for p in paths().into_iter().rev() {
            let r = time(&mut || {
                gemm_with(p, m, n, k, &mut c, n, false, Operand::rows(&a, k), Operand::rows(&w16, k).t(), 1.0)
            });
            line += &format!(", bf16 {} {r:6.1} GFLOP/s", p.name());
        }
        println!("{line}");
    }
}
