//! `duet`: the command line. Thin by design; the work is in the library.

use std::net::SocketAddr;
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
    /// Run a guest live and stream its log to a backup (fault-tolerant pair).
    Primary(PrimaryArgs),
    /// Boot the same guest and replay the primary's stream as it arrives.
    Backup(BackupArgs),
    /// The whole mission in one command: arbiter, primary and backup as
    /// separate processes, a checked kv workload, SIGKILL of the primary,
    /// failover, and an account of what the client saw.
    Demo(DemoArgs),
    /// List the embedded guest images.
    Images,
    /// Build, break and tear down the two-host network namespaces that the
    /// end-to-end tests use (as root).
    Netns(NetnsArgs),
}

#[derive(Args)]
struct NetnsArgs {
    action: vmm::netns::Action,
    /// Every namespace is named PREFIX-{a,b,arb,cli,sw}.
    #[arg(long)]
    prefix: String,
    /// Where `move-vip` puts the service address: a or b.
    #[arg(long)]
    to: Option<vmm::netns::Host>,
}

#[derive(Args)]
struct RunArgs {
    /// An embedded image name (see `duet images`) or a path to an ELF file.
    #[arg(long)]
    image: String,
    /// Guest memory, e.g. 64M, 1G or a byte count.
    #[arg(long, default_value = "64M", value_parser = parse_mem_size, allow_hyphen_values = true)]
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
struct PairArgs {
    /// Names the fault-tolerant VM; primary and backup must agree.
    #[arg(long)]
    vm_id: String,
    /// Pairing epoch. Default: the primary asks the arbiter for a new one
    /// (1 without an arbiter) and the backup adopts the primary's.
    #[arg(long)]
    epoch: Option<u64>,
    /// The test-and-set arbiter: HOST:PORT (or tas://HOST:PORT) for a
    /// tas-server, etcd://HOST:PORT[,HOST:PORT...] for an etcd cluster.
    /// Without it, losing the peer halts this side instead of failing over.
    #[arg(long, value_name = "ARBITER")]
    tas: Option<vmm::ft::arbiter::ArbiterAddr>,
    /// This process's name at the arbiter (default: role@pid).
    #[arg(long)]
    node: Option<String>,
    /// Heartbeat interval on the log channel, in milliseconds.
    #[arg(long, default_value_t = 50)]
    heartbeat_ms: u64,
    /// Silence on the log channel longer than this is a failure (see
    /// docs/ARCHITECTURE.md, "Failure detection", for why 500 ms).
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
    /// Serve status as Prometheus text over HTTP on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

impl PairArgs {
    fn options(self) -> cli::PairOptions {
        cli::PairOptions {
            vm_id: self.vm_id,
            epoch: self.epoch,
            tas: self.tas,
            node: self.node,
            heartbeat_ms: self.heartbeat_ms,
            timeout_ms: self.timeout_ms,
            metrics: self.metrics,
        }
    }
}

#[derive(Args)]
struct PrimaryArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    pair: PairArgs,
    /// The backup's log channel address.
    #[arg(long)]
    backup: SocketAddr,
    /// Log a state digest this often, in milliseconds (0: only on request).
    #[arg(long, default_value_t = 500)]
    digest_interval_ms: u64,
    /// How long to keep trying to reach the backup at start.
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
}

#[derive(Args)]
struct BackupArgs {
    /// The same image as the primary's (name or path).
    #[arg(long)]
    image: String,
    /// Guest memory; must equal the primary's.
    #[arg(long, default_value = "64M", value_parser = parse_mem_size, allow_hyphen_values = true)]
    mem: u64,
    /// Where to listen for the primary's log channel.
    #[arg(long)]
    listen: SocketAddr,
    #[command(flatten)]
    pair: PairArgs,
    /// Write the backup's own serial output (dropped otherwise) to this file.
    #[arg(long)]
    transcript: Option<PathBuf>,
    /// Where COM1 goes once this backup goes live (never before).
    #[arg(long, default_value = "none")]
    serial: SerialSpec,
    /// Shell command to run at go-live before opening the serial address
    /// (e.g. moving the service IP to this host).
    #[arg(long)]
    go_live_exec: Option<String>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// Operations (one SET and one INCR each) in the whole run.
    #[arg(long, default_value_t = 600)]
    ops: u64,
    /// Kill the primary after this many operations.
    #[arg(long, default_value_t = 300)]
    kill_after: u64,
    /// The tas-server binary (default: next to duet).
    #[arg(long)]
    tas_server: Option<PathBuf>,
    /// Keep the processes' logs in this directory.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Run across two-host network namespaces instead of loopback.
    #[arg(long)]
    netns: bool,
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
    #[arg(long, value_parser = parse_mem_size, allow_hyphen_values = true)]
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
        Command::Primary(a) => cli::primary(&cli::PrimaryOptions {
            run: a.run.options(),
            backup: a.backup,
            pair: a.pair.options(),
            digest_interval_ms: a.digest_interval_ms,
            connect_timeout_ms: a.connect_timeout_ms,
        }),
        Command::Backup(a) => cli::backup(&cli::BackupOptions {
            image: a.image,
            mem_size: a.mem,
            listen: a.listen,
            pair: a.pair.options(),
            transcript: a.transcript,
            kvm_path: a.kvm,
            serial: a.serial,
            go_live_exec: a.go_live_exec,
        }),
        Command::Demo(a) => vmm::demo::run(&vmm::demo::DemoOptions {
            ops: a.ops,
            kill_after: a.kill_after,
            tas_server: a.tas_server,
            keep_logs: a.keep_logs,
            netns: a.netns,
        }),
        Command::Netns(a) => vmm::netns::run_action(a.action, &a.prefix, a.to).map_err(Into::into),
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
