//! Building the jail, in order, before any function code runs:
//! 1. enter the environment's cgroups (memory, CPU, pids);
//! 2. new mount, PID, network, IPC, UTS and cgroup namespaces;
//! 3. fork: the child is PID 1 of the new PID namespace (the parent stays
//!    to reap it and dies with the host; the child dies with the parent);
//! 4. a fresh root: a tmpfs with `/var/task` and `/opt` bound read-only,
//!    `/tmp` a tmpfs of the configured size, `/proc`, a minimal `/dev`
//!    (null, zero, random, urandom); `pivot_root` into it, the old root
//!    detached, the root remounted read-only;
//! 5. loopback up (the only interface), hostname, resource limits;
//! 6. a user namespace of its own, in which the function's user
//!    ([`INSIDE_UID`], Lambda's `sbx_user1051`) is the environment's host
//!    uid and nothing else is mapped (the parent, still root outside,
//!    writes the map); then all capabilities dropped: that user, no
//!    supplementary groups, `no_new_privs`;
//! 7. the seccomp policy.
//!
//! Threat model: the host (kiln) is trusted; the function is not. After
//! step 7 nothing the function does can undo steps 1-6.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kiln_proto::JailSpec;

/// The uid and gid the function has inside its user namespace (Lambda's
/// `sbx_user1051` is 993); outside it is the environment's own host uid.
pub const INSIDE_UID: u32 = 993;

/// A failed step, named.
#[derive(Debug)]
pub struct JailError {
    /// The step.
    pub step: String,
    /// What failed.
    pub error: io::Error,
}

impl std::fmt::Display for JailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "jail: {}: {}", self.step, self.error)
    }
}

fn step<T>(name: impl Into<String>, r: io::Result<T>) -> Result<T, JailError> {
    r.map_err(|error| JailError {
        step: name.into(),
        error,
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

pub(crate) fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).expect("static fs type"));
    let data = data.map(|s| CString::new(s).expect("mount options without NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // until the call returns.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// Binds `source` at `target`, read-only.
fn bind_read_only(source: &Path, target: &Path) -> io::Result<()> {
    mount(
        Some(source),
        target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// Binds `source` at `target`, writable, without devices or set-id
/// programs.
fn bind_read_write(source: &Path, target: &Path) -> io::Result<()> {
    mount(Some(source), target, None, libc::MS_BIND, None)?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// Builds the jail and returns inside it, as the unprivileged PID 1 of the
/// new namespaces. Only the jailed child returns: the parent waits for it
/// and exits with its status. Must run before any thread is started.
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    // 1. cgroups, so that even the setup is accounted.
    for procs in &spec.cgroup_procs {
        step(format!("entering cgroup {procs}"), fs::write(procs, b"0"))?;
    }

    // 2. namespaces.
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: unshare with a flag word; it touches no memory of ours.
    step("unshare", check(unsafe { libc::unshare(flags) }))?;

    // 3. fork into the new PID namespace, with a pipe each way: the child
    // asks for its user namespace's map (step 6), the parent answers once
    // it has written it.
    let (ask_read, ask_write) = step("pipe", pipe())?;
    let (answer_read, answer_write) = step("pipe", pipe())?;
    // The host's /proc, held open: by the time the parent writes the map,
    // the child's pivot_root has moved the parent's root too.
    let host_proc = step(
        "/proc",
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open("/proc"),
    )?;
    // SAFETY: the process is single-threaded here, so the child may run
    // arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(JailError {
            step: "fork".into(),
            error: io::Error::last_os_error(),
        });
    }
    if pid > 0 {
        drop((ask_write, answer_read));
        map_user_namespace(&host_proc, pid, spec, ask_read, answer_write);
        reap_and_exit(pid);
    }
    drop((ask_read, answer_write, host_proc));
    // The jailed child dies with the parent, which dies with the host. (A
    // parent lost in the instant before this is armed closes the channel,
    // which ends the agent too.)
    step(
        "parent-death signal",
        // SAFETY: prctl with integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        }),
    )?;

    // 4. the root.
    build_root(spec)?;

    // 5. network, name, limits.
    step("loopback", loopback_up())?;
    let name = b"kiln";
    step(
        "hostname",
        // SAFETY: pointer and length of a live byte string.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }),
    )?;
    set_limit(libc::RLIMIT_NOFILE, spec.nofile)?;
    set_limit(libc::RLIMIT_CORE, 0)?;

    // 6. a user namespace, then privileges.
    enter_user_namespace(ask_write, answer_read)?;
    drop_privileges(INSIDE_UID, INSIDE_UID)?;

    // 7. seccomp.
    crate::seccomp::install().map_err(|e| JailError {
        step: "seccomp".into(),
        error: io::Error::other(e.0),
    })?;
    Ok(())
}

fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just made and are owned only here.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// The child's side of step 6: a new user namespace, whose map the
/// parent writes. Supplementary groups go first (setgroups is refused
/// inside a namespace whose gid map an unprivileged process wrote).
fn enter_user_namespace(
    mut ask: std::fs::File,
    mut answer: std::fs::File,
) -> Result<(), JailError> {
    use std::io::{Read, Write};
    step(
        "setgroups",
        // SAFETY: setgroups with an empty list.
        check(unsafe { libc::setgroups(0, std::ptr::null()) }),
    )?;
    step(
        "user namespace",
        // SAFETY: unshare with a flag word; the process is single-threaded.
        check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }),
    )?;
    step("user namespace map", ask.write_all(b"m"))?;
    let mut done = [0u8; 1];
    step("user namespace map", answer.read_exact(&mut done))?;
    if done[0] != b'y' {
        return Err(JailError {
            step: "user namespace map".into(),
            error: io::Error::other("the parent could not write the map"),
        });
    }
    Ok(())
}

/// The parent's side of step 6: once the child has its user namespace,
/// maps [`INSIDE_UID`] there to the environment's host uid and gid (and
/// nothing else: root inside is nobody outside).
fn map_user_namespace(
    host_proc: &fs::File,
    child: libc::pid_t,
    spec: &JailSpec,
    mut ask: std::fs::File,
    mut answer: std::fs::File,
) {
    use std::io::{Read, Write};
    let mut asked = [0u8; 1];
    if ask.read_exact(&mut asked).is_err() {
        // The child failed before step 6 and says so itself.
        return;
    }
    let write = |file: &str, text: String| -> io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let path = CString::new(format!("{child}/{file}"))
            .map_err(|_| io::Error::other("a path with a NUL byte"))?;
        // SAFETY: openat relative to a directory descriptor we hold, with a
        // NUL-terminated path; the new descriptor is owned by the File.
        let fd = unsafe {
            libc::openat(
                host_proc.as_raw_fd(),
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned only here.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.write_all(text.as_bytes())
    };
    let mapped = write("setgroups", "deny".into())
        .and_then(|()| write("uid_map", format!("{INSIDE_UID} {} 1\n", spec.uid)))
        .and_then(|()| write("gid_map", format!("{INSIDE_UID} {} 1\n", spec.gid)));
    if let Err(e) = &mapped {
        eprintln!("kiln-agent: writing the user namespace map: {e}");
    }
    let _ = answer.write_all(if mapped.is_ok() { b"y" } else { b"n" });
}

fn reap_and_exit(child: libc::pid_t) -> ! {
    // The parent holds nothing the child needs.
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            std::process::exit(code);
        }
        if rc == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
}

fn build_root(spec: &JailSpec) -> Result<(), JailError> {
    let root = Path::new(&spec.root);
    step(
        "private mounts",
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        ),
    )?;
    step(
        "root tmpfs",
        mount(
            Some(Path::new("tmpfs")),
            root,
            Some("tmpfs"),
            libc::MS_NOSUID,
            Some("size=1m,mode=755"),
        ),
    )?;
    for dir in [
        "var/task",
        "var/runtime",
        "opt",
        "tmp",
        "proc",
        "dev",
        "etc",
        ".old",
    ] {
        step(format!("mkdir {dir}"), fs::create_dir_all(root.join(dir)))?;
    }
    step(
        "/var/task",
        bind_read_only(Path::new(&spec.task_dir), &root.join("var/task")),
    )?;
    if let Some(opt) = &spec.opt_dir {
        step("/opt", bind_read_only(Path::new(opt), &root.join("opt")))?;
    }
    if let Some(compiled) = &spec.precompiled {
        let target = root.join("var/runtime/function.cwasm");
        step("precompiled file", fs::write(&target, b""))?;
        step("precompiled", bind_read_only(Path::new(compiled), &target))?;
    }
    if let Some(socket) = &spec.api_socket {
        // The way back to kiln's API; what it allows is up to the caller's
        // credentials, checked on the host.
        let target = root.join(kiln_proto::API_SOCKET.trim_start_matches('/'));
        if let Some(dir) = target.parent() {
            step("/run/kiln", fs::create_dir_all(dir))?;
        }
        step("api socket", fs::write(&target, b""))?;
        step("api socket", bind_read_only(Path::new(socket), &target))?;
    }
    match &spec.tmp_dir {
        // The environment's own disk: storage, not memory.
        Some(disk) => step("/tmp", bind_read_write(Path::new(disk), &root.join("tmp")))?,
        None => step(
            "/tmp",
            mount(
                Some(Path::new("tmpfs")),
                &root.join("tmp"),
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(&format!("size={}m,mode=1777", spec.tmp_mb.max(1))),
            ),
        )?,
    }
    step(
        "/proc",
        mount(
            Some(Path::new("proc")),
            &root.join("proc"),
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
    )?;
    step(
        "/dev",
        mount(
            Some(Path::new("tmpfs")),
            &root.join("dev"),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("size=64k,mode=755"),
        ),
    )?;
    for dev in ["null", "zero", "random", "urandom"] {
        let target = root.join("dev").join(dev);
        step(format!("/dev/{dev}"), fs::write(&target, b""))?;
        step(
            format!("/dev/{dev}"),
            mount(
                Some(&Path::new("/dev").join(dev)),
                &target,
                None,
                libc::MS_BIND,
                None,
            ),
        )?;
    }
    // Programs look these up; they hold nothing of the host.
    step(
        "/etc/passwd",
        fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0::/:/sbin/nologin\nsbx_user1051:x:{INSIDE_UID}:{INSIDE_UID}::/tmp:/sbin/nologin\n"
            ),
        ),
    )?;
    step(
        "/etc/hosts",
        fs::write(
            root.join("etc/hosts"),
            b"127.0.0.1 localhost\n::1 localhost\n",
        ),
    )?;

    let new_root = cstr(root).map_err(|error| JailError {
        step: "pivot_root".into(),
        error,
    })?;
    let put_old = cstr(&root.join(".old")).map_err(|error| JailError {
        step: "pivot_root".into(),
        error,
    })?;
    step(
        "pivot_root",
        // SAFETY: two NUL-terminated paths that outlive the call.
        check(unsafe {
            libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) as libc::c_int
        }),
    )?;
    step("chdir /", std::env::set_current_dir("/"))?;
    let old = CString::new("/.old").expect("static path");
    step(
        "detach the old root",
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) }),
    )?;
    step("remove the old root", fs::remove_dir("/.old"))?;
    step(
        "read-only root",
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
            None,
        ),
    )?;
    Ok(())
}

pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: creating a socket has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is our socket and req a valid ifreq for SIOCGIFFLAGS.
    let mut rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) };
    if rc != -1 {
        // SAFETY: the union field ifru_flags is the one SIOCGIFFLAGS filled.
        unsafe {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        // SAFETY: as above, for SIOCSIFFLAGS.
        rc = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) };
    }
    let error = io::Error::last_os_error();
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    if rc == -1 { Err(error) } else { Ok(()) }
}

// glibc and musl type the resource differently.
#[cfg(target_env = "musl")]
type Resource = libc::c_int;
#[cfg(not(target_env = "musl"))]
type Resource = libc::__rlimit_resource_t;

fn set_limit(resource: Resource, value: u64) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    step(
        format!("rlimit {resource}"),
        // SAFETY: a valid rlimit struct for a known resource.
        check(unsafe { libc::setrlimit(resource, &limit) }),
    )
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    // Empty the bounding set first, so no later execve can regain a
    // capability.
    for cap in 0..=63 {
        // SAFETY: prctl with integers; unknown capabilities fail harmlessly.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    step(
        "setresgid",
        // SAFETY: plain integer ids.
        check(unsafe { libc::setresgid(gid, gid, gid) }),
    )?;
    step(
        "setresuid",
        // SAFETY: plain integer ids. From root to non-root, this clears the
        // permitted and effective capability sets.
        check(unsafe { libc::setresuid(uid, uid, uid) }),
    )?;
    step(
        "no_new_privs",
        // SAFETY: prctl with integers.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }),
    )?;
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return Err(JailError {
            step: "drop privileges".into(),
            error: io::Error::other("still root"),
        });
    }
    Ok(())
}
