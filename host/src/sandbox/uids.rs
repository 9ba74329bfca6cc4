//! Host uids for environments, in blocks that no two kiln servers on one
//! host share: a server takes the first free block when it starts and
//! holds it (an `flock` on the block's file under `/run/kiln/uids/`) for
//! its life; the lock goes with the process, however it ends. Each of the
//! server's environments (and VMM processes) then runs as a host uid of its
//! block that no other user of the host has (blocks start at 2^30), mapped
//! inside the environment's user namespace to the function's uid.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first host uid of block 0.
const BASE: u32 = 1 << 30;
/// Uids per block.
pub const BLOCK: u32 = 65_536;
/// Blocks on one host: kiln servers that may run there at once.
const BLOCKS: u32 = 4096;

/// A block of host uids held by this server.
#[derive(Debug)]
pub struct UidBlock {
    first: u32,
    next: AtomicU32,
    _lock: fs::File,
}

impl UidBlock {
    /// Takes the first block no other server holds, registered in `dir`
    /// (`/run/kiln/uids` on a host: a tmpfs, so a reboot frees them all).
    pub fn acquire(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for n in 0..BLOCKS {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{n}.lock")))?;
            // SAFETY: flock on a descriptor we own and keep open.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self {
                    first: BASE + n * BLOCK,
                    next: AtomicU32::new(0),
                    _lock: file,
                });
            }
        }
        Err(io::Error::other(format!(
            "all {BLOCKS} uid blocks of this host are held by other kiln servers"
        )))
    }

    /// The block's first uid.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// A uid of the block for a new environment, from `offset` (the part
    /// of the block a kind of sandbox uses) through `offset + span`,
    /// round-robin.
    pub fn next(&self, offset: u32, span: u32) -> u32 {
        let span = span.clamp(1, BLOCK - offset.min(BLOCK - 1));
        self.first + offset + self.next.fetch_add(1, Ordering::Relaxed) % span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_servers_never_share_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let a = UidBlock::acquire(dir.path()).unwrap();
        let b = UidBlock::acquire(dir.path()).unwrap();
        assert_ne!(a.first(), b.first());
        assert!(a.first() >= BASE && b.first() >= BASE);
        let uid = a.next(0, 60_000);
        assert!((a.first()..a.first() + BLOCK).contains(&uid));
        assert!(!(b.first()..b.first() + BLOCK).contains(&uid));
        // A block is free again once its holder is gone.
        let first = a.first();
        drop(a);
        let c = UidBlock::acquire(dir.path()).unwrap();
        assert_eq!(c.first(), first);
    }
}
