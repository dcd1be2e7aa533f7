//! virtio-drivers' platform hooks for a Duet guest: the page tables
//! identity-map RAM and the MMIO hole (physical = virtual) and there is no
//! IOMMU, so DMA memory is ordinary heap memory and sharing a buffer with
//! the device is taking its address.

use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The [`Hal`] of a Duet guest.
pub struct DuetHal;

fn pages_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: `dma_alloc` hands out zeroed, page-aligned heap blocks that
// nothing else references until `dma_dealloc` returns them with the same
// layout; addresses are identity-mapped, so the physical address given to
// the device is the pointer itself.
unsafe impl Hal for DuetHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (virtio-drivers never asks
        // for zero pages).
        let ptr = unsafe { alloc::alloc::alloc_zeroed(pages_layout(pages)) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // virtio-drivers reports a zero physical address as DmaError.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller returns a block from `dma_alloc` with the same
        // page count, so the layout matches the allocation.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), pages_layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // The device wrote (or read) the buffer in place: nothing to copy.
    }
}
