//! `duet`: the command line. Thin by design; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use vmm::cli::{self, parse_mem_size};
use vmm::net_config::{self, Ipv4Cidr, MacAddr, NetConfig, DEFAULT_MAC};
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
    /// Give the vCPU this CPU to itself: its thread is pinned there and
    /// the VMM's other threads (log channel, output gate, serial and TAP
    /// backends) are kept off it, so that they never preempt the guest
    /// (see docs/ARCHITECTURE.md, "Failure detection"). Default: no
    /// pinning.
    #[arg(long, global = true, value_name = "N")]
    vcpu_cpu: Option<usize>,
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
    /// A standby spare: wait until one of the VMs at --join runs without a
    /// backup (after a failover), then join it and serve as its backup,
    /// without an operator. Takes the same flags as `backup`.
    Spare(BackupArgs),
    /// The whole mission in one command: arbiter, primary and backup as
    /// separate processes, a checked kv workload, SIGKILL of the primary,
    /// failover, and an account of what the client saw.
    Demo(DemoArgs),
    /// Show a pair at a glance, read from each side's --metrics endpoint:
    /// roles, epoch, protection, lag, log rate, held outputs, the last
    /// matching digest, the arbiter. A side that cannot be reached is shown
    /// as unreachable (exit 2 without --watch).
    Status(StatusArgs),
    /// Run the benchmark suite (cargo bench, from the source checkout this
    /// duet was built from) and write a Markdown report with tables and
    /// charts, beside the VMware FT paper's figures, into DIR.
    Bench(BenchArgs),
    /// Issue a deployment's TLS credentials: a CA, a certificate per VM
    /// (for both sides of its pair), the arbiter's and an operator's.
    Certs(CertsArgs),
    /// List the embedded guest images.
    Images,
    /// Build, break and tear down the two-host network namespaces that the
    /// end-to-end tests use (as root).
    Netns(NetnsArgs),
}

#[derive(Args)]
struct StatusArgs {
    /// The sides' --metrics addresses.
    #[arg(required = true)]
    addrs: Vec<SocketAddr>,
    /// Redraw in place until interrupted.
    #[arg(long)]
    watch: bool,
    /// How often --watch redraws, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// Where report.md, the charts and each benchmark's JSON and log go.
    dir: PathBuf,
    /// Run only these benchmarks (solo, record, ft, failover, net).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Small sizes (3 failover trials, a 5 s soak, 1 net trial).
    #[arg(long)]
    quick: bool,
}

#[derive(Args)]
struct CertsArgs {
    /// Where the PEM files go (created if missing). A CA already there
    /// (ca.pem and ca-key.pem) signs the new certificates.
    #[arg(long)]
    out: PathBuf,
    /// The VM ids to issue pair certificates for (SAN V.vm.duet each).
    #[arg(long, value_delimiter = ',', required = true)]
    vm_id: Vec<String>,
    /// More names for the arbiter's certificate besides arbiter.duet: its
    /// host name or IP address, so that clients may verify that instead.
    #[arg(long, value_delimiter = ',')]
    arbiter_host: Vec<String>,
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
    #[command(flatten)]
    net: NetArgs,
}

impl RunArgs {
    fn options(self) -> anyhow::Result<cli::RunOptions> {
        Ok(cli::RunOptions {
            image: self.image,
            mem_size: self.mem,
            serial: self.serial,
            kvm_path: self.kvm,
            transcript: self.transcript,
            net: self.net.options()?,
        })
    }
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    s.parse().map_err(|e: net_config::Error| e.to_string())
}

fn parse_cidr(s: &str) -> Result<Ipv4Cidr, String> {
    s.parse().map_err(|e: net_config::Error| e.to_string())
}

fn parse_gateway(s: &str) -> Result<std::net::Ipv4Addr, String> {
    net_config::parse_gateway(s).map_err(|e| e.to_string())
}

/// The guest's network identity, shared by every subcommand with a NIC.
#[derive(Args)]
struct IdentityArgs {
    /// The guest's MAC address (in the virtio-net config space).
    #[arg(long, value_parser = parse_mac)]
    mac: Option<MacAddr>,
    /// The guest's IPv4 address and prefix, A.B.C.D/N (duet-pv 0x30).
    #[arg(long, value_parser = parse_cidr)]
    guest_ip: Option<Ipv4Cidr>,
    /// The guest's IPv4 gateway (duet-pv 0x38).
    #[arg(long, value_parser = parse_gateway)]
    gateway: Option<std::net::Ipv4Addr>,
}

impl IdentityArgs {
    fn any(&self) -> bool {
        self.mac.is_some() || self.guest_ip.is_some() || self.gateway.is_some()
    }

    fn config(&self) -> NetConfig {
        NetConfig {
            mac: self.mac.unwrap_or(DEFAULT_MAC),
            ip: self.guest_ip,
            gateway: self.gateway,
        }
    }
}

#[derive(Args)]
struct NetArgs {
    /// Give the guest a virtio-net NIC backed by this TAP (created if
    /// missing, and brought up). Without it the machine has no NIC.
    #[arg(long)]
    tap: Option<String>,
    #[command(flatten)]
    identity: IdentityArgs,
}

impl NetArgs {
    fn options(self) -> anyhow::Result<Option<cli::NetOptions>> {
        match self.tap {
            Some(tap) => Ok(Some(cli::NetOptions {
                tap,
                config: self.identity.config(),
            })),
            None if self.identity.any() => {
                anyhow::bail!("--mac, --guest-ip and --gateway configure a NIC: give --tap too")
            }
            None => Ok(None),
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
    #[arg(long, default_value_t = 20)]
    heartbeat_ms: u64,
    /// Waiting longer than this for the peer's next bytes on the log
    /// channel is a failure (see docs/ARCHITECTURE.md, "Failure detection",
    /// for why 150 ms is safe on a loaded host with real-time channel
    /// threads, and why 500 ms is needed without them).
    #[arg(long, default_value_t = 150)]
    timeout_ms: u64,
    /// Run the log channel and output gate threads at normal priority.
    /// By default they run under SCHED_FIFO when the process may (root or
    /// CAP_SYS_NICE), so that a loaded host delays neither heartbeats nor
    /// the acks that release output (see docs/ARCHITECTURE.md, "Failure
    /// detection").
    #[arg(long)]
    no_realtime: bool,
    /// How far a primary may run ahead of its backup, in milliseconds of
    /// its guest's busy time, before its guest waits for the backup to
    /// catch up (the execution-lag bound; time the guest waited for a
    /// client does not count). A larger bound costs the backup that much
    /// more catching up before it can go live.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    max_lag_ms: u64,
    /// Serve status as Prometheus text over HTTP on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Write this side's state changes here, as JSON lines (paired, peer
    /// lost, claim sent, granted or lost, live, alone, diverged, stopped).
    #[arg(long)]
    events: Option<PathBuf>,
    /// The deployment's CA certificate (PEM). With --tls-cert and
    /// --tls-key, the log channel and the arbiter connection are mutual
    /// TLS; without all three they are plaintext and unauthenticated. See
    /// `duet certs`.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This side's certificate (PEM), naming VM_ID.vm.duet.
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

impl PairArgs {
    fn options(self) -> anyhow::Result<cli::PairOptions> {
        let tls = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(
                logchannel::tls::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }
                .load()
                .map_err(|e| anyhow::anyhow!("cannot load the TLS credentials: {e}"))?,
            ),
            // clap's requires_all makes a partial set a usage error.
            _ => None,
        };
        Ok(cli::PairOptions {
            vm_id: self.vm_id,
            epoch: self.epoch,
            tas: self.tas,
            node: self.node,
            heartbeat_ms: self.heartbeat_ms,
            timeout_ms: self.timeout_ms,
            realtime: !self.no_realtime,
            max_lag: Duration::from_millis(self.max_lag_ms),
            metrics: self.metrics,
            events: self.events,
            tls,
            tls_ca: self.tls_ca,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
        })
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
    /// Let a new backup join this running VM here once it has lost its
    /// backup (re-protection: `duet backup --join ADDR`); a joiner is
    /// refused while the pair is whole.
    #[arg(long)]
    join_listen: Option<SocketAddr>,
    /// Release an output only once the backup has replayed up to it and
    /// found its own output there the same bytes and its state digest
    /// equal; if it cannot, halt (exit 4) with those outputs unreleased,
    /// even with an arbiter. Costs latency (see the ft bench).
    #[arg(long)]
    verify_outputs: bool,
}

#[derive(Args)]
struct BackupArgs {
    /// The same image as the primary's (name or path).
    #[arg(long)]
    image: String,
    /// Guest memory; must equal the primary's.
    #[arg(long, default_value = "64M", value_parser = parse_mem_size, allow_hyphen_values = true)]
    mem: u64,
    /// Where to listen for the primary's log channel; once this backup
    /// goes live, new backups join the VM here.
    #[arg(long)]
    listen: SocketAddr,
    /// Join the VM running at this address (a primary's --join-listen, or
    /// a live backup's --listen) instead of waiting for a primary that
    /// boots with us: its memory and state are copied here while it runs.
    /// Several (comma-separated): the first that takes a backup; a spare
    /// watches them all.
    #[arg(long, value_delimiter = ',')]
    join: Vec<SocketAddr>,
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
    /// The NIC; its TAP is opened only when this backup goes live.
    #[command(flatten)]
    net: NetArgs,
    /// Once live, verify outputs with the next backup that joins, as
    /// `duet primary --verify-outputs` does. (Replay checks a verifying
    /// primary's outputs with or without this flag.)
    #[arg(long)]
    verify_outputs: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Operations (one SET and one INCR each) in the whole run (default:
    /// 2000 for the network demo, 600 for the serial one).
    #[arg(long)]
    ops: Option<u64>,
    /// Kill the primary after this many operations (default: 800, or 300).
    #[arg(long)]
    kill_after: Option<u64>,
    /// The tas-server binary (default: next to duet).
    #[arg(long)]
    tas_server: Option<PathBuf>,
    /// Keep the processes' logs in this directory.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Run the serial demo (`kv` on COM1, on loopback) instead of the
    /// network one.
    #[arg(long)]
    serial: bool,
    /// With --serial: across two-host network namespaces instead of loopback.
    #[arg(long, requires = "serial")]
    netns: bool,
    /// Client TCP connections of the network demo.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Operations per second (default: 500 for the network demo; 0, as fast
    /// as it answers, for the serial one).
    #[arg(long)]
    rate: Option<u64>,
    /// Where the failover chart (duet-demo-failover.svg and .png) goes.
    #[arg(long, default_value = ".")]
    out: PathBuf,
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
    /// The recording had a NIC (implied by --mac, --guest-ip or
    /// --gateway, which must match the recording's). No TAP is opened.
    #[arg(long)]
    net: bool,
    #[command(flatten)]
    identity: IdentityArgs,
}

fn main() -> ExitCode {
    cli::init_logging();
    let args = Cli::parse();
    if let Some(cpu) = args.vcpu_cpu {
        if let Err(e) = logchannel::sched::dedicate_cpu(cpu) {
            eprintln!("duet: --vcpu-cpu {cpu}: {e}");
            return ExitCode::from(2);
        }
    }
    let spare = matches!(args.command, Command::Spare(_));
    let result = match args.command {
        Command::Run(a) => a.options().and_then(|o| cli::run(&o)),
        Command::Record(a) => a.run.options().and_then(|run| {
            cli::record(&cli::RecordOptions {
                run,
                log: a.log,
                digest_interval_ms: a.digest_interval_ms,
            })
        }),
        Command::Replay(a) => cli::replay(&cli::ReplayOptions {
            image: a.image,
            log: a.log,
            mem_size: a.mem,
            output: a.output,
            kvm_path: a.kvm,
            net: (a.net || a.identity.any()).then(|| a.identity.config()),
        }),
        Command::Primary(a) => a.run.options().and_then(|run| {
            cli::primary(&cli::PrimaryOptions {
                run,
                backup: a.backup,
                pair: a.pair.options()?,
                digest_interval_ms: a.digest_interval_ms,
                connect_timeout_ms: a.connect_timeout_ms,
                join_listen: a.join_listen,
                verify_outputs: a.verify_outputs,
            })
        }),
        Command::Spare(a) if a.join.is_empty() => Err(anyhow::anyhow!(
            "a spare needs the addresses of the VM it stands by for (--join ADDR,...)"
        )),
        Command::Backup(a) | Command::Spare(a) => a.net.options().and_then(|net| {
            cli::backup(&cli::BackupOptions {
                image: a.image,
                mem_size: a.mem,
                listen: a.listen,
                join: a.join,
                spare,
                pair: a.pair.options()?,
                transcript: a.transcript,
                kvm_path: a.kvm,
                serial: a.serial,
                go_live_exec: a.go_live_exec,
                net,
                verify_outputs: a.verify_outputs,
            })
        }),
        Command::Demo(a) => vmm::demo::run(&vmm::demo::DemoOptions {
            ops: a.ops,
            kill_after: a.kill_after,
            tas_server: a.tas_server,
            keep_logs: a.keep_logs,
            serial: a.serial,
            netns: a.netns,
            connections: a.connections,
            rate: a.rate,
            out: a.out,
        }),
        Command::Netns(a) => vmm::netns::run_action(a.action, &a.prefix, a.to).map_err(Into::into),
        Command::Status(a) => vmm::status::run(
            &a.addrs,
            a.watch,
            std::time::Duration::from_millis(a.interval_ms.max(100)),
        ),
        Command::Bench(a) => vmm::bench_report::run(&vmm::bench_report::Options {
            dir: a.dir,
            only: a.only,
            quick: a.quick,
        }),
        Command::Certs(a) => cli::certs(&a.out, &a.vm_id, &a.arbiter_host),
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
