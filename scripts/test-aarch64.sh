#!/usr/bin/env bash
# The kernels' aarch64 paths (NEON, the dot-product extension), tested on an
# x86-64 machine: `pipeline-kernels` is cross-compiled for
# aarch64-unknown-linux-gnu and its tests run under qemu-user twice, as a
# CPU with every extension (`-cpu max`: the NEON dot-product paths against
# the portable ones) and as an ARMv8.0 Cortex-A53 (no dot products: nothing
# may stop on an instruction the CPU lacks). Then the whole `pipeline`
# binary is built for aarch64 and, on both CPUs, must generate from the
# real Gemma 3 270M (models/, from scripts/fetch-models.sh) the text the
# x86-64 build generates.
#
# What it needs, installed when missing (Debian, as root):
# - the cross linker and C library: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross;
# - qemu-user;
# - the Rust standard library's source for this exact rustc, to build std
#   for aarch64 with `-Zbuild-std` (rustup's prebuilt aarch64 std comes
#   from static.rust-lang.org, which some machines cannot reach). It is the
#   rustup component rust-src when installed, else Debian's `rust-src`
#   package of the same version, unpacked under $PIPELINE_RUNTIMES
#   (~/.cache/pipeline-runtimes) and linked into the toolchain's sysroot
#   where rustup would put it. `RUSTC_BOOTSTRAP=1` lets the stable cargo
#   take `-Zbuild-std`.
#
# Usage: scripts/test-aarch64.sh [--no-binary]
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "test-aarch64: $*" >&2; exit 1; }
build_binary=1
[ "${1:-}" = "--no-binary" ] && build_binary=0

runtimes="${PIPELINE_RUNTIMES:-$HOME/.cache/pipeline-runtimes}"
target=aarch64-unknown-linux-gnu

# --- cross linker and qemu ---------------------------------------------
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
  || [ ! -e /usr/aarch64-linux-gnu/lib/libc.so.6 ]; then
  command -v apt-get >/dev/null || die "needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)"
  [ "$(id -u)" = 0 ] || die "installing the cross compiler and qemu-user needs root: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
  echo "test-aarch64: installing gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null; } \
    || die "apt-get could not install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
fi

# --- the standard library's source for this rustc ----------------------
# shellcheck source=lib/rust-src.sh
. "$(dirname "$0")/lib/rust-src.sh"
ensure_rust_src

# --- build and test ----------------------------------------------------
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cross=(-Zbuild-std --target "$target" --target-dir target/aarch64 --locked)
# Only for the cross builds: cargo fingerprints RUSTC_BOOTSTRAP, and the
# host build below must reuse what `cargo test` built.
xcargo() { RUSTC_BOOTSTRAP=1 cargo "$@"; }
log="target/aarch64/test.log"
mkdir -p target/aarch64
for cpu in max cortex-a53; do
  echo "== aarch64 kernels under qemu-aarch64 -cpu $cpu"
  status=0
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu $cpu" \
    xcargo test -p pipeline-kernels "${cross[@]}" -- --nocapture >"$log" 2>&1 || status=$?
  grep -E '^(test |SKIPPED|prefill paths|error)|test result|panicked|signal' "$log" || true
  [ "$status" = 0 ] || { tail -40 "$log"; die "pipeline-kernels tests failed on aarch64 (-cpu $cpu)"; }
done
if [ "$build_binary" = 1 ]; then
  # The dev profile shares the dependencies the tests above built.
  echo "== the pipeline binary for aarch64, generating from the real Gemma 3 270M"
  status=0
  xcargo build -p pipeline-cli --bin pipeline "${cross[@]}" >"$log" 2>&1 || status=$?
  [ "$status" = 0 ] || { grep -E '^error' -A12 "$log" | head -80; die "the pipeline binary did not build for aarch64"; }
  model=models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
  [ -f "$model" ] || die "$model is missing: run scripts/fetch-models.sh"
  # 21 prompt tokens: more than a decoding step's rows, so the prompt goes
  # through the quantized prefill kernels and the 24 new tokens through the
  # decoding ones.
  gen=(generate --model "$model" --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens 24 --json)
  text() { python3 -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["text"])'; }
  cargo build --locked --quiet --bin pipeline
  want="$(target/debug/pipeline "${gen[@]}" 2>/dev/null | text)" || die "pipeline generate failed on x86-64"
  for cpu in max cortex-a53; do
    got="$(qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu "$cpu" "target/aarch64/$target/debug/pipeline" "${gen[@]}" 2>/dev/null | text)" \
      || die "pipeline generate failed on aarch64 (-cpu $cpu)"
    [ "$got" = "$want" ] || die "aarch64 (-cpu $cpu) generated other text than x86-64:
--- aarch64
$got
--- x86-64
$want"
    echo "aarch64 -cpu $cpu: the same 24 greedy tokens as x86-64"
  done
fi
echo "test-aarch64: passed"
