//! The MP table (Intel MultiProcessor Specification 1.4): how a guest
//! without ACPI, as kiln's is, learns its CPUs, its I/O APIC and how ISA
//! interrupts reach it. Written at the top of conventional memory, where
//! Linux looks for the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VmmError;
use super::layout::EBDA_START;

/// Where the I/O APIC and local APICs sit (the architectural defaults).
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// ISA IRQs routed through the I/O APIC.
const IRQS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Most vCPUs one table can describe within the 1 KiB it may occupy.
pub const MAX_CPUS: u8 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The table for `cpus` vCPUs, as bytes to place at `at`.
pub fn build(cpus: u8, at: u64) -> Result<Vec<u8>, VmmError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(VmmError::Config(format!(
            "{cpus} vCPUs: the MP table takes 1-{MAX_CPUS}"
        )));
    }
    let ioapic_id = cpus + 1;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        entries.push(0u8); // processor
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(if cpu == 0 { 0b11 } else { 0b01 }); // enabled, bootstrap
        entries.extend_from_slice(&0x0600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for irq in 0..IRQS {
        // I/O interrupt: INT, conforming polarity and trigger, bus 0.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0 and NMI to LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KILN    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut pointer = Vec::with_capacity(16);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&((at + 16) as u32).to_le_bytes());
    pointer.push(1); // length in 16-byte units
    pointer.push(4);
    pointer.push(0); // checksum, below
    pointer.extend_from_slice(&[0; 5]);
    pointer[10] = checksum(&pointer);

    let mut out = pointer;
    out.extend_from_slice(&table);
    if out.len() > 1024 {
        return Err(VmmError::Config(
            "the MP table does not fit in 1 KiB".into(),
        ));
    }
    Ok(out)
}

/// Writes the table for `cpus` vCPUs at the top of conventional memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), VmmError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| VmmError::Boot(format!("the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_checks_out_as_a_guest_reads_it() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let at = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(at, EBDA_START + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            // Walk the entries: processors are 20 bytes, the rest 8.
            let (mut off, mut processors, mut seen) = (44, 0, 0);
            while off < len {
                let size = if table[off] == 0 { 20 } else { 8 };
                if table[off] == 0 {
                    processors += 1;
                    assert_eq!(
                        table[off + 3] & 2 != 0,
                        table[off + 1] == 0,
                        "only CPU 0 boots"
                    );
                }
                off += size;
                seen += 1;
            }
            assert_eq!(off, len);
            assert_eq!((processors, seen), (cpus as usize, count));
        }
        assert!(build(0, 0).is_err());
        assert!(build(MAX_CPUS + 1, 0).is_err());
    }

    #[test]
    fn it_lands_where_linux_scans_and_outside_usable_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 4).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        // Linux scans the last KiB of conventional memory (639-640 KiB).
        assert_eq!(EBDA_START, 0x9fc00);
    }
}
