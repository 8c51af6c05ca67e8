#!/usr/bin/env bash
# Build `pipeline` with the `cuda` feature on a machine without a GPU or a
# CUDA toolkit, using NVIDIA's PyPI packages (the route that worked here).
#
#   scripts/build-cuda.sh [COMPUTE_CAP]      # default 90 (H100/H200)
#
# Produces target-cuda/release/pipeline. Run it where the GPU is with the
# CUDA 13 libraries on LD_LIBRARY_PATH (e.g. PyTorch's nvidia/cu13/lib) and
# the driver's libcuda.so.1 preloaded:
#
#   LD_LIBRARY_PATH=/path/to/nvidia/cu13/lib LD_PRELOAD=/path/to/libcuda.so.1 \
#     ./pipeline bench train --model DIR --device cuda --max-len 2048
#
# Notes:
# - nvcc and nvvm must be the same CUDA version, and not newer than the
#   target driver supports (driver 580 = CUDA 13.0): newer PTX is rejected
#   ("Unsupported .version 9.5").
# - candle's cudarc links libcuda, libcublas, libcurand, libnvrtc, libcudart
#   at build time. PyPI carries all but the driver's libcuda, for which an
#   empty stub with the right SONAME is linked; its symbols resolve at load
#   time from the real driver library (hence LD_PRELOAD).
set -euo pipefail
cap="${1:-90}"
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/target-cuda/toolkit"
ver=13.0.88

if [ ! -x "$tools/venv/bin/python" ]; then
  python3 -m venv "$tools/venv"
fi
"$tools/venv/bin/pip" install -q "nvidia-cuda-nvcc==$ver" "nvidia-nvvm==$ver" "nvidia-cuda-crt==$ver" \
  "nvidia-cuda-runtime==$ver" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==$ver" "nvidia-curand" "nvidia-cublas==13.0.*"
cu=$(find "$tools/venv" -path '*nvidia/cu13' -type d | head -n1)
[ -x "$cu/bin/nvcc" ] || { echo "no nvcc under $tools/venv" >&2; exit 1; }

stub="$tools/stub"
mkdir -p "$stub"
echo '' > "$stub/empty.c"
gcc -shared -fPIC -o "$stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$stub/empty.c"
for l in cudart.so.13 nvrtc.so.13 curand.so.10 cublas.so.13 cublasLt.so.13; do
  ln -sf "$cu/lib/lib$l" "$stub/lib${l%%.so*}.so"
done

cd "$root"
PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="$cap" \
  cargo rustc --release --features cuda --target-dir target-cuda --bin pipeline -- \
  -L "$stub" -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files
echo "built: $root/target-cuda/release/pipeline"
