#!/usr/bin/env bash
# `pipeline` on Windows, checked on this Linux machine: built for
# x86_64-pc-windows-gnu with Debian's mingw-w64 (the standard library built
# from source, as scripts/test-aarch64.sh does for aarch64) and run under
# Wine:
#
# 1. the unit tests of the crates that meet the operating system (cargo's
#    runner is `wine`);
# 2. the quickstart recipe, unchanged but for `--set`, on a random Gemma 3
#    with the real Gemma 3 tokenizer, everything on drive D: and named by
#    Windows paths: the model, HF_HOME (a copy of ../shared/hf's dataset,
#    read offline) and the cache (`--cache-dir D:\cache`). The first run is
#    killed after training step 3 (`PIPELINE_FAULT`; a checkpoint at 2), the
#    second resumes it and finishes every stage, the third finds every
#    stage cached.
#
# Wine is not Windows: it maps D: onto a Linux directory, so the file
# system underneath (renames, locks, symlinks in the HF cache) is Linux's.
# What this proves is that the Windows build compiles, links and runs: the
# Win32 calls std makes (paths with drive letters and backslashes,
# MoveFileEx for the atomic renames, LockFileEx for the cache's locks), the
# kernels' runtime CPU detection under the Windows ABI.
#
# What it needs, installed when missing (Debian, as root):
# gcc-mingw-w64-x86-64 (linker and C library for -sys crates), wine and
# wine64; the Rust standard library's source (scripts/lib/rust-src.sh).
# Wine 8 lacks bcryptprimitives.dll (std's ProcessPrng): a stand-in is
# built into the prefix.
# Wine's prefix lives under $PIPELINE_RUNTIMES (~/.cache/pipeline-runtimes).
#
# Usage: scripts/test-windows.sh [--no-quickstart | --quickstart-only | --quick]
# (--quick, what CI runs: the unit tests of pipeline-fs and pipeline-cache
# only, the files, locks and renames the cache stands on).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "test-windows: $*" >&2; exit 1; }
quickstart=1 unit=1
[ "${1:-}" = "--no-quickstart" ] && quickstart=0
quick=0
[ "${1:-}" = "--quick" ] && quickstart=0 quick=1
[ "${1:-}" = "--quickstart-only" ] && unit=0

runtimes="${PIPELINE_RUNTIMES:-$HOME/.cache/pipeline-runtimes}"
target=x86_64-pc-windows-gnu

# --- cross linker and Wine ----------------------------------------------
packages=(gcc-mingw-w64-x86-64 wine wine64)
if ! command -v x86_64-w64-mingw32-gcc >/dev/null || ! command -v wine >/dev/null \
  || ! { command -v wine64 >/dev/null || [ -x /usr/lib/wine/wine64 ]; }; then
  command -v apt-get >/dev/null || die "needs x86_64-w64-mingw32-gcc and wine (Debian: ${packages[*]})"
  [ "$(id -u)" = 0 ] || die "installing the cross compiler and Wine needs root: apt-get install ${packages[*]}"
  echo "test-windows: installing ${packages[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
    || { apt-get update -q >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; } \
    || die "apt-get could not install ${packages[*]}"
fi

# shellcheck source=lib/rust-src.sh
. "$(dirname "$0")/lib/rust-src.sh"
ensure_rust_src

# --- Wine: a prefix of our own, drive D: a scratch directory --------------
export WINEPREFIX="$runtimes/wine-prefix"
export WINEDEBUG=-all
if [ ! -f "$WINEPREFIX/system.reg" ]; then
  echo "test-windows: creating a Wine prefix in $WINEPREFIX"
  mkdir -p "$WINEPREFIX"
  wineboot -i >/dev/null 2>&1 || true
  wineserver -w || true
  [ -f "$WINEPREFIX/system.reg" ] || die "Wine could not create its prefix in $WINEPREFIX"
fi
# Wine 8 (Debian 12's) lacks bcryptprimitives.dll, whose ProcessPrng Rust's
# std calls for random numbers (Windows 10 and later have it): a stand-in
# built from a few lines of C over advapi32's RtlGenRandom. Real Windows
# needs nothing of this.
shim="$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
if [ ! -f "$shim" ]; then
  cat >"$WINEPREFIX/bcryptprimitives.c" <<'C'
#include <windows.h>
#define SystemFunction036 NTAPI SystemFunction036
#include <ntsecapi.h>
#undef SystemFunction036

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!RtlGenRandom(data, n)) return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
C
  x86_64-w64-mingw32-gcc -O2 -shared -o "$shim" "$WINEPREFIX/bcryptprimitives.c" -ladvapi32 \
    || die "could not build the bcryptprimitives.dll stand-in"
fi
drive_d="$(pwd)/target/windows/drive-d"
rm -rf "$drive_d" && mkdir -p "$drive_d"
ln -sfn "$drive_d" "$WINEPREFIX/dosdevices/d:"

# --- build and test -----------------------------------------------------
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
export CC_x86_64_pc_windows_gnu=x86_64-w64-mingw32-gcc
export CXX_x86_64_pc_windows_gnu=x86_64-w64-mingw32-g++
export AR_x86_64_pc_windows_gnu=x86_64-w64-mingw32-ar
cross=(-Zbuild-std --target "$target" --target-dir target/windows --locked)
xcargo() { RUSTC_BOOTSTRAP=1 cargo "$@"; }
log=target/windows/test.log
mkdir -p target/windows

if [ "$unit" = 1 ]; then
echo "== unit tests of the library crates, under Wine"
# The crates that meet the operating system (files, locks, renames, the
# cache, datasets on disk, run-time CPU detection). The model, training,
# inference and export crates run end to end in the quickstart below (their
# test builds are the workspace's largest, and CI's time is short).
crates=(-p pipeline-fs -p pipeline-cache -p pipeline-data -p pipeline-kernels)
[ "$quick" = 1 ] && crates=(-p pipeline-fs -p pipeline-cache)
status=0
xcargo test "${crates[@]}" --lib "${cross[@]}" >"$log" 2>&1 || status=$?
grep -E '^(test result|SKIPPED|error)|panicked|FAILED' "$log" || true
[ "$status" = 0 ] || { grep -E '^error' -A12 "$log" | head -80; tail -40 "$log"; die "unit tests failed under Wine"; }
passed="$(grep -Eo '^test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')"
echo "test-windows: $passed unit tests passed under Wine"
fi

[ "$quickstart" = 1 ] || { echo "test-windows: passed (without the quickstart)"; exit 0; }

echo "== the quickstart on drive D:, Windows paths, under Wine"
status=0
# In the test profile: the dependencies the unit tests built serve it too.
xcargo build -p pipeline-cli --bin pipeline --profile test "${cross[@]}" >"$log" 2>&1 || status=$?
[ "$status" = 0 ] || { grep -E '^error' -A12 "$log" | head -80; die "pipeline.exe did not build"; }
exe="$(pwd)/target/windows/$target/debug/pipeline.exe"
[ -f models/gemma-3-270m/tokenizer.json ] || die "models/gemma-3-270m is missing: run scripts/fetch-models.sh"
[ -d ../shared/hf/hub/datasets--shawhin--tool-use-finetuning ] || die "../shared/hf lacks the tool-use dataset"
mkdir -p "$drive_d/tokenizer" "$drive_d/hf/hub" "$drive_d/recipes"
cp models/gemma-3-270m/tokenizer.json models/gemma-3-270m/tokenizer_config.json "$drive_d/tokenizer/"
cp -a ../shared/hf/hub/datasets--shawhin--tool-use-finetuning "$drive_d/hf/hub/"
cp recipes/quickstart.toml "$drive_d/recipes/"
pipeline() { (cd "$drive_d" && HF_HOME='D:\hf' HF_HUB_OFFLINE=1 wine "$exe" "$@"); }
pipeline dev random-model --arch gemma3 --tokenizer 'D:\tokenizer' --vocab 262144 'D:\models\tiny' >/dev/null \
  || die "random-model failed under Wine"
set_args=(
  --set "model.base='D:\\models\\tiny'"
  --set stages.chat.train_on=first-assistant
  --set stages.tokens.max_len=256
  --set stages.train.max_steps=6 --set stages.train.checkpoint_every=2
  --set stages.train.eval_every=3 --set stages.train.eval_examples=2
  --set stages.eval.limit=2 --set stages.eval.generation.max_new_tokens=4
  --set 'stages.gguf.types=["q8_0"]' --set 'stages.gguf.base_types=["q8_0"]'
  --set stages.ollama.file=q8_0
  --cache-dir 'D:\cache'
)
run=(run 'D:\recipes\quickstart.toml' "${set_args[@]}")
first="$(PIPELINE_FAULT=lora-train.step-3 pipeline "${run[@]}" 2>&1)" && die "the run with a fault did not stop:
$first"
grep -q 'injected fault at `lora-train.step-3`' <<<"$first" || die "the first run stopped elsewhere:
$first"
echo "test-windows: run 1 killed after training step 3 (checkpoint at step 2), as planned"
planned="$(pipeline plan 'D:\recipes\quickstart.toml' "${set_args[@]}" 2>&1)" || die "plan failed:
$planned"
grep -Eq 'train .*resume at step 2' <<<"$planned" || die "the plan does not resume the training at its checkpoint:
$planned"
second="$(pipeline "${run[@]}" 2>&1)" || die "the resumed run failed:
$second"
for stage in data chat tokens train eval merged gguf ollama; do
  grep -Eq "^ *(ran|resumed|cached) +$stage " <<<"$second" || die "stage $stage did not finish in run 2:
$second"
done
echo "test-windows: run 2 resumed the training at step 2 and finished every stage"
third="$(pipeline "${run[@]}" 2>&1)" || die "the third run failed:
$third"
ran="$(grep -Ec '^ *(ran|resumed) ' <<<"$third" || true)"
[ "$ran" = 0 ] || die "run 3 ran stages again instead of finding them cached:
$third"
entry="$(pipeline show 'D:\recipes\quickstart.toml' ollama "${set_args[@]}" 2>/dev/null | tr -d '\r')"
case "$entry" in
  'D:\cache\store\'*) ;;
  *) die "pipeline show printed '$entry', not a path under D:\\cache\\store" ;;
esac
[ -f "$drive_d/cache/store/$(basename "${entry//\\//}")/Modelfile" ] || die "no Modelfile in $entry"
echo "test-windows: run 3 found every stage cached; the Modelfile is at $entry"
echo "test-windows: passed"
