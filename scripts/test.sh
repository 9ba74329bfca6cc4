#!/usr/bin/env bash
# The whole test suite, on a fresh machine of this kind (Debian 12, rustup,
# root). Installs what it needs, then: formatting, lints, unit and
# integration tests, the end-to-end suites against the real binary, and a
# smoke run of the benchmark harness.
#
# Build products go to $CARGO_TARGET_DIR (default ~/.cache/kiln/target) so
# that runs reuse them; everything the suite installs is installed here, on
# every run, so that no cache can hide a missing step.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
started=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - started))" "$*"; }

step "Debian packages"
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v musl-gcc >/dev/null || need+=(musl-tools)
# Environments' /tmp disks are ext4 file systems kiln makes with mkfs.ext4.
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v python3 >/dev/null || need+=(python3)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
# The console test drives Debian's headless Chromium through its driver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if ((${#need[@]})); then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

step "Rust toolchain and targets from rust-toolchain.toml"
rustup toolchain install
rustup show active-toolchain

step "Python clients (target/venv)"
python3 -m venv target/venv
target/venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt

step "guest kernel for microVMs (cached by its config hash; ~6 min when built)"
# Built here so that its time shows as its own step; the tests that boot it
# find it through the same script (instant once cached). Not exported: a
# server given a kernel probes it at start, and only the microVM tests ask.
./scripts/build-kernel.sh | tail -n 1

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release --locked -- -D warnings

step "unit, integration and CLI end-to-end tests"
cargo test --workspace --release --locked

step "end-to-end tests with boto3 against the real binary"
cargo build --release --locked -p kiln
KILN_BIN="$CARGO_TARGET_DIR/release/kiln" target/venv/bin/python -m pytest tests/python -q -p no:cacheprovider

step "benchmark harness smoke run (results in target/bench-quick; installs wasmtime-cli for the peer comparison once, into ~/.cache/kiln/peers)"
cargo run --release --locked -p kiln-bench -- --quick --out target/bench-quick

step "micro benchmarks, briefly (criterion --quick)"
cargo bench --locked -p kiln-bench --bench micro -- --quick

step "all passed"
