//! Functions in microVMs, end to end through the server: runs where
//! `kiln doctor`'s boot probe passes (a real guest reaches its agent), and
//! is skipped, with the probe's reason printed, where it does not. Also
//! checks that where it does not, the fallback is said plainly.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Server, kiln_bin, root, text};

/// The guest kernel: `KILN_GUEST_KERNEL`, or the cached build.
fn kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("KILN_GUEST_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let out = Command::new(root().join("scripts/build-kernel.sh"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().map(|l| PathBuf::from(l.trim()))
}

/// `kiln doctor`'s microvm verdict: available, and why.
fn doctor(kernel: &PathBuf, data: &std::path::Path) -> (bool, String) {
    let out = Command::new(kiln_bin())
        .args(["doctor", "--output", "json", "--data-dir"])
        .arg(data)
        .arg("--guest-kernel")
        .arg(kernel)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vm = report["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "microvm")
        .expect("doctor reports the microvm sandbox")
        .clone();
    (
        vm["available"].as_bool().unwrap(),
        vm["detail"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn functions_run_in_microvms_where_a_guest_boots() {
    let kernel = kernel().expect("the guest kernel (scripts/build-kernel.sh)");
    let dir = tempfile::tempdir().unwrap();
    let (available, detail) = doctor(&kernel, &dir.path().join("doctor"));
    if !available {
        // The fallback is stated, with the reason.
        assert!(detail.contains("functions run in jails"), "{detail}");
        // ... and a server given the kernel falls back, visibly in /metrics.
        let server = Server::start(
            &dir.path().join("data"),
            &["--guest-kernel", kernel.to_str().unwrap()],
        );
        let metrics = get(&server.endpoint, "/metrics");
        assert!(
            metrics.contains(r#"kiln_sandbox_available{sandbox="microvm"} 0"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"kiln_sandbox_selected{family="native",sandbox="jail"} 1"#)
                || metrics.contains(r#"kiln_sandbox_available{sandbox="jail"} 0"#),
            "{metrics}"
        );
        eprintln!("skipped: microVMs cannot boot on this machine: {detail}");
        return;
    }
    let server = Server::start(
        &dir.path().join("data"),
        &["--guest-kernel", kernel.to_str().unwrap()],
    );
    for (name, native) in [("hello-vm", true), ("hello-vm-wasm", false)] {
        let zip = dir.path().join(format!("{name}.zip"));
        let mut args = vec!["build"];
        if native {
            args.push("--native");
        }
        let examples = root().join("examples/hello");
        args.extend([
            examples.to_str().unwrap(),
            "--output",
            zip.to_str().unwrap(),
        ]);
        let out = server.kiln(&args);
        assert!(out.status.success(), "{:?}", text(&out));
        let out = server.kiln(&["deploy", name, zip.to_str().unwrap()]);
        assert!(out.status.success(), "{:?}", text(&out));
        let out = server.kiln(&["invoke", name, "--payload", r#"{"name":"vm"}"#]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let body: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(body["greeting"], "Hello, vm!");
    }
}

/// A plain HTTP GET on loopback; the body.
fn get(endpoint: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}
