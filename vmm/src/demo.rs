//! `duet demo`: the whole mission in one command. It starts the arbiter, a
//! primary and a backup as separate processes, runs a checked write
//! workload against the `kv` guest, kills the primary with SIGKILL in the
//! middle, lets the client reconnect to the same address (now served by the
//! backup gone live), and verifies that nothing the client was told had
//! happened was lost.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::kit::metrics::{self, Metrics};
use crate::kit::ports;
use crate::kit::process::Proc;
use crate::kit::resp::{Conn, Reply};
use crate::netns::{self, Host};

/// Options of `duet demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Operations (a SET and an INCR each) in the whole run.
    pub ops: u64,
    /// Kill the primary after this many operations.
    pub kill_after: u64,
    /// The tas-server binary (default: next to `duet`).
    pub tas_server: Option<PathBuf>,
    /// Keep the processes' logs in this directory (default: a temp dir,
    /// removed at the end).
    pub keep_logs: Option<PathBuf>,
    /// Run across the two-host network namespaces instead of loopback.
    pub netns: bool,
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
            },
            Net::Netns(_) => {
                let ip = |h: Host| std::net::IpAddr::V4(h.service_ip());
                let log_b = Host::B.log_ip().map(std::net::IpAddr::V4);
                Addrs {
                    tas: SocketAddr::new(ip(Host::Arbiter), 7000),
                    channel: SocketAddr::new(log_b.unwrap_or(ip(Host::B)), 7001),
                    service: SocketAddr::new(std::net::IpAddr::V4(netns::VIP), 6380),
                    m_primary: SocketAddr::new(ip(Host::A), 9100),
                    m_backup: SocketAddr::new(ip(Host::B), 9100),
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

/// A connection to the service from the client's host; every reply is
/// awaited for at most five seconds.
fn connect(net: &Net, addr: SocketAddr) -> std::io::Result<Conn> {
    Conn::from_stream(net.connect(addr, Duration::from_millis(200))?)
}

/// How long one reply may take.
const REPLY_LIMIT: Duration = Duration::from_secs(5);

/// What the client saw.
#[derive(Debug, Default)]
struct Ledger {
    acked_sets: Vec<u64>,
    sent_incrs: u64,
    acked_incrs: u64,
    reconnects: u64,
    failover: Option<Duration>,
    /// Requests answered with a protocol error just after a reconnect:
    /// the dead primary had passed the guest only part of an earlier
    /// request, and a serial line has no connection boundary to reset the
    /// guest's parser. Not acknowledged, so not counted as writes.
    refused_after_reconnect: u64,
    /// Replies since the last reconnect.
    since_reconnect: u64,
}

impl Ledger {
    /// An error reply is tolerated only as the first reply after a
    /// reconnect; anywhere else it is a failure.
    fn tolerate(&mut self, what: &str, reply: &Reply) -> anyhow::Result<()> {
        match reply {
            Reply::Error(_) if self.reconnects > 0 && self.since_reconnect <= 1 => {
                self.refused_after_reconnect += 1;
                Ok(())
            }
            other => bail!("{what} got {other:?}"),
        }
    }
}

/// Runs one call, reconnecting (bounded) when the connection breaks.
/// Returns the reply, and whether the call may have reached the server.
fn call_with_retry(
    net: &Net,
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    args: &[&str],
    ledger: &mut Ledger,
    killed_at: Option<Instant>,
) -> anyhow::Result<Reply> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if conn.is_none() {
            match connect(net, addr) {
                Ok(c) => *conn = Some(c),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => bail!("cannot reach the service at {addr} for 30 s: {e}"),
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match c.call(args, REPLY_LIMIT) {
            Ok(reply) => {
                ledger.since_reconnect += 1;
                if let (Some(k), None) = (killed_at, ledger.failover) {
                    if ledger.reconnects > 0 {
                        ledger.failover = Some(k.elapsed());
                    }
                }
                return Ok(reply);
            }
            Err(e) => {
                if std::env::var_os("DUET_DEMO_DEBUG").is_some() {
                    eprintln!(
                        "demo: {:?} {args:?} failed: {e}",
                        killed_at.map(|k| k.elapsed())
                    );
                }
                *conn = None;
                ledger.reconnects += 1;
                ledger.since_reconnect = 0;
                if Instant::now() >= deadline {
                    bail!("the service at {addr} kept failing for 30 s: {e}");
                }
                // The request may or may not have been executed: the caller
                // counts it as sent, not acknowledged, and moves on.
                return Err(anyhow::anyhow!("connection lost: {e}"));
            }
        }
    }
}

/// The metrics at `addr`, reached from the client's host.
fn scrape(net: &Net, addr: SocketAddr) -> anyhow::Result<Metrics> {
    let stream = net.connect(addr, Duration::from_millis(300))?;
    Metrics::parse(&metrics::fetch(stream, Duration::from_secs(1))?)
}

/// Runs the demo and returns the process exit code.
pub fn run(opts: &DemoOptions) -> anyhow::Result<u8> {
    if opts.kill_after >= opts.ops {
        bail!(
            "--kill-after ({}) must be below --ops ({})",
            opts.kill_after,
            opts.ops
        );
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
    let net = if opts.netns {
        if !netns::is_root() {
            bail!("--netns needs root (it creates network namespaces)");
        }
        let prefix = format!("dd{}", std::process::id() % 100_000);
        Net::Netns(netns::Topology::up(&prefix).context("cannot build the two-host namespaces")?)
    } else {
        Net::Loopback
    };
    let result = run_in(opts, &net, &duet, &tas_bin, &dir);
    // Dropping the topology removes the namespaces.
    drop(net);
    if opts.keep_logs.is_some() {
        println!("logs kept in {}", dir.display());
    }
    drop(temp);
    result
}

fn run_in(
    opts: &DemoOptions,
    net: &Net,
    duet: &Path,
    tas_bin: &Path,
    dir: &Path,
) -> anyhow::Result<u8> {
    let a = net.addrs()?;
    println!(
        "duet demo: arbiter, primary and backup as separate processes {}",
        net.describe()
    );

    let mut arbiter = Proc::logged(
        "arbiter",
        net.command(Host::Arbiter, tas_bin)
            .args(["--listen", &a.tas.to_string()])
            .arg("--state")
            .arg(dir.join("tas.state")),
        &dir.join("tas-server.log"),
    )?;
    wait_for_port(net, a.tas, Duration::from_secs(10), &mut arbiter)?;

    let pair = |role: &str| -> Vec<String> {
        vec![
            role.to_string(),
            "--image".into(),
            "kv".into(),
            "--vm-id".into(),
            "demo".into(),
            "--tas".into(),
            a.tas.to_string(),
            "--serial".into(),
            format!("tcp:{}", a.service),
        ]
    };
    let mut backup_cmd = net.command(Host::B, duet);
    backup_cmd
        .args(pair("backup"))
        .args(["--listen", &a.channel.to_string()])
        .args(["--metrics", &a.m_backup.to_string()])
        .env("DUET_LOG", "info");
    if let Net::Netns(t) = net {
        // Going live moves the service address to host B.
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
    let mut primary = Proc::logged(
        "primary",
        net.command(Host::A, duet)
            .args(pair("primary"))
            .args(["--backup", &a.channel.to_string()])
            .args(["--metrics", &a.m_primary.to_string()])
            .env("DUET_LOG", "info"),
        &dir.join("primary.log"),
    )?;
    wait_for_port(net, a.service, Duration::from_secs(20), &mut primary)?;
    println!(
        "primary serving kv on {}; backup replaying; arbiter on {}",
        a.service, a.tas
    );
    let (service, m_primary, tas) = (a.service, a.m_primary, a.tas);

    let mut ledger = Ledger::default();
    let mut conn: Option<Conn> = None;
    let mut killed_at = None;
    let mut before_kill = None;
    let started = Instant::now();
    for i in 0..opts.ops {
        if i == opts.kill_after {
            before_kill = scrape(net, m_primary).ok();
            primary.signal(libc::SIGKILL)?;
            killed_at = Some(Instant::now());
            println!("op {i}: killed the primary (SIGKILL)");
        }
        let (key, value) = (format!("key:{i}"), format!("value:{i}"));
        match call_with_retry(
            net,
            &mut conn,
            service,
            &["SET", &key, &value],
            &mut ledger,
            killed_at,
        ) {
            Ok(r) if r.is_ok() => ledger.acked_sets.push(i),
            Ok(other) => ledger.tolerate(&format!("SET {key}"), &other)?,
            Err(e) if e.to_string().starts_with("connection lost") => {}
            Err(e) => return Err(e),
        }
        ledger.sent_incrs += 1;
        match call_with_retry(
            net,
            &mut conn,
            service,
            &["INCR", "counter"],
            &mut ledger,
            killed_at,
        ) {
            Ok(Reply::Integer(_)) => ledger.acked_incrs += 1,
            Ok(other) => ledger.tolerate("INCR", &other)?,
            Err(e) if e.to_string().starts_with("connection lost") => {}
            Err(e) => return Err(e),
        }
    }
    let elapsed = started.elapsed();

    // Verify against the new primary.
    let mut missing = Vec::new();
    for i in ledger.acked_sets.clone() {
        let want = format!("value:{i}").into_bytes();
        match call_with_retry(
            net,
            &mut conn,
            service,
            &["GET", &format!("key:{i}")],
            &mut ledger,
            None,
        )? {
            Reply::Bulk(Some(v)) if v == want => {}
            _ => missing.push(i),
        }
    }
    let counter = match call_with_retry(
        net,
        &mut conn,
        service,
        &["GET", "counter"],
        &mut ledger,
        None,
    )? {
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0),
        _ => 0,
    };
    let counter_ok = (ledger.acked_incrs..=ledger.sent_incrs).contains(&counter);
    let went_live = std::fs::read_to_string(dir.join("backup.log"))
        .unwrap_or_default()
        .matches("going live")
        .count();
    let status = match net {
        Net::Loopback => tas_server::client::Client::new(tas, Duration::from_secs(1)).status(),
        Net::Netns(t) => t
            .in_namespace(Host::Client, || {
                tas_server::client::Client::new(tas, Duration::from_secs(1)).status()
            })
            .map_err(|e| tas_server::client::ClientError::Protocol(e.to_string()))
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

    let metrics = before_kill.unwrap_or_default();
    println!();
    println!("=== duet demo: what the client saw ===");
    println!(
        "operations            {} SET + {} INCR in {:.1} s",
        opts.ops,
        ledger.sent_incrs,
        elapsed.as_secs_f64()
    );
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
        None => println!("failover time         not observed"),
    }
    println!("backup went live      {went_live} time(s)");
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

    // The new primary stops cleanly; the arbiter is done.
    let _ = backup.terminate();
    let _ = backup.wait_timeout(Duration::from_secs(10));
    let _ = arbiter.terminate();
    let _ = arbiter.wait_timeout(Duration::from_secs(5));

    if !missing.is_empty() || !counter_ok || went_live != 1 {
        println!(
            "FAILED: {} acknowledged writes missing (first: {:?}), counter ok: {counter_ok}, went live {went_live} times",
            missing.len(),
            missing.first()
        );
        return Ok(1);
    }
    println!("OK: nothing the client was told had happened was lost");
    Ok(0)
}
