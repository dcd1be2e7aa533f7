//! The guest images, built from `guest-images/` by `build.rs` and embedded
//! in the `duet` binary, so that `duet run --image <name>` needs no files
//! next to it and primary and backup are sure to boot the same bytes.
//!
//! | image | what it is for |
//! |---|---|
//! | `hello` | boot smoke test: banner, clock, RTC, power off 0 |
//! | `ticker` | determinism torture test (timer at 1000 Hz, digests) |
//! | `kv` | Redis-compatible server on COM1 |
//! | `compute` | CPU-bound run for overhead measurements |
//! | `bench` | exit, MMIO and interrupt-injection costs, timed by the guest |
//! | `netkv` | the `kv` server on TCP port 6379 over virtio-net (smoltcp) |
//! | `rdtsc` | not replayable on purpose: the TSC picks its exits (divergence tests) |
//! | `tscecho` | not replayable on purpose: prints TSC values, same exits (verified-output tests) |

/// Names accepted by [`by_name`].
pub const NAMES: &[&str] = &[
    "hello", "ticker", "kv", "compute", "bench", "netkv", "rdtsc", "tscecho",
];

/// The ELF of the image called `name`.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    let elf: &'static [u8] = match name {
        "hello" => include_bytes!(concat!(env!("OUT_DIR"), "/images/hello.elf")),
        "ticker" => include_bytes!(concat!(env!("OUT_DIR"), "/images/ticker.elf")),
        "kv" => include_bytes!(concat!(env!("OUT_DIR"), "/images/kv.elf")),
        "compute" => include_bytes!(concat!(env!("OUT_DIR"), "/images/compute.elf")),
        "bench" => include_bytes!(concat!(env!("OUT_DIR"), "/images/bench.elf")),
        "netkv" => include_bytes!(concat!(env!("OUT_DIR"), "/images/netkv.elf")),
        "rdtsc" => include_bytes!(concat!(env!("OUT_DIR"), "/images/rdtsc.elf")),
        "tscecho" => include_bytes!(concat!(env!("OUT_DIR"), "/images/tscecho.elf")),
        _ => return None,
    };
    Some(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_an_elf() {
        for name in NAMES {
            let elf = by_name(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
        }
        assert!(by_name("nope").is_none());
    }
}
