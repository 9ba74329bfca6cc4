//! The guest image's initramfs, written by kiln: a cpio archive in the
//! "newc" format the kernel unpacks into its root file system before it
//! runs `/init`. The image holds the agent as `/init` and the directories
//! it mounts on; code and layers arrive later over the channel.

use std::io::Write;

/// One entry of the archive.
#[derive(Debug, Clone)]
pub enum Entry<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// Writes a newc archive of `entries` (parents before children) with the
/// trailer.
pub fn write(entries: &[Entry<'_>], out: &mut impl Write) -> std::io::Result<()> {
    let mut offset = 0u64;
    for (ino, entry) in entries.iter().enumerate() {
        let (path, mode, data): (&str, u32, &[u8]) = match entry {
            Entry::Dir { path, mode } => (path, S_IFDIR | (mode & 0o7777), &[]),
            Entry::File { path, mode, data } => (path, S_IFREG | (mode & 0o7777), data),
        };
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        offset += header(out, ino as u32 + 1, mode, nlink, path, data.len())?;
        out.write_all(data)?;
        offset += data.len() as u64;
        offset += pad(out, offset)?;
    }
    offset += header(out, 0, 0, 1, "TRAILER!!!", 0)?;
    pad(out, offset)?;
    Ok(())
}

/// The guest image: the agent at `/init` and the mount points.
pub fn guest_image(agent: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(agent.len() + 4096);
    let entries = [
        Entry::Dir {
            path: "dev",
            mode: 0o755,
        },
        Entry::Dir {
            path: "proc",
            mode: 0o555,
        },
        Entry::Dir {
            path: "sys",
            mode: 0o555,
        },
        Entry::Dir {
            path: "tmp",
            mode: 0o1777,
        },
        Entry::Dir {
            path: "var",
            mode: 0o755,
        },
        Entry::Dir {
            path: "var/task",
            mode: 0o755,
        },
        Entry::Dir {
            path: "var/runtime",
            mode: 0o755,
        },
        Entry::Dir {
            path: "opt",
            mode: 0o755,
        },
        Entry::Dir {
            path: "etc",
            mode: 0o755,
        },
        Entry::File {
            path: "init",
            mode: 0o755,
            data: agent,
        },
    ];
    write(&entries, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    size: usize,
) -> std::io::Result<u64> {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: reproducible images
        size as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        namesize as u32,
        0, // check
    ];
    let mut h = String::with_capacity(110);
    h.push_str("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let written = 110 + namesize as u64;
    Ok(written + pad(out, written)?)
}

/// Pads to the next 4-byte boundary given `offset` bytes written.
fn pad(out: &mut impl Write, offset: u64) -> std::io::Result<u64> {
    let n = (4 - offset % 4) % 4;
    out.write_all(&[0u8; 3][..n as usize])?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a newc archive back: (name, mode, data).
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(b[110 + namesize - 1], 0);
            let head = (110 + namesize).div_ceil(4) * 4;
            let data = b[head..head + size].to_vec();
            let consumed = (head + size).div_ceil(4) * 4;
            assert_eq!((total - b.len() + consumed) % 4, 0);
            b = &b[consumed..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn the_image_holds_the_agent_as_init() {
        let agent = b"\x7fELF pretend agent, odd length";
        let image = guest_image(agent);
        assert_eq!(image.len() % 4, 0);
        let entries = parse(&image);
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.1, 0o100755);
        assert_eq!(init.2, agent);
        let task = entries.iter().find(|e| e.0 == "var/task").unwrap();
        assert_eq!(task.1, 0o040755);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert!(
            names.iter().position(|n| *n == "var") < names.iter().position(|n| *n == "var/task")
        );
    }

    #[test]
    fn the_image_is_reproducible() {
        assert_eq!(guest_image(b"abc"), guest_image(b"abc"));
    }
}
