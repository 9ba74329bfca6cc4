//! The seccomp-bpf policy of an environment: an allowlist. A syscall is
//! allowed when it is one the runtimes need — found by tracing the agent
//! (native and Wasm), static and tokio-based bootstraps, and glibc programs
//! (`sh`, Python, Node.js) through their whole lives, plus the neighbours a
//! C library may pick instead (`nanosleep` for `clock_nanosleep`, the `*at`
//! forms, `statx`) — and refused with `EPERM` otherwise: mounting, tracing
//! other processes, loading kernels, modules or BPF, keyrings, namespaces,
//! clocks, swap, `io_uring`, and anything the kernel adds later. `clone`
//! is allowed without namespace flags; `clone3`, whose flags a filter
//! cannot read, answers `ENOSYS` so that C libraries fall back to `clone`.
//! Installed on the agent before it starts the function, so the function
//! (and everything it starts) inherits it and cannot lift it
//! (`no_new_privs`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls allowed outright (`clone` is allowed with conditions below).
const ALLOWED: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_get_mempolicy,
    libc::SYS_get_robust_list,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_ioctl,
    libc::SYS_kill,
    libc::SYS_lchown,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_lseek,
    libc::SYS_lstat,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mlock,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_select,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_setuid,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync_file_range,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
    libc::SYS_vfork,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

/// Address families `socket` may create.
const SOCKET_FAMILIES: [libc::c_int; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
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

/// The two filters to install, in order: the allowlist (`EPERM` for
/// anything else, `clone` only without namespace flags), then `clone3` as
/// unsupported (`ENOSYS`).
pub fn policy() -> Result<Vec<BpfProgram>, PolicyError> {
    let err = |e: seccompiler::BackendError| PolicyError(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let namespaces = NAMESPACE_FLAGS.iter().fold(0, |all, f| all | f);
    rules.insert(
        libc::SYS_clone,
        vec![
            SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(namespaces),
                    0,
                )
                .map_err(err)?,
            ])
            .map_err(err)?,
        ],
    );
    // Sockets of the families runtimes use: local, IPv4, IPv6, and netlink
    // (C libraries list interfaces with it; the environment has only
    // loopback). Not packet, crypto (AF_ALG), vsock or the rest.
    rules.insert(
        libc::SYS_socket,
        SOCKET_FAMILIES
            .iter()
            .map(|&family| {
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        family as u64,
                    )
                    .map_err(err)?,
                ])
                .map_err(err)
            })
            .collect::<Result<_, _>>()?,
    );
    // The second filter decides clone3.
    rules.insert(libc::SYS_clone3, Vec::new());
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
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
    [allow, clone3]
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
        assert!(programs[0].len() > ALLOWED.len());
    }

    /// The calls a function must never make are not on the list.
    #[test]
    fn nothing_dangerous_is_allowed() {
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_reboot,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_swapon,
            libc::SYS_syslog,
            libc::SYS_clock_settime,
            libc::SYS_settimeofday,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_open_by_handle_at,
            libc::SYS_iopl,
            libc::SYS_mknod,
            libc::SYS_mknodat,
            libc::SYS_sethostname,
            libc::SYS_io_uring_setup,
            libc::SYS_personality,
            libc::SYS_pidfd_getfd,
        ] {
            assert!(!ALLOWED.contains(&nr), "syscall {nr} is allowed");
        }
    }

    #[test]
    fn what_is_not_listed_is_refused_and_what_is_works() {
        let result = std::thread::spawn(|| {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(rc, 0);
            install().unwrap();
            let errno = || std::io::Error::last_os_error().raw_os_error();
            // SAFETY: syscalls with integer arguments; refused by the filter.
            let acct = unsafe { libc::syscall(libc::SYS_acct, 0) };
            let acct_errno = errno();
            // SAFETY: as above; a syscall number no kernel has yet.
            let future = unsafe { libc::syscall(1000) };
            let future_errno = errno();
            // SAFETY: as above; clone3 with a null argument.
            let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            let clone3_errno = errno();
            // SAFETY: as above; an AF_PACKET socket, refused.
            let packet = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            let packet_errno = errno();
            assert_eq!((packet, packet_errno), (-1, Some(libc::EPERM)));
            // SAFETY: an allowed socket, closed at once.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            assert!(inet >= 0);
            // SAFETY: closing the descriptor just made.
            unsafe { libc::close(inet) };
            // SAFETY: an allowed call writing into a local.
            let pid = unsafe { libc::getpid() };
            (
                (acct, acct_errno),
                (future, future_errno),
                (clone3, clone3_errno),
                pid > 0,
            )
        })
        .join()
        .unwrap();
        assert_eq!(result.0, (-1, Some(libc::EPERM)));
        assert_eq!(result.1, (-1, Some(libc::EPERM)));
        assert_eq!(result.2, (-1, Some(libc::ENOSYS)));
        assert!(result.3);
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
