//! Where things live in a microVM's guest-physical address space.
//!
//! The same map Linux's 64-bit boot protocol expects from a boot loader:
//! the zero page, the command line and the boot page tables below 1 MiB, the
//! kernel from 1 MiB, RAM up to the MMIO gap below 4 GiB, and above 4 GiB
//! whatever RAM does not fit below it.

/// The GDT the boot vCPU starts with.
pub const BOOT_GDT: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT: u64 = 0x520;
/// The boot stack's top (grows down into free low memory).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Linux's `boot_params`, the "zero page"; `rsi` points here at entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// Page-map level 4 of the boot identity map.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE: u64 = 0xa000;
/// Page directories: four of 512 × 2 MiB pages, the first 4 GiB, so that
/// the MMIO gap is mapped too (a guest that never builds its own tables
/// reaches its devices).
pub const PDE: u64 = 0xb000;
/// How many page directories follow [`PDE`].
pub const PDE_COUNT: u64 = 4;
/// The kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Its capacity, NUL included (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB: virtio-mmio devices, the IOAPIC, the LAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Each virtio-mmio device gets one page of registers, in order from here.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device's window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first IRQ (GSI) given to virtio devices; 4 is the serial port's.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The serial port's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// The TSS KVM needs for real-mode emulation on Intel, out of the way.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The RAM regions of a guest with `mem_bytes` of memory: below the MMIO
/// gap, and above 4 GiB what does not fit below it.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// The address of virtio-mmio device `index`.
pub fn virtio_mmio_address(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        let big = 10240u64 << 20;
        let regions = ram_regions(big);
        assert_eq!(regions[0], (0, MMIO_GAP_START));
        assert_eq!(regions[1].0, 1 << 32);
        assert_eq!(regions[0].1 + regions[1].1, big);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT, 0x20),
            (BOOT_IDT, 0x8),
            (ZERO_PAGE, 0x1000),
            (BOOT_STACK - 0x100, 0x100),
            (PML4, 0x1000),
            (PDPTE, 0x1000),
            (PDE, PDE_COUNT * 0x1000),
            (CMDLINE, CMDLINE_MAX as u64),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        assert!(CMDLINE + (CMDLINE_MAX as u64) < EBDA_START);
    }
}
