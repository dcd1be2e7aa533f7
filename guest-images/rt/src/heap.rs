//! The global allocator: a first-fit free list over the memory between the
//! end of the image and the end of RAM (capped below the MMIO hole).
//!
//! One vCPU, and the interrupt handlers never allocate, so the heap needs no
//! lock; an `UnsafeCell` is enough.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{null_mut, NonNull};

use linked_list_allocator::Heap;

/// Lowest MMIO address; the heap must end below it.
const MMIO_START: u64 = 0xf000_0000;

struct GuestHeap(UnsafeCell<Heap>);

// SAFETY: the guest has one CPU and only ring-3 code (never an interrupt
// handler) allocates, so accesses never overlap.
unsafe impl Sync for GuestHeap {}

#[global_allocator]
static HEAP: GuestHeap = GuestHeap(UnsafeCell::new(Heap::empty()));

// SAFETY: delegates to linked_list_allocator, which returns blocks that fit
// `layout` or null; `dealloc` gets back exactly what `alloc` handed out.
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: no other reference to the heap is live (see `Sync`).
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map_or(null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `alloc`; `ptr` came from `alloc` with this layout.
        unsafe { (*self.0.get()).deallocate(NonNull::new_unchecked(ptr), layout) }
    }
}

/// Hands the memory above the image to the allocator. Called once, in ring
/// 3, before the image's `main`.
pub(crate) fn init() {
    extern "C" {
        static __duet_image_end: u8;
    }
    let start = &raw const __duet_image_end as u64;
    let end = crate::memory_size().min(MMIO_START);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) is RAM (below the memory size the VMM gave us and
    // the MMIO hole) that the image does not use: the linker script puts
    // __duet_image_end after every section. This runs once, before any
    // allocation.
    unsafe { (*HEAP.0.get()).init(start as *mut u8, (end - start) as usize) }
}

/// Unwinding never happens (`panic = "abort"`), but `alloc` still refers to
/// the personality routine.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
