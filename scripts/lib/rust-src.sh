# Sourced by the cross-build scripts (test-aarch64.sh, test-windows.sh):
# makes sure the Rust standard library's source for this exact rustc is
# where `-Zbuild-std` looks for it. It is the rustup component rust-src
# when installed, else Debian's `rust-src` package of the same version,
# unpacked under $runtimes and linked into the toolchain's sysroot where
# rustup would put it. Needs `runtimes` set and a `die` function.

ensure_rust_src() {
  sysroot="$(rustc --print sysroot)"
  src="$sysroot/lib/rustlib/src/rust"
  version="$(rustc --version | awk '{print $2}')"
  if [ ! -f "$src/library/core/src/lib.rs" ]; then
    unpacked="$runtimes/rust-src-$version"
    if [ ! -f "$unpacked/usr/lib/rustlib/src/rust/library/core/src/lib.rs" ]; then
      # Debian's rust-src packages of this version (backports and unstable
      # carry several recent versions).
      found=""
      for dist in trixie-backports sid trixie forky; do
        index="$(curl -sf "http://deb.debian.org/debian/dists/$dist/main/binary-all/Packages.xz" | xz -dc 2>/dev/null || true)"
        found="$(awk -v v="$version" '
          /^Package: /{p=($2=="rust-src")} p&&/^Version: /{ok=(index($2, v"+")==1)}
          p&&ok&&/^Filename: /{f=$2} p&&ok&&/^SHA256: /{print f" "$2; exit}' <<<"$index")"
        [ -n "$found" ] && break
      done
      [ -n "$found" ] || die "no Debian rust-src package for rustc $version (install it with: rustup component add rust-src)"
      read -r file sha <<<"$found"
      echo "fetching Debian's $(basename "$file") (the std source of rustc $version)"
      mkdir -p "$runtimes"
      deb="$runtimes/$(basename "$file")"
      curl -sf -o "$deb.part" "http://deb.debian.org/debian/$file" || die "could not download $file from deb.debian.org"
      echo "$sha  $deb.part" | sha256sum -c --quiet - || die "$file: checksum mismatch"
      rm -rf "$unpacked.part" && mkdir -p "$unpacked.part"
      dpkg-deb -x "$deb.part" "$unpacked.part" || die "could not unpack $file"
      rm -rf "$unpacked" && mv "$unpacked.part" "$unpacked" && rm -f "$deb.part"
    fi
    mkdir -p "$(dirname "$src")"
    ln -sfn "$unpacked/usr/lib/rustlib/src/rust" "$src"
  fi
}
