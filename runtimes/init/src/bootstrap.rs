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
        // async-signal-safe calls (setsid, open, write, close) on
        // stack data.
        unsafe {
            command.pre_exec(|| {
                // Its own process group, so that it can be stopped whole.
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                // The agent protects itself from the OOM killer; the
                // function must not inherit that.
                let path = c"/proc/self/oom_score_adj";
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
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
    fn exits_read_as_lambda_writes_them() {
        assert_eq!(Exit::Code(1).describe(), "exit status 1");
        assert_eq!(Exit::Signal(libc::SIGKILL).describe(), "signal: killed");
        assert_eq!(Exit::Signal(64).describe(), "signal: 64");
    }
}
