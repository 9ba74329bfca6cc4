//! The seccomp-bpf policy of an environment: what a function never needs is
//! refused with `EPERM` — mounting, tracing other processes, loading
//! kernels or modules, BPF, keyrings, rebooting, changing namespaces,
//! clocks or swap. Installed on the agent before it starts the function, so
//! the function (and everything it starts) inherits it and cannot lift it
//! (`no_new_privs`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls refused outright.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_quotactl,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_vhangup,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_fanotify_init,
    libc::SYS_io_uring_setup,
    libc::SYS_lookup_dcookie,
];

/// `clone` flags that would create namespaces.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Why the policy could not be built.
#[derive(Debug)]
pub struct PolicyError(pub String);

/// The two filters to install, in order: refusals (`EPERM`), then
/// `clone3` as unsupported (`ENOSYS`, so that C libraries fall back to
/// `clone`, whose flags the first filter can inspect).
pub fn policy() -> Result<Vec<BpfProgram>, PolicyError> {
    let err = |e: seccompiler::BackendError| PolicyError(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .map_err(err)?,
            ])
            .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    [deny, clone3]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(|e| PolicyError(e.to_string())))
        .collect()
}

/// Installs the policy on the calling thread (and what it starts).
pub fn install() -> Result<(), PolicyError> {
    for program in policy()? {
        seccompiler::apply_filter(&program).map_err(|e| PolicyError(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_compiles() {
        let programs = policy().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs[0].len() > DENIED.len());
    }

    #[test]
    fn a_filtered_thread_gets_eperm_and_the_process_lives() {
        // A thread of our own: the filter stays with it.
        let result = std::thread::spawn(|| {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(rc, 0);
            install().unwrap();
            // SAFETY: unshare with a flag word; refused by the filter.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWUTS) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            (rc, errno)
        })
        .join()
        .unwrap();
        assert_eq!(result, (-1, Some(libc::EPERM)));
    }
}
