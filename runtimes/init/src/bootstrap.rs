//! The function's `bootstrap` process: found, started, watched and
//! stopped. The agent is PID 1 of its namespace, so it also reaps the
//! orphans the function leaves behind.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::sync::watch;

use crate::logs::{LogBuffer, PipeReader};

/// Where Lambda looks for a bootstrap, in order.
pub const LOCATIONS: [&str; 2] = ["/var/task/bootstrap", "/opt/bootstrap"];

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl Exit {
    /// As Lambda words it: `exit status 1`, `signal: killed`.
    pub fn describe(self) -> String {
        match self {
            Exit::Code(c) => format!("exit status {c}"),
            Exit::Signal(s) => {
                let name = match s {
                    libc::SIGKILL => "killed",
                    libc::SIGSEGV => "segmentation fault",
                    libc::SIGABRT => "aborted",
                    libc::SIGTERM => "terminated",
                    libc::SIGBUS => "bus error",
                    libc::SIGILL => "illegal instruction",
                    libc::SIGFPE => "floating point exception",
                    _ => return format!("signal: {s}"),
                };
                format!("signal: {name}")
            }
        }
    }
}

/// Finds the bootstrap, or says why there is none.
pub fn find() -> Result<PathBuf, String> {
    let mut problems = Vec::new();
    for location in LOCATIONS {
        let path = Path::new(location);
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(path.into()),
            Ok(m) if m.is_file() => problems.push(format!("{location} is not executable")),
            Ok(_) => problems.push(format!("{location} is not a file")),
            Err(_) => {}
        }
    }
    if problems.is_empty() {
        Err(format!(
            "Couldn't find valid bootstrap(s): [{}]",
            LOCATIONS.join(" ")
        ))
    } else {
        Err(format!(
            "Couldn't start the bootstrap: {}",
            problems.join("; ")
        ))
    }
}

/// Why `path` could not be started, in words that say what to do. A file
/// that exists but cannot be executed for want of something else is the
/// usual case: a program linked against glibc (`cargo lambda build`'s
/// default, most Go and C++ builds) needs its ELF interpreter, a script
/// needs the interpreter on its `#!` line, and neither is in an
/// environment whose root holds only the function's code.
pub fn explain_spawn_error(path: &Path, error: &io::Error) -> String {
    let head = format!("Couldn't start {}", path.display());
    let what = match (error.raw_os_error(), needs(path)) {
        (Some(libc::ENOENT), Some(Needs::Interpreter(interp))) if !Path::new(&interp).exists() => {
            format!(
                "it is dynamically linked and its ELF interpreter {interp} is not in this \
                 environment, which has no system libraries. Build it as a static binary \
                 (for Rust: --target x86_64-unknown-linux-musl, e.g. \
                 `cargo lambda build --target x86_64-unknown-linux-musl`; for Go: \
                 CGO_ENABLED=0), or ship the interpreter and libraries it needs in the zip or \
                 a layer and start it from a static bootstrap"
            )
        }
        (Some(libc::ENOENT), Some(Needs::Script(interp))) if !Path::new(&interp).exists() => {
            format!(
                "it is a script whose interpreter {interp} (its #! line) is not in this \
                 environment, which has no shell or other interpreters. Make the bootstrap a \
                 static binary, or ship the interpreter in the zip or a layer and name its \
                 path under /var/task or /opt on the #! line"
            )
        }
        (Some(libc::ENOEXEC), Some(Needs::Foreign(machine))) => format!(
            "it is a program for {machine}; kiln runs x86_64 programs (Architectures: x86_64)"
        ),
        (Some(libc::ENOEXEC), _) => "it is neither an x86_64 program nor a script with a #! \
                                     line"
            .to_owned(),
        _ => return format!("{head}: {error}"),
    };
    format!("{head}: {what}")
}

/// What a file needs in order to run.
#[derive(Debug, PartialEq, Eq)]
enum Needs {
    /// A dynamically linked ELF program: its `PT_INTERP`.
    Interpreter(String),
    /// A `#!` script: its interpreter.
    Script(String),
    /// An ELF program for another machine.
    Foreign(String),
}

fn needs(path: &Path) -> Option<Needs> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 64];
    let n = file.read(&mut head).ok()?;
    let head = &head[..n];
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next()?;
        let interp = String::from_utf8_lossy(line)
            .split_whitespace()
            .next()?
            .to_owned();
        return Some(Needs::Script(interp));
    }
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]);
    let machine = u16_at(18);
    if head[4] != 2 || machine != 62 {
        let name = match (head[4], machine) {
            (_, 183) => "aarch64 (arm64)".to_owned(),
            (1, _) => "a 32-bit machine".to_owned(),
            (_, m) => format!("machine type {m}"),
        };
        return Some(Needs::Foreign(name));
    }
    let u64_at = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
    };
    let phoff = u64_at(head, 32)?;
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56)).min(256);
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(
            phoff.checked_add(i.checked_mul(phentsize)?)?,
        ))
        .ok()?;
        file.read_exact(&mut ph).ok()?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(ph[..4].try_into().ok()?) == PT_INTERP {
            let offset = u64_at(&ph, 8)?;
            let size = u64_at(&ph, 32)?.min(4096);
            let mut interp = vec![0u8; usize::try_from(size).ok()?];
            file.seek(SeekFrom::Start(offset)).ok()?;
            file.read_exact(&mut interp).ok()?;
            let end = interp.iter().position(|&b| b == 0).unwrap_or(interp.len());
            return Some(Needs::Interpreter(
                String::from_utf8_lossy(&interp[..end]).into_owned(),
            ));
        }
    }
    None
}

/// A running bootstrap.
pub struct Bootstrap {
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    stdout: PipeReader,
    stderr: PipeReader,
}

impl Bootstrap {
    /// Starts `path` with exactly `env`, in `/var/task`, its output going
    /// to `logs`. `exit` is the reaper's channel for this pid.
    pub fn spawn(
        path: &Path,
        env: &[(String, String)],
        logs: &LogBuffer,
        reaper: &Reaper,
    ) -> io::Result<Self> {
        let mut command = Command::new(path);
        command
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(if Path::new("/var/task").is_dir() {
                "/var/task"
            } else {
                "/"
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe calls (setsid, close_range, getrlimit, fcntl,
        // prctl, open, write, close) on stack data.
        unsafe {
            command.pre_exec(|| {
                // Its own process group, so that it can be stopped whole.
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                // stdin, stdout and stderr only: nothing of the agent's
                // (its channel to the host, its sockets) reaches the
                // function. Marked close-on-exec rather than closed, so
                // that the error pipe of a failing exec still reports.
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                if libc::syscall(
                    libc::SYS_close_range,
                    3,
                    libc::c_uint::MAX,
                    CLOSE_RANGE_CLOEXEC,
                ) == -1
                {
                    // Kernels before 5.11: one by one, up to the limit.
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                        limit.rlim_cur.min(1 << 20) as libc::c_int
                    } else {
                        4096
                    };
                    for fd in 3..max {
                        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                }
                // The function is the OOM killer's first choice, before
                // the agent that reports what happened to it. Raising a
                // score needs no privilege, and nothing privileged ever
                // lowered the agent's (which would let the function lower
                // its own as far). Dumpable again first (it becomes the
                // function's own process anyway): a process that changed
                // its uid is not, and its /proc files are then root's.
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
                let path = c"/proc/self/oom_score_adj";
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"1000".as_ptr().cast(), 4);
                    libc::close(fd);
                }
                Ok(())
            });
        }
        let exit = reaper.expect();
        let mut child = command.spawn()?;
        let pid = child.id() as i32;
        reaper.watch(pid);
        let stdout: OwnedFd = child.stdout.take().expect("piped stdout").into();
        let stderr: OwnedFd = child.stderr.take().expect("piped stderr").into();
        // The reaper waits for it; the handle is not needed.
        drop(child);
        Ok(Self {
            pid,
            exit,
            stdout: PipeReader::start(stdout, logs.clone())?,
            stderr: PipeReader::start(stderr, logs.clone())?,
        })
    }

    /// How it ended, once it has.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits until it ends.
    pub async fn wait(&mut self) -> Exit {
        loop {
            if let Some(e) = *self.exit.borrow_and_update() {
                return e;
            }
            if self.exit.changed().await.is_err() {
                return Exit::Signal(libc::SIGKILL);
            }
        }
    }

    /// Moves output already in the pipes into the log buffer.
    pub fn drain_output(&self) {
        self.stdout.drain();
        self.stderr.drain();
    }

    /// Kills it and its process group.
    pub fn kill(&self) {
        // SAFETY: signalling a process group we created.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }
}

/// Reaps every child (the agent is PID 1) and reports the one it watches.
pub struct Reaper {
    tx: watch::Sender<Option<Exit>>,
    state: std::sync::Arc<std::sync::Mutex<ReaperState>>,
}

#[derive(Default)]
struct ReaperState {
    watched: i32,
    /// Exits of children not watched (yet): a child can end before the
    /// spawner learns its pid.
    recent: std::collections::VecDeque<(i32, Exit)>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD.
    pub fn start() -> io::Result<Self> {
        let (tx, _) = watch::channel(None);
        let state = std::sync::Arc::new(std::sync::Mutex::new(ReaperState::default()));
        let mut signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let (report, shared) = (tx.clone(), state.clone());
        tokio::spawn(async move {
            loop {
                reap(&report, &shared);
                if signals.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(Self { tx, state })
    }

    fn expect(&self) -> watch::Receiver<Option<Exit>> {
        self.tx.send_replace(None);
        self.tx.subscribe()
    }

    fn watch(&self, pid: i32) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.watched = pid;
        if let Some(&(_, exit)) = s.recent.iter().find(|(p, _)| *p == pid) {
            self.tx.send_replace(Some(exit));
        }
    }
}

fn reap(report: &watch::Sender<Option<Exit>>, state: &std::sync::Mutex<ReaperState>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid for any child, without blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let exit = if libc::WIFEXITED(status) {
            Exit::Code(libc::WEXITSTATUS(status))
        } else {
            Exit::Signal(libc::WTERMSIG(status))
        };
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        if pid == s.watched {
            report.send_replace(Some(exit));
        } else {
            s.recent.push_back((pid, exit));
            if s.recent.len() > 64 {
                s.recent.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_interpreter_is_named() {
        let dir = std::env::temp_dir().join(format!("kiln-needs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("bootstrap");
        std::fs::write(&script, b"#!/nowhere/bash -e\necho hi\n").unwrap();
        assert_eq!(needs(&script), Some(Needs::Script("/nowhere/bash".into())));
        let enoent = io::Error::from_raw_os_error(libc::ENOENT);
        let m = explain_spawn_error(&script, &enoent);
        assert!(m.contains("interpreter /nowhere/bash (its #! line)"), "{m}");
        // This test binary is dynamically linked (a glibc host): its
        // interpreter is named, when it is missing.
        let me = std::env::current_exe().unwrap();
        match needs(&me) {
            Some(Needs::Interpreter(i)) => assert!(i.starts_with('/') && i.contains("ld"), "{i}"),
            other => assert!(other.is_none(), "{other:?}"),
        }
        let mut aarch64 = vec![0u8; 64];
        aarch64[..4].copy_from_slice(b"\x7fELF");
        aarch64[4] = 2;
        aarch64[18] = 183;
        std::fs::write(&script, &aarch64).unwrap();
        let m = explain_spawn_error(&script, &io::Error::from_raw_os_error(libc::ENOEXEC));
        assert!(m.contains("aarch64"), "{m}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exits_read_as_lambda_writes_them() {
        assert_eq!(Exit::Code(1).describe(), "exit status 1");
        assert_eq!(Exit::Signal(libc::SIGKILL).describe(), "signal: killed");
        assert_eq!(Exit::Signal(64).describe(), "signal: 64");
    }
}
