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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

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
