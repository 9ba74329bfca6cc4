//! The agent as PID 1 of a microVM: the guest's init.
//!
//! The kernel unpacked kiln's initramfs and ran `/init` (this binary). It
//! mounts what a function needs, brings up loopback, and opens the channel
//! (`/dev/hvc0`, the VMM's virtio-console) in raw mode. The code and layers
//! arrive over the channel as [`FilePiece`]s into tmpfs mounts that become
//! read-only once `Configure` arrives, so `/var/task`, `/opt` and `/tmp`
//! look exactly as they do in the jail. The VM is the boundary here; the
//! agent stays root inside it. When the host says so, or the channel ends,
//! it powers the VM off.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};

use kiln_proto::{CodeRoot, FilePiece};

use crate::jail::{loopback_up, mount};

/// The channel's device in the guest.
const CHANNEL: &str = "/dev/hvc0";
/// The most code and layers a guest takes, in MiB (Lambda's unzipped limit).
const CODE_MB: u32 = 256;

/// Whether this process is a VM's init.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// Mounts, loopback, the channel. Errors name the step.
pub fn setup() -> Result<File, String> {
    let m = |what: &str, r: io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    let fs = |src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>| {
        mount(
            Some(Path::new(src)),
            Path::new(target),
            Some(fstype),
            flags,
            data,
        )
    };
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    // devtmpfs may be mounted already by the kernel.
    if let Err(e) = fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    ) && e.raw_os_error() != Some(libc::EBUSY)
    {
        return Err(format!("mounting /dev: {e}"));
    }
    m(
        "mounting /proc",
        fs("proc", "/proc", "proc", nosuid | libc::MS_NOEXEC, None),
    )?;
    m(
        "mounting /sys",
        fs("sysfs", "/sys", "sysfs", nosuid | libc::MS_NOEXEC, None),
    )?;
    let code = format!("size={CODE_MB}m,mode=0755");
    m(
        "mounting /var/task",
        fs("tmpfs", "/var/task", "tmpfs", nosuid, Some(&code)),
    )?;
    m(
        "mounting /opt",
        fs("tmpfs", "/opt", "tmpfs", nosuid, Some(&code)),
    )?;
    m("bringing up loopback", loopback_up())?;
    // The virtio console may be probed after init starts: wait for it,
    // bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let channel = loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(CHANNEL)
        {
            Ok(f) => break f,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                let devices: Vec<String> = fs::read_dir("/sys/bus/virtio/devices")
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
                return Err(format!(
                    "opening the channel {CHANNEL}: {e} (virtio devices: {devices:?}; command line: {})",
                    cmdline.trim()
                ));
            }
        }
    };
    raw_mode(&channel).map_err(|e| format!("channel raw mode: {e}"))?;
    Ok(channel)
}

/// No line discipline: the channel carries binary frames.
fn raw_mode(tty: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a valid out pointer.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: t is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: as for tcgetattr.
    if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes one piece of a code or layer file.
pub fn put_file(piece: &FilePiece) -> Result<(), String> {
    // The protocol already refused absolute paths and `..`; the check is
    // repeated here because this is where the path meets the file system.
    if !FilePiece::path_is_safe(&piece.path) {
        return Err(format!("unsafe path {:?}", piece.path));
    }
    let base = match piece.root {
        CodeRoot::Task => "/var/task",
        CodeRoot::Opt => "/opt",
    };
    let path: PathBuf = Path::new(base).join(&piece.path);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .append(piece.append)
        .truncate(!piece.append)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(&piece.data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(piece.mode & 0o777))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The code is complete: `/var/task` and `/opt` become read-only, `/tmp`
/// a tmpfs of `tmp_mb`.
pub fn seal(tmp_mb: u32) -> Result<(), String> {
    for dir in ["/var/task", "/opt"] {
        mount(
            None,
            Path::new(dir),
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )
        .map_err(|e| format!("making {dir} read-only: {e}"))?;
    }
    let size = format!("size={}m,mode=1777", tmp_mb.max(1));
    mount(
        Some(Path::new("tmpfs")),
        Path::new("/tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&size),
    )
    .map_err(|e| format!("mounting /tmp: {e}"))
}

/// Bridges the tty to one end of a socket pair, so the agent can use the
/// same async socket code as in the jail. Returns the other end.
pub fn bridge(tty: File) -> io::Result<std::os::unix::net::UnixStream> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut tty_in = tty.try_clone()?;
    let mut tty_out = tty;
    let mut sock_in = ours.try_clone()?;
    let mut sock_out = ours;
    std::thread::Builder::new()
        .name("channel-in".into())
        .spawn(move || {
            let _ = pump(&mut tty_in, &mut sock_out);
            // The host hung up: nothing more to do.
            power_off();
        })?;
    std::thread::Builder::new()
        .name("channel-out".into())
        .spawn(move || {
            let _ = pump(&mut sock_in, &mut tty_out);
        })?;
    Ok(theirs)
}

fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// Powers the VM off: a reset, which the kernel (booted with `reboot=k`)
/// does through the i8042, which kiln's VMM treats as the end of the VM.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; as init we may reboot.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Unreachable unless reboot failed; exiting init panics the kernel,
    // which (panic=1) also ends the VM.
    std::process::exit(1)
}
