#!/usr/bin/env bash
# The CPU image (Dockerfile), built without a daemon by buildah (Debian's
# package) as far as this machine allows, then run:
#
# - Docker Hub is out of reach here, so `debian:bookworm-slim` is made from
#   Debian's own packages (debootstrap --variant=minbase, kept under
#   $PIPELINE_RUNTIMES) and imported under that name;
# - the build stage (a rustup toolchain running `cargo build --release
#   --features mpi`) is not run: its place is taken by the binary this
#   machine builds with the same features. The runtime stage is built
#   exactly as the Dockerfile writes it (Open MPI from apt, the binary, the
#   recipes, WORKDIR, ENTRYPOINT);
# - in the image: `pipeline --version`, every shared library the binary
#   needs resolved, `mpirun` present, and `pipeline validate` of the recipes
#   the image carries.
#
# Needs root (buildah with chroot isolation and vfs storage; installs
# buildah and debootstrap with apt when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "test-container: $*" >&2; exit 1; }
runtimes="${PIPELINE_RUNTIMES:-$HOME/.cache/pipeline-runtimes}"
mkdir -p "$runtimes"

# shellcheck source=lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  apt_install test-container buildah debootstrap || exit 1
fi
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

# --- the base image, from Debian's packages --------------------------------
base=docker.io/library/debian:bookworm-slim
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  rootfs="$runtimes/debian-bookworm-minbase"
  if [ ! -x "$rootfs/bin/sh" ]; then
    echo "test-container: debootstrap bookworm (minbase) into $rootfs"
    rm -rf "$rootfs.tmp"
    debootstrap --variant=minbase bookworm "$rootfs.tmp" http://deb.debian.org/debian >"$runtimes/debootstrap.log" 2>&1 \
      || { tail -20 "$runtimes/debootstrap.log"; die "debootstrap failed"; }
    mv "$rootfs.tmp" "$rootfs"
  fi
  ctr=$(buildah from scratch)
  buildah copy "$ctr" "$rootfs" / >/dev/null
  buildah commit -q "$ctr" "$base" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

# --- the binary, in place of the build stage ------------------------------
cargo build --locked --quiet --features mpi --bin pipeline
ctr=$(buildah from scratch)
buildah copy "$ctr" target/debug/pipeline /pipeline >/dev/null
buildah commit -q "$ctr" localhost/pipeline-binary >/dev/null
buildah rm "$ctr" >/dev/null

# --- the runtime stage, as written ----------------------------------------
dockerfile=target/container/Dockerfile.runtime
mkdir -p target/container
grep -q '^FROM debian:${DEBIAN}-slim AS runtime$' Dockerfile || die "Dockerfile has no runtime stage"
{
  sed -n '/^ARG DEBIAN=/p' Dockerfile
  echo "FROM localhost/pipeline-binary AS build"
  sed -n '/^FROM debian:${DEBIAN}-slim AS runtime$/,$p' Dockerfile
} >"$dockerfile"
echo "test-container: buildah bud (the runtime stage of Dockerfile)"
buildah bud --pull=never -q -f "$dockerfile" -t localhost/pipeline:test . >target/container/build.log 2>&1 \
  || { tail -30 target/container/build.log; die "the image did not build"; }

# --- run it ----------------------------------------------------------------
entrypoint=$(buildah inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' localhost/pipeline:test)
[ "$entrypoint" = "[pipeline]" ] || die "the image's entrypoint is $entrypoint, not [pipeline]"
ctr=$(buildah from localhost/pipeline:test)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
inside() { buildah run "$ctr" -- "$@"; }
version=$(inside pipeline --version | head -n1) || die "pipeline --version failed in the image"
missing=$(inside sh -c 'ldd /usr/local/bin/pipeline | grep "not found" || true')
[ -z "$missing" ] || die "libraries missing in the image: $missing"
inside mpirun --version >/dev/null || die "mpirun is missing in the image"
inside sh -c 'pipeline validate recipes/*.toml' >/dev/null || die "the recipes in the image do not validate"
size=$(buildah images --format '{{.Size}}' localhost/pipeline:test 2>/dev/null | head -n1)
echo "test-container: passed ($version; localhost/pipeline:test is ${size:-?} with a debug binary)"
