//! A guest that needs no interrupts, for testing kiln's VMM on machines
//! where a Linux guest cannot boot.
//!
//! Entered as Linux is: 64-bit mode, identity-mapped, `rsi` pointing at the
//! zero page. It reports the e820 map and the command line on the serial
//! port, finds the virtio-mmio console the command line names, drives it
//! as a virtio driver does, and then echoes every chunk the host sends
//! with ASCII letters upper-cased, polling the used rings. A chunk holding
//! 0x04 (EOT) ends it: it says so and resets through the i8042.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{Ordering, fence};

global_asm!(
    ".section .text._start",
    ".globl _start",
    "_start:",
    "  mov rdi, rsi",
    "  lea rsp, [rip + {stack} + {size}]",
    "  call {main}",
    "2: hlt",
    "  jmp 2b",
    stack = sym STACK,
    size = const STACK_SIZE,
    main = sym guest_main,
);

const STACK_SIZE: usize = 64 * 1024;
static mut STACK: [u8; STACK_SIZE] = [0; STACK_SIZE];

const QSIZE: usize = 8;
const BUF: usize = 4096;

/// The used ring must be 4-byte aligned (virtio 1.2, 2.7.2).
#[repr(C, align(4))]
struct Used([u8; 4 + 8 * QSIZE + 2]);

#[repr(C, align(4096))]
struct Ring {
    desc: [[u8; 16]; QSIZE],
    avail: [u16; 2 + QSIZE + 1],
    used: Used,
}

static mut RINGS: [Ring; 2] = [const {
    Ring {
        desc: [[0; 16]; QSIZE],
        avail: [0; 2 + QSIZE + 1],
        used: Used([0; 4 + 8 * QSIZE + 2]),
    }
}; 2];

#[repr(C, align(4096))]
struct Buffers {
    rx: [u8; BUF],
    tx: [u8; BUF],
}

static mut BUFFERS: Buffers = Buffers {
    rx: [0; BUF],
    tx: [0; BUF],
};

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the VMM's emulated devices; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

fn print(s: &[u8]) {
    for &b in s {
        outb(0x3f8, b);
    }
}

fn print_hex(mut v: u64) {
    let mut digits = [0u8; 16];
    let mut n = 0;
    loop {
        let d = (v & 0xf) as u8;
        digits[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        n += 1;
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    print(b"0x");
    for i in (0..n).rev() {
        print(&digits[i..=i]);
    }
}

fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting while the VMM tears the VM down.
        unsafe { asm!("hlt") };
    }
}

fn fail(why: &[u8]) -> ! {
    print(b"kiln-testguest: FAIL ");
    print(why);
    print(b"\n");
    reset()
}

fn mmio_read(base: u64, offset: u64) -> u32 {
    // SAFETY: the VMM's virtio-mmio window, identity-mapped.
    unsafe { read_volatile((base + offset) as *const u32) }
}

fn mmio_write(base: u64, offset: u64, value: u32) {
    // SAFETY: the VMM's virtio-mmio window, identity-mapped.
    unsafe { write_volatile((base + offset) as *mut u32, value) }
}

/// Parses the hex address of `virtio_mmio.device=<size>@0x<addr>:<irq>`.
fn find_device(cmdline: &[u8]) -> Option<u64> {
    let key = b"virtio_mmio.device=";
    let start = cmdline.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &cmdline[start..];
    let at = rest.iter().position(|&b| b == b'@')?;
    let hex = rest.get(at + 3..)?;
    let mut addr = 0u64;
    for &b in hex {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        addr = addr.checked_mul(16)?.checked_add(u64::from(d))?;
    }
    Some(addr)
}

fn set_desc(q: usize, i: usize, addr: u64, len: u32, flags: u16) {
    // SAFETY: single-threaded guest; the rings are ours until offered.
    let d = unsafe { &mut (*addr_of_mut!(RINGS))[q].desc[i] };
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&0u16.to_le_bytes());
}

fn offer(base: u64, q: usize, head: u16, avail_idx: &mut u16) {
    // SAFETY: the avail ring of queue q; the device only reads it.
    unsafe {
        let ring = addr_of_mut!((*addr_of_mut!(RINGS))[q].avail);
        let slot = 2 + (*avail_idx as usize % QSIZE);
        write_volatile(&mut (*ring)[slot], head);
        fence(Ordering::SeqCst);
        *avail_idx = avail_idx.wrapping_add(1);
        write_volatile(&mut (*ring)[1], *avail_idx);
    }
    fence(Ordering::SeqCst);
    mmio_write(base, 0x50, q as u32);
}

/// Waits for the used ring of `q` to pass `seen`; returns the used length.
fn wait_used(q: usize, seen: &mut u16) -> u32 {
    loop {
        // SAFETY: the used ring of queue q; the device writes it.
        let (idx, len) = unsafe {
            let used = addr_of!((*addr_of!(RINGS))[q].used.0) as *const u8;
            let idx = read_volatile(used.add(2) as *const u16);
            fence(Ordering::SeqCst);
            let slot = (*seen as usize) % QSIZE;
            let len = read_volatile(used.add(4 + slot * 8 + 4) as *const u32);
            (idx, len)
        };
        if idx != *seen {
            *seen = seen.wrapping_add(1);
            return len;
        }
        core::hint::spin_loop();
    }
}

extern "C" fn guest_main(zero_page: u64) -> ! {
    print(b"kiln-testguest: booted\n");
    // SAFETY: the zero page the VMM wrote, identity-mapped.
    let (e820_entries, cmd_ptr, cmd_size) = unsafe {
        (
            read_volatile((zero_page + 0x1e8) as *const u8),
            read_volatile((zero_page + 0x228) as *const u32),
            read_volatile((zero_page + 0x238) as *const u32),
        )
    };
    print(b"kiln-testguest: e820 entries ");
    print_hex(u64::from(e820_entries));
    print(b"\n");
    // SAFETY: the command line the zero page points at.
    let cmdline = unsafe {
        core::slice::from_raw_parts(cmd_ptr as usize as *const u8, (cmd_size as usize).min(2048))
    };
    print(b"kiln-testguest: cmdline ");
    print(cmdline);
    print(b"\n");
    let Some(base) = find_device(cmdline) else {
        fail(b"no virtio_mmio.device on the command line")
    };
    print(b"kiln-testguest: virtio-mmio at ");
    print_hex(base);
    print(b"\n");
    if mmio_read(base, 0x00) != 0x7472_6976 || mmio_read(base, 0x04) != 2 {
        fail(b"not a virtio-mmio v2 device");
    }
    if mmio_read(base, 0x08) != 3 {
        fail(b"not a console");
    }
    mmio_write(base, 0x70, 0);
    mmio_write(base, 0x70, 1);
    mmio_write(base, 0x70, 3);
    mmio_write(base, 0x14, 1);
    if mmio_read(base, 0x10) & 1 == 0 {
        fail(b"no VIRTIO_F_VERSION_1");
    }
    mmio_write(base, 0x24, 1);
    mmio_write(base, 0x20, 1);
    mmio_write(base, 0x24, 0);
    mmio_write(base, 0x20, 0);
    mmio_write(base, 0x70, 11);
    if mmio_read(base, 0x70) & 8 == 0 {
        fail(b"features refused");
    }
    for q in 0..2u32 {
        mmio_write(base, 0x30, q);
        if (mmio_read(base, 0x34) as usize) < QSIZE {
            fail(b"queue too small");
        }
        mmio_write(base, 0x38, QSIZE as u32);
        // SAFETY: addresses of our own statics, identity-mapped.
        let (desc, avail, used) = unsafe {
            let r = addr_of!((*addr_of!(RINGS))[q as usize]);
            (
                addr_of!((*r).desc) as u64,
                addr_of!((*r).avail) as u64,
                addr_of!((*r).used) as u64,
            )
        };
        mmio_write(base, 0x80, desc as u32);
        mmio_write(base, 0x84, (desc >> 32) as u32);
        mmio_write(base, 0x90, avail as u32);
        mmio_write(base, 0x94, (avail >> 32) as u32);
        mmio_write(base, 0xa0, used as u32);
        mmio_write(base, 0xa4, (used >> 32) as u32);
        mmio_write(base, 0x44, 1);
    }
    mmio_write(base, 0x70, 15);
    if mmio_read(base, 0x70) & 0x40 != 0 {
        fail(b"device needs reset after DRIVER_OK");
    }
    print(b"kiln-testguest: virtio console ready\n");

    // SAFETY: addresses of our own buffers.
    let (rx, tx) = unsafe {
        (
            addr_of!((*addr_of!(BUFFERS)).rx) as u64,
            addr_of!((*addr_of!(BUFFERS)).tx) as u64,
        )
    };
    let (mut rx_avail, mut rx_used, mut tx_avail, mut tx_used) = (0u16, 0u16, 0u16, 0u16);
    let mut total: u64 = 0;
    loop {
        set_desc(0, 0, rx, BUF as u32, 2);
        offer(base, 0, 0, &mut rx_avail);
        let len = (wait_used(0, &mut rx_used) as usize).min(BUF);
        let mut done = false;
        // SAFETY: the device finished with both buffers (used ring).
        unsafe {
            let b = &mut *addr_of_mut!(BUFFERS);
            for i in 0..len {
                let c = b.rx[i];
                done |= c == 0x04;
                b.tx[i] = c.to_ascii_uppercase();
            }
        }
        total += len as u64;
        set_desc(1, 0, tx, len as u32, 0);
        offer(base, 1, 0, &mut tx_avail);
        wait_used(1, &mut tx_used);
        if done {
            break;
        }
    }
    print(b"kiln-testguest: echoed ");
    print_hex(total);
    print(b" bytes, done\n");
    reset()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail(b"panic")
}
