//! Starting the real `kiln` binary for end-to-end tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary under test.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// A `kiln serve` child on a free loopback port; killed when dropped.
pub struct Server {
    child: Child,
    pub endpoint: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on `data_dir` and waits for its "listening" line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(kiln_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("KILN_LOG", "warn")
            // The server generates its root key into the data dir; clients
            // find it there (see `kiln`).
            .env_remove("KILN_ROOT_ACCESS_KEY_ID")
            .env_remove("KILN_ROOT_SECRET_ACCESS_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning kiln serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("kiln listening on ") {
                    let endpoint = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(endpoint);
                }
            }
        });
        let endpoint = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(e) => e,
            Err(_) => {
                let _ = child.kill();
                panic!("kiln serve did not report its address within 30 s");
            }
        };
        Server {
            child,
            endpoint,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Runs a client subcommand of the binary against this server.
    pub fn kiln(&self, args: &[&str]) -> Output {
        Command::new(kiln_bin())
            .args(args)
            .env("KILN_ENDPOINT", &self.endpoint)
            .env("KILN_DATA_DIR", &self.data_dir)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("KILN_ROOT_ACCESS_KEY_ID")
            .env_remove("KILN_ROOT_SECRET_ACCESS_KEY")
            .output()
            .expect("running kiln")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// stdout and stderr of a finished command, for assertions.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The workspace root.
///
/// From the run-time `CARGO_MANIFEST_DIR` that `cargo test` sets: a build
/// cache shared between clones may hold this test compiled in another one.
pub fn root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().unwrap().to_path_buf()
}
