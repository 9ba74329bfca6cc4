//! Linux's 64-bit boot protocol, done by the VMM: the kernel ELF loaded at
//! its physical addresses, the initramfs below the MMIO gap, the zero page
//! with the e820 map and the command line, an identity map of the first 4 GiB,
//! and every vCPU put straight into long mode at the kernel's entry with
//! `rsi` pointing at the zero page.

use std::io::Cursor;

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{Cmdline, KernelLoader, elf::Elf, load_cmdline};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use super::VmmError;
use super::layout::*;

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a packed C struct of integers and arrays of them:
// every bit pattern is a valid value and it has no padding that could leak.
unsafe impl ByteValued for ZeroPage {}

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Where the loaded pieces ended up.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// The kernel's 64-bit entry point.
    pub entry: u64,
    /// The initramfs, if any: address and size.
    pub initrd: Option<(u64, u64)>,
}

/// Loads the kernel (an ELF such as `vmlinux`), the initramfs and the
/// command line, and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &Cmdline,
) -> Result<Loaded, VmmError> {
    let boot = |what: &str, e: &dyn std::fmt::Display| VmmError::Boot(format!("{what}: {e}"));
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| boot("loading the kernel ELF", &e))?;

    let low_ram_end = ram_end_below_gap(mem);
    let initrd = match initrd {
        None => None,
        Some(bytes) => {
            let size = bytes.len() as u64;
            // Page-aligned, as high as fits below the gap, above the kernel.
            let Some(addr) = low_ram_end.checked_sub(size).map(|a| a & !0xfff) else {
                return Err(VmmError::Boot(format!(
                    "the initramfs ({size} bytes) does not fit in guest memory"
                )));
            };
            if addr < result.kernel_end {
                return Err(VmmError::Boot(format!(
                    "the initramfs ({size} bytes) does not fit in guest memory above the kernel; \
                     give the VM more memory"
                )));
            }
            mem.write_slice(bytes, GuestAddress(addr))
                .map_err(|e| boot("writing the initramfs", &e))?;
            Some((addr, size))
        }
    };

    load_cmdline(mem, GuestAddress(CMDLINE), cmdline).map_err(|e| boot("the command line", &e))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| boot("the command line", &e))?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let mut entries = vec![(0u64, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + GuestMemoryRegion::len(region);
        let start = start.max(HIMEM_START);
        if end > start {
            entries.push((start, end - start));
        }
    }
    if entries.len() > params.e820_table.len() {
        return Err(VmmError::Boot("too many e820 entries".into()));
    }
    for (i, (addr, size)) in entries.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = E820_RAM;
    }
    params.e820_entries = entries.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&ZeroPage(params), GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| boot("the zero page", &e))?;
    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(Loaded {
        entry: result.kernel_load.raw_value(),
        initrd,
    })
}

fn ram_end_below_gap(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + GuestMemoryRegion::len(r))
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    let w = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|e| VmmError::Boot(format!("boot page tables: {e}")))
    };
    w(PDPTE | 0x03, PML4)?;
    for dir in 0..PDE_COUNT {
        w((PDE + dir * 0x1000) | 0x03, PDPTE + dir * 8)?;
    }
    for i in 0..512 * PDE_COUNT {
        // present, writable, page size (2 MiB)
        w((i << 21) | 0x83, PDE + i * 8)?;
    }
    Ok(())
}

/// Flat segments: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT + i as u64 * 8))
            .map_err(|e| VmmError::Boot(format!("boot GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
        .map_err(|e| VmmError::Boot(format!("boot IDT: {e}")))?;
    Ok(())
}

/// The guest's view of the CPU: what KVM supports, with each vCPU's own
/// APIC id and topology, and the hypervisor bit set.
pub fn normalize_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // APIC id, logical processor count, CLFLUSH line size (8 × 8 bytes).
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                // Hypervisor present.
                entry.ecx |= 1 << 31;
                // HTT when there is more than one logical processor.
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
            }
            0xb => entry.edx = u32::from(index),
            _ => {}
        }
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Registers, segments, FPU and MSRs of a vCPU about to enter the kernel.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), VmmError> {
    let kvm = |what: &str, e: kvm_ioctls::Error| VmmError::Kvm(format!("{what}: {e}"));

    let msrs = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&msrs).map_err(|e| VmmError::Kvm(format!("MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(|e| kvm("KVM_SET_MSRS", e))?;
    if written != msrs.as_slice().len() {
        tracing::debug!(
            written,
            wanted = msrs.as_slice().len(),
            "KVM took only some boot MSRs"
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| kvm("KVM_SET_FPU", e))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| kvm("KVM_GET_SREGS", e))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr3 = PML4;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| kvm("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| kvm("KVM_SET_REGS", e))?;
    Ok(())
}

/// LINT0 takes external interrupts (the PIC), LINT1 NMIs, as firmware
/// leaves them for Linux.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| VmmError::Kvm(format!("KVM_GET_LAPIC: {e}")))?;
    let mut set = |offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = b as _;
        }
    };
    set(APIC_LVT0, MODE_EXTINT);
    set(APIC_LVT1, MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| VmmError::Kvm(format!("KVM_SET_LAPIC: {e}")))
}

/// Creates guest memory for `mem_bytes`.
pub fn guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap, VmmError> {
    let ranges: Vec<_> = ram_regions(mem_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| VmmError::Memory(format!("mapping {mem_bytes} bytes of guest memory: {e}")))
}

/// The command line every guest gets, before the VMM adds its devices.
pub fn base_cmdline(extra: &str) -> Result<Cmdline, VmmError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX).map_err(|e| VmmError::Boot(format!("command line: {e}")))?;
    cmdline
        .insert_str(
            "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd",
        )
        .map_err(|e| VmmError::Boot(format!("command line: {e}")))?;
    if !extra.trim().is_empty() {
        cmdline
            .insert_str(extra.trim())
            .map_err(|e| VmmError::Boot(format!("command line {extra:?}: {e}")))?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let code = segment(GDT[1], 1);
        assert_eq!(
            (code.l, code.db, code.present, code.type_, code.s),
            (1, 0, 1, 0xb, 1)
        );
        assert_eq!(code.selector, 8);
        let data = segment(GDT[2], 2);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 3));
        assert_eq!(data.limit, 0xfffff);
        assert_eq!(segment(GDT[0], 0).unusable, 1);
    }

    #[test]
    fn the_zero_page_holds_the_e820_map_and_the_command_line() {
        let mem = guest_memory(64 << 20).unwrap();
        // A minimal ELF: one PT_LOAD of 4 bytes at 1 MiB, entry there.
        let elf = tiny_elf(HIMEM_START, &[0xf4, 0xf4, 0xf4, 0xf4]);
        let cmdline = base_cmdline("quiet").unwrap();
        let loaded = load(&mem, &elf, Some(&[7u8; 5000]), &cmdline).unwrap();
        assert_eq!(loaded.entry, HIMEM_START);
        let params: ZeroPage = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let p = params.0;
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.e820_entries }, 2);
        let (addr, size) = loaded.initrd.unwrap();
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (addr as u32, 5000)
        );
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        let mut line = vec![0u8; { p.hdr.cmdline_size } as usize];
        mem.read_slice(&mut line, GuestAddress(CMDLINE)).unwrap();
        assert!(String::from_utf8(line).unwrap().ends_with("quiet"));
        let byte: u8 = mem.read_obj(GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(byte, 0xf4);
    }

    #[test]
    fn an_initramfs_too_large_is_refused() {
        let mem = guest_memory(8 << 20).unwrap();
        let elf = tiny_elf(HIMEM_START, &[0xf4]);
        let err = load(
            &mem,
            &elf,
            Some(&vec![0u8; 9 << 20]),
            &base_cmdline("").unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = guest_memory(8 << 20).unwrap();
        assert!(load(&mem, b"not an elf at all", None, &base_cmdline("").unwrap()).is_err());
    }

    /// An ELF64 executable with one loadable segment.
    pub(crate) fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&addr.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
        f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes()); // vaddr
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes()); // paddr
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }
}
