#!/usr/bin/env bash
# Installs Slurm and munge (Debian's slurm-wlm parts: slurmctld, slurmd, the
# client commands, munge), for tests/schedulers.rs: it starts its own
# one-node cluster on loopback (as root) and submits an array job to it.
# Debian and Ubuntu, as root; elsewhere it says what to install.
set -euo pipefail
# shellcheck source=lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
  && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  echo "install-slurm: present: $(slurmctld -V), munge" >&2
  exit 0
fi
apt_install install-slurm slurmctld slurmd slurm-client munge
echo "install-slurm: installed: $(slurmctld -V)" >&2
