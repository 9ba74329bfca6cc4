//! kiln's VMM: a KVM microVM with one virtio-console channel to its agent.
//!
//! Owns guest memory, the boot of a 64-bit Linux kernel (or any ELF that
//! follows its boot protocol), the vCPU threads and their exits, the serial
//! console (a bounded log), i8042 reset as power-off, and the virtio-mmio
//! console that carries `runtimes/proto` bytes. It knows nothing of
//! functions, the API or the store: `kiln vmm` runs one VM per process, and
//! the `microvm` sandbox drives that process.

pub mod boot;
pub mod devices;
pub mod initramfs;
pub mod layout;
pub mod mptable;
pub mod seccomp;
pub mod virtio;

use std::io::{Read, Write};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use devices::{BoundedLog, LegacyDevices};
use virtio::MmioTransport;
use virtio::console::{Console, ConsoleStats};

/// What can go wrong making or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("KVM: {0}")]
    Kvm(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("boot: {0}")]
    Boot(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("invalid VM configuration: {0}")]
    Config(String),
}

/// How a VM is made.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs (1-32).
    pub vcpus: u8,
    /// An ELF kernel (`vmlinux`) or any ELF that follows Linux's 64-bit
    /// boot protocol.
    pub kernel: Vec<u8>,
    /// The initramfs (cpio newc).
    pub initrd: Option<Vec<u8>>,
    /// Added to the kernel command line.
    pub cmdline_extra: String,
    /// Serial console bytes kept at most.
    pub log_max: usize,
    /// Write the serial console to stdout as it arrives (within `log_max`).
    pub log_to_stdout: bool,
    /// An in-kernel interrupt controller (IOAPIC, PIC, LAPIC) with irqfds
    /// for the devices: what Linux needs. Polling test guests run without.
    pub irqchip: bool,
    /// Each vCPU thread installs its seccomp filter before its first KVM_RUN.
    pub seccomp: bool,
}

impl VmConfig {
    fn validate(&self) -> Result<(), VmmError> {
        if !(16..=10240).contains(&self.memory_mib) {
            return Err(VmmError::Config(format!(
                "memory {} MiB is outside 16-10240",
                self.memory_mib
            )));
        }
        if !(1..=32).contains(&self.vcpus) {
            return Err(VmmError::Config(format!(
                "{} vCPUs is outside 1-32",
                self.vcpus
            )));
        }
        Ok(())
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset through the i8042 (Linux's `reboot=k` power-off).
    Reset,
    /// A vCPU halted with interrupts it cannot get (no irqchip).
    Halted,
    /// Triple fault or KVM's shutdown exit.
    Shutdown,
    /// Stopped from the host.
    Stopped,
    /// KVM could not run the guest.
    Error(String),
}

/// What a VM left behind.
#[derive(Debug)]
pub struct Stopped {
    pub reason: StopReason,
    /// The serial console, bounded.
    pub log: Vec<u8>,
    /// Serial bytes beyond the bound.
    pub log_dropped: u64,
    pub console: ConsoleStats,
    /// From the first KVM_RUN to the stop.
    pub ran_for: Duration,
}

type SharedConsole = Arc<Mutex<MmioTransport<Console>>>;

/// A created VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    legacy: Arc<Mutex<LegacyDevices>>,
    console: SharedConsole,
    log: BoundedLog,
    stop: Arc<AtomicBool>,
    seccomp: bool,
    /// How long creation took (KVM VM, memory, load, vCPU setup).
    pub created_in: Duration,
}

impl Vm {
    /// Opens `/dev/kvm` (before the process gives up its file system).
    pub fn open_kvm() -> Result<Kvm, VmmError> {
        Kvm::new().map_err(|e| VmmError::Kvm(format!("opening /dev/kvm: {e}")))
    }

    /// Creates the VM on `kvm`; guest bytes of the channel go to
    /// `channel_out`.
    pub fn create(
        kvm: Kvm,
        config: &VmConfig,
        channel_out: Box<dyn Write + Send>,
    ) -> Result<Self, VmmError> {
        let started = Instant::now();
        config.validate()?;
        let kvm_err = |what: &str, e: kvm_ioctls::Error| VmmError::Kvm(format!("{what}: {e}"));
        let vm = kvm.create_vm().map_err(|e| kvm_err("KVM_CREATE_VM", e))?;
        let mem = boot::guest_memory(u64::from(config.memory_mib) << 20)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let entry = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Vm keeps for as long as the KVM VM exists (fields are dropped
            // after `_vm` only because the VM fd closes first: both live in
            // this struct and die together).
            unsafe { vm.set_user_memory_region(entry) }
                .map_err(|e| kvm_err("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let (serial_irq, console_irq) = if config.irqchip {
            vm.set_tss_address(layout::KVM_TSS_ADDRESS)
                .map_err(|e| kvm_err("KVM_SET_TSS_ADDR", e))?;
            vm.create_irq_chip()
                .map_err(|e| kvm_err("KVM_CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(|e| kvm_err("KVM_CREATE_PIT2", e))?;
            let irq = |gsi: u32| -> Result<EventFd, VmmError> {
                let fd = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| VmmError::Kvm(format!("eventfd: {e}")))?;
                vm.register_irqfd(&fd, gsi)
                    .map_err(|e| kvm_err("KVM_IRQFD", e))?;
                Ok(fd)
            };
            (
                Some(irq(layout::SERIAL_IRQ)?),
                Some(irq(layout::VIRTIO_IRQ_BASE)?),
            )
        } else {
            (None, None)
        };

        let mut cmdline = boot::base_cmdline(&config.cmdline_extra)?;
        cmdline
            .add_virtio_mmio_device(
                layout::VIRTIO_MMIO_SIZE,
                vm_memory::GuestAddress(layout::virtio_mmio_address(0)),
                layout::VIRTIO_IRQ_BASE,
                None,
            )
            .map_err(|e| VmmError::Boot(format!("command line: {e}")))?;
        let loaded = boot::load(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
        if config.irqchip {
            // With no ACPI, the MP table is how Linux finds the other vCPUs.
            mptable::write(&mem, config.vcpus)?;
        }

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            boot::normalize_cpuid(&mut cpuid, index, config.vcpus);
            vcpu.set_cpuid2(&cpuid)
                .map_err(|e| kvm_err("KVM_SET_CPUID2", e))?;
            boot::setup_vcpu(&vcpu, loaded.entry)?;
            if config.irqchip {
                boot::setup_lapic(&vcpu)?;
            }
            vcpus.push(vcpu);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let log = if config.log_to_stdout {
            BoundedLog::with_tee(config.log_max, Box::new(std::io::stdout()))
        } else {
            BoundedLog::new(config.log_max)
        };
        let legacy = Arc::new(Mutex::new(LegacyDevices::new(
            log.clone(),
            serial_irq,
            stop.clone(),
        )));
        let console = Arc::new(Mutex::new(MmioTransport::new(
            Console::new(channel_out),
            mem.clone(),
            virtio::Interrupt::new(console_irq),
        )));
        Ok(Self {
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            vcpus,
            legacy,
            console,
            log,
            stop,
            seccomp: config.seccomp,
            created_in: started.elapsed(),
        })
    }

    /// The console, for feeding host bytes to the guest.
    pub fn console(&self) -> SharedConsole {
        self.console.clone()
    }

    /// A flag that stops the VM when set (then call [`Self::kick`]-free:
    /// vCPU threads see it at their next exit, and [`Self::run`] pokes them).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Runs the guest until it powers off, fails, or the stop flag is set;
    /// `on_started` runs on this thread once every vCPU thread is running
    /// (the place to install the main thread's seccomp filter).
    pub fn run(self, on_started: impl FnOnce()) -> Stopped {
        install_kick_handler();
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel::<StopReason>();
        let mut threads = Vec::new();
        for (index, vcpu) in self.vcpus.into_iter().enumerate() {
            let legacy = self.legacy.clone();
            let console = self.console.clone();
            let stop = self.stop.clone();
            let vcpu_tx = tx.clone();
            let seccomp = self.seccomp;
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-vcpu{index}"))
                .spawn(move || {
                    let reason = vcpu_loop(vcpu, &legacy, &console, &stop, seccomp);
                    stop.store(true, Ordering::SeqCst);
                    let _ = vcpu_tx.send(reason);
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    self.stop.store(true, Ordering::SeqCst);
                    let _ = tx.send(StopReason::Error(format!("starting a vCPU thread: {e}")));
                    break;
                }
            }
        }
        drop(tx);
        on_started();
        // The first vCPU to stop decides why the VM stopped; the host may
        // also set the flag, which a vCPU sees at its next exit.
        let reason = loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(reason) => break reason,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::SeqCst) {
                        kick(&threads);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break StopReason::Stopped,
            }
        };
        self.stop.store(true, Ordering::SeqCst);
        // Poke the others out of KVM_RUN until they are gone (bounded: a
        // vCPU sees the flag at its next exit, and the signal forces one).
        for _ in 0..500 {
            if threads.iter().all(|t| t.is_finished()) {
                break;
            }
            kick(&threads);
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let (log, log_dropped) = self.log.take();
        let console = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device()
            .stats();
        Stopped {
            reason,
            log,
            log_dropped,
            console,
            ran_for: started.elapsed(),
        }
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    // Only interrupts KVM_RUN (EINTR); the handler does nothing.
    let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
}

fn kick(threads: &[std::thread::JoinHandle<()>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // SAFETY: the thread is alive (not finished, and its handle keeps
        // the pthread from being reused); the signal has a handler.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
    }
}

fn vcpu_loop(
    mut vcpu: VcpuFd,
    legacy: &Mutex<LegacyDevices>,
    console: &Mutex<MmioTransport<Console>>,
    stop: &AtomicBool,
    seccomp: bool,
) -> StopReason {
    if seccomp {
        let installed =
            seccomp::filter(seccomp::ThreadKind::Vcpu).and_then(|p| seccomp::install(&p));
        if let Err(e) = installed {
            return StopReason::Error(e.to_string());
        }
    }
    let console_window =
        layout::virtio_mmio_address(0)..layout::virtio_mmio_address(0) + layout::VIRTIO_MMIO_SIZE;
    loop {
        if stop.load(Ordering::SeqCst) {
            return StopReason::Stopped;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut devices = legacy.lock().unwrap_or_else(|p| p.into_inner());
                devices.pio_write(port, data);
                if devices.stop.load(Ordering::SeqCst) {
                    return StopReason::Reset;
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => legacy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if console_window.contains(&addr) {
                    console
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .read(addr - console_window.start, data);
                } else {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if console_window.contains(&addr) {
                    console
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write(addr - console_window.start, data);
                }
            }
            Ok(VcpuExit::Hlt) => return StopReason::Halted,
            Ok(VcpuExit::Shutdown) => return StopReason::Shutdown,
            Ok(VcpuExit::SystemEvent(..)) => return StopReason::Shutdown,
            Ok(VcpuExit::InternalError) => {
                return StopReason::Error(
                    "KVM internal error: the host's KVM could not emulate an instruction of the guest"
                        .into(),
                );
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return StopReason::Error(format!(
                    "KVM could not enter the guest on cpu {cpu} (hardware reason {reason:#x})"
                ));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => return StopReason::Error(format!("unexpected VM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return StopReason::Error(format!("KVM_RUN: {e}")),
        }
    }
}

/// Moves host bytes from `from` into the guest's console until `from`
/// ends or the VM stops. Reads only as much as the console has room for,
/// so a guest that stops reading stops the host from reading too.
pub fn feed_console(
    console: &Mutex<MmioTransport<Console>>,
    mut from: impl Read,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut offset = 0;
        let mut device = console.lock().unwrap_or_else(|p| p.into_inner());
        while offset < n {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let taken = device.device_mut().push_from_host(&buf[offset..n]);
            offset += taken;
            if taken == 0 {
                // Full: wait for the guest to take bytes. Bounded, so that
                // a stop is seen even if the guest never reads again.
                let drained = device.device().drained();
                device = drained
                    .wait_timeout(device, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}
