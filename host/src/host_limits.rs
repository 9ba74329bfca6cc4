//! What one server's execution environments may take from the host as a
//! whole, with defaults read from the machine: a memory budget that
//! admission reserves each environment's MemorySize against, and a limit
//! on their processes. Both bound the parent cgroup of the server's jails
//! (`sandbox::cgroup::ServerCgroup`); the memory budget also bounds
//! in-process Wasm environments, which admission counts the same way.

use std::fs;

/// The host's limits for environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// MiB all environments together may reserve (each its MemorySize).
    pub memory_budget_mb: u64,
    /// Processes all jailed environments together may run.
    pub max_pids: u64,
}

/// The share of physical memory the default budget takes: the rest is the
/// host's and kiln's own.
const DEFAULT_MEMORY_SHARE: f64 = 0.8;

impl HostLimits {
    /// Defaults from this machine: 80 % of physical memory, and a quarter
    /// of the host's process table.
    pub fn from_machine() -> Self {
        Self {
            memory_budget_mb: default_memory_budget_mb(),
            max_pids: (crate::sandbox::cgroup::host_pid_max() / 4).max(1024),
        }
    }
}

/// Physical memory in MiB, from `/proc/meminfo`.
pub fn physical_memory_mb() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// The default memory budget: 80 % of physical memory (4 GiB when it
/// cannot be read).
pub fn default_memory_budget_mb() -> u64 {
    physical_memory_mb().map_or(4096, |mb| (mb as f64 * DEFAULT_MEMORY_SHARE) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_machine() {
        let limits = HostLimits::from_machine();
        let physical = physical_memory_mb().unwrap();
        assert!(limits.memory_budget_mb < physical && limits.memory_budget_mb > physical / 2);
        assert!(limits.max_pids >= 1024);
    }
}
