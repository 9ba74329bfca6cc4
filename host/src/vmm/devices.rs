//! The legacy devices a microVM has: the 8250 serial console (whose output
//! becomes the environment's log, bounded) and the i8042 controller, whose
//! reset command is how the guest powers off (`reboot=k`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::Serial;
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// A byte buffer that keeps at most `max` bytes: the first `max`, and how
/// many more were dropped. A guest can print forever; the host keeps a
/// bounded amount.
#[derive(Debug, Clone)]
pub struct BoundedLog {
    inner: Arc<Mutex<LogState>>,
}

struct LogState {
    bytes: Vec<u8>,
    max: usize,
    dropped: u64,
    /// Also written through as it arrives (within the same bound), so
    /// that a VM killed from outside still leaves its console behind.
    tee: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for LogState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogState")
            .field("len", &self.bytes.len())
            .field("max", &self.max)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl BoundedLog {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogState {
                bytes: Vec::new(),
                max,
                dropped: 0,
                tee: None,
            })),
        }
    }

    /// A log that also writes what it keeps to `tee` as it arrives.
    pub fn with_tee(max: usize, tee: Box<dyn Write + Send>) -> Self {
        let log = Self::new(max);
        log.inner.lock().unwrap_or_else(|p| p.into_inner()).tee = Some(tee);
        log
    }

    /// Takes what was logged so far, and the count of bytes dropped.
    pub fn take(&self) -> (Vec<u8>, u64) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut s.dropped);
        (std::mem::take(&mut s.bytes), dropped)
    }

    /// What was logged so far, copied.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .clone()
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = s.max.saturating_sub(s.bytes.len());
        let n = room.min(buf.len());
        s.bytes.extend_from_slice(&buf[..n]);
        s.dropped += (buf.len() - n) as u64;
        if n > 0
            && let Some(tee) = &mut s.tee
        {
            let _ = tee.write_all(&buf[..n]);
            let _ = tee.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises the serial port's interrupt through an irqfd, when there is one.
pub struct SerialTrigger(Option<EventFd>);

impl vm_superio::Trigger for SerialTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// The port-I/O devices of a VM.
pub struct LegacyDevices {
    serial: Serial<SerialTrigger, NoEvents, BoundedLog>,
    /// Set when the guest asked for a reset or power-off.
    pub stop: Arc<AtomicBool>,
}

impl LegacyDevices {
    pub fn new(log: BoundedLog, serial_irq: Option<EventFd>, stop: Arc<AtomicBool>) -> Self {
        Self {
            serial: Serial::new(SerialTrigger(serial_irq), log),
            stop,
        }
    }

    /// A guest `in`. Ports nobody decodes read as all ones, as on real buses.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - SERIAL_PORT) as u8);
            }
            I8042_COMMAND if data.len() == 1 => data[0] = 0,
            I8042_DATA if data.len() == 1 => data[0] = 0,
            _ => {}
        }
    }

    /// A guest `out`.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                let _ = self.serial.write((p - SERIAL_PORT) as u8, data[0]);
            }
            I8042_COMMAND if data == [I8042_RESET] => {
                self.stop.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_a_bounded_prefix() {
        let mut log = BoundedLog::new(10);
        log.write_all(b"0123456789abcdef").unwrap();
        log.write_all(b"more").unwrap();
        let (bytes, dropped) = log.take();
        assert_eq!(bytes, b"0123456789");
        assert_eq!(dropped, 10);
    }

    #[test]
    fn serial_output_and_i8042_reset() {
        let log = BoundedLog::new(1 << 10);
        let stop = Arc::new(AtomicBool::new(false));
        let mut dev = LegacyDevices::new(log.clone(), None, stop.clone());
        for b in b"hi\n" {
            dev.pio_write(SERIAL_PORT, &[*b]);
        }
        assert_eq!(log.snapshot(), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        dev.pio_read(SERIAL_PORT + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        dev.pio_write(I8042_COMMAND, &[0x01]);
        assert!(!stop.load(Ordering::SeqCst));
        dev.pio_write(I8042_COMMAND, &[I8042_RESET]);
        assert!(stop.load(Ordering::SeqCst));
        // Unknown ports float high; odd sizes are ignored.
        let mut w = [0u8; 4];
        dev.pio_read(0x1234, &mut w);
        assert_eq!(w, [0xff; 4]);
        dev.pio_write(SERIAL_PORT, &[1, 2, 3]);
    }
}
