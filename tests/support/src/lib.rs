//! Helpers shared by kiln's test suites.
//!
//! Tests need real function components: [`wasm_function`] builds a function
//! crate of this workspace for `wasm32-wasip2` with the same cargo that runs
//! the tests, once per test process, and returns the component's path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The workspace root.
///
/// Found at run time from the package cargo runs (`cargo test`, `cargo run`
/// set `CARGO_MANIFEST_DIR`) when it can be: a build cache shared between
/// clones at different paths may hold this crate compiled in another one.
pub fn workspace_root() -> PathBuf {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|dir| {
            dir.ancestors()
                .find(|d| d.join("Cargo.lock").is_file() && d.join("wit").is_dir())
                .map(Path::to_path_buf)
        });
    runtime.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .expect("tests/support sits two levels below the workspace root")
            .to_path_buf()
    })
}

/// Builds `package` (a cdylib function crate of this workspace) as a Wasm
/// component in release mode and returns the path of the `.wasm` file.
///
/// Panics with cargo's output if the build fails: a test cannot go on
/// without its fixture.
pub fn wasm_function(package: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = built.get(package) {
        return path.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
            "-p",
            package,
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo");
    assert!(
        output.status.success(),
        "building the fixture {package} failed"
    );
    let path = artifact(&output.stdout, package)
        .unwrap_or_else(|| panic!("cargo reported no .wasm artifact for {package}"));
    built.insert(package.to_owned(), path.clone());
    path
}

/// Finds the `.wasm` file of `package` in cargo's JSON messages.
fn artifact(messages: &[u8], package: &str) -> Option<PathBuf> {
    let lib_name = package.replace('-', "_");
    String::from_utf8_lossy(messages)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == lib_name.as_str())
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
        })
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|p| p.extension().is_some_and(|e| e == "wasm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_wasm_artifact_in_cargo_messages() {
        let msgs = br#"{"reason":"compiler-artifact","target":{"name":"serde"},"filenames":["/t/libserde.rlib"]}
{"reason":"compiler-artifact","target":{"name":"my_fn"},"filenames":["/t/my_fn.wasm"]}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            artifact(msgs, "my-fn"),
            Some(PathBuf::from("/t/my_fn.wasm"))
        );
        assert_eq!(artifact(msgs, "other"), None);
    }
}
