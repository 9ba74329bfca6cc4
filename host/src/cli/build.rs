//! `kiln build`: compiles a function crate into a Wasm component with plain
//! cargo and packs it as a deployable zip (`function.wasm` inside).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

pub use kiln::package::COMPONENT_IN_ZIP;

/// What a build produced.
#[derive(Debug)]
pub struct Built {
    /// The crate's name.
    pub name: String,
    /// The zip written.
    pub zip: PathBuf,
    /// Size of the zip.
    pub zip_size: u64,
}

/// Builds the crate at `path` and writes the zip to `output` (default:
/// `<crate>.zip` in the current directory).
pub fn build(path: &Path, output: Option<&Path>) -> Result<Built> {
    let manifest = if path.is_dir() {
        path.join("Cargo.toml")
    } else {
        path.to_path_buf()
    };
    if !manifest.is_file() {
        bail!(
            "{} is not a Rust crate: expected a directory with a Cargo.toml (a crate that \
             depends on kiln-sdk and has crate-type = [\"cdylib\"])",
            path.display()
        );
    }
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("resolving {}", manifest.display()))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut child = Command::new(&cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "cargo was not found on PATH: install Rust with rustup (https://rustup.rs)"
                )
            } else {
                anyhow::anyhow!("running {cargo}: {e}")
            }
        })?;

    let stdout = child.stdout.take().context("cargo's output")?;
    let mut artifact: Option<(String, PathBuf)> = None;
    let mut saw_lib = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let from_manifest = msg["manifest_path"]
            .as_str()
            .is_some_and(|m| Path::new(m) == manifest);
        if !from_manifest {
            continue;
        }
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kinds: Vec<&str> = msg["target"]["kind"]
            .as_array()
            .map(|k| k.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if kinds.iter().any(|k| k.contains("lib")) {
            saw_lib = Some(name.clone());
        }
        if let Some(wasm) = msg["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|f| f.ends_with(".wasm"))
        {
            artifact = Some((name, PathBuf::from(wasm)));
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        let mut hint = String::new();
        if !target_installed() {
            hint = "\nhint: the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`".to_owned();
        }
        bail!("cargo build failed for {}{hint}", manifest.display());
    }
    let Some((name, component)) = artifact else {
        match saw_lib {
            Some(lib) => bail!(
                "{lib} built, but not as a WebAssembly library: add\n\n[lib]\ncrate-type = [\"cdylib\"]\n\nto {}",
                manifest.display()
            ),
            None => bail!(
                "{} has no library target: a kiln function is a library crate with \
                 crate-type = [\"cdylib\"] whose handler is marked #[kiln_sdk::handler]",
                manifest.display()
            ),
        }
    };
    let bytes =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    if let Err(e) = kiln_wasm::check_component_header(&bytes) {
        bail!(
            "{} is not a component ({e}); does the crate mark its handler with #[kiln_sdk::handler]?",
            component.display()
        );
    }

    let zip = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{name}.zip")));
    let packed = kiln::package::pack_component(&bytes).context("writing the zip")?;
    if let Some(parent) = zip.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&zip, &packed).with_context(|| format!("writing {}", zip.display()))?;
    Ok(Built {
        name,
        zip,
        zip_size: packed.len() as u64,
    })
}

fn target_installed() -> bool {
    Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|sysroot| {
            Path::new(sysroot.trim())
                .join("lib/rustlib/wasm32-wasip2")
                .is_dir()
        })
}
