//! Re-protection benchmark: how long a new backup takes to join a VM that
//! runs alone, and how long the guest pauses for it.
//!
//! Each trial builds the situation a join repairs, with real processes on
//! loopback: a `tas-server` arbiter, a primary (`--join-listen`) and its
//! backup; the backup is SIGKILLed, the primary wins the arbiter and goes
//! on alone (`continuing alone`); then a joiner (`duet backup --join`)
//! starts, and the trial ends at the primary's `protected again`. Per
//! scenario it reports, over the trials (p50 and max):
//!
//! - `protected_ms`: from spawning the joiner process to the survivor's
//!   `protected` event (the joiner's boot and connect included: what an
//!   operator waits for), and `survivor_total_ms`, the survivor's own
//!   figure (from the joiner's arrival to the handover);
//!   `joined_ms` runs to the joiner's own `joined` event instead: the
//!   survivor declares protection when it has sent the handover, and
//!   `joiner_behind_ms` is how long the joiner then still takes to apply
//!   the stream, restore and check the state before its log channel
//!   answers (the survivor's link times out after 500 ms of silence);
//! - `blackout_us`: how long the guest was paused for the handover, and
//!   its parts (`blackout_parts_us`: taking the state, sending the last
//!   dirty pages, the digest of all memory, sending the handover);
//! - `bytes`, `rounds`, `pages`: what the transfer sent;
//! - under writes, the client's worst reply gap across the join and the
//!   writes acknowledged meanwhile.
//!
//! Scenarios, each at 64 MiB and 512 MiB (`--mem`, the same on every side):
//! `kv` idle; `kv` with a client writing SETs over the serial line during
//! the join (it barely touches memory: a few pages per request); and
//! `compute`, which rewrites words of its 4 MiB buffer at random
//! thousands of times a second, the churn a pre-copy has to chase. It
//! powers off after a few seconds, so a trial whose join is not done by
//! then fails, and says so.
//!
//! Prints one JSON object: a member per scenario, the targets of issue 10
//! (protected within 2 s at 64 MiB, blackout under 50 ms) and whether they
//! were met (by the worst trial). A figure that cannot be computed is
//! `null`. `DUET_REJOIN_TRIALS` (default 3) sets the trials per scenario;
//! `DUET_REJOIN_ONLY` (scenario names, comma-separated) runs only those.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use common::*;
use serde_json::{json, Value};

/// Issue 10's targets.
const TARGET_PROTECTED_64M_MS: f64 = 2000.0;
const TARGET_BLACKOUT_US: f64 = 50_000.0;
/// Bounds on each wait of a trial: booting, pairing, failing over.
const STEP_LIMIT: Duration = Duration::from_secs(30);
/// A join of 512 MiB on a loaded two-core machine can take a while; more
/// than this is a failure, not a figure.
const JOIN_LIMIT: Duration = Duration::from_secs(90);
/// Writes start this long before the joiner, so the client is in its
/// stride when the join begins.
const WRITE_LEAD: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Idle,
    /// A client writing SETs on the serial line.
    Writes,
    /// The `compute` guest's own memory churn.
    Churn,
}

struct Scenario {
    name: String,
    image: &'static str,
    mem_mib: u64,
    load: Load,
}

/// One successful trial's figures.
#[derive(Default)]
struct Trial {
    protected_ms: f64,
    survivor_total_ms: f64,
    joiner_ms: f64,
    joined_ms: f64,
    joiner_behind_ms: f64,
    blackout_us: f64,
    /// The pause's parts, from the survivor's `handover at exit` line.
    state_us: f64,
    last_pages_us: f64,
    digest_us: f64,
    handover_us: f64,
    last_pages: f64,
    bytes: f64,
    rounds: f64,
    pages: f64,
    worst_gap_ms: Option<f64>,
    writes: Option<f64>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The processes of one trial, each logging to a file in `dir`; all are
/// killed when it drops (the kit's [`Proc`] guard), on every path.
struct Lab {
    dir: tempfile::TempDir,
    tas: SocketAddr,
    procs: Vec<Proc>,
}

impl Lab {
    fn new(tas_bin: &Path) -> anyhow::Result<Lab> {
        let dir = tempdir("rejoin-bench");
        let tas = free_addr();
        let arbiter = Proc::logged(
            "arbiter",
            Command::new(tas_bin)
                .args(["--listen", &tas.to_string()])
                .arg("--state")
                .arg(dir.path().join("tas.state")),
            &dir.path().join("arbiter.log"),
        )?;
        wait_for_port(tas, Duration::from_secs(10));
        Ok(Lab {
            dir,
            tas,
            procs: vec![arbiter],
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Starts `cmd` as side `name` of the VM, with the pair options every
    /// side shares; returns its index in `procs`.
    fn spawn(&mut self, name: &str, mut cmd: Command, s: &Scenario) -> anyhow::Result<usize> {
        cmd.args(["--mem", &format!("{}M", s.mem_mib)])
            .args(["--tas", &self.tas.to_string()])
            .args(["--node", name])
            .args(["--heartbeat-ms", "50", "--timeout-ms", "500"])
            .arg("--events")
            .arg(self.path(&format!("{name}.events")));
        let log = self.path(&format!("{name}.log"));
        self.procs.push(Proc::logged(name, &mut cmd, &log)?);
        Ok(self.procs.len() - 1)
    }

    fn text(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits for `needle` in side `i`'s log; an error names the side and
    /// ends with the last lines of its log.
    fn wait_log(&mut self, i: usize, needle: &str, limit: Duration) -> anyhow::Result<()> {
        if self.procs[i].wait_for_log(needle, limit) {
            return Ok(());
        }
        let p = &mut self.procs[i];
        let how = match p.status() {
            Some(s) => format!("exited ({s})"),
            None => format!("not within {limit:?}"),
        };
        bail!(
            "the {} never logged {needle:?}, {how}: {}",
            p.name(),
            tail(&p.log_text(), 3)
        )
    }

    /// The first event of kind `kind` in side `name`'s event log.
    fn event(&self, name: &str, kind: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.path(&format!("{name}.events"))).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == kind)
    }
}

/// The last `n` non-empty lines of `text`, joined by " | ".
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The number just before `unit` in `line` ("..., 3 rounds, ..." gives 3
/// for " rounds").
fn number_before(line: &str, unit: &str) -> Option<f64> {
    let at = line.find(unit)?;
    line[..at].rsplit(' ').next()?.parse().ok()
}

/// The number that follows `label` in `text` ("digest 123 µs").
fn number_after(text: &str, label: &str) -> Option<f64> {
    let at = text.find(label)? + label.len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// What the writer saw: reply times, so that the gaps across the join can
/// be picked out afterwards.
struct Written {
    replies: Vec<Instant>,
    started: Instant,
    error: Option<String>,
}

/// SETs back to back on `conn` until `stop` (or a bounded time), each
/// with a bounded wait: a join must not make a client wait for seconds.
fn write_until(mut conn: Conn, stop: Arc<AtomicBool>) -> Written {
    let started = Instant::now();
    let end = started + JOIN_LIMIT + STEP_LIMIT;
    let mut replies = Vec::new();
    let mut error = None;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let (k, v) = (format!("load:{i}"), format!("w{i}"));
        match conn.call(&["SET", &k, &v], Duration::from_secs(10)) {
            Ok(r) if r.is_ok() => replies.push(Instant::now()),
            other => {
                error = Some(format!("SET {k}: {other:?}"));
                break;
            }
        }
        i += 1;
    }
    Written {
        replies,
        started,
        error,
    }
}

/// The longest gap between two replies (or the writer's start and the
/// first reply) that overlaps `[from, to]`, and how many replies came in
/// that window.
fn worst_gap(w: &Written, from: Instant, to: Instant) -> (Option<f64>, usize) {
    let mut worst: Option<Duration> = None;
    let mut prev = w.started;
    let mut during = 0;
    for &r in &w.replies {
        if r >= from && prev <= to {
            let gap = r - prev;
            worst = Some(worst.map_or(gap, |w| w.max(gap)));
        }
        if (from..=to).contains(&r) {
            during += 1;
        }
        prev = r;
    }
    (worst.map(|d| d.as_secs_f64() * 1e3), during)
}

/// One trial; a failure prints the end of every side's log, since the
/// lab (and its logs) goes away with it.
fn trial(s: &Scenario, tas_bin: &Path) -> anyhow::Result<Trial> {
    let mut lab = Lab::new(tas_bin)?;
    let result = run_trial(s, &mut lab);
    if result.is_err() {
        for side in ["a", "b", "c"] {
            eprintln!(
                "--- {side}, last lines:\n{}",
                tail_lines(&lab.text(side), 12)
            );
        }
    }
    result
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run_trial(s: &Scenario, lab: &mut Lab) -> anyhow::Result<Trial> {
    let vm = "rjbench";
    let (b_listen, c_listen, a_join, service) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let b = lab.spawn("b", backup_cmd(s.image, vm, b_listen), s)?;
    let mut a_cmd = primary_cmd(s.image, vm, b_listen);
    a_cmd.args(["--join-listen", &a_join.to_string()]);
    if s.image == "kv" {
        a_cmd.args(["--serial", &format!("tcp:{service}")]);
    }
    let a = lab.spawn("a", a_cmd, s)?;
    let end = Instant::now() + STEP_LIMIT;
    while lab.event("a", "paired").is_none() {
        lab.procs[a].ensure_running()?;
        if Instant::now() >= end {
            bail!("the pair never formed: {}", tail(&lab.text("a"), 3));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The client connects while the pair runs, as a client of a protected
    // VM would; the serial line serves one client at a time.
    let conn = match s.load {
        Load::Writes => {
            Some(Conn::connect(service, STEP_LIMIT).context("cannot connect to the kv guest")?)
        }
        _ => None,
    };

    lab.procs[b].signal(libc::SIGKILL)?;
    lab.wait_log(a, "continuing alone", STEP_LIMIT)?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = conn.map(|c| {
        let stop = stop.clone();
        std::thread::spawn(move || write_until(c, stop))
    });
    if writer.is_some() {
        std::thread::sleep(WRITE_LEAD);
    }

    let mut c_cmd = backup_cmd(s.image, vm, c_listen);
    c_cmd.args(["--join", &a_join.to_string(), "--serial", "none"]);
    let spawned_wall = wall_now();
    let spawned = Instant::now();
    let c = lab.spawn("c", c_cmd, s)?;
    let joined = lab.wait_log(a, "protected again", JOIN_LIMIT);
    let protected_at = Instant::now();
    // A little more load after the handover: the first replies after the
    // pause belong to the join's gap.
    if writer.is_some() {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.map(|w| w.join().expect("the writer thread panicked"));
    joined?;
    lab.wait_log(c, "joined the VM", STEP_LIMIT)?;
    // The new pair must still be a pair a moment later: a joiner that
    // diverged at once would have made a fine-looking figure.
    std::thread::sleep(Duration::from_millis(300));
    for i in [a, c] {
        lab.procs[i].ensure_running()?;
    }

    let p = lab
        .event("a", "protected")
        .context("no protected event from the survivor")?;
    let num = |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("no {k} in {v}"));
    let survivor = lab.text("a");
    let line = survivor
        .lines()
        .find(|l| l.contains("protected again"))
        .unwrap_or_default();
    let handover = survivor
        .lines()
        .find(|l| l.contains("handover at exit"))
        .unwrap_or_default();
    let parts = handover.split_once("paused").map_or("", |(_, p)| p);
    let part = |label: &str| number_after(parts, label).unwrap_or(f64::NAN);
    let joined = lab
        .event("c", "joined")
        .context("no joined event from the joiner")?;
    let mut t = Trial {
        protected_ms: (num(&p, "ts")? - spawned_wall) * 1e3,
        survivor_total_ms: num(&p, "total_ms")?,
        joiner_ms: num(&joined, "total_ms")?,
        joined_ms: (num(&joined, "ts")? - spawned_wall) * 1e3,
        joiner_behind_ms: (num(&joined, "ts")? - num(&p, "ts")?) * 1e3,
        state_us: part("(state "),
        last_pages_us: part(", last pages "),
        digest_us: part(", digest "),
        handover_us: part(", handover "),
        last_pages: number_before(handover, " last pages,").unwrap_or(f64::NAN),
        blackout_us: num(&p, "blackout_us")?,
        bytes: num(&p, "bytes")?,
        rounds: number_before(line, " rounds").unwrap_or(f64::NAN),
        pages: number_before(line, " pages").unwrap_or(f64::NAN),
        ..Trial::default()
    };
    if let Some(w) = written {
        if let Some(e) = w.error {
            bail!("the client's write failed during the join: {e}");
        }
        let (gap, n) = worst_gap(&w, spawned, protected_at);
        t.worst_gap_ms = gap;
        t.writes = Some(n as f64);
    }
    Ok(t)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A JSON number rounded to `dp` decimals, or `null` (NaN is not JSON).
fn num(x: f64, dp: i32) -> Value {
    if x.is_finite() {
        let f = 10f64.powi(dp);
        json!((x * f).round() / f)
    } else {
        Value::Null
    }
}

/// `{"p50":..,"max":..,"trials":[..]}` of the finite figures, in trial
/// order, or `null` if there are none.
fn stats(xs: &[f64], dp: i32) -> Value {
    let mut sorted: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if sorted.is_empty() {
        return Value::Null;
    }
    sorted.sort_by(f64::total_cmp);
    json!({
        "p50": num(percentile(&sorted, 0.5), dp),
        "max": num(*sorted.last().expect("not empty"), dp),
        "trials": xs.iter().map(|x| num(*x, dp)).collect::<Vec<_>>(),
    })
}

fn main() -> anyhow::Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("rejoin bench: /dev/kvm is missing");
    }
    let tas_bin = tas_server_bin();
    let trials = env_u64("DUET_REJOIN_TRIALS", 3).max(1);
    let mut scenarios = Vec::new();
    for mem_mib in [64, 512] {
        for (image, load, label) in [
            ("kv", Load::Idle, "kv_idle"),
            ("kv", Load::Writes, "kv_writes"),
            ("compute", Load::Churn, "compute_churn"),
        ] {
            scenarios.push(Scenario {
                name: format!("{label}_{mem_mib}m"),
                image,
                mem_mib,
                load,
            });
        }
    }

    // For chasing one scenario by hand: `DUET_REJOIN_ONLY=kv_writes_512m`.
    if let Ok(only) = std::env::var("DUET_REJOIN_ONLY") {
        scenarios.retain(|s| only.split(',').any(|o| s.name == o.trim()));
    }
    let mut out = serde_json::Map::new();
    out.insert("trials".into(), json!(trials));
    out.insert(
        "targets".into(),
        json!({
            "protected_64m_ms": TARGET_PROTECTED_64M_MS,
            "blackout_us": TARGET_BLACKOUT_US,
        }),
    );
    let mut protected_64m_met = true;
    let mut blackout_met = true;
    let mut any_ok = false;
    for s in &scenarios {
        let mut ok = Vec::new();
        let mut failures = Vec::new();
        for t in 0..trials {
            let started = Instant::now();
            match trial(s, &tas_bin) {
                Ok(r) => {
                    eprintln!(
                        "rejoin {} trial {}/{trials}: protected in {:.0} ms (survivor {:.0} ms), blackout {:.0} µs, {} rounds, {:.1} MiB{}",
                        s.name,
                        t + 1,
                        r.protected_ms,
                        r.survivor_total_ms,
                        r.blackout_us,
                        r.rounds,
                        r.bytes / 1048576.0,
                        r.worst_gap_ms
                            .map_or(String::new(), |g| format!(", worst reply gap {g:.0} ms"))
                    );
                    ok.push(r);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!(
                        "rejoin {} trial {}/{trials} FAILED after {:.1} s: {why}",
                        s.name,
                        t + 1,
                        started.elapsed().as_secs_f64()
                    );
                    failures.push(why);
                }
            }
        }
        let col = |f: fn(&Trial) -> f64| ok.iter().map(f).collect::<Vec<f64>>();
        let protected = col(|t| t.protected_ms);
        let blackout = col(|t| t.blackout_us);
        let worst = |xs: &[f64]| xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let blackout_ok = (!ok.is_empty()).then(|| worst(&blackout) < TARGET_BLACKOUT_US);
        let protected_ok = (s.mem_mib == 64 && !ok.is_empty())
            .then(|| worst(&protected) < TARGET_PROTECTED_64M_MS);
        // A scenario that produced no figure has not met anything.
        blackout_met &= blackout_ok.unwrap_or(false);
        if s.mem_mib == 64 {
            protected_64m_met &= protected_ok.unwrap_or(false);
        }
        any_ok |= !ok.is_empty();
        let mut v = json!({
            "image": s.image,
            "mem_mib": s.mem_mib,
            "load": match s.load {
                Load::Idle => "idle",
                Load::Writes => "writes",
                Load::Churn => "churn",
            },
            "ok_trials": ok.len(),
            "failed_trials": failures.len(),
            "protected_ms": stats(&protected, 1),
            "survivor_total_ms": stats(&col(|t| t.survivor_total_ms), 0),
            "joiner_total_ms": stats(&col(|t| t.joiner_ms), 0),
            "joined_ms": stats(&col(|t| t.joined_ms), 1),
            "joiner_behind_ms": stats(&col(|t| t.joiner_behind_ms), 1),
            "blackout_us": stats(&blackout, 0),
            "blackout_parts_us": {
                "state": stats(&col(|t| t.state_us), 0),
                "last_pages": stats(&col(|t| t.last_pages_us), 0),
                "digest": stats(&col(|t| t.digest_us), 0),
                "handover": stats(&col(|t| t.handover_us), 0),
            },
            "last_pages": stats(&col(|t| t.last_pages), 0),
            "bytes": stats(&col(|t| t.bytes), 0),
            "rounds": stats(&col(|t| t.rounds), 0),
            "pages": stats(&col(|t| t.pages), 0),
            "protected_target_met": protected_ok,
            "blackout_target_met": blackout_ok,
            "failures": failures,
        });
        if s.load == Load::Writes {
            v["client_worst_gap_ms"] = stats(&col(|t| t.worst_gap_ms.unwrap_or(f64::NAN)), 1);
            v["writes_during_join"] = stats(&col(|t| t.writes.unwrap_or(f64::NAN)), 0);
        }
        out.insert(s.name.clone(), v);
    }
    out.insert(
        "targets_met".into(),
        json!({
            "protected_64m": protected_64m_met,
            "blackout": blackout_met,
        }),
    );
    println!("{}", Value::Object(out));
    if !any_ok {
        bail!("no join succeeded");
    }
    Ok(())
}
