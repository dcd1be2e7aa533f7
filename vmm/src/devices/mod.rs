//! Deterministic device models. They do no I/O: values from the outside world are passed in by the caller, which takes them from the timeline.

pub mod bus;
pub mod pic;
pub mod pit;
pub mod pv;
pub mod rtc;
pub mod serial;
pub mod virtio_mmio;
pub mod virtio_net;
