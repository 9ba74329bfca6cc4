//! kiln's environment agent.
//!
//! One static binary for both kinds of environment. Started by kiln with
//! `--channel-fd N` (the jail: a Unix socket inherited as descriptor N), it
//! greets the host, receives the environment's configuration, builds the
//! jail when the configuration asks for one, then serves the function (see
//! `agent`). Steps, in order: `main` (channel, hello, configure) -> `jail`
//! -> `seccomp` -> `agent` (init, invocations) with `runtime_api`,
//! `bootstrap`, `logs`, `wasm` and `relay` (the way back to kiln's API).

mod agent;
mod bootstrap;
mod jail;
mod logs;
mod relay;
mod runtime_api;
mod seccomp;
mod vm;
mod wasm;

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::process::ExitCode;

use kiln_proto::{AgentMessage, HostMessage, PROTOCOL_VERSION, read_message, write_message};

fn usage() -> ExitCode {
    eprintln!("usage: kiln-agent --channel-fd N   (started by kiln, not by hand)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    if vm::is_init() {
        // PID 1 of a microVM: there is nobody to return an exit code to.
        let outcome = vm::setup().and_then(|tty| {
            let channel = vm::bridge(tty).map_err(|e| format!("channel: {e}"))?;
            run(File::from(std::os::fd::OwnedFd::from(channel)), true)
        });
        if let Err(e) = outcome {
            eprintln!("kiln-agent: {e}");
        }
        vm::power_off();
    }
    let args: Vec<String> = std::env::args().collect();
    let fd: RawFd = match args.as_slice() {
        [_, flag, n] if flag == "--channel-fd" => match n.parse() {
            Ok(n) if n > 2 => n,
            _ => return usage(),
        },
        _ => return usage(),
    };
    // Only the channel may come from the host, and it must not reach the
    // function: every other inherited descriptor is closed, and the
    // channel is closed on exec.
    close_inherited(fd);
    // SAFETY: kiln passes this descriptor open and owned by this process;
    // nothing else in the agent uses the number.
    let channel = unsafe { File::from_raw_fd(fd) };
    match run(channel, false) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut channel: File, in_vm: bool) -> Result<(), String> {
    write_message(
        &mut channel,
        &AgentMessage::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .map_err(|e| e.to_string())?;
    match read_message::<HostMessage>(&mut channel).map_err(|e| e.to_string())? {
        HostMessage::Hello { version } if version == PROTOCOL_VERSION => {}
        HostMessage::Hello { version } => {
            return Err(format!(
                "the host speaks protocol {version}, not {PROTOCOL_VERSION}"
            ));
        }
        other => return Err(format!("expected Hello, got {other:?}")),
    }
    // A microVM's agent receives the code first; a jail's mounts it.
    let config = loop {
        match read_message::<HostMessage>(&mut channel).map_err(|e| e.to_string())? {
            HostMessage::Configure(c) => break *c,
            HostMessage::PutFile(piece) if in_vm => vm::put_file(&piece)?,
            other => return Err(format!("expected Configure, got {other:?}")),
        }
    };
    if in_vm {
        if config.jail.is_some() {
            return Err("a microVM's agent does not build a jail".into());
        }
        vm::seal(config.tmp_mb)?;
    }
    if let Some(spec) = &config.jail
        && let Err(e) = jail::enter(spec)
    {
        let message = e.to_string();
        let _ = write_message(
            &mut channel,
            &AgentMessage::InitFailed {
                error_type: "Sandbox.Failure".into(),
                message: message.clone(),
                logs: Vec::new(),
            },
        );
        return Err(message);
    }
    // From here on: inside the environment, unprivileged and filtered.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(async move {
        channel
            .set_nonblocking_compat()
            .map_err(|e| format!("channel: {e}"))?;
        let stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(channel));
        let stream =
            tokio::net::UnixStream::from_std(stream).map_err(|e| format!("channel: {e}"))?;
        let (reader, writer) = stream.into_split();
        agent::run(config, reader, writer)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Closes every descriptor above 2 but `channel`, and marks `channel`
/// close-on-exec.
fn close_inherited(channel: RawFd) {
    let channel = channel as libc::c_uint;
    // SAFETY: close_range, close, getrlimit and fcntl take integers (and a
    // struct we own) and touch only this process's descriptor table, before
    // any thread or other descriptor exists.
    unsafe {
        if channel > 3 {
            libc::syscall(libc::SYS_close_range, 3, channel - 1, 0);
        }
        if libc::syscall(libc::SYS_close_range, channel + 1, libc::c_uint::MAX, 0) == -1 {
            // Kernels before 5.9: one by one, up to the limit.
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(1 << 20) as RawFd
            } else {
                4096
            };
            for fd in (channel as RawFd + 1)..max {
                libc::close(fd);
            }
        }
        let flags = libc::fcntl(channel as RawFd, libc::F_GETFD);
        libc::fcntl(channel as RawFd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
    }
}

/// `File` has no `set_nonblocking`; the channel is a socket, which does.
trait NonBlocking {
    fn set_nonblocking_compat(&self) -> std::io::Result<()>;
}

impl NonBlocking for File {
    fn set_nonblocking_compat(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor this File owns.
        let flags = unsafe { libc::fcntl(self.as_raw_fd(), libc::F_GETFL) };
        if flags == -1 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(self.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
