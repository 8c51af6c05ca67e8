#!/usr/bin/env bash
# Installs PyTorch, transformers and PEFT into a virtual environment outside
# the clone (default ~/.cache/pipeline-runtimes/torch-venv): the programs
# the runtime tests run our adapters and merged models in, llama.cpp's
# converter (convert_hf_to_gguf.py, which imports sentencepiece) that they
# compare our GGUF files with, and the reference `pipeline bench compare
# --train` measures LoRA training against.
#
# PyPI's torch for Linux is the CUDA build: with its CUDA libraries the
# environment is ~6 GB, downloaded once per machine (about a minute here)
# and reused when present. It runs on the CPU without a GPU.
#
#   scripts/install-torch.sh            # prints the environment's python on stdout
#   PIPELINE_RUNTIMES=DIR scripts/install-torch.sh
set -euo pipefail

# Pinned so that a reference measured today is measured again tomorrow.
packages=(torch==2.15.0 transformers==5.25.0 peft==0.21.2 gguf numpy safetensors sentencepiece)
root="${PIPELINE_RUNTIMES:-$HOME/.cache/pipeline-runtimes}"
venv="$root/torch-venv"
stamp="$venv/.complete-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-12)"
say() { printf 'install-torch: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
  say "present: $venv"
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$root"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
say "installing ${packages[*]} into $venv (~6 GB with CUDA's libraries)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" \
  || die "pip could not install ${packages[*]}"
"$venv/bin/python" -c "import torch, transformers, peft, gguf, sentencepiece" || die "the installed packages do not import"
touch "$stamp"
echo "$venv/bin/python"
