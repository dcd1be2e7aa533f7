//! `duet`: the command line. Thin by design; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use vmm::cli::{self, parse_mem_size};
use vmm::serial_backend::SerialSpec;

#[derive(Parser)]
#[command(
    name = "duet",
    version,
    about = "Fault-tolerant virtual machines on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest alone (no replication).
    Run(RunArgs),
    /// List the embedded guest images.
    Images,
}

#[derive(Args)]
struct RunArgs {
    /// An embedded image name (see `duet images`) or a path to an ELF file.
    #[arg(long)]
    image: String,
    /// Guest memory, e.g. 64M, 1G or a byte count.
    #[arg(long, default_value = "64M", value_parser = parse_mem_size)]
    mem: u64,
    /// Where COM1 goes: stdio, none, or tcp:ADDR:PORT (one client at a time).
    #[arg(long, default_value = "stdio")]
    serial: SerialSpec,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
}

fn main() -> ExitCode {
    cli::init_logging();
    let args = Cli::parse();
    let result = match args.command {
        Command::Run(a) => cli::run(&cli::RunOptions {
            image: a.image,
            mem_size: a.mem,
            serial: a.serial,
            kvm_path: a.kvm,
        }),
        Command::Images => {
            for name in vmm::images::NAMES {
                println!("{name}");
            }
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("duet: {e:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
