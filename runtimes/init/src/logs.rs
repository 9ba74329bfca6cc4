//! The function's stdout and stderr: read from pipes into one bounded
//! buffer that each invocation drains. A flood is cut at the capacity (and
//! the cut reported), so the agent's memory stays flat.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kiln_wasm::CappedLog;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The shared buffer.
#[derive(Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<CappedLog>>,
}

impl LogBuffer {
    /// A buffer of at most `capacity` bytes between drains.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(CappedLog::new(capacity))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CappedLog> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends what fits.
    #[cfg(test)]
    pub fn push(&self, data: &[u8]) {
        self.lock().push(data);
    }

    /// Reads once from `fd` and appends, under one lock, so that readers of
    /// the same pipe keep the bytes in order.
    fn read_from(&self, fd: &OwnedFd) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let mut b = self.lock();
        let n = read_some(fd, &mut chunk)?;
        b.push(&chunk[..n]);
        Ok(n)
    }

    /// Takes everything since the last call, with a note of what was cut.
    pub fn take(&self) -> Vec<u8> {
        self.lock().take()
    }
}

/// A pipe being read into a [`LogBuffer`].
pub struct PipeReader {
    fd: Arc<AsyncFd<OwnedFd>>,
    buffer: LogBuffer,
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_some(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a buffer we own, of its own length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl PipeReader {
    /// Starts reading `fd` in the background.
    pub fn start(fd: OwnedFd, buffer: LogBuffer) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: `OwnedFd` owns an open descriptor and always reports that
        // same descriptor for as long as the `AsyncFd` holds it.
        let fd = Arc::new(
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?,
        );
        let reader = Self {
            fd: fd.clone(),
            buffer: buffer.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                match buffer.read_from(fd.get_ref()) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        Ok(reader)
    }

    /// Moves what is already in the pipe into the buffer now (before an
    /// invocation's result is sent, so its last lines are in its log).
    pub fn drain(&self) {
        for _ in 0..64 {
            match self.buffer.read_from(self.fd.get_ref()) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floods_are_cut_and_reported() {
        let b = LogBuffer::new(8);
        b.push(b"0123456789");
        let out = String::from_utf8(b.take()).unwrap();
        assert!(out.starts_with("01234567\n[kiln] 2 bytes"), "{out}");
        assert!(b.take().is_empty());
    }
}
