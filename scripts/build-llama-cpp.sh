#!/usr/bin/env bash
# Builds the llama.cpp programs the runtime tests run our artifacts in
# (llama-tokenize, llama-perplexity, llama-quantize, llama-server,
# llama-completion) and llama-bench (for `pipeline bench compare`), from package registries only: the llama-cpp-python
# sdist on PyPI vendors the whole llama.cpp tree, and cmake comes from PyPI.
#
# The build lives outside the clone (default ~/.cache/pipeline-runtimes), one
# directory per llama.cpp version and CPU (it is built for the CPU it runs
# on), so CI pays the ~5 min build once per machine. Re-running is cheap.
#
#   scripts/build-llama-cpp.sh            # prints the bin directory on stdout
#   PIPELINE_RUNTIMES=DIR scripts/build-llama-cpp.sh
#   LLAMA_ISA=avx2 scripts/build-llama-cpp.sh   # AVX2/FMA/F16C only, as on an
#       AVX2 machine: compare with `PIPELINE_MAX_CPU_ISA=avx2 pipeline bench
#       compare --llama-bench DIR/llama-bench` on an AVX-512 one
set -euo pipefail

version=0.3.36 # llama-cpp-python; vendors llama.cpp 0c1e570
root="${PIPELINE_RUNTIMES:-$HOME/.cache/pipeline-runtimes}"
say() { printf 'build-llama-cpp: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

cpu=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
# Built without ggml's AMX backend: on Sapphire Rapids CPUs its matrix
# product segfaults on these models' Q4_K/Q5_0 weights (llama.cpp issue
# 20824, closed unfixed), which GGML_NATIVE would otherwise switch on.
variant=noamx
isa_flags=(-DGGML_NATIVE=ON)
case "${LLAMA_ISA:-native}" in
  native) ;;
  avx2)
    variant=avx2
    isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    ;;
  *) die "LLAMA_ISA=$LLAMA_ISA: expected native or avx2" ;;
esac
prefix="$root/llama.cpp-$version-$variant-$cpu"
bins=(llama-tokenize llama-perplexity llama-quantize llama-server llama-completion llama-bench)
# Complete when every program is there: a build made before a program was
# added to the list gets just that program built (the cmake tree is reused).
missing=()
for b in "${bins[@]}"; do
  [ -x "$prefix/bin/$b" ] || missing+=("$b")
done
# The source tree (also for its converter, convert_hf_to_gguf.py, which the
# tests compare our GGUF files with): $prefix/src links to it.
mkdir -p "$root"
sdist="$root/llama_cpp_python-$version.tar.gz"
src="$root/llama_cpp_python-$version"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  if [ ! -f "$sdist" ]; then
    say "downloading the llama-cpp-python $version sdist from PyPI"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$root"
  fi
  tar -xzf "$sdist" -C "$root"
fi
[ -f "$src/vendor/llama.cpp/CMakeLists.txt" ] || die "$sdist has no vendor/llama.cpp"
mkdir -p "$prefix"
ln -sfn "$src/vendor/llama.cpp" "$prefix/src"

if [ -f "$prefix/.complete" ] && [ ${#missing[@]} -eq 0 ]; then
  say "present: $prefix/bin"
  echo "$prefix/bin"
  exit 0
fi

if ! command -v cmake >/dev/null 2>&1; then
  say "installing cmake from PyPI"
  python3 -m pip install --quiet cmake
fi
command -v cmake >/dev/null 2>&1 || die "cmake is not on PATH after pip install cmake"

build="$prefix/build"
no_amx=""
[ "$(uname -m)" = x86_64 ] && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
say "building llama.cpp ($(nproc) jobs) in $build"
cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release "${isa_flags[@]}" \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DBUILD_SHARED_LIBS=OFF >"$prefix.log" 2>&1 || { tail -30 "$prefix.log" >&2; die "cmake configure failed"; }
cmake --build "$build" -j "$(nproc)" --target "${bins[@]}" >>"$prefix.log" 2>&1 \
  || { tail -30 "$prefix.log" >&2; die "build failed (log: $prefix.log)"; }
mkdir -p "$prefix/bin"
for b in "${bins[@]}"; do
  cp "$build/bin/$b" "$prefix/bin/$b"
done
"$prefix/bin/llama-tokenize" --help >/dev/null 2>&1 || true
touch "$prefix/.complete"
say "built: $prefix/bin"
echo "$prefix/bin"
