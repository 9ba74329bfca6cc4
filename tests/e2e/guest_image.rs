//! The microVM guest image end to end under QEMU with software emulation:
//! the kernel built from `runtimes/kernel` and kiln's initramfs (the agent
//! as `/init`) boot on `qemu-system-x86_64 -M microvm -accel tcg`, the
//! agent answers over a virtio-console on virtio-mmio (the transport
//! kiln's VMM offers), receives the code over the channel, and runs one
//! native and one Wasm invocation.
//!
//! This is how the guest image is proven on machines whose KVM cannot boot
//! Linux; kiln's own VMM boots the same image where it can.

mod common;

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{kiln_bin, root};
use kiln_proto::{
    AgentMessage, CodeRoot, Config, FilePiece, HostMessage, Invocation, MAX_PIECE, Mode, Outcome,
    PROTOCOL_VERSION, read_message, write_message,
};

/// The guest kernel: `KILN_GUEST_KERNEL`, or built (and cached) by
/// `scripts/build-kernel.sh`.
fn kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            if let Some(k) = std::env::var_os("KILN_GUEST_KERNEL") {
                return PathBuf::from(k);
            }
            let out = Command::new(root().join("scripts/build-kernel.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("running scripts/build-kernel.sh");
            assert!(out.status.success(), "building the guest kernel failed");
            let stdout = String::from_utf8_lossy(&out.stdout);
            PathBuf::from(
                stdout
                    .lines()
                    .last()
                    .expect("the script prints the kernel's path")
                    .trim(),
            )
        })
        .clone()
}

/// QEMU's microvm machine boots the bzImage built beside `vmlinux`.
fn qemu_kernel() -> PathBuf {
    let k = kernel();
    if k.file_name().is_some_and(|n| n == "vmlinux") {
        k.with_file_name("bzImage")
    } else {
        k
    }
}

/// kiln's guest image: the embedded agent as /init.
fn image(dir: &Path) -> PathBuf {
    let agent = kiln::sandbox::jail::AGENT;
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, kiln::vmm::initramfs::guest_image(agent)).unwrap();
    path
}

/// Files of a zip built by `kiln build`.
fn build(args: &[&str], dir: &Path, name: &str) -> Vec<(String, u32, Vec<u8>)> {
    let zip_path = dir.join(format!("{name}.zip"));
    let status = Command::new(kiln_bin())
        .arg("build")
        .args(args)
        .arg("--output")
        .arg(&zip_path)
        .status()
        .unwrap();
    assert!(status.success(), "kiln build {args:?}");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mode = f.unix_mode().unwrap_or(0o644) & 0o777;
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().to_owned(), mode, data)
        })
        .collect()
}

struct Guest {
    qemu: Child,
    channel: UnixStream,
    serial: PathBuf,
    booted_in: Duration,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Guest {
    fn boot(dir: &Path) -> Guest {
        let socket = dir.join("channel.sock");
        let serial = dir.join("serial.log");
        let started = Instant::now();
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off,x-option-roms=off",
                "-accel",
                "tcg",
                "-m",
                "512",
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(qemu_kernel())
            .arg("-initrd")
            .arg(image(dir))
            .args(["-append", "console=ttyS0 reboot=t panic=1 acpi=off quiet"])
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ch0,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["-device", "virtconsole,chardev=ch0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-system-x86_64 (Debian's qemu-system-x86)");
        // QEMU creates the socket as it starts; bounded wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let channel = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("QEMU's channel socket: {e}"),
            }
        };
        channel
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut guest = Guest {
            qemu,
            channel,
            serial,
            booted_in: Duration::ZERO,
        };
        match guest.read() {
            AgentMessage::Hello { version } => assert_eq!(version, PROTOCOL_VERSION),
            other => panic!("expected Hello, got {other:?}"),
        }
        guest.booted_in = started.elapsed();
        guest.write(&HostMessage::Hello {
            version: PROTOCOL_VERSION,
        });
        guest
    }

    fn read(&mut self) -> AgentMessage {
        read_message(&mut self.channel).unwrap_or_else(|e| {
            panic!(
                "reading from the agent: {e}\nserial:\n{}",
                std::fs::read_to_string(&self.serial).unwrap_or_default()
            )
        })
    }

    fn write(&mut self, message: &HostMessage) {
        write_message(&mut self.channel, message).unwrap();
    }

    fn put_files(&mut self, files: &[(String, u32, Vec<u8>)]) {
        for (path, mode, data) in files {
            for (i, chunk) in data.chunks(MAX_PIECE).enumerate() {
                self.write(&HostMessage::PutFile(Box::new(FilePiece {
                    root: CodeRoot::Task,
                    path: path.clone(),
                    mode: *mode,
                    append: i > 0,
                    data: chunk.to_vec(),
                })));
            }
        }
    }

    fn configure(&mut self, mode: Mode) {
        let env = [
            ("AWS_LAMBDA_FUNCTION_NAME", "hello"),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
            ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
            ("AWS_REGION", "us-east-1"),
            ("LAMBDA_TASK_ROOT", "/var/task"),
            ("_HANDLER", "bootstrap"),
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        self.write(&HostMessage::Configure(Box::new(Config {
            function_name: "hello".into(),
            function_version: "$LATEST".into(),
            memory_mb: 256,
            env,
            mode,
            jail: None,
            log_capacity: 64 * 1024,
            tmp_mb: 64,
        })));
        match self.read() {
            AgentMessage::Ready { .. } => {}
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn invoke(&mut self, payload: &[u8]) -> (Outcome, String) {
        let deadline_ms = (std::time::SystemTime::now() + Duration::from_secs(120))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        self.write(&HostMessage::Invoke(Box::new(Invocation {
            request_id: "11111111-2222-3333-4444-555555555555".into(),
            deadline_ms,
            invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:hello".into(),
            trace_id: "Root=1-00000000-000000000000000000000000".into(),
            client_context: None,
            cognito_identity: None,
            payload: payload.to_vec(),
        })));
        match self.read() {
            AgentMessage::Result(r) => (r.outcome, String::from_utf8_lossy(&r.logs).into_owned()),
            other => panic!("expected a result, got {other:?}"),
        }
    }

    /// Asks the agent to stop; the guest powers off and QEMU exits.
    fn shut_down(mut self) {
        self.write(&HostMessage::Shutdown);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.qemu.try_wait().unwrap() {
                assert!(status.success(), "qemu: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the guest did not power off");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn qemu_missing() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
}

#[test]
fn a_native_bootstrap_runs_in_the_guest_image() {
    assert!(
        !qemu_missing(),
        "qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86"
    );
    let dir = tempfile::tempdir().unwrap();
    let code = build(
        &["--native", root().join("examples/hello").to_str().unwrap()],
        dir.path(),
        "native",
    );
    let mut guest = Guest::boot(dir.path());
    eprintln!(
        "guest agent ready {:?} after QEMU started (TCG)",
        guest.booted_in
    );
    guest.put_files(&code);
    guest.configure(Mode::Bootstrap);
    let (outcome, logs) = guest.invoke(br#"{"name":"microvm"}"#);
    let Outcome::Response(body) = outcome else {
        panic!("{outcome:?}\n{logs}");
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["greeting"], "Hello, microvm!");
    assert_eq!(body["request_id"], "11111111-2222-3333-4444-555555555555");
    assert!(logs.contains("greeting microvm"), "{logs}");
    // A second invocation reuses the running bootstrap.
    let (outcome, _) = guest.invoke(br#"{"name":"again"}"#);
    assert!(matches!(outcome, Outcome::Response(_)), "{outcome:?}");
    guest.shut_down();
}

#[test]
fn a_wasm_component_runs_in_the_guest_image() {
    assert!(
        !qemu_missing(),
        "qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86"
    );
    let dir = tempfile::tempdir().unwrap();
    let code = build(
        &[root().join("examples/hello").to_str().unwrap()],
        dir.path(),
        "wasm",
    );
    let mut guest = Guest::boot(dir.path());
    guest.put_files(&code);
    guest.configure(Mode::Wasm {
        component: "/var/task/function.wasm".into(),
        precompiled: None,
    });
    let (outcome, logs) = guest.invoke(br#"{"name":"wasm in a vm"}"#);
    let Outcome::Response(body) = outcome else {
        panic!("{outcome:?}\n{logs}");
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["greeting"], "Hello, wasm in a vm!");
    guest.shut_down();
}
