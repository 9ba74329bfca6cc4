//! The seccomp filters of a VMM process, one per kind of thread, installed
//! by each thread on itself before it touches guest-controlled data: a vCPU
//! thread before its first KVM_RUN, the main thread once it has started the
//! others. Anything else kills the whole process: a VMM that makes a call
//! it never makes has been taken over.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::VmmError;

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and emulates the devices the guest touches.
    Vcpu,
    /// Moves channel bytes and waits for the vCPUs.
    Main,
}

/// Calls every thread of a running VMM makes: memory, locks, time, signals
/// and exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_close,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `KVM_RUN`, `_IO(KVMIO, 0x80)`: the one ioctl a vCPU thread makes once
/// it runs (registers, memory and interrupts are all set up before).
pub const KVM_RUN: u64 = 0xAE80;

/// The filter for `kind`, compiled.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, VmmError> {
    let err = |e: seccompiler::BackendError| {
        VmmError::Seccomp(format!("building the {kind:?} filter: {e}"))
    };
    let extra: &[i64] = match kind {
        // KVM_RUN on its own vCPU fd (below, narrowed by its request
        // number); interrupts are eventfd writes.
        ThreadKind::Vcpu => &[],
        // The channel socket, poking vCPU threads out of KVM_RUN.
        ThreadKind::Main => &[
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_ppoll,
            libc::SYS_poll,
            libc::SYS_tgkill,
            libc::SYS_getpid,
            libc::SYS_gettid,
        ],
    };
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = COMMON
        .iter()
        .chain(extra)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if kind == ThreadKind::Vcpu {
        let kvm_run = seccompiler::SeccompRule::new(vec![
            seccompiler::SeccompCondition::new(
                1,
                seccompiler::SeccompCmpArgLen::Dword,
                seccompiler::SeccompCmpOp::Eq,
                KVM_RUN,
            )
            .map_err(err)?,
        ])
        .map_err(err)?;
        rules.insert(libc::SYS_ioctl, vec![kvm_run]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| VmmError::Seccomp(format!("building the {kind:?} filter: {e}")))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| {
        VmmError::Seccomp(format!("compiling the {kind:?} filter: {e}"))
    })
}

/// Installs `program` on the calling thread (and `no_new_privs`, which
/// seccomp requires of an unprivileged caller).
pub fn install(program: &BpfProgram) -> Result<(), VmmError> {
    seccompiler::apply_filter(program).map_err(|e| VmmError::Seccomp(format!("installing: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks; the child installs `kind`'s filter and makes `call`; returns
    /// how the child ended.
    fn child_status(kind: ThreadKind, call: fn() -> i64) -> i32 {
        let program = filter(kind).unwrap();
        // SAFETY: the child only makes raw system calls (prctl, seccomp,
        // the call under test, _exit) before it ends; it touches no lock
        // another thread of the test process could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match seccompiler::apply_filter(&program) {
                Ok(()) => {
                    call();
                    0
                }
                Err(_) => 3,
            };
            // SAFETY: ends the forked child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` is a valid out pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        status
    }

    fn open_socket() -> i64 {
        // SAFETY: a raw system call with integer arguments.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) }
    }

    fn get_time() -> i64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out pointer.
        unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) }
    }

    #[test]
    fn a_denied_call_on_a_filtered_vcpu_thread_kills_the_process() {
        let status = child_status(ThreadKind::Vcpu, open_socket);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let status = child_status(ThreadKind::Main, open_socket);
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    fn other_ioctl() -> i64 {
        // KVM_GET_REGS on stdin: any request but KVM_RUN.
        // SAFETY: a raw system call with integer arguments; the pointer is
        // never dereferenced (the filter stops the call first).
        unsafe { libc::syscall(libc::SYS_ioctl, 0, 0x8090_AE81u64, 0usize) }
    }

    fn kvm_run_on_a_bad_fd() -> i64 {
        // SAFETY: a raw system call with integer arguments; it fails with
        // EBADF.
        unsafe { libc::syscall(libc::SYS_ioctl, -1, KVM_RUN, 0usize) }
    }

    #[test]
    fn a_vcpu_thread_may_issue_kvm_run_and_no_other_ioctl() {
        let status = child_status(ThreadKind::Vcpu, other_ioctl);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let status = child_status(ThreadKind::Vcpu, kvm_run_on_a_bad_fd);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
    }

    #[test]
    fn allowed_calls_pass() {
        let status = child_status(ThreadKind::Vcpu, get_time);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
