//! Guest memory as the VMM holds it, and the set of pages written since a
//! point in time.
//!
//! Re-protection copies guest memory to a new backup while the guest runs
//! (pre-copy), so it must learn which pages changed between rounds. KVM's
//! dirty log sees only the guest's own stores; the VMM's writes (a received
//! frame copied into an RX buffer, a used-ring entry) never reach it. So
//! guest memory carries vm-memory's [`AtomicBitmap`], which marks every
//! page written through vm-memory's API, and [`DirtyPages`] is the union
//! of the two. Every VMM write into guest memory must therefore go through
//! vm-memory (`Bytes`, `VolatileSlice`, virtio-queue), never a raw pointer,
//! once tracking may be on; boot-time writes (tables, the ELF) come before
//! any tracking and are exempt.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory with a page bitmap of the VMM's own writes. A clone is a
/// new handle on the same mapping (and the same bitmap).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// The page size of dirty tracking: KVM's and the host's (x86-64).
pub const PAGE_SIZE: u64 = 4096;

/// A set of guest pages, one bit per 4 KiB page from guest-physical 0 to
/// the end of memory; bit `i % 64` of word `i / 64` is page `i`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DirtyPages {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        DirtyPages {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Every page of memory of `mem_size` bytes: the first pre-copy round.
    pub fn all(mem_size: u64) -> Self {
        let mut d = DirtyPages::new(mem_size.div_ceil(PAGE_SIZE));
        for p in 0..d.pages {
            d.set(p);
        }
        d
    }

    /// How many pages the set spans (dirty or not).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks page `page`; pages past the end are ignored (they are not
    /// guest memory).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// True if page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// ORs `bits` (a bitmap in the same layout) in, starting at page
    /// `first_page` (a memory slot's first page). A misaligned start is
    /// handled bit by bit.
    pub fn or_bitmap(&mut self, first_page: u64, bits: &[u64]) {
        if first_page.is_multiple_of(64) {
            let at = (first_page / 64) as usize;
            for (w, b) in self.words.iter_mut().skip(at).zip(bits) {
                *w |= *b;
            }
            self.clear_tail();
            return;
        }
        for (i, word) in bits.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                self.set(first_page + i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
    }

    /// ORs another set over the same memory in.
    pub fn union(&mut self, other: &DirtyPages) {
        self.or_bitmap(0, &other.words);
    }

    /// Keeps bits past `pages` clear, so that `count` and `iter` never
    /// name a page outside memory.
    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// The number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True if no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The page indices in the set within `start..end`, in increasing
    /// order.
    pub fn iter_range(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        let end = end.min(self.pages);
        (start..end).filter(move |&p| self.contains(p))
    }

    /// The page indices in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, word)| {
            let mut w = *word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

/// The whole bitmap of one region: the trait's `bitmap()` is a slice view
/// without get-and-reset, the mmap region underneath has the bitmap itself.
fn region_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// The size of guest memory: the end of its highest region.
pub fn mem_size(mem: &GuestMem) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// The pages the VMM wrote through vm-memory since the last call, and
/// clears them.
pub fn take_vmm_writes(mem: &GuestMem) -> DirtyPages {
    let mut d = DirtyPages::new(mem_size(mem).div_ceil(PAGE_SIZE));
    for region in mem.iter() {
        let bits = region_bitmap(region).get_and_reset();
        d.or_bitmap(region.start_addr().0 / PAGE_SIZE, &bits);
    }
    d
}

/// Forgets the VMM's writes so far (tracking starts now).
pub fn clear_vmm_writes(mem: &GuestMem) {
    for region in mem.iter() {
        region_bitmap(region).reset();
    }
}

/// Copies the pages in `pages` from `src` to `dst` (memories of the same
/// size) through vm-memory: a pre-copy round done in one process, as the
/// tests do; a transfer between hosts sends the same pages over the wire.
pub fn copy_pages(
    src: &GuestMem,
    dst: &GuestMem,
    pages: &DirtyPages,
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::{Bytes, GuestAddress};
    let mut buf = [0u8; PAGE_SIZE as usize];
    for page in pages.iter() {
        let at = GuestAddress(page * PAGE_SIZE);
        src.read_slice(&mut buf, at)?;
        dst.write_slice(&buf, at)?;
    }
    Ok(())
}

/// CRC-32 of one page's bytes: the unit of the handover digest.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// The handover digest of memory whose pages have these CRCs (page 0
/// first): a CRC-32 over the page CRCs. A survivor keeps the CRC of every
/// page as it sends it during pre-copy, so at the pause it hashes only the
/// last dirty pages and this array, not all of memory (about 1.5 ms per
/// 64 MiB here, 20-60 ms at 512 MiB under load); the joiner computes the
/// same from its memory with [`page_digest`].
pub fn digest_of_page_crcs(crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for c in crcs {
        h.update(&c.to_le_bytes());
    }
    h.finalize()
}

/// The CRC of every page of `mem`, read now.
pub fn page_crcs(mem: &GuestMem) -> Result<Vec<u32>, vm_memory::GuestMemoryError> {
    use vm_memory::{Bytes, GuestAddress};
    let pages = mem_size(mem) / PAGE_SIZE;
    let mut buf = [0u8; PAGE_SIZE as usize];
    let mut out = Vec::with_capacity(pages as usize);
    for page in 0..pages {
        mem.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))?;
        out.push(page_crc(&buf));
    }
    Ok(out)
}

/// The handover digest of `mem` as it is now (see [`digest_of_page_crcs`]).
pub fn page_digest(mem: &GuestMem) -> Result<u32, vm_memory::GuestMemoryError> {
    Ok(digest_of_page_crcs(&page_crcs(mem)?))
}

/// [`page_digest`] of a memory whose pages outside `written` are known to
/// be zero (a fresh machine's: nothing but the VMM has written it, and
/// vm-memory's bitmap saw every such write). Reading an untouched page
/// costs a page fault, about 10 µs here: a joiner of a 512 MiB guest that
/// read them all would take over a second.
pub fn page_digest_of_written(
    mem: &GuestMem,
    written: &DirtyPages,
) -> Result<u32, vm_memory::GuestMemoryError> {
    Ok(digest_of_page_crcs(&page_crcs_of_written(mem, written)?))
}

/// The page CRCs behind [`page_digest_of_written`].
pub fn page_crcs_of_written(
    mem: &GuestMem,
    written: &DirtyPages,
) -> Result<Vec<u32>, vm_memory::GuestMemoryError> {
    use vm_memory::{Bytes, GuestAddress};
    let pages = mem_size(mem) / PAGE_SIZE;
    let mut buf = [0u8; PAGE_SIZE as usize];
    let zero = page_crc(&buf);
    let mut crcs = vec![zero; pages as usize];
    for page in written.iter() {
        if let Some(c) = crcs.get_mut(page as usize) {
            mem.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))?;
            *c = page_crc(&buf);
        }
    }
    Ok(crcs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_page_digest_follows_every_page() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let zero = page_digest(&mem).unwrap();
        let mut crcs = page_crcs(&mem).unwrap();
        assert_eq!(digest_of_page_crcs(&crcs), zero);
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        assert_ne!(page_digest(&mem).unwrap(), zero);
        // Updating only the written page's CRC gives the same digest.
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(0x5000)).unwrap();
        crcs[5] = page_crc(&page);
        assert_eq!(digest_of_page_crcs(&crcs), page_digest(&mem).unwrap());
        // A fresh memory: only the written pages need reading.
        let fresh = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        clear_vmm_writes(&fresh);
        fresh.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        let written = take_vmm_writes(&fresh);
        assert_eq!(
            page_digest_of_written(&fresh, &written).unwrap(),
            page_digest(&mem).unwrap()
        );
    }

    #[test]
    fn pages_set_count_and_iterate() {
        let mut d = DirtyPages::new(130);
        assert!(d.is_empty());
        for p in [0, 63, 64, 129, 130, 1000] {
            d.set(p);
        }
        assert_eq!(d.count(), 4);
        assert_eq!(d.iter().collect::<Vec<_>>(), [0, 63, 64, 129]);
        assert!(d.contains(129) && !d.contains(130) && !d.contains(1));
        assert_eq!(DirtyPages::all(130 * 4096 - 1).count(), 130);
    }

    #[test]
    fn bitmaps_merge_at_any_page() {
        let mut d = DirtyPages::new(256);
        d.or_bitmap(64, &[0b101]);
        d.or_bitmap(3, &[1 << 63 | 1]);
        assert_eq!(d.iter().collect::<Vec<_>>(), [3, 64, 66]);
        // Bits past the end never count.
        let mut e = DirtyPages::new(65);
        e.or_bitmap(0, &[0, u64::MAX]);
        assert_eq!(e.iter().collect::<Vec<_>>(), [64]);
        d.union(&DirtyPages::all(256 * 4096));
        assert_eq!(d.count(), 256);
    }

    #[test]
    fn vmm_writes_through_vm_memory_are_tracked_and_cleared() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        clear_vmm_writes(&mem);
        assert!(take_vmm_writes(&mem).is_empty());
        mem.write_obj(7u64, GuestAddress(0x3ffc)).unwrap();
        mem.write_slice(&[1; 3], GuestAddress(0x8_0000)).unwrap();
        let d = take_vmm_writes(&mem);
        assert_eq!(d.iter().collect::<Vec<_>>(), [3, 4, 0x80]);
        assert!(take_vmm_writes(&mem).is_empty());
        // Reads mark nothing.
        let _: u64 = mem.read_obj(GuestAddress(0x3ffc)).unwrap();
        assert!(take_vmm_writes(&mem).is_empty());
    }
}
