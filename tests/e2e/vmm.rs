//! The VMM on this machine's KVM: `kiln vmm` boots a tiny no_std guest
//! (`tests/guests/virtio-echo`) in long mode through the same boot path a
//! Linux kernel takes, and bytes cross the virtio-console both ways.
//!
//! Skipped, with the reason printed, where /dev/kvm cannot make a VM.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{kiln_bin, root};

/// Why KVM cannot run here, if it cannot.
fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

macro_rules! require_kvm {
    () => {
        if let Some(why) = kvm_unavailable() {
            eprintln!("skipped: no usable KVM on this machine ({why})");
            return;
        }
    };
}

/// Builds the test guest for x86_64-unknown-none (once per test process).
fn guest() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = root().join("tests/guests/virtio-echo");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root().join("target"), PathBuf::from)
                .join("testguest");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // Run from the guest's directory so that its .cargo/config.toml
            // (target and flags) applies.
            let status = Command::new(cargo)
                .current_dir(&dir)
                .args(["build", "--release", "--locked", "--target-dir"])
                .arg(&target)
                .env_remove("RUSTFLAGS")
                .status()
                .expect("running cargo for the test guest");
            assert!(status.success(), "building the test guest failed");
            target.join("x86_64-unknown-none/release/virtio-echo")
        })
        .clone()
}

struct Run {
    status: std::process::ExitStatus,
    serial: String,
    report: serde_json::Value,
}

/// Starts `kiln vmm` on the guest with `extra` arguments; `talk` gets the
/// host end of the channel.
fn run_vmm(extra: &[&str], talk: impl FnOnce(&mut UnixStream)) -> Run {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut command = Command::new(kiln_bin());
    command
        .arg("vmm")
        .arg("--kernel")
        .arg(guest())
        .args(["--memory", "64", "--no-irqchip", "--channel-fd", "3"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    kiln::sandbox::jail::channel_on_fd3(&mut command, fd);
    let child = command.spawn().expect("spawning kiln vmm");
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    talk(&mut ours);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_else(|| panic!("no report from kiln vmm; stderr:\n{stderr}"));
    Run {
        status: out.status,
        serial: String::from_utf8_lossy(&out.stdout).into_owned(),
        report,
    }
}

fn echo(stream: &mut UnixStream, bytes: &[u8]) -> Vec<u8> {
    stream.write_all(bytes).unwrap();
    let mut got = vec![0u8; bytes.len()];
    stream.read_exact(&mut got).unwrap();
    got
}

#[test]
fn a_guest_boots_and_bytes_cross_the_virtio_console_both_ways() {
    require_kvm!();
    let started = Instant::now();
    let mut first = Duration::ZERO;
    let payload: Vec<u8> = (0..40_000u32)
        .map(|i| (i % 251) as u8)
        .filter(|b| *b != 4)
        .collect();
    let run = run_vmm(&[], |s| {
        assert_eq!(echo(s, b"hello kvm\n"), b"HELLO KVM\n");
        first = started.elapsed();
        // Far more than the guest's 4 KiB buffer and the 8-entry rings.
        let got = echo(s, &payload);
        let want: Vec<u8> = payload.iter().map(u8::to_ascii_uppercase).collect();
        assert!(got == want, "the echo of 40 KB differs");
        assert_eq!(echo(s, b"bye\x04"), b"BYE\x04");
    });
    assert!(run.status.success(), "{:?} {}", run.status, run.report);
    assert_eq!(run.report["reason"], "reset", "{}", run.report);
    assert_eq!(run.report["badChains"], 0);
    let total = 10 + payload.len() as u64 + 4;
    assert_eq!(run.report["bytesToGuest"], total);
    assert_eq!(run.report["bytesToHost"], total);
    // The boot path as the guest saw it: the zero page's e820 map and
    // command line, the device the command line names.
    assert!(
        run.serial.contains("kiln-testguest: booted"),
        "{}",
        run.serial
    );
    assert!(run.serial.contains("e820 entries 0x2"), "{}", run.serial);
    assert!(
        run.serial.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        run.serial
    );
    assert!(
        run.serial.contains("virtio console ready"),
        "{}",
        run.serial
    );
    assert!(
        run.serial
            .contains(&format!("echoed {total:#x} bytes, done")),
        "{}",
        run.serial
    );
    eprintln!(
        "VM created in {} µs, first echo {:?} after spawn, ran {} µs in all",
        run.report["createdMicros"], first, run.report["ranMicros"]
    );
}

#[test]
fn the_vmm_jails_itself_before_the_guest_runs() {
    require_kvm!();
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap().to_owned();
    let run = run_vmm(
        &["--jail-dir", &dir, "--uid", "65534", "--gid", "65534"],
        |s| {
            assert_eq!(echo(s, b"jailed\x04"), b"JAILED\x04");
        },
    );
    assert!(run.status.success(), "{}", run.report);
    assert_eq!(run.report["jailed"]["uid"], 65534);
    assert_eq!(run.report["jailed"]["gid"], 65534);
    assert_eq!(run.report["reason"], "reset");
}

#[test]
fn a_kernel_that_is_not_an_elf_is_refused_clearly() {
    require_kvm!();
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"not an ELF at all").unwrap();
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut command = Command::new(kiln_bin());
    command.args(["vmm", "--kernel"]).arg(garbage.path()).args([
        "--no-irqchip",
        "--channel-fd",
        "3",
    ]);
    kiln::sandbox::jail::channel_on_fd3(&mut command, fd);
    let out = command.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loading the kernel ELF"), "{stderr}");
}

#[test]
fn a_host_that_hangs_up_stops_the_vm() {
    require_kvm!();
    // The guest polls for bytes forever; closing the channel must end it.
    let run = run_vmm(&[], |s| {
        assert_eq!(echo(s, b"one\n"), b"ONE\n");
        s.shutdown(std::net::Shutdown::Both).unwrap();
    });
    assert!(run.status.success(), "{}", run.report);
    assert_eq!(run.report["reason"], "stopped", "{}", run.report);
}
