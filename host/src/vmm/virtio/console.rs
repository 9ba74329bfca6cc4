//! virtio-console with one port (no MULTIPORT): the byte stream between the
//! host and the agent. Queue 0 (receiveq) carries host bytes into the guest,
//! queue 1 (transmitq) guest bytes out. In the guest it is `/dev/hvc0`.
//!
//! Bounds: at most [`TO_GUEST_CAPACITY`] host bytes wait for guest buffers
//! (the host stops reading its socket until the guest catches up); guest
//! bytes are copied out in [`CHUNK`]-sized pieces, so a descriptor claiming
//! 4 GiB costs no more memory than one claiming 4 KiB.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{F_VERSION_1, Interrupt, VirtioDevice};

/// Virtio device id of a console.
pub const DEVICE_ID: u32 = 3;
const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Host bytes buffered for the guest at most.
pub const TO_GUEST_CAPACITY: usize = 1 << 20;
/// Guest bytes are moved in pieces of this size.
const CHUNK: usize = 4096;

/// Counters a test or the VMM's log can read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleStats {
    pub bytes_to_guest: u64,
    pub bytes_to_host: u64,
    /// Chains the device could not use: a buffer outside guest memory, a
    /// write-only buffer where the device reads, or the reverse.
    pub bad_chains: u64,
}

/// The console device.
pub struct Console {
    to_host: Box<dyn Write + Send>,
    to_guest: VecDeque<u8>,
    /// Notified when the guest took host bytes, for a feeder waiting for
    /// room (with the lock that guards this device).
    drained: Arc<std::sync::Condvar>,
    active: Option<Active>,
    stats: ConsoleStats,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

impl Console {
    /// A console whose guest output goes to `to_host`.
    pub fn new(to_host: Box<dyn Write + Send>) -> Self {
        Self {
            to_host,
            to_guest: VecDeque::new(),
            drained: Arc::new(std::sync::Condvar::new()),
            active: None,
            stats: ConsoleStats::default(),
        }
    }

    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }

    /// Notified whenever the guest takes host bytes.
    pub fn drained(&self) -> Arc<std::sync::Condvar> {
        self.drained.clone()
    }

    /// How many more host bytes it takes now.
    pub fn room(&self) -> usize {
        TO_GUEST_CAPACITY - self.to_guest.len()
    }

    /// Queues host bytes for the guest; returns how many it took (at most
    /// [`Self::room`]). Delivers what the guest has buffers for.
    pub fn push_from_host(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.to_guest.extend(&bytes[..n]);
        self.fill_receive();
        n
    }

    /// Moves waiting host bytes into the guest's receive buffers.
    fn fill_receive(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mut used_any = false;
        while !self.to_guest.is_empty() {
            let Some(chain) = active.queues[RECEIVEQ].pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            let mut bad = false;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                let mut offset = 0u32;
                while offset < desc.len() && !self.to_guest.is_empty() {
                    let (front, _) = self.to_guest.as_slices();
                    let n = front.len().min((desc.len() - offset) as usize).min(CHUNK);
                    let Some(addr) = desc.addr().0.checked_add(u64::from(offset)) else {
                        bad = true;
                        break;
                    };
                    if active
                        .mem
                        .write_slice(&front[..n], GuestAddress(addr))
                        .is_err()
                    {
                        bad = true;
                        break;
                    }
                    self.to_guest.drain(..n);
                    offset += n as u32;
                    written += n as u32;
                }
                if bad || self.to_guest.is_empty() {
                    break;
                }
            }
            if bad {
                self.stats.bad_chains += 1;
            }
            self.stats.bytes_to_guest += u64::from(written);
            if active.queues[RECEIVEQ]
                .add_used(&active.mem, head, written)
                .is_err()
            {
                self.stats.bad_chains += 1;
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used();
            self.drained.notify_all();
        }
    }

    /// Copies every pending transmit chain to the host.
    fn drain_transmit(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mut buf = [0u8; CHUNK];
        let mut used_any = false;
        while let Some(chain) = active.queues[TRANSMITQ].pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only() {
                    bad = true;
                    continue;
                }
                let mut offset = 0u32;
                while offset < desc.len() {
                    let n = ((desc.len() - offset) as usize).min(CHUNK);
                    let Some(addr) = desc.addr().0.checked_add(u64::from(offset)) else {
                        bad = true;
                        break;
                    };
                    if active
                        .mem
                        .read_slice(&mut buf[..n], GuestAddress(addr))
                        .is_err()
                    {
                        bad = true;
                        break;
                    }
                    if self.to_host.write_all(&buf[..n]).is_err() {
                        // The host went away; the VM is being torn down.
                        break;
                    }
                    self.stats.bytes_to_host += n as u64;
                    offset += n as u32;
                }
            }
            if bad {
                self.stats.bad_chains += 1;
            }
            if active.queues[TRANSMITQ]
                .add_used(&active.mem, head, 0)
                .is_err()
            {
                self.stats.bad_chains += 1;
            }
            used_any = true;
        }
        let _ = self.to_host.flush();
        if used_any {
            active.interrupt.signal_used();
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (u16 each), max_nr_ports (u32), emerg_wr (u32): an
        // 80x25 console with one port.
        let mut config = [0u8; 12];
        config[0..2].copy_from_slice(&80u16.to_le_bytes());
        config[2..4].copy_from_slice(&25u16.to_le_bytes());
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        data.fill(0);
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        if queues.len() != 2 {
            return Err(format!("a console has 2 queues, got {}", queues.len()));
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        self.fill_receive();
        self.drain_transmit();
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        match index as usize {
            RECEIVEQ => self.fill_receive(),
            TRANSMITQ => self.drain_transmit(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    //! The device model driven from the host side the way a guest driver
    //! drives it: registers through the transport, rings in guest memory.

    use super::*;
    use crate::vmm::virtio::{INT_VRING, MmioTransport};
    const MAGIC: u32 = 0x7472_6976;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;
    const QSTRIDE: u64 = 0x10000;
    const QSIZE: u16 = 16;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A virtio driver, as a guest kernel would be, over guest memory.
    struct Driver {
        mem: GuestMemoryMmap,
        dev: MmioTransport<Console>,
        sink: Sink,
        avail_idx: [u16; 2],
        used_seen: [u16; 2],
    }

    impl Driver {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let sink = Sink::default();
            let dev = MmioTransport::new(
                Console::new(Box::new(sink.clone())),
                mem.clone(),
                Interrupt::new(None),
            );
            Self {
                mem,
                dev,
                sink,
                avail_idx: [0; 2],
                used_seen: [0; 2],
            }
        }

        fn w(&mut self, offset: u64, value: u32) {
            self.dev.write(offset, &value.to_le_bytes());
        }

        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn base(q: usize) -> u64 {
            q as u64 * QSTRIDE
        }

        /// The whole handshake of virtio 1.2 section 3.1.1.
        fn init(&mut self) {
            assert_eq!(self.r(0x00), MAGIC);
            assert_eq!(self.r(0x04), 2);
            assert_eq!(self.r(0x08), DEVICE_ID);
            self.w(0x70, 0);
            self.w(0x70, 1);
            self.w(0x70, 1 | 2);
            self.w(0x14, 1);
            assert_eq!(self.r(0x10), 1, "VERSION_1 offered");
            self.w(0x24, 1);
            self.w(0x20, 1);
            self.w(0x24, 0);
            self.w(0x20, 0);
            self.w(0x70, 1 | 2 | 8);
            assert_eq!(self.r(0x70) & 8, 8, "features accepted");
            for q in 0..2 {
                let b = Self::base(q);
                self.w(0x30, q as u32);
                assert_eq!(self.r(0x34), u32::from(QUEUE_SIZE));
                self.w(0x38, u32::from(QSIZE));
                self.w(0x80, (b + DESC) as u32);
                self.w(0x84, 0);
                self.w(0x90, (b + AVAIL) as u32);
                self.w(0x94, 0);
                self.w(0xa0, (b + USED) as u32);
                self.w(0xa4, 0);
                self.w(0x44, 1);
            }
            self.w(0x70, 1 | 2 | 8 | 4);
            assert!(self.dev.is_activated(), "status {:#x}", self.r(0x70));
        }

        /// Writes descriptor `i` of queue `q`.
        fn desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = Self::base(q) + DESC + u64::from(i) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }

        /// Makes chain `head` available on queue `q` and notifies.
        fn offer(&mut self, q: usize, head: u16) {
            let b = Self::base(q);
            let slot = self.avail_idx[q] % QSIZE;
            self.mem
                .write_obj(head, GuestAddress(b + AVAIL + 4 + u64::from(slot) * 2))
                .unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx[q], GuestAddress(b + AVAIL + 2))
                .unwrap();
            self.w(0x50, q as u32);
        }

        /// Used entries since the last call: (head, len).
        fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let b = Self::base(q);
            let idx: u16 = self.mem.read_obj(GuestAddress(b + USED + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen[q] != idx {
                let slot = u64::from(self.used_seen[q] % QSIZE);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(b + USED + 4 + slot * 8))
                    .unwrap();
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(b + USED + 8 + slot * 8))
                    .unwrap();
                out.push((id, len));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }
    }

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    #[test]
    fn bytes_move_both_ways() {
        let mut d = Driver::new();
        d.init();
        // Guest -> host: a two-descriptor chain.
        d.mem.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        d.mem.write_slice(b"host", GuestAddress(0x9000)).unwrap();
        d.desc(TRANSMITQ, 0, 0x8000, 6, NEXT, 1);
        d.desc(TRANSMITQ, 1, 0x9000, 4, 0, 0);
        d.offer(TRANSMITQ, 0);
        assert_eq!(&*d.sink.0.lock().unwrap(), b"hello host");
        assert_eq!(d.used(TRANSMITQ), vec![(0, 0)]);
        assert_eq!(d.r(0x60) & INT_VRING, INT_VRING);
        d.w(0x64, INT_VRING);
        assert_eq!(d.r(0x60), 0);

        // Host -> guest: bytes wait until the guest offers a buffer.
        assert_eq!(d.dev.device_mut().push_from_host(b"hi guest"), 8);
        assert!(d.used(RECEIVEQ).is_empty());
        d.desc(RECEIVEQ, 0, 0xa000, 5, WRITE, 0);
        d.offer(RECEIVEQ, 0);
        assert_eq!(d.used(RECEIVEQ), vec![(0, 5)]);
        d.desc(RECEIVEQ, 1, 0xb000, 64, WRITE, 0);
        d.offer(RECEIVEQ, 1);
        assert_eq!(d.used(RECEIVEQ), vec![(1, 3)]);
        let mut got = [0u8; 8];
        d.mem
            .read_slice(&mut got[..5], GuestAddress(0xa000))
            .unwrap();
        d.mem
            .read_slice(&mut got[5..], GuestAddress(0xb000))
            .unwrap();
        assert_eq!(&got, b"hi guest");
        assert_eq!(d.dev.device().stats().bad_chains, 0);
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused_without_a_panic() {
        let mut d = Driver::new();
        d.init();
        d.desc(TRANSMITQ, 0, 0xffff_ffff_f000, 4096, 0, 0);
        d.offer(TRANSMITQ, 0);
        // Straddling the end of memory.
        d.desc(TRANSMITQ, 1, (1 << 20) - 8, 64, 0, 0);
        d.offer(TRANSMITQ, 1);
        // An address that overflows with the length.
        d.desc(TRANSMITQ, 2, u64::MAX - 2, 16, 0, 0);
        d.offer(TRANSMITQ, 2);
        assert_eq!(d.used(TRANSMITQ).len(), 3);
        assert_eq!(d.dev.device().stats().bad_chains, 3);

        d.dev.device_mut().push_from_host(b"data");
        d.desc(RECEIVEQ, 0, 0xffff_0000_0000, 16, WRITE, 0);
        d.offer(RECEIVEQ, 0);
        assert_eq!(d.dev.device().stats().bad_chains, 4);
    }

    #[test]
    fn oversized_lengths_cost_no_memory() {
        let mut d = Driver::new();
        d.init();
        // 4 GiB - 1 claimed over 1 MiB of memory: copied piecewise until
        // the first piece past the end fails.
        d.desc(TRANSMITQ, 0, 0x8000, u32::MAX, 0, 0);
        d.offer(TRANSMITQ, 0);
        assert_eq!(d.used(TRANSMITQ).len(), 1);
        assert_eq!(d.dev.device().stats().bad_chains, 1);
        assert!(d.sink.0.lock().unwrap().len() <= 1 << 20);
    }

    #[test]
    fn malformed_chains_are_rejected() {
        let mut d = Driver::new();
        d.init();
        // A loop: 0 -> 1 -> 0.
        d.desc(TRANSMITQ, 0, 0x8000, 4, NEXT, 1);
        d.desc(TRANSMITQ, 1, 0x8000, 4, NEXT, 0);
        d.offer(TRANSMITQ, 0);
        // A next index past the table.
        d.desc(TRANSMITQ, 2, 0x8000, 4, NEXT, 999);
        d.offer(TRANSMITQ, 2);
        // A head index past the table.
        d.offer(TRANSMITQ, 4000);
        // A write-only buffer on the transmit queue.
        d.desc(TRANSMITQ, 3, 0x8000, 4, WRITE, 0);
        d.offer(TRANSMITQ, 3);
        // A read-only buffer on the receive queue.
        d.dev.device_mut().push_from_host(b"x");
        d.desc(RECEIVEQ, 0, 0xa000, 4, 0, 0);
        d.offer(RECEIVEQ, 0);
        // The device still works afterwards.
        d.mem.write_slice(b"ok", GuestAddress(0x8000)).unwrap();
        d.desc(TRANSMITQ, 5, 0x8000, 2, 0, 0);
        d.offer(TRANSMITQ, 5);
        assert!(d.sink.0.lock().unwrap().ends_with(b"ok"));
        assert!(d.dev.device().stats().bad_chains >= 2);
    }

    #[test]
    fn host_bytes_are_bounded() {
        let mut d = Driver::new();
        d.init();
        let big = vec![1u8; TO_GUEST_CAPACITY + 100];
        assert_eq!(d.dev.device_mut().push_from_host(&big), TO_GUEST_CAPACITY);
        assert_eq!(d.dev.device_mut().push_from_host(&big), 0);
        assert_eq!(d.dev.device().room(), 0);
    }

    #[test]
    fn a_driver_that_skips_steps_does_not_activate_the_device() {
        let mut d = Driver::new();
        // DRIVER_OK without features or queues.
        d.w(0x70, 1);
        d.w(0x70, 1 | 2);
        d.w(0x70, 1 | 2 | 4);
        assert!(!d.dev.is_activated());
        assert_eq!(d.r(0x70) & STATUS_NEEDS_RESET_BIT, STATUS_NEEDS_RESET_BIT);
        // Features it was not offered.
        d.w(0x70, 0);
        d.w(0x70, 1 | 2);
        d.w(0x24, 0);
        d.w(0x20, 0xffff_ffff);
        d.w(0x70, 1 | 2 | 8);
        assert_eq!(d.r(0x70) & 8, 0);
        // Queue sizes that are not powers of two, or too large.
        d.w(0x70, 0);
        d.w(0x30, 0);
        d.w(0x38, 3);
        d.w(0x38, 1 << 20);
        d.w(0x30, 77);
        d.w(0x38, 8);
        d.w(0x44, 1);
        assert!(!d.dev.is_activated());
        // A used ring off its 4-byte alignment.
        d.w(0x70, 0);
        d.w(0x70, 1 | 2);
        d.w(0x24, 1);
        d.w(0x20, 1);
        d.w(0x70, 1 | 2 | 8);
        for q in 0..2u32 {
            d.w(0x30, q);
            d.w(0x38, 8);
            d.w(0x80, 0x1000 + q * 0x1000);
            d.w(0x90, 0x8000 + q * 0x1000);
            d.w(0xa0, 0x10002 + q * 0x1000);
            d.w(0x44, 1);
        }
        d.w(0x70, 1 | 2 | 8 | 4);
        assert!(!d.dev.is_activated());
        assert_eq!(d.r(0x70) & STATUS_NEEDS_RESET_BIT, STATUS_NEEDS_RESET_BIT);
        // Odd widths and unknown registers are ignored.
        d.dev.write(0x70, &[1, 2]);
        let mut wide = [0u8; 8];
        d.dev.read(0x00, &mut wide);
        assert_eq!(wide, [0; 8]);
        let mut cfg = [0u8; 64];
        d.dev.read(0x100 + 8, &mut cfg);
        d.dev.read(u64::MAX, &mut cfg);
    }

    const STATUS_NEEDS_RESET_BIT: u32 = 0x40;
}
