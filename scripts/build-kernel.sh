#!/usr/bin/env bash
# Builds kiln's microVM guest kernel: Debian's linux-source-6.1, `make
# tinyconfig`, the fragment runtimes/kernel/kiln.config merged on top, `make
# olddefconfig`, a check that every option of the fragment survived, then
# vmlinux + bzImage.
#
# Cache layout, under ${KILN_KERNEL_CACHE:-$HOME/.cache/kiln/kernel}:
#   <key>/{vmlinux,bzImage,config,System.map,release,build.log}   results
#   src/linux-source-6.1_<version>/   the unpacked source, shared read-only by
#                                     builds (they are out of tree, make O=...)
#   build/<key>.XXXXXX/               a build in progress (objects only)
# <key> is the first 16 hex digits of the SHA-256 of the source package's
# version, the fragment and this script. With the result in place a run only
# prints its path. Everything is built in temporary directories and moved into
# place with one rename at the end, so an interrupted or failed run leaves
# nothing that a later run could mistake for a result; concurrent runs wait
# for each other.
#
# Everything goes to stderr except the last line of stdout: the vmlinux path.
#
# Environment:
#   KILN_KERNEL_CACHE       cache root (default ~/.cache/kiln/kernel)
#   KILN_KERNEL_KEEP_BUILD  1 = keep the object directory after the build
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
fragment="$(cd "$here/../runtimes/kernel" 2>/dev/null && pwd)/kiln.config" ||
  die "runtimes/kernel is missing"
[[ -f "$fragment" ]] || die "the config fragment $fragment is missing"

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
cached() {
  if complete "$out"; then
    log "cached: $out ($src_pkg $src_version)"
    printf '%s\n' "$out/vmlinux" >&3
    exit 0
  fi
}

cached
mkdir -p "$cache/locks" "$cache/build" "$cache/src"
# One build per key at a time; whoever waited finds the result in place.
exec 9>"$cache/locks/$key"
if ! flock -n 9; then
  log "another build of $key is running; waiting for it"
  flock 9
fi
cached

# --- interruption ----------------------------------------------------------
temps=()
child=
cleanup() {
  local t
  for t in "${temps[@]}"; do
    if [[ "$t" == "${work:-}" && "${KILN_KERNEL_KEEP_BUILD:-0}" == 1 ]]; then
      log "build directory kept: $t"
    else
      rm -rf "$t"
    fi
  done
}
on_signal() {
  # Stop the running step and everything it started (it leads its own
  # process group, see run), then leave: bash alone would let it run on.
  if [[ -n "$child" ]]; then
    kill -TERM -- "-$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

buildlog=/dev/null
run() {
  # Runs a step (a program, not a shell function) in its own process group,
  # in the background so that a signal interrupts the wait, its output in the
  # build log, or on stderr if verbose.
  local rc=0
  if [[ "${KILN_KERNEL_VERBOSE:-0}" == 1 ]]; then
    setsid "$@" &
  else
    setsid "$@" >>"$buildlog" 2>&1 &
  fi
  child=$!
  wait "$child" || rc=$?
  child=
  if ((rc != 0)); then
    log "failed ($rc): $*"
    if [[ "${KILN_KERNEL_VERBOSE:-0}" != 1 && "$buildlog" != /dev/null ]]; then
      log "the end of $buildlog:"
      tail -n 60 "$buildlog" >&2
    fi
    return "$rc"
  fi
}

started=$SECONDS

# --- the source, unpacked once per source version ------------------------------
src="$cache/src/${src_pkg}_$src_version"
if [[ ! -f "$src/.kiln-unpacked" ]]; then
  exec 8>"$cache/locks/src"
  flock 8
  if [[ ! -f "$src/.kiln-unpacked" ]]; then
    rm -rf "$src"
    unpack="$(mktemp -d "$cache/src/.unpack.XXXXXX")"
    temps+=("$unpack")
    log "unpacking $tarball into $src"
    run tar -xJf "$tarball" -C "$unpack"
    [[ -f "$unpack/linux-source-6.1/Makefile" ]] ||
      die "$tarball did not unpack to linux-source-6.1/"
    touch "$unpack/linux-source-6.1/.kiln-unpacked"
    mv -T "$unpack/linux-source-6.1" "$src"
  fi
  flock -u 8
fi

# --- configure ------------------------------------------------------------------
work="$(mktemp -d "$cache/build/$key.XXXXXX")"
temps+=("$work")
obj="$work/obj"
mkdir -p "$obj"
buildlog="$work/build.log"
log "building $src_pkg $src_version with $(basename "$fragment") (key $key) in $work"

# Reproducible-ish banners: no user, host or build time baked in.
export KBUILD_BUILD_USER=kiln KBUILD_BUILD_HOST=kiln
export KBUILD_BUILD_TIMESTAMP="$src_pkg $src_version"
cd "$obj"
kmake=(make -C "$src" O="$obj" ARCH="$arch")

log "configuring: tinyconfig + fragment + olddefconfig"
run "${kmake[@]}" tinyconfig
cp "$fragment" "$work/kiln.config"
run "$src/scripts/kconfig/merge_config.sh" -m .config "$work/kiln.config"
run "${kmake[@]}" olddefconfig

# Every `CONFIG_X=value` line of the fragment must be in the final config;
# olddefconfig silently drops a value whose dependencies are not met.
missing=()
unwanted=()
while IFS= read -r line; do
  if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    sym="${BASH_REMATCH[1]}"
    if ! grep -qxF -- "$line" .config; then
      final="$(grep -E "^(# )?$sym[= ]" .config || echo 'absent: its dependencies are not met')"
      missing+=("$line (final: $final)")
    fi
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    sym="${BASH_REMATCH[1]}"
    if grep -qE "^$sym=" .config; then
      unwanted+=("$(grep -E "^$sym=" .config) (something selects it)")
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

# --- compile ------------------------------------------------------------------
jobs="$(nproc)"
log "compiling vmlinux bzImage with -j$jobs (a few minutes; log: $buildlog)"
run "${kmake[@]}" -j"$jobs" vmlinux bzImage

stage="$work/out"
mkdir -p "$stage"
cp vmlinux "$stage/vmlinux"
cp arch/x86/boot/bzImage "$stage/bzImage"
cp .config "$stage/config"
cp System.map "$stage/System.map"
"${kmake[@]}" -s --no-print-directory kernelrelease >"$stage/release"
cp "$buildlog" "$stage/build.log"

# Into place in one rename. A leftover incomplete directory (copied in by
# hand, say) is replaced.
rm -rf "$out"
mv -T "$stage" "$out"
log "built in $((SECONDS - started))s: $out (vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes, $(cat "$out/release"))"
printf '%s\n' "$out/vmlinux" >&3
