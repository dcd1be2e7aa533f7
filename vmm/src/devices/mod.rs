//! Deterministic device models. They do no I/O: values from the outside world are passed in by the caller, which takes them from the timeline.

pub mod bus;
pub mod pic;
pub mod pit;
pub mod pv;
pub mod rtc;
pub mod serial;
// The virtio models are a crate of their own so that they can be fuzzed
// without building the monitor (see virtio-dev/src/lib.rs).
pub use virtio_dev::{virtio_mmio, virtio_net};
