//! What the `duet` subcommands do, kept out of `main.rs` so that it is
//! testable and `main` stays a thin parser.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use logchannel::channel::{self, error_chain, BackupLink, ChannelConfig, Hello, PrimaryLink};
use logchannel::{Header, LogReader, LogWriter};

use crate::ft::arbiter::{Arbiter, ArbiterAddr, ArbiterTls};
use crate::ft::backup::{BackupTimeline, StreamSource, Takeover};
use crate::ft::join::{JoinPlan, JoinService};
use crate::ft::metrics::{self, Metrics, Role};
use crate::ft::primary::ChannelSink;
use crate::images;
use crate::machine::{self, MachineConfig};
use crate::net_config::NetConfig;
use crate::serial_backend::{self, SerialSpec};
use crate::tap_backend;
use tas_server::tls::TlsFiles;

use crate::doorbell::Doorbell;
use crate::ft::events::{Event, EventLog};
use crate::ft::{self, HookError};
use crate::stop;
use crate::timeline;
use crate::timeline::live::Live;
use crate::timeline::record::{FileSink, Record};
use crate::timeline::replay::{LoadedLog, Replay};
use crate::timeline::world::World;
use crate::vcpu::Outcome;

/// Exit status when duet itself fails (bad input, KVM trouble).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when the guest crashed (triple fault, halted for good).
pub const EXIT_GUEST_CRASH: u8 = 3;
/// Exit status when replay diverged from the recording.
pub const EXIT_DIVERGENCE: u8 = 4;

/// Options of `duet run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: String,
    pub mem_size: u64,
    pub serial: SerialSpec,
    pub kvm_path: PathBuf,
    /// A file that receives a copy of all serial output.
    pub transcript: Option<PathBuf>,
    /// The NIC: its TAP and the guest's identity. None: no NIC.
    pub net: Option<NetOptions>,
}

/// A NIC backed by a TAP (`--tap`, `--mac`, `--guest-ip`, `--gateway`).
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// The TAP's name; opened (or created) when the world opens.
    pub tap: String,
    pub config: NetConfig,
}

/// Logs go to stderr, filtered by `DUET_LOG` (default: warnings, plus the
/// primary's and backup's periodic status line).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUET_LOG")
        // Warnings, and the FT roles' periodic one-line status.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,vmm::ft=info"));
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
    if !(crate::boot::MEM_MIN..=crate::boot::MEM_MAX).contains(&bytes)
        || !bytes.is_multiple_of(4096)
    {
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
    let config = machine_config(opts)?;
    // SIGINT/SIGTERM stop the guest at its next exit, so that the run
    // still says where it ended (as `duet record` does); installed before
    // the serial address opens, which is what a caller waits for.
    stop::install()?;
    let world = open_world(opts)?;
    let mut vcpu = machine::build(&config, Box::new(Live::new(world)))
        .with_context(|| format!("cannot boot {:?}", opts.image))?;
    let outcome = vcpu.run()?;
    tracing::info!("stats: {:?}", vcpu.stats());
    print_final_state(&vcpu.stats());
    Ok(report(&outcome))
}

/// Options of `duet record`.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub run: RunOptions,
    pub log: PathBuf,
    /// Periodic state digests, in milliseconds of run time (0: none).
    pub digest_interval_ms: u64,
}

/// `duet record`: runs like `duet run` and writes every nondeterministic
/// event to the log.
pub fn record(opts: &RecordOptions) -> anyhow::Result<u8> {
    let config = machine_config(&opts.run)?;
    let file = File::create(&opts.log)
        .with_context(|| format!("cannot create log {}", opts.log.display()))?;
    let header = Header::new(
        logchannel::image_hash(&config.image),
        config.mem_size,
        machine::describe(&config),
    );
    let writer = LogWriter::new(BufWriter::new(file), &header)
        .with_context(|| format!("cannot write log {}", opts.log.display()))?;
    stop::install()?;
    let world = open_world(&opts.run)?;
    let every = (opts.digest_interval_ms > 0)
        .then(|| std::time::Duration::from_millis(opts.digest_interval_ms));
    let timeline = Record::new(world, FileSink::new(writer), every);
    let mut vcpu = machine::build(&config, Box::new(timeline))
        .with_context(|| format!("cannot boot {:?}", opts.run.image))?;
    let outcome = vcpu.run()?;
    print_final_state(&vcpu.stats());
    Ok(report(&outcome))
}

/// Options of `duet replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub image: String,
    pub log: PathBuf,
    /// If given, must equal the recorded memory size.
    pub mem_size: Option<u64>,
    /// Where the replayed serial output goes (stdout if None).
    pub output: Option<PathBuf>,
    pub kvm_path: PathBuf,
    /// The NIC the recording machine had (replay opens no TAP).
    pub net: Option<NetConfig>,
}

/// `duet replay`: re-executes a recorded run from the log alone.
pub fn replay(opts: &ReplayOptions) -> anyhow::Result<u8> {
    let image = load_image(&opts.image)?;
    let (header, records) = read_log(&opts.log)?;
    let mem_size = opts.mem_size.unwrap_or(header.mem_size);
    let config = MachineConfig {
        image,
        mem_size,
        kvm_path: opts.kvm_path.clone(),
        net: opts.net,
    };
    check_header(&header, &config)?;
    let output: Box<dyn Write> = match &opts.output {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout()),
    };
    let timeline = Replay::new(LoadedLog::new(records), output);
    let mut vcpu = machine::build(&config, Box::new(timeline))
        .with_context(|| format!("cannot boot {:?}", opts.image))?;
    let outcome = match vcpu.run() {
        Err(crate::vcpu::Error::Timeline(e @ timeline::Error::Divergence { .. })) => {
            eprintln!("duet: replay diverged: {e}");
            return Ok(EXIT_DIVERGENCE);
        }
        other => other?,
    };
    print_final_state(&vcpu.stats());
    Ok(report(&outcome))
}

/// Options shared by `duet primary` and `duet backup`.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub vm_id: String,
    /// The pairing epoch. None: the primary asks the arbiter for a new one
    /// (or uses 1 without an arbiter); the backup adopts the primary's.
    pub epoch: Option<u64>,
    /// The test-and-set arbiter (tas-server or etcd); without one, losing
    /// the peer halts.
    pub tas: Option<ArbiterAddr>,
    /// This process's name at the arbiter.
    pub node: Option<String>,
    pub heartbeat_ms: u64,
    pub timeout_ms: u64,
    /// Run the channel and gate threads under SCHED_FIFO if permitted.
    pub realtime: bool,
    /// The execution-lag bound (see [`ChannelSink::max_lag`]).
    pub max_lag: Duration,
    /// Serve Prometheus text here, if given.
    pub metrics: Option<SocketAddr>,
    /// The event log (JSON lines), if given.
    pub events: Option<PathBuf>,
    /// Mutual TLS credentials (`--tls-ca`, `--tls-cert`, `--tls-key`),
    /// loaded and checked; None: the log channel is plaintext.
    pub tls: Option<logchannel::tls::TlsIdentity>,
    /// The deployment's CA, this side's certificate and key (PEM), all or
    /// none: mutual TLS to the arbiter.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl PairOptions {
    /// How the log channel is protected.
    fn security(&self) -> channel::Security {
        match &self.tls {
            Some(id) => channel::Security::Tls(id.clone()),
            None => channel::Security::Plaintext,
        }
    }

    /// Says once, as a warning, that a paired channel is plaintext: anyone
    /// who can reach it could feed a backup a log or read the primary's.
    /// Said once paired, not at start, so that a side that fails before
    /// pairing still reports only its one-line error.
    fn warn_if_plaintext(&self, role: channel::Role) {
        if self.tls.is_none() {
            tracing::warn!(
                "{role}: the log channel is unauthenticated and unencrypted (no --tls-ca, --tls-cert, --tls-key; see `duet certs`)"
            );
        }
    }

    /// Sets how the channel and gate threads are scheduled, before any is
    /// started (see [`logchannel::sched`]). Not being allowed real-time
    /// scheduling is a warning: the pair works, only its failure detection
    /// and output latency suffer on a loaded host.
    fn schedule(&self) {
        if !self.realtime {
            logchannel::sched::disable_realtime();
            return;
        }
        if let Err(e) = logchannel::sched::enable_realtime() {
            tracing::warn!(
                "the log channel threads run at normal priority: SCHED_FIFO is not allowed here ({e}); heartbeats and acks may be delayed on a loaded host"
            );
        }
    }

    fn channel_config(&self) -> ChannelConfig {
        ChannelConfig {
            heartbeat: Duration::from_millis(self.heartbeat_ms.max(1)),
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            ..ChannelConfig::default()
        }
    }

    /// How a survivor lets new backups join at `listen`.
    fn join_plan(
        &self,
        listen: SocketAddr,
        config: &MachineConfig,
        arbiter: Option<Arbiter>,
    ) -> JoinPlan {
        JoinPlan {
            listen,
            hello: Hello {
                join: true,
                ..self.hello(channel::Role::Primary, config, 0)
            },
            security: self.security(),
            config: self.channel_config(),
            arbiter,
        }
    }

    fn hello(&self, role: channel::Role, config: &MachineConfig, epoch: u64) -> Hello {
        Hello {
            protocol: channel::PROTOCOL_VERSION,
            role,
            vm_id: self.vm_id.clone(),
            image_hash: logchannel::image_hash(&config.image),
            machine: machine::describe(config),
            epoch,
            join: false,
        }
    }

    /// The arbiter's TLS credentials, read and checked now, so that a bad
    /// file fails the start rather than the failover.
    fn arbiter_tls(&self) -> anyhow::Result<Option<ArbiterTls>> {
        let files = TlsFiles::from_flags(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )?;
        let (Some(files), Some(_)) = (files, &self.tas) else {
            return Ok(None);
        };
        Ok(Some(
            ArbiterTls::load(files).context("cannot load the arbiter's TLS credentials")?,
        ))
    }

    fn arbiter(
        &self,
        epoch: u64,
        default_node: String,
        tls: &Option<ArbiterTls>,
    ) -> Option<Arbiter> {
        self.tas.clone().map(|addr| Arbiter {
            addr,
            vm_id: self.vm_id.clone(),
            epoch,
            claimant: self.node.clone().unwrap_or(default_node),
            tls: tls.clone(),
        })
    }

    fn metrics(&self, role: Role, epoch: u64) -> anyhow::Result<Arc<Metrics>> {
        let m = Metrics::new(role, epoch);
        if let Some(path) = &self.events {
            let log = EventLog::create(path)
                .with_context(|| format!("cannot create the event log {}", path.display()))?;
            m.set_events(log);
        }
        if let Some(addr) = self.metrics {
            metrics::serve(addr, m.clone())?;
        }
        Ok(m)
    }
}

/// Options of `duet primary`.
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    pub run: RunOptions,
    pub backup: SocketAddr,
    pub pair: PairOptions,
    pub digest_interval_ms: u64,
    /// How long to keep trying to reach the backup at start.
    pub connect_timeout_ms: u64,
    /// Where new backups may join once this primary runs alone.
    pub join_listen: Option<SocketAddr>,
    /// Verified-output mode (see [`ChannelSink::verify_outputs`]).
    pub verify_outputs: bool,
}

/// `duet primary`: runs the guest live and streams its log to the backup;
/// output leaves only once the backup has acknowledged the log up to it.
pub fn primary(opts: &PrimaryOptions) -> anyhow::Result<u8> {
    let config = machine_config(&opts.run)?;
    opts.pair.schedule();
    let node = format!("primary@{}", std::process::id());
    let tls = opts.pair.arbiter_tls()?;
    let epoch = match (opts.pair.epoch, opts.pair.arbiter(0, node.clone(), &tls)) {
        (Some(e), _) => e,
        (None, Some(a)) => a
            .new_epoch()
            .context("cannot get a pairing epoch from the arbiter")?,
        (None, None) => 1,
    };
    let metrics = opts.pair.metrics(Role::Primary, epoch)?;
    let hello = opts.pair.hello(channel::Role::Primary, &config, epoch);
    let link = PrimaryLink::connect_with(
        opts.backup,
        hello,
        opts.pair.channel_config(),
        Duration::from_millis(opts.connect_timeout_ms),
        &opts.pair.security(),
    )?;
    opts.pair.warn_if_plaintext(channel::Role::Primary);
    tracing::info!(
        "primary: paired with the backup at {}, epoch {epoch}",
        opts.backup
    );
    metrics.event(Event::Paired { epoch });
    stop::install()?;
    let world = open_world(&opts.run)?;
    let outlet = world.outlet()?;
    let every =
        (opts.digest_interval_ms > 0).then(|| Duration::from_millis(opts.digest_interval_ms));
    let arbiter = opts.pair.arbiter(epoch, node, &tls);
    let mut sink = ChannelSink::new(link, metrics.clone(), outlet, arbiter.clone())?
        .verify_outputs(opts.verify_outputs)
        .max_lag(opts.pair.max_lag);
    if let Some(listen) = opts.join_listen {
        let plan = opts.pair.join_plan(listen, &config, arbiter);
        sink = sink.with_join(JoinService::start(
            plan,
            world.bell(),
            metrics.clone(),
            epoch,
            true,
        )?);
    }
    let timeline = Record::new(world, sink, every);
    let mut vcpu = machine::build(&config, Box::new(timeline))
        .with_context(|| format!("cannot boot {:?}", opts.run.image))?;
    let outcome = vcpu.run();
    tracing::info!("primary: {}", metrics.summary());
    let outcome = ft_outcome(outcome, &metrics)?;
    print_final_state(&vcpu.stats());
    Ok(outcome)
}

/// Exit status when this side lost the arbiter's test-and-set and halted.
pub const EXIT_LOST_ARBITRATION: u8 = 5;

/// Maps how a fault-tolerant run ended to an exit code, with the one-line
/// reports an operator needs.
fn ft_outcome(
    outcome: Result<Outcome, crate::vcpu::Error>,
    metrics: &Metrics,
) -> anyhow::Result<u8> {
    use crate::vcpu::Error::Timeline;
    let how = match &outcome {
        Ok(o) => format!("{o:?}"),
        Err(e) => error_chain(e),
    };
    if let Err(Timeline(
        e @ (timeline::Error::Divergence { .. }
        | timeline::Error::Ft(ft::Error::BackupDiverged { .. })),
    )) = &outcome
    {
        metrics.event(Event::Diverged {
            detail: e.to_string(),
        });
    }
    metrics.event(Event::Stopped { how });
    match outcome {
        Ok(o) => Ok(report(&o)),
        Err(Timeline(e @ timeline::Error::Divergence { .. })) => {
            eprintln!("duet: diverged from the primary: {e}");
            Ok(EXIT_DIVERGENCE)
        }
        Err(Timeline(timeline::Error::Ft(e @ ft::Error::BackupDiverged { .. }))) => {
            eprintln!("duet: {e}");
            Ok(EXIT_DIVERGENCE)
        }
        Err(Timeline(timeline::Error::Ft(e @ ft::Error::LostArbitration { .. }))) => {
            eprintln!("duet: {e}");
            Ok(EXIT_LOST_ARBITRATION)
        }
        Err(Timeline(timeline::Error::Interrupted)) => {
            eprintln!("duet: stopped by a signal");
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

/// Options of `duet backup`.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub image: String,
    pub mem_size: u64,
    pub listen: SocketAddr,
    /// Join a VM running at one of these instead of waiting for a primary.
    pub join: Vec<SocketAddr>,
    /// Wait (as a standby spare) until one of `join` needs a backup.
    pub spare: bool,
    pub pair: PairOptions,
    /// The backup's own (dropped) serial output is written here, if given.
    pub transcript: Option<PathBuf>,
    pub kvm_path: PathBuf,
    /// Where COM1 goes once this backup goes live (never before).
    pub serial: SerialSpec,
    /// A shell command run at go-live, before the serial address is
    /// opened (for example to move a service IP to this host).
    pub go_live_exec: Option<String>,
    /// The NIC; its TAP is opened at go-live, never before.
    pub net: Option<NetOptions>,
    /// Once live, verify outputs with a backup that joins.
    pub verify_outputs: bool,
}

/// `duet backup`: boots the same image and replays the primary's stream,
/// never executing past what the primary has declared complete. It drops
/// its output and opens no outside device.
pub fn backup(opts: &BackupOptions) -> anyhow::Result<u8> {
    let config = MachineConfig {
        image: load_image(&opts.image)?,
        mem_size: opts.mem_size,
        kvm_path: opts.kvm_path.clone(),
        net: opts.net.as_ref().map(|n| n.config),
    };
    opts.pair.schedule();
    let tls = opts.pair.arbiter_tls()?;
    let metrics = opts
        .pair
        .metrics(Role::Backup, opts.pair.epoch.unwrap_or(0))?;
    let hello = opts
        .pair
        .hello(channel::Role::Backup, &config, opts.pair.epoch.unwrap_or(0));
    let output: Box<dyn Write> = match &opts.transcript {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::sink()),
    };
    // The machine is built before a primary connects: a bad image or a
    // missing KVM fails at once, and the replay starts without delay. It
    // gets its real timeline once paired.
    let mut vcpu = machine::build(
        &config,
        Box::new(Replay::new(LoadedLog::new(Vec::new()), std::io::sink())),
    )
    .with_context(|| format!("cannot boot {:?}", opts.image))?;
    let (link, resume, epoch) = match opts.join.is_empty() {
        true => {
            tracing::info!("backup: waiting for a primary on {}", opts.listen);
            let link = BackupLink::accept_with(
                opts.listen,
                hello,
                opts.pair.channel_config(),
                &opts.pair.security(),
                |e| {
                    eprintln!("duet: refused a primary: {}", error_chain(e));
                },
            )?;
            let epoch = link.peer().epoch;
            (link, None, epoch)
        }
        false => {
            let hello = Hello {
                join: true,
                ..hello
            };
            if opts.spare {
                stop::install()?;
                tracing::warn!(
                    "spare: standing by for a VM at {} that needs a backup",
                    opts.join
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let joined = match ft::joiner::join_any(
                &mut vcpu,
                &opts.join,
                &hello,
                &opts.pair.security(),
                opts.pair.channel_config(),
                opts.spare,
            ) {
                Ok(j) => j,
                Err(e @ ft::joiner::Error::DigestMismatch { .. }) => {
                    eprintln!("duet: {e}");
                    return Ok(EXIT_DIVERGENCE);
                }
                Err(_) if opts.spare && stop::requested() => {
                    eprintln!("duet: stopped by a signal");
                    return Ok(0);
                }
                Err(e) => return Err(e.into()),
            };
            let h = &joined.handover;
            let addr = joined.from;
            metrics.join_done(Duration::ZERO, joined.took, joined.bytes);
            metrics.event(Event::Joined {
                epoch: joined.epoch,
                exit: h.exit,
                bytes: joined.bytes,
                total_ms: joined.took.as_millis() as u64,
            });
            tracing::warn!(
                "backup: joined the VM at {addr} after exit {}, epoch {}: state digest {} equals the survivor's ({} bytes in {} ms)",
                h.exit,
                joined.epoch,
                joined.digest,
                joined.bytes,
                joined.took.as_millis()
            );
            let resume = Some((h.first_seq, h.exit, h.clock_ns));
            (joined.link, resume, joined.epoch)
        }
    };
    opts.pair.warn_if_plaintext(channel::Role::Backup);
    stop::install()?;
    metrics.set_epoch(epoch);
    tracing::info!("backup: paired with a primary, epoch {epoch}");
    metrics.event(Event::Paired { epoch });
    let node = format!("backup@{}", std::process::id());
    let (serial, exec) = (opts.serial.clone(), opts.go_live_exec.clone());
    let net = opts.net.clone();
    let arbiter = opts.pair.arbiter(epoch, node, &tls);
    let takeover = Takeover {
        join: Some(opts.pair.join_plan(opts.listen, &config, arbiter.clone())),
        digest_every: Some(Duration::from_millis(500)),
        verify_outputs: opts.verify_outputs,
        max_lag: opts.pair.max_lag,
        arbiter,
        metrics: metrics.clone(),
        open_world: Box::new(move || {
            if let Some(cmd) = &exec {
                run_hook(cmd).map_err(ft::Error::GoLiveHook)?;
            }
            let bell = Doorbell::new();
            let port = serial_backend::start(&serial, &bell).map_err(ft::Error::GoLiveSerial)?;
            let world = World::new(bell.clone(), port, None);
            Ok(match &net {
                Some(n) => world.with_net(
                    tap_backend::start(&n.tap, n.config, &bell).map_err(ft::Error::GoLiveNet)?,
                ),
                None => world,
            })
        }),
    };
    let source = StreamSource::new(link, metrics.clone());
    let mut replay = match resume {
        Some((first_seq, exit, _)) => Replay::new(source.resume_at(first_seq, exit), output),
        None => Replay::new(source, output),
    };
    if let Some((_, _, clock_ns)) = resume {
        replay.resume_clock(clock_ns);
    }
    vcpu.set_timeline(Box::new(BackupTimeline::new(replay, takeover)));
    let outcome = vcpu.run();
    // A backup that went live ends as a primary, and says so.
    tracing::info!("{}: {}", metrics.role().name(), metrics.summary());
    let outcome = ft_outcome(outcome, &metrics)?;
    print_final_state(&vcpu.stats());
    Ok(outcome)
}

/// `duet certs`: issues a deployment's credentials into `out` and lists
/// what it wrote.
pub fn certs(out: &Path, vm_ids: &[String], arbiter_hosts: &[String]) -> anyhow::Result<u8> {
    let issued = logchannel::tls::issue(out, vm_ids, arbiter_hosts)?;
    if issued.new_ca {
        println!("a new CA in {}", out.display());
    } else {
        println!("signed by the CA already in {}", out.display());
    }
    for f in &issued.files {
        println!("  {}", f.display());
    }
    println!("keep ca-key.pem offline; give each host ca.pem and its own certificate and key");
    Ok(0)
}

/// Runs an operator's hook command with `sh -c`.
fn run_hook(cmd: &str) -> Result<(), HookError> {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map_err(|source| HookError::Spawn {
            command: cmd.to_string(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(HookError::Failed {
            command: cmd.to_string(),
            status,
        })
    }
}

/// Reads and validates a whole log file.
pub fn read_log(path: &Path) -> anyhow::Result<(Header, Vec<logchannel::Record>)> {
    let file = File::open(path).with_context(|| format!("cannot open log {}", path.display()))?;
    let (mut reader, header) = LogReader::open(BufReader::new(file))
        .with_context(|| format!("bad log {}", path.display()))?;
    let mut records = Vec::new();
    while let Some(r) = reader
        .next_record()
        .with_context(|| format!("bad log {}", path.display()))?
    {
        records.push(r);
    }
    Ok((header, records))
}

/// Refuses a log recorded from another image, memory size or machine.
fn check_header(header: &Header, config: &MachineConfig) -> anyhow::Result<()> {
    let hash = logchannel::image_hash(&config.image);
    if header.image_hash != hash {
        bail!(
            "the log was recorded from a different image (log {}, this image {})",
            hex(&header.image_hash[..8]),
            hex(&hash[..8])
        );
    }
    if header.mem_size != config.mem_size {
        bail!(
            "the log was recorded with {} bytes of memory, not {}",
            header.mem_size,
            config.mem_size
        );
    }
    let machine = machine::describe(config);
    if header.machine != machine {
        bail!(
            "the log was recorded on a different machine ({:?}, this is {:?})",
            header.machine,
            machine
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The final state line that tests and operators compare between runs;
/// nothing when the run did not reach an end with a state to show (a side
/// that lost the arbiter halts where it was).
fn print_final_state(stats: &crate::vcpu::Stats) {
    if let Some(d) = stats.final_digest {
        eprintln!(
            "duet: final state exits={} regs={:08x} mem={:08x}",
            stats.exits, d.regs_crc, d.mem_crc
        );
    }
}

fn machine_config(opts: &RunOptions) -> anyhow::Result<MachineConfig> {
    Ok(MachineConfig {
        image: load_image(&opts.image)?,
        mem_size: opts.mem_size,
        kvm_path: opts.kvm_path.clone(),
        net: opts.net.as_ref().map(|n| n.config),
    })
}

fn open_world(opts: &RunOptions) -> anyhow::Result<World> {
    let transcript = match &opts.transcript {
        Some(p) => Some(
            File::create(p).with_context(|| format!("cannot create transcript {}", p.display()))?,
        ),
        None => None,
    };
    let bell = Doorbell::new();
    let port = serial_backend::start(&opts.serial, &bell)?;
    let world = World::new(bell.clone(), port, transcript);
    let mut world = match &opts.net {
        Some(n) => world.with_net(tap_backend::start(&n.tap, n.config, &bell)?),
        None => world,
    };
    world.announce();
    Ok(world)
}

/// Prints a crash report and maps the outcome to an exit code.
pub fn report(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::PowerOff(code) => *code,
        Outcome::Stopped => 0,
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
