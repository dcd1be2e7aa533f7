//! Guest memory and the boot-time structures the VMM writes into it: the
//! identity-mapped page tables, GDT, TSS and an empty IDT page, and the
//! guest ELF loaded through linux-loader.
//!
//! The layout is the guest ABI in docs/ARCHITECTURE.md; guests depend on
//! every address here, so change both together.

use std::io::Cursor;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Page-map level 4; PDPT and four page directories follow it.
pub const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
/// Gigabytes identity-mapped with 2 MiB pages (covers the MMIO hole).
const MAPPED_GIB: u64 = 4;
pub const GDT_ADDR: u64 = 0x7000;
/// The TSS and its I/O permission bitmap (all ports allowed) span
/// 0xa000..0xc069. The bitmap matters: this KVM does not honour
/// RFLAGS.IOPL, so ring-3 port I/O is allowed by the bitmap instead.
pub const TSS_ADDR: u64 = 0xa000;
const IOPB_OFFSET: u64 = 104;
const IOPB_BYTES: u64 = 65536 / 8;
pub const IDT_ADDR: u64 = 0x8000;
pub const IDT_LIMIT: u16 = 0xfff;
/// Interrupt stack (IST1) top; the stack spans 0x10000..0x20000.
pub const IST1_TOP: u64 = 0x20000;
/// Ring-0 stack for privilege changes (RSP0); spans 0x20000..0x30000.
pub const RSP0_TOP: u64 = 0x30000;
/// Boot stack pointer at entry; spans 0x30000..0x80000.
pub const BOOT_STACK: u64 = 0x80000;
/// Lowest address an ELF segment may use; everything below is the VMM's.
pub const LOAD_MIN: u64 = 0x10_0000;

pub const SEL_KERNEL_CODE: u16 = 0x08;
pub const SEL_KERNEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x28;
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10 kernel data
    0x00cf_f300_0000_ffff, // 0x18 user data, DPL3
    0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit, DPL3
];
/// Seven 8-byte slots: five segments and the 16-byte TSS descriptor.
pub const GDT_LIMIT: u16 = 7 * 8 - 1;
/// The TSS, the bitmap and the bitmap's terminating 0xff byte.
pub const TSS_LIMIT: u32 = (IOPB_OFFSET + IOPB_BYTES) as u32;

/// CR0: PE | MP | ET | NE | WP | PG, EM clear (the prebuilt core uses SSE).
pub const CR0: u64 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: SCE | LME | LMA.
pub const EFER: u64 = 1 | (1 << 8) | (1 << 10);

/// Smallest and largest guest memory: the tables need the first MiB, and
/// memory must end below the paravirtual MMIO window at 0xf000_0000.
pub const MEM_MIN: u64 = 2 << 20;
pub const MEM_MAX: u64 = 3 << 30;

/// Errors building guest memory or loading the image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memory size {0} bytes is outside {MEM_MIN}..={MEM_MAX} or not a multiple of 4 KiB")]
    MemorySize(u64),
    #[error("cannot allocate guest memory: {0}")]
    Allocate(String),
    #[error("writing boot tables failed")]
    Tables(#[from] vm_memory::GuestMemoryError),
    #[error("not a loadable x86-64 ELF: {0}")]
    Elf(String),
    #[error("the ELF needs memory up to {end:#x}, beyond the guest's {mem:#x} bytes")]
    TooBig { end: u64, mem: u64 },
}

/// Allocates zeroed guest memory of `size` bytes at guest-physical 0.
pub fn allocate(size: u64) -> Result<GuestMem, Error> {
    if !(MEM_MIN..=MEM_MAX).contains(&size) || !size.is_multiple_of(4096) {
        return Err(Error::MemorySize(size));
    }
    GuestMem::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|e| Error::Allocate(e.to_string()))
}

/// Writes page tables, GDT, TSS and a zeroed IDT page (the guest fills in
/// its own gates: it owns the handler addresses).
pub fn write_tables(mem: &GuestMem) -> Result<(), Error> {
    mem.write_obj(PDPT_ADDR | 7, GuestAddress(PML4_ADDR))?;
    for gib in 0..MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | 7, GuestAddress(PDPT_ADDR + gib * 8))?;
        for entry in 0..512u64 {
            let phys = (gib << 30) | (entry << 21);
            // present | writable | user | 2 MiB page
            mem.write_obj(phys | 0x87, GuestAddress(pd + entry * 8))?;
        }
    }
    for (i, desc) in GDT.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    let (tss_lo, tss_hi) = tss_descriptor(TSS_ADDR, TSS_LIMIT);
    mem.write_obj(tss_lo, GuestAddress(GDT_ADDR + u64::from(SEL_TSS)))?;
    mem.write_obj(tss_hi, GuestAddress(GDT_ADDR + u64::from(SEL_TSS) + 8))?;
    mem.write_obj(RSP0_TOP, GuestAddress(TSS_ADDR + 4))?;
    mem.write_obj(IST1_TOP, GuestAddress(TSS_ADDR + 0x24))?;
    // An all-zero I/O permission bitmap (memory starts zeroed): ring 3 may
    // use every port. The byte after it must be 0xff.
    mem.write_obj(IOPB_OFFSET as u16, GuestAddress(TSS_ADDR + 0x66))?;
    mem.write_obj(0xffu8, GuestAddress(TSS_ADDR + IOPB_OFFSET + IOPB_BYTES))?;
    Ok(())
}

/// A busy 64-bit TSS descriptor, as TR will hold it.
fn tss_descriptor(base: u64, limit: u32) -> (u64, u64) {
    let limit = u64::from(limit);
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

/// Loads an ELF image with linux-loader and returns its entry point.
///
/// linux-loader checks the header and copies the segments; this adds the
/// checks that matter to Duet: nothing may land below [`LOAD_MIN`] (the
/// tables live there) or past the end of memory, including `.bss`.
pub fn load_elf(mem: &GuestMem, image: &[u8], mem_size: u64) -> Result<u64, Error> {
    check_segments(image, mem_size)?;
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(LOAD_MIN)),
    )
    .map_err(|e| Error::Elf(e.to_string()))?;
    if result.kernel_end > mem_size {
        return Err(Error::TooBig {
            end: result.kernel_end,
            mem: mem_size,
        });
    }
    entry_point(image)
}

fn entry_point(image: &[u8]) -> Result<u64, Error> {
    read_u64(image, 24).ok_or_else(|| Error::Elf("truncated header".into()))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Walks the program headers before linux-loader does, so that a segment
/// outside guest memory is reported as such and not as a copy failure.
fn check_segments(image: &[u8], mem_size: u64) -> Result<(), Error> {
    if image.len() < 64 || &image[..4] != b"\x7fELF" {
        return Err(Error::Elf("no ELF magic".into()));
    }
    if image[4] != 2 || image[5] != 1 || read_u16(image, 18) != Some(62) {
        return Err(Error::Elf("not a 64-bit little-endian x86-64 ELF".into()));
    }
    let bad = || Error::Elf("program headers out of bounds".into());
    let phoff = read_u64(image, 32).ok_or_else(bad)? as usize;
    let phentsize = read_u16(image, 54).ok_or_else(bad)? as usize;
    let phnum = read_u16(image, 56).ok_or_else(bad)? as usize;
    if phentsize < 56 {
        return Err(bad());
    }
    let mut loads = 0;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let p_type = image
            .get(ph..ph + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(bad)?;
        if p_type != 1 {
            continue;
        }
        loads += 1;
        let paddr = read_u64(image, ph + 24).ok_or_else(bad)?;
        let filesz = read_u64(image, ph + 32).ok_or_else(bad)?;
        let memsz = read_u64(image, ph + 40).ok_or_else(bad)?;
        let offset = read_u64(image, ph + 8).ok_or_else(bad)?;
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > image.len() as u64)
        {
            return Err(Error::Elf("segment data past the end of the file".into()));
        }
        if memsz > 0 && paddr < LOAD_MIN {
            return Err(Error::Elf(format!(
                "segment at {paddr:#x} is below the load minimum {LOAD_MIN:#x}"
            )));
        }
        let end = paddr.checked_add(memsz.max(filesz)).ok_or_else(bad)?;
        if end > mem_size {
            return Err(Error::TooBig { end, mem: mem_size });
        }
    }
    if loads == 0 {
        return Err(Error::Elf("no loadable segments".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_memory_sizes() {
        assert!(matches!(allocate(1 << 20), Err(Error::MemorySize(_))));
        assert!(matches!(allocate((4 << 20) + 1), Err(Error::MemorySize(_))));
        assert!(matches!(allocate(4 << 30), Err(Error::MemorySize(_))));
        assert!(allocate(4 << 20).is_ok());
    }

    #[test]
    fn rejects_non_elf() {
        let mem = allocate(4 << 20).unwrap();
        assert!(matches!(
            load_elf(&mem, b"hello world, not an elf at all", 4 << 20),
            Err(Error::Elf(_))
        ));
        assert!(matches!(load_elf(&mem, &[], 4 << 20), Err(Error::Elf(_))));
    }

    #[test]
    fn tss_descriptor_splits_base() {
        let (lo, hi) = tss_descriptor(0x1234_5678_9abc_def0, 103);
        assert_eq!(lo & 0xffff, 103);
        assert_eq!((lo >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((lo >> 56) & 0xff, 0x9a);
        assert_eq!((lo >> 40) & 0xff, 0x8b);
        assert_eq!(hi, 0x1234_5678);
    }

    #[test]
    fn page_tables_identity_map_with_user_bit() {
        let mem = allocate(4 << 20).unwrap();
        write_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 7);
        let pd3: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 8))
            .unwrap();
        assert_eq!(pd3, (3 << 30) | (1 << 21) | 0x87);
    }
}
