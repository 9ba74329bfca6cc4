//! `kiln vmm`: one microVM per process. The host starts it with the
//! channel on a file descriptor; it reads the kernel and initramfs, opens
//! `/dev/kvm`, jails itself (namespaces, chroot into an empty directory,
//! an unprivileged uid, no capabilities), creates the VM, and runs it with
//! a seccomp filter on every thread. The guest's serial console goes to
//! stdout as it arrives (bounded); one JSON line on stderr says how it ended.

use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::FromRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use kiln::vmm::{StopReason, Vm, VmConfig, feed_console, seccomp};

/// Arguments of `kiln vmm`.
#[derive(Debug, Args)]
pub struct VmmArgs {
    /// The guest kernel: an ELF (`vmlinux`) entered in 64-bit mode.
    #[arg(long)]
    pub kernel: PathBuf,
    /// The initramfs (cpio newc).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Added to the kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// The channel to the host: an inherited socket descriptor.
    #[arg(long)]
    pub channel_fd: i32,
    /// Serial console bytes kept at most.
    #[arg(long, default_value_t = 1 << 20)]
    pub log_max: usize,
    /// No in-kernel interrupt controller (for guests that poll).
    #[arg(long)]
    pub no_irqchip: bool,
    /// `cgroup.procs` files to enter first, so the whole VM is accounted
    /// (repeatable).
    #[arg(long)]
    pub cgroup_procs: Vec<PathBuf>,
    /// Jail: an empty directory to chroot into before the guest runs.
    #[arg(long)]
    pub jail_dir: Option<PathBuf>,
    /// Jail: the uid and gid to run as.
    #[arg(long, default_value_t = 65534)]
    pub uid: u32,
    #[arg(long, default_value_t = 65534)]
    pub gid: u32,
}

/// Runs the VM; the process's exit code.
pub fn run(args: VmmArgs) -> Result<i32> {
    for procs in &args.cgroup_procs {
        std::fs::write(procs, b"0").with_context(|| format!("entering {}", procs.display()))?;
    }
    let kernel = std::fs::read(&args.kernel)
        .with_context(|| format!("reading the kernel {}", args.kernel.display()))?;
    let initrd = match &args.initrd {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    if args.channel_fd < 3 {
        bail!("--channel-fd must be an inherited descriptor (3 or above)");
    }
    // SAFETY: the host passed this descriptor for us alone; nothing else in
    // this process owns it.
    let channel_in = unsafe { File::from_raw_fd(args.channel_fd) };
    let channel_out = channel_in.try_clone().context("duplicating the channel")?;
    let kvm = Vm::open_kvm()?;
    let jailed = match &args.jail_dir {
        Some(dir) => Some(jail(dir, args.uid, args.gid)?),
        None => None,
    };
    let config = VmConfig {
        memory_mib: args.memory,
        vcpus: args.vcpus,
        kernel,
        initrd,
        cmdline_extra: args.cmdline.clone(),
        log_max: args.log_max,
        log_to_stdout: true,
        irqchip: !args.no_irqchip,
        seccomp: true,
    };
    let vm = Vm::create(kvm, &config, Box::new(channel_out))?;
    let created_in = vm.created_in;
    let console = vm.console();
    let stop = vm.stop_flag();
    let feeder = std::thread::Builder::new()
        .name("kiln-channel".into())
        .spawn({
            let stop = stop.clone();
            move || {
                // No unfiltered thread touches guest memory: without its
                // filter the channel stays shut and the VM stops.
                let filtered =
                    seccomp::filter(seccomp::ThreadKind::Main).and_then(|p| seccomp::install(&p));
                if filtered.is_err() {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                feed_console(&console, channel_in, &stop);
                // The host hung up: the environment is over.
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .context("starting the channel thread")?;
    let main_filter = seccomp::filter(seccomp::ThreadKind::Main)?;
    let stopped = vm.run(|| {
        if let Err(e) = seccomp::install(&main_filter) {
            eprintln!("kiln vmm: {e}");
            std::process::exit(1);
        }
    });
    // The feeder ends with its socket or the stop flag; it is not joined
    // (a host that keeps the channel open must not hold the VMM up).
    drop(feeder);
    // The console went to stdout as it arrived.
    let (reason, code) = match &stopped.reason {
        StopReason::Reset => ("reset", 0),
        StopReason::Halted => ("halted", 0),
        StopReason::Shutdown => ("shutdown", 0),
        StopReason::Stopped => ("stopped", 0),
        StopReason::Error(_) => ("error", 1),
    };
    let report = serde_json::json!({
        "reason": reason,
        "error": match &stopped.reason { StopReason::Error(e) => Some(e.as_str()), _ => None },
        "createdMicros": created_in.as_micros() as u64,
        "ranMicros": stopped.ran_for.as_micros() as u64,
        "bytesToGuest": stopped.console.bytes_to_guest,
        "bytesToHost": stopped.console.bytes_to_host,
        "badChains": stopped.console.bad_chains,
        "logDropped": stopped.log_dropped,
        "jailed": jailed,
    });
    let _ = writeln!(std::io::stderr(), "{report}");
    Ok(code)
}

/// What the jail left the process with, for the report.
#[derive(Debug, serde::Serialize)]
struct Jailed {
    uid: u32,
    gid: u32,
    root: String,
}

/// New mount, network, IPC and UTS namespaces; chroot into `dir`; then
/// the unprivileged ids with no capabilities and `no_new_privs`.
fn jail(dir: &std::path::Path, uid: u32, gid: u32) -> Result<Jailed> {
    let check = |what: &str, rc: libc::c_int| -> Result<()> {
        if rc == -1 {
            bail!("jail: {what}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare with a flag word.
    check("unshare", unsafe { libc::unshare(flags) })?;
    let path = CString::new(dir.as_os_str().as_bytes()).context("jail dir")?;
    // SAFETY: a NUL-terminated path that outlives the call.
    check("chroot", unsafe { libc::chroot(path.as_ptr()) })?;
    std::env::set_current_dir("/").context("jail: chdir /")?;
    for cap in 0..=63 {
        // SAFETY: prctl with integers; capabilities this kernel lacks fail harmlessly.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: an empty group list.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer ids.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer ids; from root to non-root this clears the permitted
    // and effective capabilities.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: prctl with integers.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // SAFETY: getuid and getgid take no arguments.
    let (now_uid, now_gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if now_uid == 0 && uid != 0 {
        bail!("jail: still root after setresuid");
    }
    Ok(Jailed {
        uid: now_uid,
        gid: now_gid,
        root: dir.display().to_string(),
    })
}
