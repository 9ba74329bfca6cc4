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

/// The canonical path of the Cargo.toml of the crate at `path` (a
/// directory or the manifest itself); `hint` adds what the crate must be.
fn manifest_of(path: &Path, hint: &str) -> Result<PathBuf> {
    let manifest = if path.is_dir() {
        path.join("Cargo.toml")
    } else {
        path.to_path_buf()
    };
    if !manifest.is_file() {
        bail!(
            "{} is not a Rust crate: expected a directory with a Cargo.toml{hint}",
            path.display()
        );
    }
    manifest
        .canonicalize()
        .with_context(|| format!("resolving {}", manifest.display()))
}

/// Builds the crate at `path` and writes the zip to `output` (default:
/// `<crate>.zip` in the current directory).
pub fn build(path: &Path, output: Option<&Path>) -> Result<Built> {
    let manifest = manifest_of(
        path,
        " (a crate that \
             depends on kiln-sdk and has crate-type = [\"cdylib\"])",
    )?;
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

    let packed = kiln::package::pack_component(&bytes).context("writing the zip")?;
    write_zip(name, output, "", packed)
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

/// The target native bootstraps are built for.
pub const NATIVE_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the crate at `path` as a custom runtime: its `bootstrap` binary
/// (or its only binary) if it has one, else a bootstrap around its kiln-sdk
/// handler. Writes a zip holding `bootstrap`.
pub fn build_native(path: &Path, output: Option<&Path>) -> Result<Built> {
    let manifest = manifest_of(path, "")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let metadata = Command::new(&cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .map_err(|e| anyhow::anyhow!("running {cargo}: {e}"))?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed:\n{}",
            String::from_utf8_lossy(&metadata.stderr)
        );
    }
    let metadata: Value =
        serde_json::from_slice(&metadata.stdout).context("cargo metadata's output")?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["manifest_path"]
                .as_str()
                .is_some_and(|m| Path::new(m) == manifest)
        })
        .context("cargo metadata does not list the crate")?;
    let name = package["name"].as_str().unwrap_or_default().to_owned();
    let target_dir = PathBuf::from(metadata["target_directory"].as_str().unwrap_or("target"));
    let targets: Vec<&Value> = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let kinds = |t: &Value| -> Vec<String> {
        t["kind"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let bins: Vec<&str> = targets
        .iter()
        .filter(|t| kinds(t).iter().any(|k| k == "bin"))
        .filter_map(|t| t["name"].as_str())
        .collect();

    let (build_manifest, bin) = if !bins.is_empty() {
        let bin = match bins.iter().find(|b| **b == "bootstrap") {
            Some(b) => (*b).to_owned(),
            None if bins.len() == 1 => bins[0].to_owned(),
            None => bail!(
                "{name} has several binaries ({}): name the custom runtime's one `bootstrap`",
                bins.join(", ")
            ),
        };
        (manifest.clone(), bin)
    } else {
        let lib = targets
            .iter()
            .find(|t| {
                kinds(t)
                    .iter()
                    .any(|k| k == "cdylib" || k == "rlib" || k == "lib")
            })
            .with_context(|| format!("{name} has neither a binary nor a library to build"))?;
        let lib_kinds = kinds(lib);
        if !lib_kinds.iter().any(|k| k == "rlib" || k == "lib") {
            bail!(
                "{name} builds only a cdylib; to build it natively too, add \"rlib\":\n\n[lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\nto {}",
                manifest.display()
            );
        }
        let lib_name = lib["name"].as_str().unwrap_or(&name).replace('-', "_");
        let crate_dir = manifest.parent().context("the manifest's directory")?;
        let wrapper = target_dir.join("kiln-native").join(&name);
        std::fs::create_dir_all(&wrapper)
            .with_context(|| format!("creating {}", wrapper.display()))?;
        std::fs::write(
            wrapper.join("Cargo.toml"),
            format!(
                "# Written by `kiln build --native`: a custom runtime around {name}'s handler.\n\
                 [package]\nname = \"kiln-native-{name}\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n\
                 [[bin]]\nname = \"bootstrap\"\npath = \"main.rs\"\n\n\
                 [dependencies]\n{name} = {{ path = {:?} }}\n\n[workspace]\n",
                crate_dir.display().to_string()
            ),
        )?;
        std::fs::write(
            wrapper.join("main.rs"),
            format!(
                "//! Written by `kiln build --native`.\n\
                 extern crate {lib_name};\n\n\
                 unsafe extern \"Rust\" {{\n    safe fn __kiln_native_main() -> !;\n}}\n\n\
                 fn main() {{\n    __kiln_native_main()\n}}\n"
            ),
        )?;
        // Build with the versions the crate's own workspace locked.
        if let Some(lock) = metadata["workspace_root"]
            .as_str()
            .map(|root| Path::new(root).join("Cargo.lock"))
            .filter(|l| l.is_file())
            && !wrapper.join("Cargo.lock").is_file()
        {
            std::fs::copy(&lock, wrapper.join("Cargo.lock"))?;
        }
        (wrapper.join("Cargo.toml"), "bootstrap".to_owned())
    };

    let mut command = Command::new(&cargo);
    command
        .args([
            "build",
            "--release",
            "--target",
            NATIVE_TARGET,
            "--bin",
            &bin,
        ])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&build_manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if std::env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
        command.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    let out = command
        .output()
        .map_err(|e| anyhow::anyhow!("running {cargo}: {e}"))?;
    if !out.status.success() {
        bail!(
            "cargo build for {NATIVE_TARGET} failed for {}\nhint: the target needs `rustup target add {NATIVE_TARGET}`, and crates with C code need `apt-get install musl-tools`",
            manifest.display()
        );
    }
    let executable = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin.as_str())
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no executable")?;
    let bytes =
        std::fs::read(&executable).with_context(|| format!("reading {}", executable.display()))?;
    let packed = kiln::package::pack_bootstrap(&bytes).context("writing the zip")?;
    write_zip(name, output, "-native", packed)
}

/// Writes `packed` to `output` (default: `<name><suffix>.zip` here).
fn write_zip(name: String, output: Option<&Path>, suffix: &str, packed: Vec<u8>) -> Result<Built> {
    let zip = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{name}{suffix}.zip")));
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
