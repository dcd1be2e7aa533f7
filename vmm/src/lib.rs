//! Duet's virtual machine monitor: a single-vCPU KVM machine whose every
//! nondeterministic input passes through one door, the [`timeline`], so that
//! a run can be recorded and replayed bit for bit.

pub mod bench_report;
pub mod boot;
pub mod chart;
pub mod cli;
pub mod demo;
pub mod devices;
pub mod doorbell;
pub mod ft;
pub mod images;
pub mod kit;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod net_config;
pub mod netns;
pub mod serial_backend;
pub mod status;
pub mod stop;
pub mod tap_backend;
pub mod timeline;
pub mod vcpu;
