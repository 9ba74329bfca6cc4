//! The `kiln` command line, as an author uses it: build, deploy, invoke, and
//! the errors a person can act on.

mod common;

use std::process::Command;

use common::{Server, kiln_bin, root, text};

#[test]
fn build_deploy_invoke_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let zip = dir.path().join("hello.zip");

    let out = server.kiln(&[
        "build",
        root().join("examples/hello").to_str().unwrap(),
        "--output",
        zip.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(zip.is_file());

    let out = server.kiln(&["deploy", "hello", zip.to_str().unwrap(), "--memory", "256"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("function:hello") && stdout.contains("256 MB"),
        "{stdout}"
    );

    let out = server.kiln(&["invoke", "hello", "--payload", r#"{"name":"Grace"}"#]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let body: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(body["greeting"], "Hello, Grace!");

    let out = server.kiln(&["invoke", "hello", "--output", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["StatusCode"], 200);
    assert_eq!(doc["ExecutedVersion"], "$LATEST");
    assert_eq!(doc["Payload"]["greeting"], "Hello, world!");
    assert!(doc["Log"].as_str().unwrap().contains("REPORT RequestId:"));

    // Deploying again updates the code in place.
    let out = server.kiln(&["deploy", "hello", zip.to_str().unwrap(), "--output", "json"]);
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["MemorySize"], 256);
}

#[test]
fn deploying_a_crate_directory_builds_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let out = server.kiln(&[
        "deploy",
        "counter",
        root().join("examples/counter").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    for expected in 1..=2 {
        let out = server.kiln(&["invoke", "counter"]);
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(body["count"], expected);
    }
}

#[test]
fn client_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);

    let out = server.kiln(&["invoke", "nope"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ResourceNotFoundException") && stderr.contains("function:nope"),
        "{stderr}"
    );

    let out = server.kiln(&["invoke", "nope", "--payload", "{not json"]);
    assert!(
        text(&out).1.contains("--payload is not JSON"),
        "{:?}",
        text(&out)
    );

    let out = server.kiln(&["deploy", "bad name", "/nonexistent.zip"]);
    assert!(
        text(&out).1.contains("reading /nonexistent.zip"),
        "{:?}",
        text(&out)
    );

    // Nothing listens on port 9 of loopback.
    let out = Command::new(kiln_bin())
        .args(["invoke", "hello", "--endpoint", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("could not reach kiln at http://127.0.0.1:9"),
        "{stderr}"
    );
    assert!(stderr.contains("kiln serve"), "{stderr}");
}

#[test]
fn a_function_error_exits_non_zero_and_prints_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let out = server.kiln(&[
        "deploy",
        "hello",
        root().join("examples/hello").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = server.kiln(&["invoke", "hello", "--payload", r#"{"name":"  "}"#]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains(r#""errorType":"InvalidName""#), "{stdout}");
    assert!(stderr.contains("Unhandled"), "{stderr}");
}

#[test]
fn build_errors_are_actionable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kiln_bin())
        .args(["build", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("Cargo.toml"), "{:?}", text(&out));

    // A library that is not a cdylib.
    let krate = dir.path().join("plainlib");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"plainlib\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(krate.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    let out = Command::new(kiln_bin())
        .args(["build", krate.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("crate-type = [\"cdylib\"]"), "{stderr}");
}

#[test]
fn one_server_per_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Server::start(&dir.path().join("data"), &[]);
    let out = Command::new(kiln_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("in use by another kiln server"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn leftover_environments_are_cleaned_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let out = server.kiln(&[
        "deploy",
        "counter",
        root().join("examples/counter").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(server.kiln(&["invoke", "counter"]).status.success());
    // Environments' directories (some are made ahead for environments to
    // come, each with its /tmp disk).
    let envs = || -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(data.join("envs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    assert!(!envs().is_empty(), "the warm environment holds a directory");
    let before = envs();
    server.kill();
    let left = envs();
    assert!(left.is_superset(&before), "SIGKILL ran no teardown");
    let server = Server::start(&data, &[]);
    let now = envs();
    assert!(
        left.intersection(&now).next().is_none(),
        "a new server removes what the old one left: {:?}",
        left.intersection(&now).collect::<Vec<_>>()
    );
    let out = server.kiln(&["invoke", "counter"]);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["count"], 1, "a new environment starts from scratch");
}
