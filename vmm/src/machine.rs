//! Builds a machine from its configuration: guest memory, boot tables, the
//! loaded image and the vCPU, wired to a timeline.

use std::path::PathBuf;

use crate::boot;
use crate::devices::bus::Devices;
use crate::devices::pv::PvDevice;
use crate::devices::virtio_net::VirtioNet;
use crate::kvm::{self, Vm};
use crate::net_config::NetConfig;
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
    /// The NIC and the guest's network identity; None: no NIC.
    pub net: Option<NetConfig>,
}

/// Builds guest memory and the vCPU, ready to run at the image's entry.
pub fn build(config: &MachineConfig, timeline: Box<dyn Timeline>) -> Result<Vcpu, Error> {
    let mem = boot::allocate(config.mem_size)?;
    boot::write_tables(&mem)?;
    let entry = boot::load_elf(&mem, &config.image, config.mem_size)?;
    let mut vm = Vm::new(&mem, &config.kvm_path)?;
    vm.setup_long_mode(entry, boot::BOOT_STACK, config.mem_size)?;
    let devices = match &config.net {
        Some(net) => Devices::new(
            PvDevice::with_net(net),
            Some(VirtioNet::new(net.mac.0, mem.clone())),
        ),
        None => Devices::default(),
    };
    Ok(Vcpu::new(vm, mem, devices, timeline))
}

/// The machine as the log header names it. Record and replay must agree on
/// every part of it, so any change to the devices or the ABI changes it.
///
/// A machine without a NIC keeps the description it had before NICs
/// existed, so that its logs stay valid.
pub fn describe(config: &MachineConfig) -> String {
    let mut d = format!(
        "duet-pc/1 vcpus=1 mem={} pic=i8259x2 pit=i8254 rtc=mc146818 com1=16550 pv=duet-pv/1",
        config.mem_size
    );
    if let Some(net) = &config.net {
        d.push(' ');
        d.push_str(&net.describe());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nic_and_its_identity_are_part_of_the_machine() {
        let mut config = MachineConfig {
            image: Vec::new(),
            mem_size: 64 << 20,
            kvm_path: PathBuf::from("/dev/kvm"),
            net: None,
        };
        assert_eq!(
            describe(&config),
            "duet-pc/1 vcpus=1 mem=67108864 pic=i8259x2 pit=i8254 rtc=mc146818 com1=16550 pv=duet-pv/1"
        );
        let net = NetConfig {
            mac: crate::net_config::DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: Some("198.18.0.1".parse().unwrap()),
        };
        config.net = Some(net);
        let with = describe(&config);
        assert!(with.ends_with(
            " net=virtio-net-mmio/2@0xf0002000,irq5 mac=52:54:00:12:34:56 ip=198.18.0.2/24 gw=198.18.0.1"
        ));
        config.net = Some(NetConfig { ip: None, ..net });
        assert_ne!(describe(&config), with);
    }
}
