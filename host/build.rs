//! Builds the environment agent (`runtimes/init`) as a static musl binary
//! and hands it to the host crate to embed (`include_bytes!`), so that one
//! `kiln` binary carries everything it runs.
//!
//! `KILN_AGENT_BIN=/path/to/kiln-agent` skips the build and embeds that
//! file instead (for packagers who build the agent separately).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_AGENT_BIN");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("kiln-agent");
    if let Some(prebuilt) = env::var_os("KILN_AGENT_BIN") {
        std::fs::copy(&prebuilt, &out)
            .unwrap_or_else(|e| panic!("KILN_AGENT_BIN={}: {e}", Path::new(&prebuilt).display()));
        return;
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("host/ sits in the workspace");
    // Relative to this package: a build cache shared by checkouts at other
    // paths must watch this checkout's sources, not the last one's.
    for dir in ["runtimes/init", "runtimes/proto", "runtimes/wasm", "wit"] {
        println!("cargo:rerun-if-changed=../{dir}");
    }
    println!("cargo:rerun-if-changed=../Cargo.lock");

    // A target dir of its own: the outer build holds the lock on its own.
    // Kept next to the outer one (OUT_DIR is <target>/<profile>/build/<pkg>/out)
    // so that it survives rebuilds of this crate.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map_or_else(|| out_dir.join("agent"), |t| t.join("kiln-agent-build"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "kiln-init",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // C parts of dependencies (wasmtime's helpers) need a musl C compiler:
    // Debian's musl-tools provides musl-gcc.
    let cc_var = "CC_x86_64_unknown_linux_musl";
    println!("cargo:rerun-if-env-changed={cc_var}");
    if env::var_os(cc_var).is_none() {
        command.env(cc_var, "musl-gcc");
    }
    // The outer build's settings are not the agent's.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build the agent: {e}"));
    if !status.success() {
        panic!(
            "building the environment agent (kiln-init) for {TARGET} failed; it needs the \
             target (`rustup target add {TARGET}`; rust-toolchain.toml lists it) and a musl C \
             compiler (`apt-get install musl-tools`)"
        );
    }
    let built = target_dir.join(TARGET).join("release").join("kiln-agent");
    std::fs::copy(&built, &out).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
}
