//! The guest's network identity: its MAC address (shown in the virtio-net
//! config space) and its IPv4 configuration (shown in `duet-pv` registers).
//!
//! Both are part of the machine: they are fixed when it is built, named in
//! [`crate::machine::describe`], and so checked at the handshake and against
//! a log's header. A backup with another MAC would answer ARP differently
//! from the primary, which is a divergence the handshake should refuse
//! rather than one the digests find later.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The MAC used when `--mac` is not given: locally administered (bit 1 of
/// the first octet set) and unicast, in the range QEMU made familiar.
pub const DEFAULT_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

/// Errors parsing network flags; each message fits on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("bad MAC address {0:?}: expected six hex octets like 52:54:00:12:34:56")]
    Mac(String),
    #[error("bad MAC address {0:?}: a multicast address cannot be a NIC's")]
    MulticastMac(String),
    #[error("bad guest address {0:?}: expected A.B.C.D/N with N from 1 to 32")]
    Cidr(String),
    #[error("bad gateway {0:?}: expected A.B.C.D")]
    Gateway(String),
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(|| Error::Mac(s.into()))?;
            if part.len() != 2 {
                return Err(Error::Mac(s.into()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| Error::Mac(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(Error::Mac(s.into()));
        }
        if out[0] & 1 != 0 {
            return Err(Error::MulticastMac(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An IPv4 address with its prefix length (`--guest-ip A.B.C.D/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    /// 1..=32.
    pub prefix: u8,
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Cidr(s.into());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(1..=32).contains(&prefix) || addr.is_unspecified() {
            return Err(bad());
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses `--gateway A.B.C.D`.
pub fn parse_gateway(s: &str) -> Result<Ipv4Addr, Error> {
    match s.parse::<Ipv4Addr>() {
        Ok(a) if !a.is_unspecified() => Ok(a),
        _ => Err(Error::Gateway(s.into())),
    }
}

/// Everything the guest learns about its network from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: MacAddr,
    /// None: the guest is told no address (it may still see frames).
    pub ip: Option<Ipv4Cidr>,
    pub gateway: Option<Ipv4Addr>,
}

impl NetConfig {
    /// The value of `duet-pv` register 0x30: the address as a number
    /// (`u32::from(Ipv4Addr)`, so the first octet is bits 24..32) in bits
    /// 0..32 and the prefix length in bits 32..40; 0 without an address.
    pub fn pv_ip_register(&self) -> u64 {
        self.ip.map_or(0, |c| {
            u64::from(u32::from(c.addr)) | (u64::from(c.prefix) << 32)
        })
    }

    /// The value of `duet-pv` register 0x38: the gateway as a number, or 0.
    pub fn pv_gateway_register(&self) -> u64 {
        self.gateway.map_or(0, |g| u64::from(u32::from(g)))
    }

    /// This config's part of the machine description.
    pub fn describe(&self) -> String {
        let ip = self.ip.map_or("none".to_string(), |c| c.to_string());
        let gw = self.gateway.map_or("none".to_string(), |g| g.to_string());
        format!(
            "net=virtio-net-mmio/2@{:#x},irq{} mac={} ip={ip} gw={gw}",
            crate::devices::virtio_net::NET_MMIO_BASE,
            crate::devices::virtio_net::NET_IRQ,
            self.mac
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!("52:54:00:12:34:56".parse::<MacAddr>().unwrap(), DEFAULT_MAC);
        assert_eq!(DEFAULT_MAC.to_string(), "52:54:00:12:34:56");
        assert_eq!(
            "02-AB-cd-00-00-01".parse::<MacAddr>().unwrap().0,
            [2, 0xab, 0xcd, 0, 0, 1]
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
            "525400123456",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(Error::Mac(bad.into())), "{bad}");
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(Error::MulticastMac(_))
        ));
    }

    #[test]
    fn cidrs_and_registers() {
        let c: Ipv4Cidr = "198.18.0.2/24".parse().unwrap();
        assert_eq!(c.to_string(), "198.18.0.2/24");
        let cfg = NetConfig {
            mac: DEFAULT_MAC,
            ip: Some(c),
            gateway: Some(parse_gateway("198.18.0.1").unwrap()),
        };
        assert_eq!(cfg.pv_ip_register(), 0x18_c612_0002);
        assert_eq!(cfg.pv_gateway_register(), 0xc612_0001);
        let none = NetConfig {
            ip: None,
            gateway: None,
            ..cfg
        };
        assert_eq!((none.pv_ip_register(), none.pv_gateway_register()), (0, 0));
        for bad in [
            "198.18.0.2",
            "198.18.0.2/0",
            "198.18.0.2/33",
            "x/24",
            "0.0.0.0/8",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        assert!(parse_gateway("0.0.0.0").is_err());
        assert!(parse_gateway("198.18.0").is_err());
    }
}
