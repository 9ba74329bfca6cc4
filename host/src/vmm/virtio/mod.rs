//! Virtio over MMIO (virtio 1.2, section 4.2, version 2 registers): the
//! transport a guest driver programs, and the devices behind it.
//!
//! Everything here reads guest-controlled memory: queue addresses, sizes,
//! descriptor chains. Nothing is trusted; every access goes through
//! `vm-memory` (bounds-checked), chains are walked by `virtio-queue` (which
//! refuses loops and out-of-range tables), and every byte count is bounded
//! before anything is allocated.

pub mod console;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `virt` in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Vendor id the devices report ("KILN").
const VENDOR: u32 = 0x4b49_4c4e;
/// VIRTIO_F_VERSION_1: modern devices only.
pub const F_VERSION_1: u64 = 1 << 32;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Bit 0 of InterruptStatus: a queue has used buffers.
pub const INT_VRING: u32 = 1;

/// The interrupt line of one device: its status register and, where the VM
/// has an interrupt controller, the irqfd that raises its GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: Option<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: Option<EventFd>) -> Arc<Self> {
        Arc::new(Self {
            status: AtomicU32::new(0),
            irqfd,
        })
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Some(fd) = &self.irqfd {
            // A full eventfd counter already means "raised".
            let _ = fd.write(1);
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (3 = console).
    fn device_type(&self) -> u32;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Maximum size of each queue, in queue order.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver finished setup: the device owns its queues from now on.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String>;
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device.
    fn reset(&mut self);
}

/// One virtio-mmio device window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// Queues given a ring address the device could not take.
    bad_queues: u64,
}

#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        let queues = Self::fresh_queues(&device);
        Self {
            device,
            mem,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            config_generation: 0,
            activated: false,
            bad_queues: 0,
        }
    }

    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect()
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Device status as the driver set it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            // Queue registers are read-only once the device runs.
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // No writable configuration.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.device_features_sel = value,
            // Features are fixed once FEATURES_OK is set.
            0x20 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue refuses sizes that are not a power of two
                    // or above the maximum; the queue then stays invalid.
                    let _ = q.try_set_size(value.min(u32::from(u16::MAX)) as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x50 if self.activated => self.device.queue_notify(value),
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 => self.set_ring_address(Ring::Desc, Some(value), None),
            0x84 => self.set_ring_address(Ring::Desc, None, Some(value)),
            0x90 => self.set_ring_address(Ring::Avail, Some(value), None),
            0x94 => self.set_ring_address(Ring::Avail, None, Some(value)),
            0xa0 => self.set_ring_address(Ring::Used, Some(value), None),
            0xa4 => self.set_ring_address(Ring::Used, None, Some(value)),
            _ => {}
        }
    }

    /// Sets half of a ring address. `virtio-queue` ignores an address that
    /// breaks the ring's alignment and keeps the old one; the device would
    /// then use rings the driver never wrote, so such a queue is marked
    /// invalid instead, and the device does not start.
    fn set_ring_address(&mut self, ring: Ring, low: Option<u32>, high: Option<u32>) {
        let sel = self.queue_sel as usize;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let get = |q: &Queue| match ring {
            Ring::Desc => q.desc_table(),
            Ring::Avail => q.avail_ring(),
            Ring::Used => q.used_ring(),
        };
        let before = get(q);
        let want = match (low, high) {
            (Some(l), _) => (before & !0xffff_ffff) | u64::from(l),
            (_, Some(h)) => (before & 0xffff_ffff) | (u64::from(h) << 32),
            (None, None) => before,
        };
        match ring {
            Ring::Desc => q.set_desc_table_address(low, high),
            Ring::Avail => q.set_avail_ring_address(low, high),
            Ring::Used => q.set_used_ring_address(low, high),
        }
        if get(q) != want {
            self.bad_queues |= 1 << sel.min(63);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2, 2.1.2).
        if value & self.status != self.status {
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Refused: the driver sees FEATURES_OK unset and gives up.
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let needed = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        let valid = self.status & needed == needed
            && self.bad_queues == 0
            && self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.mem));
        if !valid {
            tracing::debug!(
                status = self.status,
                "virtio device activated without valid queues"
            );
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let queues = std::mem::take(&mut self.queues);
        match self
            .device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::debug!(error = %e, "virtio device activation failed");
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(&self.device);
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.bad_queues = 0;
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}
