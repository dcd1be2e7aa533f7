//! Duet's virtio device models: the virtio-mmio transport and the
//! virtio-net device on rust-vmm's virtio-queue.
//!
//! They live apart from `vmm` (which re-exports them as
//! `vmm::devices::{virtio_mmio, virtio_net}`) because they are the models
//! that walk structures the guest controls (descriptor tables, rings,
//! buffers), so they are fuzzed (`virtio-dev/fuzz`), and a crate with
//! only these dependencies builds under the sanitizers in seconds, without
//! the guest images that `vmm`'s build script compiles. Like every device
//! model in Duet they are deterministic and do no I/O.

pub mod virtio_mmio;
pub mod virtio_net;

/// Guest memory as the models see it: with vm-memory's bitmap of the
/// writes made through it, so that a VMM can tell which pages a device
/// wrote (received frames, used rings), which KVM's dirty log does not.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
