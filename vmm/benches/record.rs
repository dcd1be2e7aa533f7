//! What recording costs, and how fast a log replays, measured on real
//! `duet` processes. `cargo bench -p vmm --bench record` prints one JSON
//! object on stdout (progress goes to stderr).
//!
//! Per image, solo (`duet run`), record (`duet record`) and replay
//! (`duet replay` of that recording) runs are interleaved, [`ROUNDS`]
//! rounds of solo, record, replay, because the machine is noisy and has two
//! cores shared by everything. Each figure is the median over the rounds;
//! each ratio is the median of the per-round ratios, so that one round's
//! neighbouring runs are compared with each other.
//!
//! - `compute`: wall time and the guest's own `elapsed_ns`, solo and
//!   recorded; `*_ratio` is record over solo (1.0 = free).
//! - `ticker`: runs a fixed 2000 timer ticks, so its wall time is pinned to
//!   about 2 s; what recording can slow down is how much the guest gets done
//!   in that time, its synchronous exits (about three per loop iteration).
//!   `exits_ratio` is record over solo (1.0 = free, lower = slower).
//! - `hello`, `kv_idle` (no client for [`KV_IDLE`], then SIGTERM) and
//!   `kv_busy` (`redis-benchmark -c 1 -n 2000 -t set,get,incr`, then
//!   SIGTERM; null without redis-benchmark): log size per second of guest
//!   run time, taken as the recorder's wall time (the guest clock is the
//!   host's monotonic clock since boot), in bytes and Mbit/s (VMware FT
//!   reports 1.5 to 18 Mbit/s of logging traffic).
//! - `replay_over_record_wall`, per image: replay wall time over record
//!   wall time (below 1.0: the backup could keep up).
//!
//! Every child runs under a time limit and is killed if it overruns.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use common::{
    duet, finish, free_addr, launch, run_bounded, stderr, stdout, tempdir, wait_for_port,
};

/// Interleaved rounds per image.
const ROUNDS: usize = 3;
/// Limit for one guest run.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long the idle `kv` recording runs.
const KV_IDLE: Duration = Duration::from_secs(3);
/// Limit for one `redis-benchmark` run.
const REDIS_LIMIT: Duration = Duration::from_secs(300);

/// One finished `duet` run.
struct Run {
    wall: f64,
    out: Output,
}

fn timed(cmd: &mut Command, what: &str) -> anyhow::Result<Run> {
    eprintln!("record bench: {what}");
    let start = Instant::now();
    let out = run_bounded(cmd, None, RUN_LIMIT);
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): stdout {} stderr {}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
    }
    Ok(Run { wall, out })
}

fn solo(image: &str) -> anyhow::Result<Run> {
    timed(
        duet()
            .env("DUET_LOG", "info")
            .args(["run", "--image", image, "--serial", "stdio"]),
        &format!("duet run --image {image}"),
    )
}

fn record(image: &str, log: &Path) -> anyhow::Result<Run> {
    timed(
        duet()
            .args(["record", "--image", image, "--serial", "stdio", "--log"])
            .arg(log),
        &format!("duet record --image {image}"),
    )
}

fn replay(image: &str, log: &Path) -> anyhow::Result<Run> {
    timed(
        duet().args(["replay", "--image", image, "--log"]).arg(log),
        &format!("duet replay --image {image}"),
    )
}

/// The number after `key` (`key=` or `key: `) in `text`.
fn number_after(text: &str, key: &str) -> anyhow::Result<f64> {
    let at = text
        .find(key)
        .with_context(|| format!("no {key:?} in output:\n{text}"))?;
    let digits: String = text[at + key.len()..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .with_context(|| format!("no number after {key:?} in output:\n{text}"))
}

/// Synchronous exits of a run: the final-state line of record and replay,
/// the `DUET_LOG=info` stats line of a solo run.
fn exits(run: &Run) -> anyhow::Result<f64> {
    let err = stderr(&run.out);
    match err.find("duet: final state exits=") {
        Some(_) => number_after(&err, "final state exits="),
        None => number_after(&err, "Stats { exits:"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A JSON number: finite, four significant decimals; else null.
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".to_string()
    }
}

/// A JSON integer (a median of counts may end in .5: rounded); else null.
fn int(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "null".to_string()
    }
}

/// A JSON object from (key, already-formatted value) pairs.
fn object(pairs: &[(&str, String)]) -> String {
    let body: Vec<String> = pairs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", body.join(","))
}

/// Medians over the rounds of what every image reports.
#[derive(Default)]
struct Rounds {
    solo_wall: Vec<f64>,
    record_wall: Vec<f64>,
    replay_wall: Vec<f64>,
    record_over_solo_wall: Vec<f64>,
    replay_over_record_wall: Vec<f64>,
    log_bytes: Vec<f64>,
    log_bytes_per_s: Vec<f64>,
}

impl Rounds {
    fn add(&mut self, solo: Option<&Run>, rec: &Run, rep: &Run, log: &Path) -> anyhow::Result<()> {
        let bytes = std::fs::metadata(log)?.len() as f64;
        if let Some(s) = solo {
            self.solo_wall.push(s.wall);
            self.record_over_solo_wall.push(rec.wall / s.wall);
        }
        self.record_wall.push(rec.wall);
        self.replay_wall.push(rep.wall);
        self.replay_over_record_wall.push(rep.wall / rec.wall);
        self.log_bytes.push(bytes);
        self.log_bytes_per_s.push(bytes / rec.wall);
        if stdout(&rep.out) != stdout(&rec.out) && !stdout(&rec.out).is_empty() {
            bail!("replay printed something else than the recording");
        }
        Ok(())
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let bps = median(self.log_bytes_per_s.clone());
        let mut f = Vec::new();
        if !self.solo_wall.is_empty() {
            f.push(("solo_wall_s", num(median(self.solo_wall.clone()))));
        }
        f.push(("record_wall_s", num(median(self.record_wall.clone()))));
        if !self.solo_wall.is_empty() {
            f.push((
                "record_over_solo_wall",
                num(median(self.record_over_solo_wall.clone())),
            ));
        }
        f.extend([
            ("replay_wall_s", num(median(self.replay_wall.clone()))),
            (
                "replay_over_record_wall",
                num(median(self.replay_over_record_wall.clone())),
            ),
            ("log_bytes", int(median(self.log_bytes.clone()))),
            ("log_bytes_per_s", num(bps)),
            ("log_mbit_per_s", num(bps * 8.0 / 1e6)),
        ]);
        f
    }
}

/// `compute`: wall and guest-reported time, solo against record.
fn bench_compute(dir: &tempfile::TempDir) -> anyhow::Result<String> {
    let mut r = Rounds::default();
    let (mut solo_guest, mut rec_guest, mut guest_ratio) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let log = dir.path().join(format!("compute-{round}.log"));
        let s = solo("compute")?;
        let rec = record("compute", &log)?;
        let rep = replay("compute", &log)?;
        let sg = number_after(&stdout(&s.out), "elapsed_ns=")? / 1e9;
        let rg = number_after(&stdout(&rec.out), "elapsed_ns=")? / 1e9;
        solo_guest.push(sg);
        rec_guest.push(rg);
        guest_ratio.push(rg / sg);
        r.add(Some(&s), &rec, &rep, &log)?;
    }
    let mut f = r.fields();
    f.splice(
        3..3,
        [
            ("solo_guest_elapsed_s", num(median(solo_guest))),
            ("record_guest_elapsed_s", num(median(rec_guest))),
            ("record_over_solo_guest_elapsed", num(median(guest_ratio))),
        ],
    );
    Ok(object(&f))
}

/// `ticker`: fixed tick count, so wall time and the guest's progress.
fn bench_ticker(dir: &tempfile::TempDir) -> anyhow::Result<String> {
    let mut r = Rounds::default();
    let (mut solo_exits, mut rec_exits, mut ratio) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let log = dir.path().join(format!("ticker-{round}.log"));
        let s = solo("ticker")?;
        let rec = record("ticker", &log)?;
        let rep = replay("ticker", &log)?;
        let (se, re) = (exits(&s)?, exits(&rec)?);
        solo_exits.push(se);
        rec_exits.push(re);
        ratio.push(re / se);
        r.add(Some(&s), &rec, &rep, &log)?;
    }
    let mut f = r.fields();
    f.splice(
        3..3,
        [
            ("solo_exits", int(median(solo_exits))),
            ("record_exits", int(median(rec_exits))),
            ("record_over_solo_exits", num(median(ratio))),
        ],
    );
    Ok(object(&f))
}

/// `hello`: boot, a few device reads, power off.
fn bench_hello(dir: &tempfile::TempDir) -> anyhow::Result<String> {
    let mut r = Rounds::default();
    for round in 0..ROUNDS {
        let log = dir.path().join(format!("hello-{round}.log"));
        let s = solo("hello")?;
        let rec = record("hello", &log)?;
        let rep = replay("hello", &log)?;
        r.add(Some(&s), &rec, &rep, &log)?;
    }
    Ok(object(&r.fields()))
}

/// `redis-benchmark` against `addr`: requests per second of SET, GET and
/// INCR, in that order.
fn redis_benchmark(addr: std::net::SocketAddr) -> anyhow::Result<Vec<(String, f64)>> {
    let rps = common::redis_benchmark(addr, "2000", REDIS_LIMIT)?;
    Ok(["SET", "GET", "INCR"]
        .iter()
        .map(|t| (t.to_string(), rps[*t]))
        .collect())
}

/// `kv` on a TCP serial port, solo or recorded: `load` runs while it is up,
/// then it gets SIGTERM. Returns the run and what `load` returned.
fn kv_run<T>(
    log: Option<&Path>,
    load: impl FnOnce(std::net::SocketAddr) -> anyhow::Result<T>,
) -> anyhow::Result<(Run, T)> {
    let addr = free_addr();
    let mut cmd = duet();
    match log {
        Some(log) => cmd.args(["record", "--log"]).arg(log),
        None => cmd.arg("run"),
    };
    cmd.args(["--image", "kv", "--serial"])
        .arg(format!("tcp:{addr}"));
    eprintln!(
        "record bench: kv {} on {addr}",
        if log.is_some() { "record" } else { "solo" }
    );
    let start = Instant::now();
    let mut vm = launch(&mut cmd, false);
    wait_for_port(addr, Duration::from_secs(10));
    let t = load(addr)?;
    vm.terminate()?;
    let out = finish(vm, Duration::from_secs(30));
    let wall = start.elapsed().as_secs_f64();
    // `duet record` stops cleanly on SIGTERM; `duet run` just dies of it.
    if log.is_some() && !out.status.success() {
        bail!("kv exited with {}: {}", out.status, stderr(&out));
    }
    Ok((Run { wall, out }, t))
}

/// `kv` with no client: what an idle server logs.
fn bench_kv_idle(dir: &tempfile::TempDir) -> anyhow::Result<String> {
    let mut r = Rounds::default();
    for round in 0..ROUNDS {
        let log = dir.path().join(format!("kv-idle-{round}.log"));
        let (rec, ()) = kv_run(Some(&log), |_| {
            std::thread::sleep(KV_IDLE);
            Ok(())
        })?;
        let rep = replay("kv", &log)?;
        r.add(None, &rec, &rep, &log)?;
    }
    Ok(object(&r.fields()))
}

/// `kv` under `redis-benchmark`, solo and recorded.
fn bench_kv_busy(dir: &tempfile::TempDir) -> anyhow::Result<String> {
    if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("record bench: no redis-benchmark on PATH, kv_busy skipped");
        return Ok("null".to_string());
    }
    let mut r = Rounds::default();
    let mut retries = 0u32;
    let mut solo_rps: Vec<Vec<(String, f64)>> = vec![];
    let mut rec_rps: Vec<Vec<(String, f64)>> = vec![];
    for round in 0..ROUNDS {
        let log = dir.path().join(format!("kv-busy-{round}.log"));
        let (_, s) = with_retries(&mut retries, || kv_run(None, redis_benchmark))?;
        let (rec, t) = with_retries(&mut retries, || kv_run(Some(&log), redis_benchmark))?;
        let rep = replay("kv", &log)?;
        r.add(None, &rec, &rep, &log)?;
        solo_rps.push(s);
        rec_rps.push(t);
    }
    let mut f = r.fields();
    for (i, test) in ["set", "get", "incr"].iter().enumerate() {
        let solo = median(solo_rps.iter().map(|v| v[i].1).collect());
        let rec = median(rec_rps.iter().map(|v| v[i].1).collect());
        let ratio = median(
            solo_rps
                .iter()
                .zip(&rec_rps)
                .map(|(s, r)| r[i].1 / s[i].1)
                .collect(),
        );
        f.push((leak(format!("solo_{test}_rps")), num(solo)));
        f.push((leak(format!("record_{test}_rps")), num(rec)));
        f.push((leak(format!("record_over_solo_{test}_rps")), num(ratio)));
    }
    f.push(("redis_benchmark_retries", retries.to_string()));
    Ok(object(&f))
}

/// Runs `f` up to four times, counting the failed attempts in `retries`.
///
/// `redis-benchmark` first asks `CONFIG GET save` and `CONFIG GET
/// appendonly` in one go; `kv` answers each with an empty array, which
/// redis-benchmark takes as a failure after the first reply, and it hangs
/// up with the second one unread. Those bytes can reach the next client on
/// the serial port, which then fails with "Protocol error". A fresh guest
/// and a new attempt is the way around it until `kv` answers with the
/// (name, value) pairs redis-benchmark expects; the JSON says how often it
/// happened.
fn with_retries<T>(
    retries: &mut u32,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut last = None;
    for _ in 0..4 {
        match f() {
            Ok(t) => return Ok(t),
            Err(e) => {
                eprintln!("record bench: attempt failed, retrying: {e:#}");
                *retries += 1;
                last = Some(e);
            }
        }
    }
    Err(last.unwrap())
}

/// A field name built at run time, for [`object`]'s `&str` keys (a handful
/// per run).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn main() -> anyhow::Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("the record benchmark needs /dev/kvm");
    }
    let dir = tempdir("bench-record");
    let parts = [
        ("rounds", ROUNDS.to_string()),
        ("compute", bench_compute(&dir)?),
        ("ticker", bench_ticker(&dir)?),
        ("hello", bench_hello(&dir)?),
        ("kv_idle", bench_kv_idle(&dir)?),
        ("kv_busy", bench_kv_busy(&dir)?),
    ];
    println!("{}", object(&parts));
    Ok(())
}
