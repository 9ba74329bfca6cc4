//! Scratch disks: each execution environment's `/tmp` is an ext4 file
//! system of EphemeralStorage bytes in a sparse file of the environment's
//! directory, loop-mounted there. It is storage, as on Lambda: its pages
//! are the page cache of a file, which the kernel writes back and reclaims
//! under a function's memory limit (a tmpfs's pages would count against
//! MemorySize and could not be reclaimed), and it is full at
//! EphemeralStorage (`ENOSPC`), however much disk the host has. In-process
//! Wasm environments get the same disk as their preopened `/tmp`; jails
//! bind it.
//!
//! Steps for one disk, in order: an empty file system of the size is made
//! once per size (`mkfs.ext4` into `<runtime>/scratch/`), copied sparsely
//! into the environment's directory, attached to a free loop device that
//! detaches itself once unmounted (`LO_FLAGS_AUTOCLEAR`), mounted
//! `nosuid,nodev` at `<env>/tmp`, opened to everyone (mode 1777, as
//! `/tmp` is). Dropping the disk unmounts it; the environment's directory,
//! image included, is removed after.
//!
//! Threat model: the function writes what it likes into its file system
//! (never mounted anywhere else, and made by kiln); it cannot reach the
//! image, the loop device or the mount. A server that dies leaves mounts
//! only in its own mount namespace, which dies with it (see `server`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes scratch disks; `None` where this host cannot (see [`Scratch::probe`]).
#[derive(Debug, Clone)]
pub struct Scratch {
    templates: PathBuf,
}

/// `ioctl` requests of `linux/loop.h`.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`, of which only the flags are set.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// One environment's mounted `/tmp`; unmounted when dropped.
#[derive(Debug)]
pub struct ScratchDisk {
    mount: PathBuf,
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        if let Ok(target) = cstring(&self.mount) {
            // SAFETY: a NUL-terminated path. MNT_DETACH: a jail that still
            // holds it lets go when its namespace ends.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl Scratch {
    /// Scratch disks with their empty file systems kept in `templates`,
    /// when this host can mount them (root, loop devices, `mkfs.ext4`):
    /// checked by making, mounting and filling a small one.
    pub fn probe(templates: PathBuf, scratch_dir: &Path) -> Result<Self, String> {
        let this = Self { templates };
        let dir = scratch_dir.join(format!("scratch-probe-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("tmp")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let result = this.mount(&dir, 1).and_then(|disk| {
            // One MiB fills; the next write finds the disk full.
            let file = disk.mount.join("fill");
            let big = vec![0u8; 2 << 20];
            match fs::write(&file, &big) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Ok(()),
                Err(e) => Err(e),
                Ok(()) => Err(io::Error::other("a 1 MiB disk took 2 MiB")),
            }
        });
        let _ = fs::remove_dir_all(&dir);
        result.map(|()| this).map_err(|e| {
            format!(
                "environments' /tmp cannot be a disk of its own here ({e}): it needs root, \
                 /dev/loop-control and mkfs.ext4 (Debian's e2fsprogs)"
            )
        })
    }

    /// The empty file system of `size_mb`, made once.
    fn template(&self, size_mb: u32) -> io::Result<PathBuf> {
        let path = self.templates.join(format!("ext4-{size_mb}m.img"));
        if path.is_file() {
            return Ok(path);
        }
        fs::create_dir_all(&self.templates)?;
        let tmp = self.templates.join(format!(
            ".tmp-ext4-{size_mb}m-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let file = fs::File::create(&tmp)?;
        file.set_len(u64::from(size_mb) << 20)?;
        drop(file);
        // No journal (nothing survives the environment), no reserved
        // blocks (the function gets all of it), inode tables left to the
        // kernel (mounted with noinit_itable: never zeroed, never read).
        let out = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                "-m",
                "0",
                "-L",
                "kiln-tmp",
            ])
            .arg(&tmp)
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("running mkfs.ext4: {e}")))?;
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::other(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Mounts a new disk of `size_mb` at `<env_dir>/tmp` (which exists),
    /// its image at `<env_dir>/tmp.img`.
    pub fn mount(&self, env_dir: &Path, size_mb: u32) -> io::Result<ScratchDisk> {
        let image = env_dir.join("tmp.img");
        sparse_copy(&self.template(size_mb)?, &image)?;
        let device = attach(&image)?;
        let mount = env_dir.join("tmp");
        let (source, target) = (cstring(&device.path)?, cstring(&mount)?);
        let options = CString::new("noinit_itable,errors=remount-ro").expect("static text");
        // SAFETY: NUL-terminated strings that outlive the call.
        check(unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                c"ext4".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME,
                options.as_ptr().cast(),
            )
        })?;
        let disk = ScratchDisk { mount };
        // The mount holds the device now; ours may go (AUTOCLEAR detaches
        // it when the mount does).
        drop(device);
        fs::set_permissions(&disk.mount, fs::Permissions::from_mode(0o1777))?;
        Ok(disk)
    }
}

/// A loop device attached to a file.
struct Attached {
    path: PathBuf,
    _fd: OwnedFd,
}

/// Attaches `image` to a free loop device that detaches itself once it is
/// neither open nor mounted.
fn attach(image: &Path) -> io::Result<Attached> {
    let file = fs::OpenOptions::new().read(true).write(true).open(image)?;
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the free device first: try again.
    for _ in 0..16 {
        // SAFETY: an ioctl without an argument on the control device.
        let number = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) })?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = match fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: plain data; all zeroes is a valid value.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = file.as_raw_fd() as u32;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` we own for the
        // length of the call.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if rc == 0 {
            return Ok(Attached {
                path,
                _fd: device.into(),
            });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(error);
        }
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

/// Copies `from` to `to` (new) keeping its holes: an empty file system's
/// image is a few hundred KiB of data in a file of its whole size.
fn sparse_copy(from: &Path, to: &Path) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = fs::File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(len)?;
    let mut offset: u64 = 0;
    let mut buf = vec![0u8; 256 << 10];
    while offset < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: only a hole is left.
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (data, hole) = (data as u64, (hole.max(data) as u64).min(len));
        src.seek(SeekFrom::Start(data))?;
        dst.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        offset = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = fs::File::create(&from).unwrap();
            f.set_len(8 << 20).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(5 << 20)).unwrap();
            f.write_all(b"middle").unwrap();
        }
        let to = dir.path().join("to");
        sparse_copy(&from, &to).unwrap();
        assert_eq!(fs::read(&from).unwrap(), fs::read(&to).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&to).unwrap().blocks() * 512 < 1 << 20);
    }

    #[test]
    fn a_scratch_disk_is_full_at_its_size_where_the_host_allows_one() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = match Scratch::probe(dir.path().join("templates"), dir.path()) {
            Ok(s) => s,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let env = dir.path().join("env");
        fs::create_dir_all(env.join("tmp")).unwrap();
        let disk = scratch.mount(&env, 4).unwrap();
        let mode = fs::metadata(env.join("tmp")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777);
        fs::write(env.join("tmp/a"), vec![1u8; 2 << 20]).unwrap();
        let err = fs::write(env.join("tmp/b"), vec![1u8; 4 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        drop(disk);
        assert!(!env.join("tmp/a").exists(), "unmounted");
    }
}
