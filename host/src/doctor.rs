//! `kiln doctor`: which sandboxes this machine can run, found by trying
//! them, and why not the others.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::sandbox::jail::{JailSandbox, install_agent};

/// One sandbox's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxStatus {
    /// `wasm`, `jail`, `microvm`.
    pub name: &'static str,
    /// Whether this machine can run it.
    pub available: bool,
    /// What was found, or why not.
    pub detail: String,
}

/// What environments may take from the host together, by default (`kiln
/// serve --memory-budget`, `--max-pids` change it).
#[derive(Debug, Clone, Serialize)]
pub struct LimitsReport {
    /// The default memory budget in MiB (80 % of physical memory).
    pub memory_budget_mb: u64,
    /// Physical memory in MiB, if it could be read.
    pub physical_memory_mb: Option<u64>,
    /// The default process limit of all jailed environments.
    pub max_pids: u64,
    /// The host's `kernel.pid_max`.
    pub host_pid_max: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// In order: wasm, jail, microvm.
    pub sandboxes: Vec<SandboxStatus>,
    /// What environments may take from the host together.
    pub limits: LimitsReport,
}

/// Probes every sandbox, using `data_dir` for scratch space.
pub async fn examine(data_dir: &Path, guest_kernel: Option<&Path>) -> DoctorReport {
    let _ = std::fs::create_dir_all(data_dir);
    let absolute = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let data_dir = absolute.as_path();
    let wasm = match kiln_wasm::Runtime::new({
        let mut c = kiln_wasm::RuntimeConfig::new(data_dir.join("compiled"));
        c.max_environments = 1;
        c
    }) {
        Ok(_) => SandboxStatus {
            name: "wasm",
            available: true,
            detail:
                "wasmtime 48 in the kiln process: pooling allocator, memory limits, epoch deadlines"
                    .into(),
        },
        Err(e) => SandboxStatus {
            name: "wasm",
            available: false,
            detail: format!("the Wasm engine cannot start: {e}"),
        },
    };
    let defaults = crate::host_limits::HostLimits::from_machine();
    DoctorReport {
        sandboxes: vec![
            wasm,
            jail(data_dir).await,
            microvm(data_dir, guest_kernel).await,
        ],
        limits: LimitsReport {
            memory_budget_mb: defaults.memory_budget_mb,
            physical_memory_mb: crate::host_limits::physical_memory_mb(),
            max_pids: defaults.max_pids,
            host_pid_max: crate::sandbox::cgroup::host_pid_max(),
        },
    }
}

async fn jail(data_dir: &Path) -> SandboxStatus {
    let fail = |detail: String| SandboxStatus {
        name: "jail",
        available: false,
        detail,
    };
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return fail("kiln is not running as root: building jails (namespaces, mounts, cgroups, other uids) needs root".into());
    }
    let agent = match install_agent(&data_dir.join("runtime")) {
        Ok(a) => a,
        Err(e) => {
            return fail(format!(
                "cannot install the agent in {}: {e}",
                data_dir.display()
            ));
        }
    };
    let runtime = match kiln_wasm::Runtime::new({
        let mut c = kiln_wasm::RuntimeConfig::new(data_dir.join("compiled"));
        c.max_environments = 1;
        c
    }) {
        Ok(r) => Arc::new(r),
        Err(e) => return fail(format!("the Wasm engine cannot start: {e}")),
    };
    // A group of its own: a server may be running on the same data dir.
    let group = format!("doctor-{}", std::process::id());
    let uids = match crate::sandbox::uids::UidBlock::acquire(std::path::Path::new(
        crate::server::UID_REGISTRY,
    )) {
        Ok(u) => Arc::new(u),
        Err(e) => return fail(format!("no block of host uids: {e}")),
    };
    let sandbox = match JailSandbox::new(agent, runtime, group, uids) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let scratch = data_dir
        .join("envs")
        .join(format!("doctor-{}", uuid::Uuid::new_v4().simple()));
    let probed = sandbox.probe(&scratch).await;
    let _ = crate::store::artifacts::remove_tree(&scratch);
    match probed {
        Ok(()) => SandboxStatus {
            name: "jail",
            available: true,
            detail: format!(
                "built a jail end to end (namespaces, pivot_root, cgroup {}, unprivileged uid, seccomp) and reached its agent",
                if cgroups_rs::hierarchies::is_cgroup2_unified_mode() {
                    "v2"
                } else {
                    "v1"
                }
            ),
        },
        Err(e) => fail(e),
    }
}

async fn microvm(data_dir: &Path, guest_kernel: Option<&Path>) -> SandboxStatus {
    let status = |available: bool, detail: String| SandboxStatus {
        name: "microvm",
        available,
        detail,
    };
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return status(
            false,
            "no /dev/kvm on this machine; functions run in jails".into(),
        );
    }
    let hardware = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let Some(kernel) = guest_kernel else {
        return status(
            false,
            "no guest kernel: build one with scripts/build-kernel.sh and pass --guest-kernel (or \
             set KILN_GUEST_KERNEL); functions run in jails"
                .into(),
        );
    };
    match crate::sandbox::microvm::try_boot(&data_dir.join("runtime"), kernel).await {
        Ok((_, took)) => status(
            true,
            format!(
                "a guest booted to its agent in {} ms (kernel {})",
                took.as_millis(),
                kernel.display()
            ),
        ),
        Err(why) => status(
            false,
            format!(
                "{why}{}; functions run in jails",
                if hardware {
                    ""
                } else {
                    " (this CPU has no hardware virtualization, no vmx/svm flag: /dev/kvm is a \
                     paravirtual KVM that runs small guests but not Linux)"
                }
            ),
        ),
    }
}
