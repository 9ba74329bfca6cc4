#!/usr/bin/env bash
# Builds kiln's microVM guest kernel: Debian's linux-source-6.1, `make
# tinyconfig`, the fragment runtimes/kernel/kiln.config merged on top, `make
# olddefconfig`, then vmlinux + bzImage.
#
# The result is cached in
#   ${KILN_KERNEL_CACHE:-$HOME/.cache/kiln/kernel}/<key>/{vmlinux,bzImage,config,System.map}
# where <key> is the first 16 hex digits of the SHA-256 of the kernel source
# package's version, the fragment and this script. A second run with the same
# inputs only prints the path. The build runs in a temporary directory under
# the cache and the result is moved into place in one rename at the end, so an
# interrupted or failed build leaves nothing behind that a later run would
# mistake for a result. Concurrent runs for the same key wait for each other.
#
# Everything goes to stderr except the last line of stdout: the vmlinux path.
#
# Environment:
#   KILN_KERNEL_CACHE       cache root (default ~/.cache/kiln/kernel)
#   KILN_KERNEL_KEEP_BUILD  1 = keep the build tree (under the cache) after the build
#   KILN_KERNEL_VERBOSE     1 = stream make's output instead of logging it
set -euo pipefail

exec 3>&1 1>&2 # fd 3 = the real stdout, for the result path only
log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/../runtimes/kernel/kiln.config"
[[ -f "$fragment" ]] || die "the config fragment $fragment is missing"
fragment="$(cd "$(dirname "$fragment")" && pwd)/$(basename "$fragment")"

src_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
arch=x86_64

# --- packages -----------------------------------------------------------------
need=()
for pkg in "$src_pkg" flex bison libelf-dev bc build-essential xz-utils; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == installed ]] || need+=("$pkg")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || die "need root (or sudo) to install ${need[*]}"
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -q "${need[@]}"; then
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q "${need[@]}"
  fi
fi
[[ -f "$tarball" ]] || die "$tarball is missing although $src_pkg is installed"
src_version="$(dpkg-query -W -f='${Version}' "$src_pkg")"

# --- cache key ----------------------------------------------------------------
key="$(
  {
    printf '%s %s\n' "$src_pkg" "$src_version"
    printf -- '--- fragment\n'
    cat "$fragment"
    printf -- '--- script\n'
    cat "$script"
  } | sha256sum | cut -c1-16
)"
cache="${KILN_KERNEL_CACHE:-$HOME/.cache/kiln/kernel}"
out="$cache/$key"
products=(vmlinux bzImage config System.map)

complete() {
  local f
  for f in "${products[@]}"; do
    [[ -s "$1/$f" ]] || return 1
  done
}

mkdir -p "$cache"
if complete "$out"; then
  log "cached: $out ($src_pkg $src_version)"
  printf '%s\n' "$out/vmlinux" >&3
  exit 0
fi

# One build per key at a time; whoever waited finds the result in place.
exec 9>"$cache/.$key.lock"
if ! flock -n 9; then
  log "another build of $key is running; waiting for it"
  flock 9
fi
if complete "$out"; then
  log "cached: $out ($src_pkg $src_version)"
  printf '%s\n' "$out/vmlinux" >&3
  exit 0
fi

# --- build --------------------------------------------------------------------
mkdir -p "$cache/build"
work="$(mktemp -d "$cache/build/$key.XXXXXX")"
cleanup() {
  if [[ "${KILN_KERNEL_KEEP_BUILD:-0}" == 1 ]]; then
    log "build tree kept: $work"
  else
    rm -rf "$work"
  fi
}
child=
on_signal() {
  # Stop the running step too: bash alone would wait for it to finish.
  [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null
  [[ -n "$child" ]] && wait "$child" 2>/dev/null
  exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

buildlog="$work/build.log"
run() {
  # Runs a step in the background (so that a signal interrupts the wait),
  # its output in the build log, or on stderr if verbose.
  local rc=0
  if [[ "${KILN_KERNEL_VERBOSE:-0}" == 1 ]]; then
    "$@" &
  else
    "$@" >>"$buildlog" 2>&1 &
  fi
  child=$!
  wait "$child" || rc=$?
  child=
  if ((rc != 0)); then
    log "failed ($rc): $*"
    if [[ "${KILN_KERNEL_VERBOSE:-0}" != 1 ]]; then
      log "the end of $buildlog:"
      tail -n 60 "$buildlog" >&2
    fi
    return "$rc"
  fi
}

started=$SECONDS
log "building $src_pkg $src_version with $(basename "$fragment") (key $key) in $work"
log "unpacking $tarball"
run tar -xJf "$tarball" -C "$work"
tree="$work/linux-source-6.1"
[[ -f "$tree/Makefile" ]] || die "$tarball did not unpack to linux-source-6.1/"

# Reproducible-ish banners: no user, host or build time baked in.
export KBUILD_BUILD_USER=kiln KBUILD_BUILD_HOST=kiln
export KBUILD_BUILD_TIMESTAMP="$src_pkg $src_version"
mk() { make -C "$tree" --no-print-directory ARCH="$arch" "$@"; }

log "configuring: tinyconfig + fragment + olddefconfig"
run mk tinyconfig
cp "$fragment" "$work/kiln.config"
merge() { cd "$tree" && ./scripts/kconfig/merge_config.sh -m .config "$work/kiln.config"; }
run merge
run mk olddefconfig

# Every `CONFIG_X=value` line of the fragment must be in the final config;
# olddefconfig silently drops a value whose dependencies are not met.
missing=()
unwanted=()
while IFS= read -r line; do
  if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF -- "$line" "$tree/.config" || missing+=("$line (final: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$tree/.config" || echo 'absent, dependencies unmet'))")
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    sym="${BASH_REMATCH[1]}"
    if grep -qE "^$sym=" "$tree/.config"; then
      unwanted+=("$sym (final: $(grep -E "^$sym=" "$tree/.config"); something selects it)")
    fi
  fi
done <"$fragment"
for u in "${unwanted[@]}"; do
  log "warning: wanted off but on: $u"
done
if ((${#missing[@]})); then
  log "error: these options of $(basename "$fragment") did not survive olddefconfig:"
  for m in "${missing[@]}"; do
    log "  $m"
  done
  die "fix their dependencies in the fragment (see 'depends on' in the Kconfig files)"
fi
log "config checked: every option of the fragment is in the final .config"

jobs="$(nproc)"
log "compiling vmlinux bzImage with -j$jobs (a few minutes)"
run mk -j"$jobs" vmlinux bzImage

stage="$work/out"
mkdir -p "$stage"
cp "$tree/vmlinux" "$stage/vmlinux"
cp "$tree/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$tree/.config" "$stage/config"
cp "$tree/System.map" "$stage/System.map"
mk -s kernelrelease >"$stage/release"
[[ -f "$buildlog" ]] && cp "$buildlog" "$stage/build.log"

# Into place in one rename. A leftover incomplete directory (copied in by
# hand, say) is replaced.
if [[ -e "$out" ]]; then
  rm -rf "$out"
fi
mv -T "$stage" "$out"
log "built in $((SECONDS - started))s: $out (vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes, $(cat "$out/release"))"
printf '%s\n' "$out/vmlinux" >&3
