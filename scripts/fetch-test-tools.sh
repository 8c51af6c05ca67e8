#!/usr/bin/env bash
# Provision everything the tests need beyond the models: first the models
# (scripts/fetch-models.sh), then the programs our files are checked in.
#
# - Python tools (pip --user): the `gguf` and `safetensors` readers, moto's
#   S3 server and the wsgidav WebDAV server, transformers, huggingface_hub,
#   olah (a hub mirror), TensorBoard.
# - Go (Debian's golang-go), whose text/template the Ollama template test
#   renders with.
# - Slurm and munge (scripts/install-slurm.sh), for the array-job test.
# - llama.cpp (scripts/build-llama-cpp.sh) and PyTorch + transformers + PEFT
#   in their own environment (scripts/install-torch.sh), both built once per
#   machine outside the clone (~/.cache), recorded in models/llama-cpp-bin
#   and models/torch-python.
#
# A fresh machine takes about half an hour (llama.cpp's build and PyTorch's
# download); a re-run checks and keeps what is there.
# Usage: scripts/fetch-test-tools.sh [DEST]     (or PIPELINE_MODELS_DIR=DEST)
set -euo pipefail

dest="${1:-${PIPELINE_MODELS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/models}}"
"$(dirname "$0")/fetch-models.sh" "$dest"

say() { printf 'fetch-test-tools: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# --- Python tools the tests check against (pip) ---------------------------
pip_install() { # import-check package...
  local check=$1; shift
  if python3 -c "import $check" 2>/dev/null; then
    say "present: $*"; return
  fi
  say "installing (pip): $*"
  python3 -m pip install --quiet --user "$@" 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages "$@" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "$@" \
    || say "warning: could not install $*; the tests that need it will fail"
}
# llama.cpp's own GGUF reader reads back the files `quantize` writes.
pip_install gguf gguf
# Hugging Face's own safetensors reader reads back the adapters and merged
# models (and checks the `format: pt` header transformers looks for).
pip_install "safetensors.numpy" safetensors
# The servers the remote-cache tests start on loopback: an S3 API (moto's
# server mode) and WebDAV (wsgidav).
pip_install "moto.server, flask" 'moto[server]'
pip_install "wsgidav.server.server_cli, cheroot" wsgidav cheroot
# transformers loads the merged models (config, tokenizer, chat template)
# as users do; without torch it reads everything but the weights.
pip_install "transformers, jinja2" "transformers>=5,<6" jinja2
# huggingface_hub reads the model cards `export` writes (ModelCard,
# metadata_load), as the hub does.
pip_install huggingface_hub huggingface_hub
# olah, a self-hosted Hugging Face hub mirror: the online hub tests serve
# local git repositories through it (HF_ENDPOINT on loopback).
pip_install olah.server olah
# TensorBoard's own EventAccumulator reads back the training event files.
pip_install "tensorboard.backend.event_processing.event_accumulator" tensorboard

# --- Go: its own text/template renders our Ollama templates (tests) --------
# Ollama renders prompts with Go's text/template; tests/ollama/render.go
# runs our Modelfile templates through it (Debian's golang-go, ~1 min).
if command -v go >/dev/null 2>&1; then
  say "present: go ($(go version | awk '{print $3}'))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing (apt): golang-go"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >/dev/null; } \
    || say "warning: could not install golang-go; the Ollama template test will fail (install Go, or set PIPELINE_GO)"
else
  say "warning: Go is missing; install it (apt-get install golang-go) for the Ollama template test"
fi

# --- Slurm: tests/schedulers.rs runs a sweep as an array job on a cluster of its own
"$(dirname "$0")/install-slurm.sh" || say "warning: Slurm and munge are missing: tests/schedulers.rs will fail"

# --- llama.cpp, the runtime the GGUF files are checked in -----------------
# Built once per machine outside the clone (scripts/build-llama-cpp.sh);
# the tests find the programs through $dest/llama-cpp-bin.
bin=$("$(dirname "$0")/build-llama-cpp.sh") || die "llama.cpp did not build (scripts/build-llama-cpp.sh)"
printf '%s\n' "$bin" > "$dest/llama-cpp-bin"

# --- PyTorch, transformers, PEFT: our adapters and merges run in them -----
py=$("$(dirname "$0")/install-torch.sh") || die "PyTorch did not install (scripts/install-torch.sh)"
printf '%s\n' "$py" > "$dest/torch-python"

say "done: $dest"
