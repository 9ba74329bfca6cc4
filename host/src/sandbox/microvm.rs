//! The `microvm` sandbox: every environment is a KVM guest whose PID 1 is
//! the agent, run by one `kiln vmm` process (itself jailed, in the
//! environment's cgroup, seccomp-filtered per thread). The code reaches the
//! guest over the channel; after that an environment speaks the same
//! protocol as a jail's, so the jail's environment type serves both.
//!
//! Selected only where [`MicroVmSandbox::probe`] boots the real guest image
//! to a greeting agent: on machines whose KVM cannot boot Linux, functions
//! fall back to the jail (see `kiln doctor`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{CodeRoot, Config, FilePiece, MAX_PIECE, Mode};

use super::cgroup::EnvCgroup;
use super::jail::{Launch, Spawner, start_environment, var};
use super::{
    CodeSpec, EnvironmentSpec, ExecutionEnvironment, PreparedCode, Sandbox, SandboxError,
    SandboxKind,
};
use crate::control::runtimes::{self, Family};

/// Guest memory beyond MemorySize: the kernel, the agent, and the code and
/// layers the guest holds in tmpfs.
const GUEST_OVERHEAD_MB: u32 = 160;
/// Host memory the VMM process itself may use beyond the guest's.
const VMM_OVERHEAD: u64 = 32 << 20;

/// What a microVM needs to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// kiln's initramfs (the agent as `/init`).
    pub initramfs: PathBuf,
    /// The `kiln` executable that runs `kiln vmm`.
    pub vmm: PathBuf,
}

impl GuestImage {
    /// Writes the initramfs into `dir` (named by the agent it holds, so it
    /// is built only when the agent changed) for `kernel`.
    pub fn install(dir: &Path, kernel: PathBuf) -> std::io::Result<Self> {
        let initramfs = super::jail::install_once(
            dir,
            &format!("initramfs-{}.cpio", super::jail::agent_digest()),
            0o644,
            || crate::vmm::initramfs::guest_image(super::jail::AGENT),
        )?;
        Ok(Self {
            kernel,
            initramfs,
            vmm: std::env::current_exe()?,
        })
    }

    fn command(&self, memory_mb: u32) -> Command {
        let mut command = Command::new(&self.vmm);
        command
            .arg("vmm")
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initramfs)
            .args(["--memory", &memory_mb.to_string(), "--channel-fd", "3"])
            .env_clear();
        command
    }
}

/// The microVM sandbox.
pub struct MicroVmSandbox {
    image: GuestImage,
    wasm: Arc<kiln_wasm::Runtime>,
    spawner: Spawner,
    cgroup_group: String,
    uids: Arc<super::uids::UidBlock>,
}

impl std::fmt::Debug for MicroVmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVmSandbox")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

/// What a microVM environment runs.
enum VmCode {
    Native,
    Wasm { component: String },
}

impl MicroVmSandbox {
    pub fn new(
        image: GuestImage,
        wasm: Arc<kiln_wasm::Runtime>,
        cgroup_group: String,
        uids: Arc<super::uids::UidBlock>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            image,
            wasm,
            spawner: Spawner::start()?,
            cgroup_group,
            uids,
        })
    }
}

/// The first symbolic link under `dir`, as a path relative to it.
fn first_link(dir: &Path) -> Option<String> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let kind = entry.file_type().ok()?;
            if kind.is_symlink() {
                let path = entry.path();
                return Some(
                    path.strip_prefix(dir)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                );
            }
            if kind.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    None
}

/// How long the boot probe waits for a guest's agent.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Whether microVMs work on this machine, and why not: installs the guest
/// image for `kernel` under `runtime_dir` and boots it once to its agent.
/// Returns the image and how long the boot took.
pub async fn try_boot(runtime_dir: &Path, kernel: &Path) -> Result<(GuestImage, Duration), String> {
    if !kernel.is_file() {
        return Err(format!(
            "the guest kernel {} does not exist",
            kernel.display()
        ));
    }
    let image = GuestImage::install(runtime_dir, kernel.to_path_buf())
        .map_err(|e| format!("writing the guest image: {e}"))?;
    let took = probe(&image, PROBE_DEADLINE).await?;
    Ok((image, took))
}

/// Boots `image` and waits for its agent to greet, within `deadline`.
async fn probe(image: &GuestImage, deadline: Duration) -> Result<Duration, String> {
    use kiln_proto::asynchronous::read_message;
    let started = std::time::Instant::now();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let mut command = image.command(128);
    command.args(["--log-max", "65536"]);
    super::jail::channel_on_fd3(&mut command, std::os::fd::AsRawFd::as_raw_fd(&theirs));
    let mut child = tokio::process::Command::from(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {} vmm: {e}", image.vmm.display()))?;
    drop(theirs);
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    let greeting = tokio::time::timeout(
        deadline,
        read_message::<kiln_proto::AgentMessage>(&mut stream),
    )
    .await;
    drop(stream);
    match greeting {
        Ok(Ok(kiln_proto::AgentMessage::Hello { .. })) => {
            // The agent powers the guest off when the channel closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            Ok(started.elapsed())
        }
        other => {
            let _ = child.start_kill();
            let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
                .await
                .ok()
                .and_then(Result::ok);
            let (serial, report) = out.map_or_else(Default::default, |o| {
                (
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            });
            let why = match other {
                Ok(Ok(m)) => format!("the agent sent {m:?} first"),
                Ok(Err(e)) => format!("the guest never greeted ({e})"),
                Err(_) => format!("no agent within {deadline:?}"),
            };
            let vmm_error = report
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .or_else(|| {
                    report
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .map(str::to_owned)
                });
            let last_serial: String = serial.lines().rev().take(1).collect();
            Err(format!(
                "the guest did not boot to its agent: {why}{}{}",
                vmm_error
                    .map(|e| format!("; the VMM: {e}"))
                    .unwrap_or_default(),
                if last_serial.is_empty() {
                    String::new()
                } else {
                    format!("; last console line: {last_serial}")
                }
            ))
        }
    }
}

/// Every regular file under `dir` as pieces for `root`.
fn pieces(dir: &Path, root: CodeRoot) -> std::io::Result<Vec<FilePiece>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .map_err(std::io::Error::other)?
                    .to_string_lossy()
                    .into_owned();
                let mode = entry.metadata()?.permissions().mode() & 0o755;
                let data = std::fs::read(&path)?;
                let mut chunks = data.chunks(MAX_PIECE).peekable();
                if chunks.peek().is_none() {
                    out.push(FilePiece {
                        root,
                        path: rel,
                        mode,
                        append: false,
                        data: Vec::new(),
                    });
                    continue;
                }
                for (i, chunk) in chunks.enumerate() {
                    out.push(FilePiece {
                        root,
                        path: rel.clone(),
                        mode,
                        append: i > 0,
                        data: chunk.to_vec(),
                    });
                }
            }
            // Symbolic links are refused at `prepare`; special files never
            // reach the code store.
        }
    }
    Ok(out)
}

#[async_trait]
impl Sandbox for MicroVmSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::MicroVm
    }

    async fn prepare(&self, code: &CodeSpec) -> Result<PreparedCode, SandboxError> {
        // The code is copied into the guest file by file, and links are not
        // carried yet: say so now rather than fail inside the guest.
        if let Some(link) = first_link(&code.task_dir) {
            return Err(SandboxError::InvalidCode(format!(
                "the archive holds the symbolic link {link:?}, which microVM environments do not \
                 carry yet; replace it with the file it points to"
            )));
        }
        match runtimes::lookup(&code.runtime).map(|r| r.family) {
            Some(Family::Native) => Ok(PreparedCode::new(SandboxKind::MicroVm, VmCode::Native)),
            Some(Family::Wasm) => {
                // Validated on the host; the guest compiles it for its CPU.
                let component = super::wasm::prepare_for_guest(&self.wasm, code).await?;
                Ok(PreparedCode::new(
                    SandboxKind::MicroVm,
                    VmCode::Wasm { component },
                ))
            }
            None => Err(SandboxError::InvalidCode(format!(
                "unknown runtime {}",
                code.runtime
            ))),
        }
    }

    fn memory_overhead_mb(&self, _code: &PreparedCode) -> u32 {
        GUEST_OVERHEAD_MB + (VMM_OVERHEAD >> 20) as u32
    }

    async fn create(
        &self,
        code: &PreparedCode,
        spec: EnvironmentSpec,
    ) -> Result<Box<dyn ExecutionEnvironment>, SandboxError> {
        let code: &VmCode = code
            .downcast(SandboxKind::MicroVm)
            .ok_or_else(|| SandboxError::Internal("code prepared by another sandbox".into()))?;
        let internal =
            |what: &str, e: &dyn std::fmt::Display| SandboxError::Internal(format!("{what}: {e}"));
        let id = spec.id();
        let guest_mb = spec.memory_mb + GUEST_OVERHEAD_MB;
        let limit = (u64::from(guest_mb) << 20) + VMM_OVERHEAD;
        let cgroup = tokio::task::spawn_blocking({
            let (group, id, memory_mb) = (self.cgroup_group.clone(), id.clone(), spec.memory_mb);
            move || EnvCgroup::create(&group, &id, memory_mb, limit)
        })
        .await
        .map_err(|e| internal("cgroup task", &e))?
        .map_err(|e| internal("cgroup", &e))?;
        let files = tokio::task::spawn_blocking({
            let (task, opt) = (spec.task_dir.clone(), spec.opt_dir.clone());
            move || -> std::io::Result<Vec<FilePiece>> {
                let mut all = pieces(&task, CodeRoot::Task)?;
                if let Some(opt) = opt {
                    all.extend(pieces(&opt, CodeRoot::Opt)?);
                }
                Ok(all)
            }
        })
        .await
        .map_err(|e| internal("code task", &e))?
        .map_err(|e| internal("reading the code", &e))?;
        let jail_dir = spec.env_dir.join("vmm-root");
        std::fs::create_dir_all(&jail_dir).map_err(|e| internal("VMM jail", &e))?;
        // Past the jails' part of the server's block.
        let uid = self.uids.next(
            super::jail::JAIL_UIDS,
            super::uids::BLOCK - super::jail::JAIL_UIDS,
        );
        let mode = match code {
            VmCode::Native => Mode::Bootstrap,
            VmCode::Wasm { component } => Mode::Wasm {
                component: component.clone(),
                precompiled: None,
            },
        };
        let config = Config {
            function_name: var(&spec.env, "AWS_LAMBDA_FUNCTION_NAME"),
            function_version: var(&spec.env, "AWS_LAMBDA_FUNCTION_VERSION"),
            memory_mb: spec.memory_mb,
            env: spec.env.clone(),
            mode,
            jail: None,
            log_capacity: spec.log_capacity.min(kiln_proto::MAX_LOG - 4096) as u32,
            tmp_mb: spec.ephemeral_mb,
        };
        let mut command = self.image.command(guest_mb);
        command.arg("--jail-dir").arg(&jail_dir).args([
            "--uid",
            &uid.to_string(),
            "--gid",
            &uid.to_string(),
        ]);
        for procs in cgroup.procs_files() {
            command.arg("--cgroup-procs").arg(procs);
        }
        start_environment(
            &self.spawner,
            Launch {
                command,
                cgroup,
                config,
                files,
                log_capacity: spec.log_capacity,
                greeting_timeout: Duration::from_secs(10),
                console: Some(id),
                relay: None,
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_becomes_pieces_with_modes_and_chunks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("bootstrap"), b"#!").unwrap();
        std::fs::set_permissions(
            dir.path().join("bootstrap"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::write(dir.path().join("lib/big"), vec![7u8; MAX_PIECE + 10]).unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let mut got = pieces(dir.path(), CodeRoot::Task).unwrap();
        got.sort_by(|a, b| (&a.path, a.append).cmp(&(&b.path, b.append)));
        let summary: Vec<_> = got
            .iter()
            .map(|p| (p.path.as_str(), p.mode, p.append, p.data.len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("bootstrap", 0o755, false, 2),
                ("empty", 0o644, false, 0),
                ("lib/big", 0o644, false, MAX_PIECE),
                ("lib/big", 0o644, true, 10),
            ]
        );
    }
}
