//! `duet demo`: the whole mission in one command. It builds two hosts (and
//! an arbiter's and a client's) as network namespaces, starts the arbiter,
//! a primary and a backup as separate processes, and runs a checked write
//! workload against the `netkv` guest over a bridged NIC on a few TCP
//! connections; it kills the primary with SIGKILL in the middle, keeps the
//! same connections going against the backup gone live, and verifies that
//! nothing the clients were told had happened was lost and that no
//! connection had to be made again. A standby spare (`duet spare`) waits on
//! host A from the start, so that the failover is followed by
//! re-protection without an operator: the spare joins the backup gone live
//! while the clients write, and the demo reports the join's pause, time
//! and bytes from the survivor's `protected` event. It prints its
//! progress, an account, and a chart of the failover and the re-protection
//! (SVG and PNG).
//!
//! Where it cannot make namespaces (not root, no iproute2), it says why and
//! runs the serial demo instead: `kv` on a serial line over loopback, whose
//! client must reconnect after the failover (`--serial` asks for it).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tas_server::tls::TlsFiles;

use crate::chart::{self, Mark, Timeline};
use crate::kit::certs;
use crate::kit::metrics::{self, Metrics};
use crate::kit::ports;
use crate::kit::process::Proc;
use crate::kit::resp::{Conn, Reply};
use crate::netns::{self, Host};

/// Options of `duet demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Operations (a SET and an INCR each) in the whole run (default 2000
    /// for the network demo, 600 for the serial one).
    pub ops: Option<u64>,
    /// Kill the primary after this many operations (default 800, or 300).
    pub kill_after: Option<u64>,
    /// The tas-server binary (default: next to `duet`).
    pub tas_server: Option<PathBuf>,
    /// Keep the processes' logs in this directory (default: a temp dir,
    /// removed at the end).
    pub keep_logs: Option<PathBuf>,
    /// Run the serial demo (`kv` on COM1) instead of the network one.
    pub serial: bool,
    /// Run the serial demo across the two-host network namespaces instead
    /// of loopback.
    pub netns: bool,
    /// Client connections of the network demo.
    pub connections: usize,
    /// Operations per second (default 500 for the network demo; 0 for the
    /// serial one: as fast as it answers).
    pub rate: Option<u64>,
    /// Where the failover chart goes.
    pub out: PathBuf,
}

/// Where the demo's processes run and how the client reaches them:
/// loopback, or the two-host network namespaces (`--netns`).
enum Net {
    Loopback,
    Netns(netns::Topology),
}

/// The addresses of one demo run.
struct Addrs {
    tas: SocketAddr,
    /// Where the backup listens for the log channel (and the primary dials).
    channel: SocketAddr,
    service: SocketAddr,
    m_primary: SocketAddr,
    m_backup: SocketAddr,
    /// The standby spare's addresses (the network demo only).
    spare: Option<SpareAddrs>,
}

/// Where the standby spare and the primary's join service listen, all on
/// host A: the spare joins whichever side runs alone, and once it is a
/// backup it must be reachable on A's logging link.
struct SpareAddrs {
    /// The primary's `--join-listen` (used only if the backup died first).
    primary_join: SocketAddr,
    /// The spare's own `--listen`: where joiners reach it once it is live.
    listen: SocketAddr,
    metrics: SocketAddr,
}

impl Net {
    fn addrs(&self) -> anyhow::Result<Addrs> {
        Ok(match self {
            Net::Loopback => Addrs {
                tas: ports::loopback()?,
                channel: ports::loopback()?,
                service: ports::loopback()?,
                m_primary: ports::loopback()?,
                m_backup: ports::loopback()?,
                spare: None,
            },
            Net::Netns(_) => {
                let ip = |h: Host| std::net::IpAddr::V4(h.service_ip());
                let log_b = Host::B.log_ip().map(std::net::IpAddr::V4);
                let log_a = std::net::IpAddr::V4(Host::A.log_ip().unwrap_or(Host::A.service_ip()));
                Addrs {
                    tas: SocketAddr::new(ip(Host::Arbiter), 7000),
                    channel: SocketAddr::new(log_b.unwrap_or(ip(Host::B)), 7001),
                    service: SocketAddr::new(std::net::IpAddr::V4(netns::VIP), 6380),
                    m_primary: SocketAddr::new(ip(Host::A), 9100),
                    m_backup: SocketAddr::new(ip(Host::B), 9100),
                    spare: Some(SpareAddrs {
                        primary_join: SocketAddr::new(log_a, 7002),
                        listen: SocketAddr::new(log_a, 7003),
                        metrics: SocketAddr::new(ip(Host::A), 9101),
                    }),
                }
            }
        })
    }

    /// A command for `program` on `host` (inside its namespace, if any).
    fn command(&self, host: Host, program: &Path) -> Command {
        match self {
            Net::Loopback => Command::new(program),
            Net::Netns(t) => t.command(host, program),
        }
    }

    /// Connects from the client's host.
    fn connect(&self, addr: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
        match self {
            Net::Loopback => TcpStream::connect_timeout(&addr, limit),
            Net::Netns(t) => t
                .in_namespace(Host::Client, || TcpStream::connect_timeout(&addr, limit))
                .map_err(std::io::Error::other)?,
        }
    }

    fn describe(&self) -> String {
        match self {
            Net::Loopback => "on 127.0.0.1".into(),
            Net::Netns(t) => format!(
                "across network namespaces {}-{{a,b,arb,cli}} (198.18.0.0/15)",
                t.prefix()
            ),
        }
    }
}

fn wait_for_port(
    net: &Net,
    addr: SocketAddr,
    limit: Duration,
    proc: &mut Proc,
) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if net.connect(addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        proc.ensure_running().with_context(|| {
            let log = proc.log_path().map(|p| p.display().to_string());
            format!("see {}", log.unwrap_or_else(|| "its log".into()))
        })?;
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the {} did not open {addr} within {limit:?}", proc.name())
}

/// The metrics at `addr`, reached from the client's host.
fn scrape(net: &Net, addr: SocketAddr) -> anyhow::Result<Metrics> {
    let stream = net.connect(addr, Duration::from_millis(300))?;
    Metrics::parse(&metrics::fetch(stream, Duration::from_secs(1))?)
}

/// A connection to the service from the client's host.
fn connect(net: &Net, addr: SocketAddr) -> std::io::Result<Conn> {
    Conn::from_stream(net.connect(addr, Duration::from_millis(200))?)
}

/// How long one reply may take.
const REPLY_LIMIT: Duration = Duration::from_secs(5);

/// One client connection, and how often it had to be made again.
#[derive(Default)]
struct Slot {
    conn: Option<Conn>,
    reconnects: u64,
    /// Replies since the last reconnect.
    since_reconnect: u64,
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Ledger {
    acked_sets: Vec<u64>,
    sent_incrs: u64,
    acked_incrs: u64,
    /// From the SIGKILL to the first reply on a connection made after it
    /// (the serial demo, whose clients must reconnect).
    failover: Option<Duration>,
    /// Requests answered with a protocol error just after a reconnect:
    /// the dead primary had passed the guest only part of an earlier
    /// request, and a serial line has no connection boundary to reset the
    /// guest's parser. Not acknowledged, so not counted as writes.
    refused_after_reconnect: u64,
    /// Every reply: (seconds since the start, latency in ms).
    replies: Vec<(f64, f64)>,
}

impl Ledger {
    /// An error reply is tolerated only as the first reply after a
    /// reconnect; anywhere else it is a failure.
    fn tolerate(&mut self, slot: &Slot, what: &str, reply: &Reply) -> anyhow::Result<()> {
        match reply {
            Reply::Error(_) if slot.reconnects > 0 && slot.since_reconnect <= 1 => {
                self.refused_after_reconnect += 1;
                Ok(())
            }
            other => bail!("{what} got {other:?}"),
        }
    }
}

/// Why a call got no reply.
#[derive(Debug)]
enum CallError {
    /// The connection broke: the request may or may not have been
    /// executed, so the caller counts it as sent, not acknowledged.
    Lost,
    /// The service could not be reached again for 30 s.
    Unreachable(String),
}

/// Runs one call on `slot`, connecting first if it has no connection.
fn call(
    net: &Net,
    slot: &mut Slot,
    addr: SocketAddr,
    args: &[&str],
    ledger: &mut Ledger,
    clock: (Instant, Option<Instant>),
) -> Result<Reply, CallError> {
    let (started, killed_at) = clock;
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot.conn.is_none() {
        match connect(net, addr) {
            Ok(c) => slot.conn = Some(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Err(CallError::Unreachable(format!(
                    "cannot reach the service at {addr} for 30 s: {e}"
                )))
            }
        }
    }
    let Some(c) = slot.conn.as_mut() else {
        return Err(CallError::Lost);
    };
    let sent = Instant::now();
    match c.call(args, REPLY_LIMIT) {
        Ok(reply) => {
            let now = Instant::now();
            ledger.replies.push((
                (now - started).as_secs_f64(),
                (now - sent).as_secs_f64() * 1e3,
            ));
            slot.since_reconnect += 1;
            if let (Some(k), None) = (killed_at, ledger.failover) {
                if slot.reconnects > 0 {
                    ledger.failover = Some(k.elapsed());
                }
            }
            Ok(reply)
        }
        Err(e) => {
            if std::env::var_os("DUET_DEMO_DEBUG").is_some() {
                eprintln!(
                    "demo: {:?} {args:?} failed: {e}",
                    killed_at.map(|k| k.elapsed())
                );
            }
            slot.conn = None;
            slot.reconnects += 1;
            slot.since_reconnect = 0;
            Err(CallError::Lost)
        }
    }
}

/// The events (`--events`) a side wrote, each line as JSON; a line being
/// written (or torn) is skipped.
fn event_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The events a side wrote, as (Unix time, event name).
fn read_events(path: &Path) -> Vec<(f64, String)> {
    event_lines(path)
        .iter()
        .filter_map(|v| Some((v["ts"].as_f64()?, v["event"].as_str()?.to_string())))
        .collect()
}

/// What the survivor reported of a finished join (its `protected` event):
/// the demo's figures come from the side that paused its guest, not from
/// the joiner, which cannot see the pause.
#[derive(Debug, Clone, PartialEq)]
struct Protection {
    /// Unix time of the event.
    ts: f64,
    epoch: u64,
    blackout_us: u64,
    total_ms: u64,
    bytes: u64,
}

/// The first `protected` event in a side's events, if any.
fn read_protection(path: &Path) -> Option<Protection> {
    event_lines(path)
        .iter()
        .find(|v| v["event"] == "protected")
        .and_then(|v| {
            Some(Protection {
                ts: v["ts"].as_f64()?,
                epoch: v["epoch"].as_u64()?,
                blackout_us: v["blackout_us"].as_u64()?,
                total_ms: v["total_ms"].as_u64()?,
                bytes: v["bytes"].as_u64()?,
            })
        })
}

/// Why each join the survivor gave up failed (its `join_failed` events).
fn join_failures(path: &Path) -> Vec<String> {
    event_lines(path)
        .iter()
        .filter(|v| v["event"] == "join_failed")
        .map(|v| v["why"].as_str().unwrap_or("no reason given").to_string())
        .collect()
}

/// How long the network demo waits after the kill for the spare to
/// protect the VM again before it calls re-protection failed. A join of
/// the demo's 64 MiB guest takes about a second; this only bounds it.
const REPROTECT_LIMIT: Duration = Duration::from_secs(30);

/// How long the workload goes on after the survivor is protected again,
/// so that the chart shows the traffic on both sides of the join (and
/// room for the mark's label).
const AFTER_PROTECTED: Duration = Duration::from_secs(1);

/// The failover's moments: the kill, then what the backup's events say
/// (up to and including its re-protection).
fn failover_marks(kill_t: f64, t0_unix: f64, backup_events: &[(f64, String)]) -> Vec<Mark> {
    let mut marks = vec![Mark {
        t: kill_t,
        label: "kill".into(),
    }];
    for (ts, event) in backup_events {
        let label = match event.as_str() {
            "peer_lost" => "detected",
            "claim_sent" => "claim",
            "claim_granted" => "granted",
            "live" => "go-live",
            "protected" => "protected",
            _ => continue,
        };
        marks.push(Mark {
            t: (ts - t0_unix).max(kill_t),
            label: label.into(),
        });
    }
    marks
}

/// Which guest the demo runs, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    /// `netkv` on a bridged NIC: clients keep their TCP connections.
    Network,
    /// `kv` on the serial line: clients reconnect after a failover.
    Serial,
}

/// Why the network demo cannot run here, if it cannot.
fn network_unavailable() -> Option<String> {
    if !netns::is_root() {
        return Some("it needs root to create network namespaces".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip` (iproute2) is not installed".into()),
    }
}

/// Runs the demo and returns the process exit code.
pub fn run(opts: &DemoOptions) -> anyhow::Result<u8> {
    let guest = match (opts.serial, network_unavailable()) {
        (true, _) => Guest::Serial,
        (false, None) => Guest::Network,
        (false, Some(why)) => {
            println!(
                "duet demo: the network demo cannot run here ({why}); running the serial demo on loopback instead"
            );
            Guest::Serial
        }
    };
    let (ops, kill_after) = match guest {
        Guest::Network => (opts.ops.unwrap_or(2000), opts.kill_after.unwrap_or(800)),
        Guest::Serial => (opts.ops.unwrap_or(600), opts.kill_after.unwrap_or(300)),
    };
    if kill_after >= ops {
        bail!("--kill-after ({kill_after}) must be below --ops ({ops})");
    }
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let duet = std::env::current_exe().context("cannot find the duet executable")?;
    let tas_bin = match &opts.tas_server {
        Some(p) => p.clone(),
        None => duet.with_file_name("tas-server"),
    };
    if !tas_bin.exists() {
        bail!(
            "tas-server not found at {} (build it with `cargo build --release --workspace`, or pass --tas-server)",
            tas_bin.display()
        );
    }
    // Removed on drop, on every path, unless the logs are to be kept.
    let temp = tempfile::Builder::new()
        .prefix("duet-demo-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let dir = opts
        .keep_logs
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let net = if guest == Guest::Network || opts.netns {
        if !netns::is_root() {
            bail!("--netns needs root (it creates network namespaces)");
        }
        let prefix = format!("dd{}", std::process::id() % 100_000);
        Net::Netns(netns::Topology::up(&prefix).context("cannot build the two-host namespaces")?)
    } else {
        Net::Loopback
    };
    let plan = Plan {
        guest,
        ops,
        kill_after,
        connections: match guest {
            Guest::Network => opts.connections,
            Guest::Serial => 1,
        },
        rate: opts
            .rate
            .unwrap_or(if guest == Guest::Network { 500 } else { 0 }),
    };
    let result = run_in(opts, &plan, &net, (&duet, &tas_bin), &dir);
    // Dropping the topology removes the namespaces.
    drop(net);
    if opts.keep_logs.is_some() {
        println!("logs kept in {}", dir.display());
    }
    drop(temp);
    result
}

/// What this run does, once the defaults are settled.
struct Plan {
    guest: Guest,
    ops: u64,
    kill_after: u64,
    connections: usize,
    /// Operations per second; 0: as fast as the service answers.
    rate: u64,
}

/// The demo's arbiter credentials: the arbiter's, the pair's (VM `demo`)
/// and an operator's (for the final status), all from a CA made for this
/// run in its directory, so that the demo's arbiter is authenticated as a
/// deployment's should be.
struct DemoTls {
    arbiter: TlsFiles,
    pair: TlsFiles,
    operator: TlsFiles,
}

/// Issues them the way `duet certs` does, into `dir`: one CA for the log
/// channel and the arbiter alike.
fn demo_credentials(dir: &Path) -> anyhow::Result<DemoTls> {
    logchannel::tls::issue(dir, &["demo".into()], &[])
        .context("cannot issue the demo's TLS credentials")?;
    let files = |name: &str| TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    Ok(DemoTls {
        arbiter: files("arbiter"),
        pair: files("demo"),
        operator: files("operator"),
    })
}

fn run_in(
    opts: &DemoOptions,
    plan: &Plan,
    net: &Net,
    (duet, tas_bin): (&Path, &Path),
    dir: &Path,
) -> anyhow::Result<u8> {
    let mut a = net.addrs()?;
    let network = plan.guest == Guest::Network;
    if network {
        a.service = SocketAddr::new(std::net::IpAddr::V4(netns::GUEST_IP), 6379);
    }
    println!(
        "duet demo: arbiter, primary and backup as separate processes {}",
        net.describe()
    );
    if network {
        println!(
            "the guest (netkv, a Redis-protocol server with its own TCP stack) is on a bridged NIC at {}; {} client connection(s) stay open across the failover",
            a.service, plan.connections
        );
    }

    // Secure by default: the arbiter and the pair's log channel are mutual
    // TLS, with credentials issued here the way `duet certs` issues them.
    let certs_dir = dir.join("tls");
    let tls = demo_credentials(&certs_dir)?;
    println!(
        "the arbiter and the log channel are mutual TLS (a CA and certificates issued into {})",
        certs_dir.display()
    );
    let mut arbiter = Proc::logged(
        "arbiter",
        net.command(Host::Arbiter, tas_bin)
            .args(["--listen", &a.tas.to_string()])
            .arg("--state")
            .arg(dir.join("tas.state"))
            .args(certs::args(&tls.arbiter)),
        &dir.join("tas-server.log"),
    )?;
    wait_for_port(net, a.tas, Duration::from_secs(10), &mut arbiter)?;

    let guest_ip = format!("{}/{}", netns::GUEST_IP, netns::SERVICE_PREFIX_LEN);
    let pair = |role: &str| -> Vec<String> {
        let mut args: Vec<String> = [role, "--vm-id", "demo", "--tas"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(a.tas.to_string());
        args.extend(
            certs::args(&tls.pair)
                .iter()
                .map(|a| a.to_string_lossy().into_owned()),
        );
        args.push("--events".into());
        args.push(dir.join(format!("{role}.events")).display().to_string());
        if network {
            args.extend(
                ["--image", "netkv", "--tap", netns::TAP_IF, "--guest-ip"].map(String::from),
            );
            args.push(guest_ip.clone());
        } else {
            args.extend(["--image".into(), "kv".into(), "--serial".into()]);
            args.push(format!("tcp:{}", a.service));
        }
        args
    };
    let mut backup_cmd = net.command(Host::B, duet);
    backup_cmd
        .args(pair("backup"))
        .args(["--listen", &a.channel.to_string()])
        .args(["--metrics", &a.m_backup.to_string()])
        .env("DUET_LOG", "info");
    if let (Net::Netns(t), false) = (net, network) {
        // Going live moves the serial service's address to host B. (A
        // NIC needs no hook: the guest keeps its address, and the backup
        // announces the MAC from its host.)
        backup_cmd.args([
            "--go-live-exec",
            &format!(
                "{} netns move-vip --prefix {} --to b",
                duet.display(),
                t.prefix()
            ),
        ]);
    }
    let mut backup = Proc::logged("backup", &mut backup_cmd, &dir.join("backup.log"))?;
    wait_for_port(net, a.m_backup, Duration::from_secs(10), &mut backup)?;
    let mut primary_cmd = net.command(Host::A, duet);
    primary_cmd
        .args(pair("primary"))
        .args(["--backup", &a.channel.to_string()])
        .args(["--metrics", &a.m_primary.to_string()])
        .env("DUET_LOG", "info");
    if network {
        primary_cmd.args(["--serial", "none"]);
    }
    if let Some(s) = &a.spare {
        // Should the backup die instead, the primary takes the spare.
        primary_cmd.args(["--join-listen", &s.primary_join.to_string()]);
    }
    let mut primary = Proc::logged("primary", &mut primary_cmd, &dir.join("primary.log"))?;
    wait_for_port(net, a.service, Duration::from_secs(20), &mut primary)?;
    println!(
        "primary serving on {} from host A; backup replaying on host B; arbiter on {}",
        a.service, a.tas
    );
    // The standby spare, on host A with the pair's NIC flags: it opens
    // A's TAP only if it ever goes live, so it can wait beside the primary.
    // A spare that cannot start fails the re-protection, not the demo's
    // failover, which still runs and reports.
    let mut spare = None;
    let mut spare_problem = None;
    if let Some(s) = &a.spare {
        let mut cmd = net.command(Host::A, duet);
        cmd.args(pair("spare"))
            .args(["--serial", "none"])
            .args(["--listen", &s.listen.to_string()])
            .args(["--join", &format!("{},{}", a.channel, s.primary_join)])
            .args(["--metrics", &s.metrics.to_string()])
            .env("DUET_LOG", "info");
        match Proc::logged("spare", &mut cmd, &dir.join("spare.log")) {
            Ok(mut p) => {
                if p.wait_for_log("spare: standing by", Duration::from_secs(10)) {
                    println!(
                        "standby spare on host A watching the backup ({}) and the primary ({}), to join whichever runs alone",
                        a.channel, s.primary_join
                    );
                } else {
                    spare_problem = Some(format!(
                        "the spare did not start (see {})",
                        dir.join("spare.log").display()
                    ));
                }
                spare = Some(p);
            }
            Err(e) => spare_problem = Some(format!("cannot start the spare: {e:#}")),
        }
        if let Some(why) = &spare_problem {
            println!("re-protection: {why}; the failover goes on without it");
        }
    }
    let (service, m_primary, tas) = (a.service, a.m_primary, a.tas);
    let backup_events = dir.join("backup.events");

    let mut ledger = Ledger::default();
    let mut slots: Vec<Slot> = (0..plan.connections).map(|_| Slot::default()).collect();
    if network {
        // Every connection is made now, before the kill, so that any
        // connection made later is a reconnect.
        for slot in &mut slots {
            slot.conn = Some(connect(net, service).context("cannot connect to the guest")?);
        }
    }
    let mut killed_at = None;
    let mut before_kill = None;
    let started = Instant::now();
    let t0_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut progress = (Instant::now(), 0usize);
    // With a spare, the workload runs on past `ops` until the survivor is
    // protected again (and a little after), or the spare gave up, or
    // [`REPROTECT_LIMIT`] after the kill: the chart then shows the clients
    // through the join's pause.
    let waiting_for_spare = spare.is_some() && spare_problem.is_none();
    let mut protected: Option<Protection> = None;
    let mut last_poll = Instant::now();
    let mut i = 0u64;
    loop {
        if i >= plan.ops {
            if !waiting_for_spare {
                break;
            }
            if last_poll.elapsed() >= Duration::from_millis(50) {
                last_poll = Instant::now();
                protected = protected.or_else(|| read_protection(&backup_events));
            }
            let now_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let done = match &protected {
                Some(p) => now_unix - p.ts >= AFTER_PROTECTED.as_secs_f64(),
                None => {
                    killed_at.is_some_and(|k: Instant| k.elapsed() >= REPROTECT_LIMIT)
                        || spare.as_mut().is_some_and(|p| p.status().is_some())
                }
            };
            if done {
                break;
            }
        }
        if plan.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / plan.rate as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        if i == plan.kill_after {
            before_kill = scrape(net, m_primary).ok();
            primary.signal(libc::SIGKILL)?;
            killed_at = Some(Instant::now());
            println!(
                "  {:5.1} s  op {i}: killed the primary (SIGKILL)",
                started.elapsed().as_secs_f64()
            );
        }
        if progress.0.elapsed() >= Duration::from_secs(1) {
            let events = read_events(&backup_events);
            let who = if events.iter().any(|(_, e)| e == "protected") {
                "host B, protected again by the spare on host A"
            } else if events.iter().any(|(_, e)| e == "join_started") {
                "host B (the backup went live); the spare is joining"
            } else if events.iter().any(|(_, e)| e == "live") {
                "host B (the backup went live)"
            } else {
                "host A"
            };
            let rate =
                (ledger.replies.len() - progress.1) as f64 / progress.0.elapsed().as_secs_f64();
            println!(
                "  {:5.1} s  {:6.0} replies/s  primary: {who}",
                started.elapsed().as_secs_f64(),
                rate
            );
            progress = (Instant::now(), ledger.replies.len());
        }
        let slot = &mut slots[i as usize % plan.connections];
        let clock = (started, killed_at);
        let (key, value) = (format!("key:{i}"), format!("value:{i}"));
        match call(
            net,
            slot,
            service,
            &["SET", &key, &value],
            &mut ledger,
            clock,
        ) {
            Ok(r) if r.is_ok() => ledger.acked_sets.push(i),
            Ok(other) => ledger.tolerate(slot, &format!("SET {key}"), &other)?,
            Err(CallError::Lost) => {}
            Err(CallError::Unreachable(e)) => bail!(e),
        }
        ledger.sent_incrs += 1;
        match call(net, slot, service, &["INCR", "counter"], &mut ledger, clock) {
            Ok(Reply::Integer(_)) => ledger.acked_incrs += 1,
            Ok(other) => ledger.tolerate(slot, "INCR", &other)?,
            Err(CallError::Lost) => {}
            Err(CallError::Unreachable(e)) => bail!(e),
        }
        i += 1;
    }
    let ops_done = i;
    let elapsed = started.elapsed();
    // The chart shows the workload, not the check that follows.
    let workload_replies = ledger.replies.clone();

    // Verify against the new primary, each key on the connection that
    // wrote it.
    let mut missing = Vec::new();
    for i in ledger.acked_sets.clone() {
        let want = format!("value:{i}").into_bytes();
        let slot = &mut slots[i as usize % plan.connections];
        let got = loop {
            match call(
                net,
                slot,
                service,
                &["GET", &format!("key:{i}")],
                &mut ledger,
                (started, None),
            ) {
                Ok(r) => break r,
                Err(CallError::Lost) => continue,
                Err(CallError::Unreachable(e)) => bail!(e),
            }
        };
        if !matches!(got, Reply::Bulk(Some(v)) if v == want) {
            missing.push(i);
        }
    }
    let counter = loop {
        match call(
            net,
            &mut slots[0],
            service,
            &["GET", "counter"],
            &mut ledger,
            (started, None),
        ) {
            Ok(Reply::Bulk(Some(v))) => {
                break String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0)
            }
            Ok(_) => break 0,
            Err(CallError::Lost) => continue,
            Err(CallError::Unreachable(e)) => bail!(e),
        }
    };
    let counter_ok = (ledger.acked_incrs..=ledger.sent_incrs).contains(&counter);
    let went_live = std::fs::read_to_string(dir.join("backup.log"))
        .unwrap_or_default()
        .matches("going live")
        .count();
    let operator = tas_server::client::Client::new(tas, Duration::from_secs(1))
        .with_tls(tls.operator.client_config()?);
    let status = match net {
        Net::Loopback => operator.status().map_err(|e| e.to_string()),
        Net::Netns(t) => t
            .in_namespace(Host::Client, || {
                operator.status().map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r),
    }
    .map(|s| {
        s.vms
            .iter()
            .map(|vm| format!("{} epoch {} held by {:?}", vm.vm_id, vm.epoch, vm.holders))
            .collect::<Vec<_>>()
            .join("; ")
    })
    .unwrap_or_else(|e| format!("unavailable: {e}"));

    let kill_t = killed_at.map_or(0.0, |k| (k - started).as_secs_f64());
    let marks = failover_marks(kill_t, t0_unix, &read_events(&backup_events));
    let reprotection = a.spare.is_some().then(|| {
        let protected = protected
            .clone()
            .or_else(|| read_protection(&backup_events));
        let failures = join_failures(&backup_events);
        match (protected, &spare_problem) {
            (Some(p), _) => Ok(p),
            (None, Some(why)) => Err(why.clone()),
            (None, None) => {
                let exited = spare.as_mut().and_then(|sp| sp.status());
                let mut why = match exited {
                    Some(st) => format!("the spare exited ({st})"),
                    None => format!(
                        "the new primary was not protected again within {} s of the kill",
                        REPROTECT_LIMIT.as_secs()
                    ),
                };
                if !failures.is_empty() {
                    why.push_str(&format!("; joins given up: {}", failures.join("; ")));
                }
                why.push_str(&format!(
                    " (see {} and {})",
                    dir.join("spare.log").display(),
                    dir.join("backup.log").display()
                ));
                Err(why)
            }
        }
    });
    let timeline = Timeline {
        title: format!(
            "duet demo: {} clients across a SIGKILL of the primary{}",
            if network { "TCP" } else { "serial" },
            if reprotection.is_some() {
                ", then re-protection by a spare"
            } else {
                ""
            }
        ),
        replies: workload_replies,
        marks: marks.clone(),
    };
    let reconnected = slots.iter().filter(|s| s.reconnects > 0).count();

    let metrics = before_kill.unwrap_or_default();
    println!();
    println!("=== duet demo: what the clients saw ===");
    println!(
        "operations            {} SET + {} INCR in {:.1} s over {} connection(s){}",
        ops_done,
        ledger.sent_incrs,
        elapsed.as_secs_f64(),
        plan.connections,
        if ops_done > plan.ops {
            format!(
                " ({} more than --ops, while the spare joined)",
                ops_done - plan.ops
            )
        } else {
            String::new()
        }
    );
    if network {
        println!(
            "connections           {} of {} kept open across the failover; {reconnected} had to reconnect",
            plan.connections - reconnected,
            plan.connections
        );
    }
    println!(
        "writes acknowledged   {} SETs; verified present on the new primary: {}",
        ledger.acked_sets.len(),
        ledger.acked_sets.len() - missing.len()
    );
    println!(
        "counter               {counter}, must lie in [{} acknowledged, {} sent]: {}",
        ledger.acked_incrs,
        ledger.sent_incrs,
        if counter_ok { "yes" } else { "NO" }
    );
    match ledger.failover {
        Some(d) => println!(
            "failover time         {:.0} ms from SIGKILL to the first reply from the new primary",
            d.as_secs_f64() * 1e3
        ),
        None if !network => println!("failover time         not observed"),
        None => {}
    }
    let steps: Vec<String> = marks
        .iter()
        .skip(1)
        .map(|m| format!("{} +{:.0} ms", m.label, (m.t - kill_t) * 1e3))
        .collect();
    println!(
        "failover steps        SIGKILL, then {}",
        if steps.is_empty() {
            "nothing in the backup's events".to_string()
        } else {
            steps.join(", ")
        }
    );
    if let Some((gap, _)) = timeline.longest_gap() {
        println!(
            "longest reply gap     {:.0} ms (the failover as a client saw it)",
            gap * 1e3
        );
    }
    println!("backup went live      {went_live} time(s)");
    match &reprotection {
        Some(Ok(p)) => {
            let live_ts = read_events(&backup_events)
                .iter()
                .find(|(_, e)| e == "live")
                .map(|(ts, _)| *ts);
            let after_live = live_ts
                .map(|l| format!(" {:.0} ms after go-live", (p.ts - l) * 1e3))
                .unwrap_or_default();
            println!(
                "re-protection         the spare on host A joined the new primary without an operator:{after_live}, epoch {}",
                p.epoch
            );
            println!(
                "  guest paused        {} µs (the last dirty pages and the machine state)",
                p.blackout_us
            );
            println!(
                "  time to protected   {} ms from the spare's arrival",
                p.total_ms
            );
            println!(
                "  bytes sent          {} ({:.1} MiB, pre-copy rounds and the handover)",
                p.bytes,
                p.bytes as f64 / (1024.0 * 1024.0)
            );
        }
        Some(Err(why)) => println!("re-protection         FAILED: {why}"),
        None => {}
    }
    if ledger.refused_after_reconnect > 0 {
        println!(
            "cut mid-request       {} request(s) after the reconnect got a protocol error (a request the old primary had half-delivered); not counted as writes",
            ledger.refused_after_reconnect
        );
    }
    println!(
        "log bandwidth         {:.2} Mbit/s (primary, before the kill)",
        metrics.get("duet_log_mbit_per_second").unwrap_or(0.0)
    );
    println!(
        "execution lag         p50 {:.2} ms, p99 {:.2} ms",
        metrics.quantile("duet_lag_seconds", 0.50).unwrap_or(0.0) * 1e3,
        metrics.quantile("duet_lag_seconds", 0.99).unwrap_or(0.0) * 1e3
    );
    println!("arbiter state         {status}");
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let (svg, png) = (
        opts.out.join("duet-demo-failover.svg"),
        opts.out.join("duet-demo-failover.png"),
    );
    match chart::write(&timeline, &svg, &png) {
        Ok(()) => println!(
            "chart                 {} and {}",
            svg.display(),
            png.display()
        ),
        Err(e) => println!("chart                 not written: {e}"),
    }

    // The spare first (a backup whose primary stops would go live), then
    // the new primary stops cleanly; the arbiter is done.
    drop(slots);
    if let Some(p) = spare.as_mut() {
        let _ = p.terminate();
        let _ = p.wait_timeout(Duration::from_secs(10));
    }
    let _ = backup.terminate();
    let _ = backup.wait_timeout(Duration::from_secs(10));
    let _ = arbiter.terminate();
    let _ = arbiter.wait_timeout(Duration::from_secs(5));

    let kept_open = !network || reconnected == 0;
    if !missing.is_empty() || !counter_ok || went_live != 1 || !kept_open {
        println!(
            "FAILED: {} acknowledged writes missing (first: {:?}), counter ok: {counter_ok}, went live {went_live} times, connections that had to reconnect: {reconnected}",
            missing.len(),
            missing.first()
        );
        return Ok(1);
    }
    match &reprotection {
        Some(Err(why)) => {
            println!(
                "FAILED: re-protection: {why}; the failover itself lost nothing the clients were told had happened"
            );
            Ok(1)
        }
        Some(Ok(_)) => {
            println!(
                "OK: nothing the clients were told had happened was lost, and the VM is protected again (the spare on host A is its backup)"
            );
            Ok(0)
        }
        None => {
            println!("OK: nothing the clients were told had happened was lost");
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event log as a survivor that went live and took a spare writes
    /// it (the lines `ft::events` writes, one torn at the end).
    fn survivor_events() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            concat!(
                r#"{"ts":100.0,"role":"backup","event":"peer_lost","peer":"primary","failure":"silent"}"#,
                "\n",
                r#"{"ts":100.5,"role":"backup","event":"live","exit":7}"#,
                "\n",
                r#"{"ts":101.0,"role":"primary","event":"join_failed","why":"the joiner went away"}"#,
                "\n",
                r#"{"ts":101.9,"role":"primary","event":"protected","epoch":4,"exit":99,"blackout_us":1800,"total_ms":420,"bytes":70000000}"#,
                "\n",
                r#"{"ts":102.0,"role":"prim"#,
            ),
        )
        .unwrap();
        file
    }

    #[test]
    fn the_survivors_protected_event_gives_the_figures_and_a_mark_after_go_live() {
        let file = survivor_events();
        let p = read_protection(file.path()).unwrap();
        assert_eq!(
            p,
            Protection {
                ts: 101.9,
                epoch: 4,
                blackout_us: 1800,
                total_ms: 420,
                bytes: 70_000_000,
            }
        );
        assert_eq!(join_failures(file.path()), ["the joiner went away"]);
        let marks = failover_marks(2.0, 98.0, &read_events(file.path()));
        let labels: Vec<&str> = marks.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["kill", "detected", "go-live", "protected"]);
        assert!((marks[3].t - 3.9).abs() < 1e-9 && marks[3].t > marks[2].t);
    }

    #[test]
    fn no_protected_event_is_none() {
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(read_protection(file.path()), None);
        assert!(join_failures(Path::new("/nonexistent/events")).is_empty());
    }
}
