# shellcheck shell=bash
# apt_install WHO PACKAGE...: installs Debian packages quietly (updating the
# package lists once if the first try fails), as root; otherwise says which
# packages to install and returns 1. WHO prefixes the messages.
apt_install() {
  local who=$1; shift
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    printf '%s: error: needs %s (Debian/Ubuntu: sudo apt-get install %s)\n' "$who" "$*" "$*" >&2
    return 1
  fi
  printf '%s: installing (apt): %s\n' "$who" "$*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || { apt-get update -q >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; } \
    || { printf '%s: error: apt-get could not install %s\n' "$who" "$*" >&2; return 1; }
}
