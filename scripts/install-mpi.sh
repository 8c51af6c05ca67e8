#!/usr/bin/env bash
# Installs what `cargo build --features mpi` needs: Open MPI (its headers,
# libraries and mpirun) and libclang (the `mpi` crate generates its bindings
# from mpi.h). Debian/Ubuntu, as root; elsewhere it says what to install.
# MPICH works too (apt-get install libmpich-dev mpich).
set -euo pipefail
# shellcheck source=lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 \
  && { ldconfig -p 2>/dev/null | grep -q 'libclang'; }; then
  echo "install-mpi: present: $(mpirun --version 2>/dev/null | head -n1), libclang" >&2
  exit 0
fi
apt_install install-mpi libopenmpi-dev openmpi-bin libclang-dev
echo "install-mpi: installed: $(mpirun --version 2>/dev/null | head -n1)" >&2
