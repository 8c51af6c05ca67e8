//! Tells the kernels' tests which instruction paths this machine can run,
//! so that a test of a path the CPU lacks is reported by the test harness
//! as ignored (with the reason), never as passed without running it.
//!
//! Emits `cpu_avx2`, `cpu_avx512`, `cpu_avx512vnni`, `cpu_avx512bf16` and
//! `cpu_amx` when the build runs on the kind of machine it builds for
//! (x86-64 on x86-64, Linux or Windows under Wine) and the CPU has them, within `PIPELINE_MAX_CPU_ISA` as
//! the kernels read it at run time. Each such test checks at run time that
//! its path is really there (a wrong detection fails, it does not skip).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cpu_avx2, cpu_avx512, cpu_avx512vnni, cpu_avx512bf16, cpu_amx)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["PIPELINE_MAX_CPU_ISA", "PIPELINE_BF16_NO_AMX", "PIPELINE_BF16_WIDEN"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let (host, target) = (std::env::var("HOST").unwrap_or_default(), std::env::var("TARGET").unwrap_or_default());
    // Built for x86-64 on x86-64: the tests run on this CPU (natively, or
    // a Windows build under Wine); a build for another architecture runs
    // elsewhere (qemu), and its paths' tests check the CPU at run time.
    let arch = |triple: &str| triple.split('-').next().unwrap_or_default().to_string();
    if arch(&host) != arch(&target) || !target.starts_with("x86_64") {
        return;
    }
    for cfg in detect() {
        println!("cargo::rustc-cfg={cfg}");
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Vec<&'static str> {
    use std::arch::is_x86_feature_detected as has;
    let cap = std::env::var("PIPELINE_MAX_CPU_ISA").unwrap_or_default().trim().to_ascii_lowercase();
    let (allow_avx2, allow_avx512) = match cap.as_str() {
        "portable" | "scalar" => (false, false),
        "avx2" => (true, false),
        _ => (true, true),
    };
    let mut out = Vec::new();
    let avx2 = allow_avx2 && has!("avx2") && has!("fma") && has!("f16c");
    if avx2 {
        out.push("cpu_avx2");
    }
    let avx512 = avx2 && allow_avx512 && has!("avx512f") && has!("avx512bw");
    if avx512 && has!("avx512vl") {
        out.push("cpu_avx512");
    }
    if avx512 && has!("avx512vnni") {
        out.push("cpu_avx512vnni");
    }
    let widen_only = std::env::var_os("PIPELINE_BF16_WIDEN").is_some();
    let bf16 = allow_avx512 && has!("avx512f") && has!("avx512bf16") && !widen_only;
    if bf16 {
        out.push("cpu_avx512bf16");
        // AMX-BF16 and AMX-TILE: CPUID leaf 7, EDX bits 22 and 24.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if (edx >> 22) & 1 == 1 && (edx >> 24) & 1 == 1 && std::env::var_os("PIPELINE_BF16_NO_AMX").is_none() {
            out.push("cpu_amx");
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Vec<&'static str> {
    Vec::new()
}
