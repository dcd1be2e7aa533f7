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
    /// Run a guest like `run` and write every nondeterministic event to a log.
    Record(RecordArgs),
    /// Re-execute a recorded run from its log alone, checking every event.
    Replay(ReplayArgs),
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
    /// Also write all serial output to this file.
    #[arg(long)]
    transcript: Option<PathBuf>,
}

impl RunArgs {
    fn options(self) -> cli::RunOptions {
        cli::RunOptions {
            image: self.image,
            mem_size: self.mem,
            serial: self.serial,
            kvm_path: self.kvm,
            transcript: self.transcript,
        }
    }
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The log file to write.
    #[arg(long)]
    log: PathBuf,
    /// Log a state digest (registers and a memory hash) this often, in
    /// milliseconds of run time; 0 turns periodic digests off.
    #[arg(long, default_value_t = 500)]
    digest_interval_ms: u64,
}

#[derive(Args)]
struct ReplayArgs {
    /// The image the log was recorded from (name or path).
    #[arg(long)]
    image: String,
    /// The log to replay.
    #[arg(long)]
    log: PathBuf,
    /// Guest memory; defaults to the recorded size, and must equal it.
    #[arg(long, value_parser = parse_mem_size)]
    mem: Option<u64>,
    /// Where the replayed serial output goes (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
}

fn main() -> ExitCode {
    cli::init_logging();
    let args = Cli::parse();
    let result = match args.command {
        Command::Run(a) => cli::run(&a.options()),
        Command::Record(a) => cli::record(&cli::RecordOptions {
            run: a.run.options(),
            log: a.log,
            digest_interval_ms: a.digest_interval_ms,
        }),
        Command::Replay(a) => cli::replay(&cli::ReplayOptions {
            image: a.image,
            log: a.log,
            mem_size: a.mem,
            output: a.output,
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
