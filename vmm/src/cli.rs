//! What the `duet` subcommands do, kept out of `main.rs` so that it is
//! testable and `main` stays a thin parser.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::images;
use crate::machine::{self, MachineConfig};
use crate::serial_backend::{self, SerialSpec};
use crate::timeline::live::Live;
use crate::vcpu::Outcome;

/// Exit status when duet itself fails (bad input, KVM trouble).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when the guest crashed (triple fault, halted for good).
pub const EXIT_GUEST_CRASH: u8 = 3;

/// Options of `duet run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: String,
    pub mem_size: u64,
    pub serial: SerialSpec,
    pub kvm_path: PathBuf,
}

/// Logs go to stderr, filtered by `DUET_LOG` (default: warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Parses a memory size: a byte count, or a number with K, M or G
/// (optionally followed by "iB" or "B"), in binary units.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 64M)"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !(crate::boot::MEM_MIN..=crate::boot::MEM_MAX).contains(&bytes) || bytes % 4096 != 0 {
        return Err(format!("{s:?} must be a multiple of 4K between 2M and 3G"));
    }
    Ok(bytes)
}

/// Resolves `--image`: an embedded name first, then a file path.
pub fn load_image(spec: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(bytes) = images::by_name(spec) {
        return Ok(bytes.to_vec());
    }
    let path = std::path::Path::new(spec);
    if !path.exists() {
        bail!(
            "unknown image {spec:?}: not an embedded image ({}) and no such file",
            images::NAMES.join(", ")
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read image {spec:?}"))
}

/// `duet run`: boots the image solo and returns the process exit code.
pub fn run(opts: &RunOptions) -> anyhow::Result<u8> {
    let image = load_image(&opts.image)?;
    let config = MachineConfig {
        image,
        mem_size: opts.mem_size,
        kvm_path: opts.kvm_path.clone(),
    };
    let link = serial_backend::start(&opts.serial)?;
    let mut vcpu = machine::build(&config, Box::new(Live::new(link)))
        .with_context(|| format!("cannot boot {:?}", opts.image))?;
    let outcome = vcpu.run()?;
    tracing::info!("stats: {:?}", vcpu.stats());
    Ok(report(&outcome))
}

/// Prints a crash report and maps the outcome to an exit code.
pub fn report(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::PowerOff(code) => *code,
        Outcome::Crashed { reason, rip } => {
            eprintln!("duet: guest crashed at rip {rip:#x}: {reason}");
            EXIT_GUEST_CRASH
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("64M"), Ok(64 << 20));
        assert_eq!(parse_mem_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_mem_size("1G"), Ok(1 << 30));
        assert_eq!(parse_mem_size("4194304"), Ok(4 << 20));
        assert!(parse_mem_size("abc").is_err());
        assert!(parse_mem_size("1M").is_err());
        assert!(parse_mem_size("64G").is_err());
        assert!(parse_mem_size("99999999999999999999G").is_err());
        assert!(parse_mem_size("").is_err());
    }
}
