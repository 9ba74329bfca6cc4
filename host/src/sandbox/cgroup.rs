//! One cgroup per jailed environment, through cgroups-rs, on cgroup v1 (as
//! on this team's machines) or v2: memory limited to the function's
//! MemorySize, a CPU share proportional to memory as Lambda allots CPU
//! (1,769 MB = one vCPU), at most 1,024 processes, CPU time accounted, and
//! a freezer that stops every process of the environment between
//! invocations, as Lambda freezes an environment once it has answered.
//!
//! All of a server's environment cgroups live under one parent,
//! `kiln/<group>/` in each hierarchy ([`ServerCgroup`]), whose memory and
//! process limits bound the server's environments as a whole; a server
//! that died finds and removes what it left there.

use std::fs;
use std::path::{Path, PathBuf};

use cgroups_rs::cpu::CpuController;
use cgroups_rs::freezer::FreezerController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, Controller, MaxValue, hierarchies};

/// Where kiln's cgroups go, in every hierarchy.
pub const PARENT: &str = "kiln";
/// Most processes in one environment.
pub const MAX_PIDS: i64 = 1024;
/// Lambda's memory per vCPU.
const MB_PER_VCPU: u64 = 1769;

/// Why a cgroup could not be made or used.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {message}")]
pub struct CgroupError {
    /// The cgroup.
    pub path: String,
    /// What failed.
    pub message: String,
}

/// The controllers of an environment's cgroup: CPU time is accounted by
/// `cpuacct` on v1 (`cpu.stat` on v2), and the freezer is built into v2.
fn controllers(v2: bool) -> Vec<String> {
    let mut list = vec!["memory", "cpu", "pids", "freezer"];
    if !v2 {
        list.push("cpuacct");
    }
    list.into_iter().map(str::to_owned).collect()
}

/// The parent of all of one server's environments: `kiln/<group>/`, its
/// memory and process counts bounding them together, so that no number of
/// functions can take the host's memory or process table.
pub struct ServerCgroup {
    cgroup: Cgroup,
    name: String,
}

impl std::fmt::Debug for ServerCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCgroup")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServerCgroup {
    /// Creates (or takes over) `kiln/<group>` with at most `memory_bytes`
    /// of memory and `max_pids` processes for all its environments.
    pub fn create(group: &str, memory_bytes: u64, max_pids: u64) -> Result<Self, CgroupError> {
        let name = format!("{PARENT}/{group}");
        let err = |message: String| CgroupError {
            path: name.clone(),
            message,
        };
        let cgroup = Cgroup::new_with_specified_controllers(
            hierarchies::auto(),
            &name,
            Some(vec!["memory".into(), "pids".into()]),
        )
        .map_err(|e| err(e.to_string()))?;
        let memory_bytes = i64::try_from(memory_bytes).unwrap_or(i64::MAX);
        cgroup
            .controller_of::<MemController>()
            .ok_or_else(|| err("no memory controller".into()))?
            .set_limit(memory_bytes)
            .map_err(|e| err(format!("memory limit: {e}")))?;
        cgroup
            .controller_of::<PidController>()
            .ok_or_else(|| err("no pids controller".into()))?
            .set_pid_max(MaxValue::Value(i64::try_from(max_pids).unwrap_or(i64::MAX)))
            .map_err(|e| err(format!("pids limit: {e}")))?;
        Ok(Self { cgroup, name })
    }

    /// Processes in all the server's environments now.
    pub fn process_count(&self) -> u64 {
        self.cgroup
            .controller_of::<PidController>()
            .and_then(|p| p.get_pid_current().ok())
            .unwrap_or(0)
    }

    /// The cgroup's path in the pids hierarchy, for tests and `kiln doctor`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The host's `kernel.pid_max`: how many processes the whole host may have.
pub fn host_pid_max() -> u64 {
    fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32_768)
}

/// An environment's cgroup; removed when dropped.
pub struct EnvCgroup {
    cgroup: Cgroup,
    name: String,
    v2: bool,
    memory_dir: Option<PathBuf>,
    /// The freezer's control file, held open: it is written twice per
    /// invocation.
    freezer: Option<fs::File>,
}

impl std::fmt::Debug for EnvCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvCgroup")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl EnvCgroup {
    /// Creates `kiln/<group>/<id>` with the limits of a function of
    /// `memory_mb`; `group` is the server's (see [`group_for`]).
    pub fn create(
        group: &str,
        id: &str,
        memory_mb: u32,
        memory_limit_bytes: u64,
    ) -> Result<Self, CgroupError> {
        let name = format!("{PARENT}/{group}/{id}");
        let err = |message: String| CgroupError {
            path: name.clone(),
            message,
        };
        let hier = hierarchies::auto();
        let v2 = hier.v2();
        let cgroup = Cgroup::new_with_specified_controllers(hier, &name, Some(controllers(v2)))
            .map_err(|e| err(e.to_string()))?;
        let freezer = cgroup.controller_of::<FreezerController>().and_then(|f| {
            let file = if v2 { "cgroup.freeze" } else { "freezer.state" };
            fs::OpenOptions::new()
                .write(true)
                .open(f.path().join(file))
                .ok()
        });
        let this = Self {
            memory_dir: cgroup
                .controller_of::<MemController>()
                .map(|m| m.path().to_path_buf()),
            cgroup,
            name: name.clone(),
            v2,
            freezer,
        };
        let memory = this
            .cgroup
            .controller_of::<MemController>()
            .ok_or_else(|| err("no memory controller".into()))?;
        memory
            .set_limit(memory_limit_bytes as i64)
            .map_err(|e| err(format!("memory limit: {e}")))?;
        if !v2 {
            // No swap to escape the limit into (fails where swap accounting
            // is off, which means there is nothing to escape into anyway).
            let _ = memory.set_memswap_limit(memory_limit_bytes as i64);
        }
        if let Some(cpu) = this.cgroup.controller_of::<CpuController>() {
            let shares = (1024 * u64::from(memory_mb) / MB_PER_VCPU).max(2);
            cpu.set_shares(shares)
                .map_err(|e| err(format!("cpu shares: {e}")))?;
        }
        this.cgroup
            .controller_of::<PidController>()
            .ok_or_else(|| err("no pids controller".into()))?
            .set_pid_max(MaxValue::Value(MAX_PIDS))
            .map_err(|e| err(format!("pids limit: {e}")))?;
        Ok(this)
    }

    /// The `cgroup.procs` files a process writes itself into.
    pub fn procs_files(&self) -> Vec<String> {
        self.cgroup
            .subsystems()
            .iter()
            .map(|s| {
                s.to_controller()
                    .path()
                    .join("cgroup.procs")
                    .display()
                    .to_string()
            })
            .collect()
    }

    fn read_memory_file(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.memory_dir.as_ref()?.join(file)).ok()
    }

    /// Peak memory use of the environment, in bytes.
    pub fn peak_memory(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read_memory_file(file)?.trim().parse().ok()
    }

    /// How many times the kernel's OOM killer acted in the environment.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read_memory_file(file)
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Processes in the environment now.
    pub fn process_count(&self) -> usize {
        self.cgroup.procs().len()
    }

    /// Kills every process in the cgroup.
    pub fn kill_all(&self) {
        kill_procs(&self.cgroup);
    }

    /// Stops every process of the environment where it is (between
    /// invocations: nothing of a function runs while it has no
    /// invocation). Returns whether the freezer took the request.
    pub fn freeze(&self) -> bool {
        self.write_freezer(if self.v2 { "1" } else { "FROZEN" })
    }

    /// Lets the environment's processes run again.
    pub fn thaw(&self) -> bool {
        self.write_freezer(if self.v2 { "0" } else { "THAWED" })
    }

    fn write_freezer(&self, state: &str) -> bool {
        use std::os::unix::fs::FileExt;
        self.freezer
            .as_ref()
            .is_some_and(|f| f.write_at(state.as_bytes(), 0).is_ok())
    }

    /// CPU time used by the environment's processes so far, in nanoseconds.
    pub fn cpu_time_ns(&self) -> Option<u64> {
        cpu_time_ns(&self.cgroup, self.v2)
    }
}

fn cpu_time_ns(cgroup: &Cgroup, v2: bool) -> Option<u64> {
    for subsystem in cgroup.subsystems() {
        let dir = subsystem.to_controller().path().to_path_buf();
        if v2 {
            let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
            return stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .map(|us| us * 1000);
        }
        if let Ok(text) = fs::read_to_string(dir.join("cpuacct.usage")) {
            return text.trim().parse().ok();
        }
    }
    None
}

fn kill_procs(cgroup: &Cgroup) {
    // Twice: a fork racing the first pass lands in the cgroup and is caught
    // by the second.
    for _ in 0..2 {
        for pid in cgroup.procs() {
            // SAFETY: sending a signal to a pid; no memory is involved.
            unsafe { libc::kill(pid.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    // A frozen process dies only once thawed (cgroup v1).
    if let Some(freezer) = cgroup.controller_of::<FreezerController>() {
        let _ = freezer.thaw();
    }
}

impl Drop for EnvCgroup {
    fn drop(&mut self) {
        kill_procs(&self.cgroup);
        if let Err(e) = self.cgroup.delete() {
            tracing::warn!(cgroup = %self.name, error = %e, "removing a cgroup");
        }
    }
}

/// The cgroup group of the server whose data dir is `data_dir`: servers
/// with other data dirs may run beside it, and their cgroups are theirs.
pub fn group_for(data_dir: &Path) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        data_dir.as_os_str().as_encoded_bytes(),
    );
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("d{hex}")
}

/// Removes cgroups a dead server of the same data dir left under
/// `kiln/<group>/`, killing what runs in them. (The data dir is locked, so
/// no live server owns them.) Returns how many were removed.
pub fn remove_leftovers(group: &str) -> usize {
    let hier = hierarchies::auto();
    let mut names = std::collections::BTreeSet::new();
    for subsystem in hier.subsystems() {
        let dir: &Path = subsystem.to_controller().path();
        let parent = dir.join(PARENT).join(group);
        if let Ok(entries) = fs::read_dir(&parent) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    names.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    let mut removed = 0;
    for name in names {
        let cgroup = Cgroup::load(hierarchies::auto(), format!("{PARENT}/{group}/{name}"));
        kill_procs(&cgroup);
        if cgroup.delete().is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether cgroups with the memory, cpu and pids controllers can be made
/// here, and why not.
pub fn probe() -> Result<(), String> {
    let id = format!("probe-{}", std::process::id());
    EnvCgroup::create("probes", &id, 128, 128 << 20)
        .map(drop)
        .map_err(|e| e.to_string())
}
