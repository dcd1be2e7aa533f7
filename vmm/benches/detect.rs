//! Silent-failure detection: how long clients wait when the primary stops
//! without closing anything, and whether a loaded machine makes a healthy
//! pair fail over. `cargo bench -p vmm --bench detect` (as root: it builds
//! network namespaces) prints one JSON object on stdout; progress goes to
//! stderr.
//!
//! Each trial builds the two-host topology of `vmm::netns` (198.18.0.0/15,
//! inside namespaces this benchmark creates and removes), starts the
//! arbiter, a backup on B and a primary on A of `kv` with the binary's
//! default `--timeout-ms` and `--heartbeat-ms`, puts some writes through,
//! and then:
//!
//! - `freeze`: stops the primary with SIGSTOP (no FIN, no RST: a hung
//!   host);
//! - `cut`: takes the logging link down at both ends (the arbiter and the
//!   clients still reach both sides).
//!
//! From that moment a client in the client namespace probes the service
//! address (a new connection and a PING, 10 ms for each, until a PONG), so
//! `*_serving_ms` is what a client sees: detection, the claim, the
//! backup's replay of what it holds, its go-live hook moving the service
//! address, and the reconnection. `*_detect_ms` is when the first side's
//! channel reported the peer lost, from its event log. For `cut` either
//! side may win; `cut_backup_won` counts the trials the backup won.
//!
//! ```text
//! {"timeout_ms":..,"heartbeat_ms":..,"trials":N,
//!  "freeze_serving_ms_p50":..,"freeze_serving_ms_p99":..,"freeze_serving_ms_max":..,
//!  "freeze_detect_ms_p50":..,..,"freeze_failed":..,
//!  "cut_serving_ms_p50":..,..,"cut_detect_ms_p50":..,..,"cut_backup_won":..,"cut_failed":..,
//!  "soak_secs":..,"soak_hogs":..,"soak_requests":..,"soak_false_failovers":..,
//!  "soak_peer_silence_max_ms_primary":..,"soak_peer_silence_max_ms_backup":..}
//! ```
//!
//! The soak (`DUET_SOAK_SECS`, default 20; the target is stated for 600)
//! runs a pair of the same kind under a steady client while `DUET_SOAK_HOGS`
//! busy loops (default: one per core) keep every core loaded, and counts
//! false failovers: a `peer_lost` in either side's event log. A pair that
//! failed over is replaced and the soak goes on. The longest wait either
//! side's channel had for the other's next bytes
//! (`duet_peer_silence_max_seconds`) shows how close to the timeout the
//! healthy link came. `DUET_DETECT_TRIALS` (default 10) sets the trials per
//! mode.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/twohost/mod.rs"]
mod twohost;

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use common::{Conn, Proc, Reply};
use twohost::{Guest, Pair, Side, Timing};
use vmm::netns::Host;

/// How long one probe may wait to connect, and then for its PONG.
const PROBE: Duration = Duration::from_millis(10);
/// A trial whose service is not back within this long failed.
const SERVING_LIMIT: Duration = Duration::from_secs(10);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A JSON number with one decimal, or `null`.
fn json(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "null".to_string()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The timestamps of `event` lines in an event log.
fn event_times(log: &str, event: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == event)
        .filter_map(|v| v["ts"].as_f64())
        .collect()
}

/// One probe from the client namespace's thread: a fresh connection and a
/// PING; true on PONG.
fn probe(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, PROBE) else {
        std::thread::sleep(Duration::from_millis(1));
        return false;
    };
    let _ = stream.set_write_timeout(Some(PROBE));
    let Ok(mut c) = Conn::from_stream(stream) else {
        return false;
    };
    matches!(c.call(&["PING"], PROBE), Ok(Reply::Simple(s)) if s == "PONG")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Freeze,
    Cut,
}

/// What one trial measured.
struct Trial {
    serving_ms: f64,
    detect_ms: f64,
    winner: Side,
}

fn trial(fault: Fault, n: u64) -> anyhow::Result<Trial> {
    let prefix = format!("dt{}{}{n}", std::process::id() % 10_000, fault_tag(fault));
    let mut pair = Pair::start_timed(&prefix, Guest::Kv, Timing::Defaults);
    let mut conn = pair.wait_for_service(Duration::from_secs(30));
    for i in 0..20 {
        let r = conn.call(&["SET", &format!("k{i}"), "v"], Duration::from_secs(5));
        if !matches!(&r, Ok(Reply::Simple(s)) if s == "OK") {
            bail!("SET k{i} got {r:?}\n{}", pair.logs());
        }
    }
    drop(conn);
    let service = pair.service();
    let topo = &pair.topo;
    let primary = &mut pair.primary;
    // The fault and the probes run on one thread in the client namespace,
    // so that the clock starts right at the fault.
    let result = topo.in_namespace(Host::Client, || {
        let at = unix_now();
        let start = Instant::now();
        let faulted = match fault {
            Fault::Freeze => primary.signal(libc::SIGSTOP).context("SIGSTOP"),
            Fault::Cut => topo.cut_logging_link().context("cutting the logging link"),
        };
        faulted?;
        while start.elapsed() < SERVING_LIMIT {
            if probe(service) {
                return Ok((at, start.elapsed()));
            }
        }
        bail!("the service did not answer within {SERVING_LIMIT:?}")
    });
    let (at, serving) = match result.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(v) => v,
        Err(e) => {
            let logs = pair.logs();
            pair.shutdown();
            return Err(e.context(logs));
        }
    };
    // Events are written as they happen; give the loser a moment to log.
    std::thread::sleep(Duration::from_millis(300));
    let (p, b) = (pair.events(Side::Primary), pair.events(Side::Backup));
    let lost: Vec<f64> = event_times(&p, "peer_lost")
        .into_iter()
        .chain(event_times(&b, "peer_lost"))
        .collect();
    let first_lost = lost.iter().copied().fold(f64::INFINITY, f64::min);
    let since = |log: &str, event: &str| {
        event_times(log, event)
            .first()
            .map_or(f64::NAN, |t| (t - at) * 1e3)
    };
    eprintln!(
        "detect bench: events (ms after the fault): primary lost {:.1} claim {:.1} granted {:.1} alone {:.1}; backup lost {:.1} claim {:.1} granted {:.1} live {:.1}",
        since(&p, "peer_lost"),
        since(&p, "claim_sent"),
        since(&p, "claim_granted"),
        since(&p, "alone"),
        since(&b, "peer_lost"),
        since(&b, "claim_sent"),
        since(&b, "claim_granted"),
        since(&b, "live"),
    );
    let winner = if event_times(&b, "live").is_empty() {
        Side::Primary
    } else {
        Side::Backup
    };
    let logs = pair.logs();
    pair.shutdown();
    if fault == Fault::Freeze && winner != Side::Backup {
        bail!("the primary was frozen and the backup did not go live\n{logs}");
    }
    Ok(Trial {
        serving_ms: serving.as_secs_f64() * 1e3,
        detect_ms: (first_lost - at) * 1e3,
        winner,
    })
}

fn fault_tag(f: Fault) -> &'static str {
    match f {
        Fault::Freeze => "f",
        Fault::Cut => "c",
    }
}

/// `n` busy loops, one process each, killed when dropped.
fn hogs(n: u64) -> anyhow::Result<Vec<Proc>> {
    (0..n)
        .map(|i| {
            Proc::spawn(
                &format!("hog{i}"),
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
        })
        .collect()
}

/// What the soak saw.
#[derive(Default)]
struct Soak {
    requests: u64,
    false_failovers: u64,
    silence_ms: [f64; 2],
}

/// Runs pairs under a steady client until `secs` have passed, with `hogs`
/// busy loops running.
fn soak(secs: u64, hog_count: u64) -> anyhow::Result<Soak> {
    let _hogs = hogs(hog_count)?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut out = Soak::default();
    let mut round = 0;
    while Instant::now() < end {
        round += 1;
        let prefix = format!("ds{}r{round}", std::process::id() % 10_000);
        let mut pair = Pair::start_timed(&prefix, Guest::Kv, Timing::Defaults);
        let mut conn = pair.wait_for_service(Duration::from_secs(60));
        let mut failed_over = false;
        let mut i = 0u64;
        let mut last_look = Instant::now();
        while Instant::now() < end {
            let r = conn.call(
                &["SET", &format!("s{}", i % 1000), "v"],
                Duration::from_secs(5),
            );
            if !matches!(&r, Ok(Reply::Simple(s)) if s == "OK") {
                eprintln!("detect soak: SET got {r:?}");
            }
            i += 1;
            out.requests += 1;
            std::thread::sleep(Duration::from_millis(2));
            if last_look.elapsed() >= Duration::from_secs(1) {
                last_look = Instant::now();
                let lost = [Side::Primary, Side::Backup]
                    .iter()
                    .any(|s| !event_times(&pair.events(*s), "peer_lost").is_empty());
                if lost {
                    failed_over = true;
                    break;
                }
            }
        }
        for (k, side) in [Side::Primary, Side::Backup].into_iter().enumerate() {
            if let Ok(m) = pair.scrape(side) {
                let ms = m.get("duet_peer_silence_max_seconds").unwrap_or(0.0) * 1e3;
                out.silence_ms[k] = out.silence_ms[k].max(ms);
            }
        }
        if failed_over {
            out.false_failovers += 1;
            eprintln!(
                "detect soak: a false failover after {} requests\n{}\n{}",
                i,
                pair.events(Side::Primary),
                pair.events(Side::Backup)
            );
        }
        drop(conn);
        pair.shutdown();
    }
    Ok(out)
}

/// The binary's default for `flag`, from `duet primary --help`.
fn default_of(flag: &str) -> anyhow::Result<u64> {
    let help = common::run_bounded(
        common::duet().args(["primary", "--help"]),
        None,
        Duration::from_secs(10),
    );
    let text = common::stdout(&help);
    let after = text
        .split(flag)
        .nth(1)
        .with_context(|| format!("no {flag} in duet primary --help"))?;
    let default = after
        .split("[default: ")
        .nth(1)
        .and_then(|t| t.split(']').next())
        .with_context(|| format!("no default for {flag}"))?;
    Ok(default.parse()?)
}

fn main() -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("the detect benchmark needs /dev/kvm");
    }
    if !vmm::netns::is_root() {
        bail!("the detect benchmark needs root for network namespaces");
    }
    let trials = env_u64("DUET_DETECT_TRIALS", 10);
    let soak_secs = env_u64("DUET_SOAK_SECS", 20);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    let hog_count = env_u64("DUET_SOAK_HOGS", cores);
    let mut fields = vec![
        (
            "timeout_ms".to_string(),
            default_of("--timeout-ms")?.to_string(),
        ),
        (
            "heartbeat_ms".to_string(),
            default_of("--heartbeat-ms")?.to_string(),
        ),
        ("trials".to_string(), trials.to_string()),
    ];
    for fault in [Fault::Freeze, Fault::Cut] {
        let name = match fault {
            Fault::Freeze => "freeze",
            Fault::Cut => "cut",
        };
        let (mut serving, mut detect) = (Vec::new(), Vec::new());
        let (mut failed, mut backup_won) = (0, 0);
        for n in 0..trials {
            match trial(fault, n) {
                Ok(t) => {
                    eprintln!(
                        "detect bench: {name} {n}: serving after {:.1} ms, detected after {:.1} ms, the {:?} won",
                        t.serving_ms, t.detect_ms, t.winner
                    );
                    serving.push(t.serving_ms);
                    detect.push(t.detect_ms);
                    backup_won += u64::from(t.winner == Side::Backup);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("detect bench: {name} {n} failed: {e:#}");
                }
            }
        }
        serving.sort_by(f64::total_cmp);
        detect.sort_by(f64::total_cmp);
        for (what, v) in [("serving", &serving), ("detect", &detect)] {
            for (q, x) in [
                ("p50", percentile(v, 0.5)),
                ("p99", percentile(v, 0.99)),
                ("max", v.last().copied().unwrap_or(f64::NAN)),
            ] {
                fields.push((format!("{name}_{what}_ms_{q}"), json(x)));
            }
        }
        if fault == Fault::Cut {
            fields.push(("cut_backup_won".into(), backup_won.to_string()));
        }
        fields.push((format!("{name}_failed"), failed.to_string()));
    }
    eprintln!("detect bench: soak for {soak_secs} s with {hog_count} busy loops");
    let s = soak(soak_secs, hog_count)?;
    fields.extend([
        ("soak_secs".into(), soak_secs.to_string()),
        ("soak_hogs".into(), hog_count.to_string()),
        ("soak_requests".into(), s.requests.to_string()),
        ("soak_false_failovers".into(), s.false_failovers.to_string()),
        (
            "soak_peer_silence_max_ms_primary".into(),
            json(s.silence_ms[0]),
        ),
        (
            "soak_peer_silence_max_ms_backup".into(),
            json(s.silence_ms[1]),
        ),
    ]);
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    println!("{{{}}}", body.join(","));
    Ok(())
}
