//! Builds a machine from its configuration: guest memory, boot tables, the
//! loaded image and the vCPU, wired to a timeline.

use std::path::PathBuf;

use crate::boot;
use crate::kvm::{self, Vm};
use crate::timeline::Timeline;
use crate::vcpu::Vcpu;

/// Errors building the machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
}

/// Everything that defines the machine the guest sees. Two machines built
/// from equal configs and fed the same timeline run identically.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The guest ELF.
    pub image: Vec<u8>,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// The KVM device to open.
    pub kvm_path: PathBuf,
}

/// Builds guest memory and the vCPU, ready to run at the image's entry.
pub fn build(config: &MachineConfig, timeline: Box<dyn Timeline>) -> Result<Vcpu, Error> {
    let mem = boot::allocate(config.mem_size)?;
    boot::write_tables(&mem)?;
    let entry = boot::load_elf(&mem, &config.image, config.mem_size)?;
    let mut vm = Vm::new(&mem, &config.kvm_path)?;
    vm.setup_long_mode(entry, boot::BOOT_STACK, config.mem_size)?;
    Ok(Vcpu::new(vm, mem, timeline))
}

/// The machine as the log header names it. Record and replay must agree on
/// every part of it, so any change to the devices or the ABI changes it.
pub fn describe(config: &MachineConfig) -> String {
    format!(
        "duet-pc/1 vcpus=1 mem={} pic=i8259x2 pit=i8254 rtc=mc146818 com1=16550 pv=duet-pv/1",
        config.mem_size
    )
}
