#!/usr/bin/env bash
# Data-parallel LoRA training over MPI, as CI checks it: installs Open MPI
# (scripts/install-mpi.sh), builds `pipeline` with the `mpi` feature and runs
# tests/distributed.rs: `mpirun -np 2 pipeline run recipes/quickstart.toml`
# on a tiny random Gemma 3 trains what one process trains, and a rank killed
# with SIGKILL leaves a job whose rerun resumes from rank 0's checkpoint.
# Needs the models (scripts/fetch-models.sh) and ../shared/hf.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-mpi.sh
cargo test --locked --features mpi --test distributed -- --nocapture
