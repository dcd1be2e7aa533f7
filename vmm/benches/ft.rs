//! What fault tolerance costs: the same workloads solo (`duet run`) and
//! under FT (`duet primary` with a `duet backup` on loopback), interleaved
//! in rounds (solo, FT, solo, FT, ...) within one run, medians reported.
//! `cargo bench -p vmm --bench ft` prints one JSON object on stdout
//! (progress goes to stderr):
//!
//! ```text
//! {"rounds":..,
//!  "solo_kv_set_rps":..,"ft_kv_set_rps":..,"kv_set_ratio":..,  (also get, incr)
//!  "solo_ping_p50_us":..,"ft_ping_p50_us":..,"output_rule_added_p50_us":.., (also p99)
//!  "solo_pinned_ping_p50_us":..,"ft_pinned_ping_p50_us":..,"output_rule_added_pinned_p50_us":.., (also p99)
//!  "ft_verify_ping_p50_us":..,"ft_verify_ping_p99_us":..,"verify_added_p50_us":..,
//!  "verify_added_p99_us":..,
//!  "solo_compute_wall_s":..,"ft_compute_wall_s":..,"compute_wall_ratio":..,
//!  "solo_compute_guest_s":..,"ft_compute_guest_s":..,"compute_guest_ratio":..,
//!  "ft_compute_digest50_wall_s":..,"compute_digest50_wall_ratio":..,  (also guest)
//!  "record_compute_wall_s":..,"compute_record_wall_ratio":..,  (also guest)
//!  "woken_compute_guest_s":..,"woken_compute_guest_ratio":..,
//!  "wakeups_per_cpu_s":..,"preemption_cost_us":..,
//!  "ft_compute_unbounded_wall_s":..,"compute_unbounded_wall_ratio":..,  (also guest)
//!  "compute_unbounded_throttle_ms":..,"compute_unbounded_lag_p99_ms":..,
//!  "kv_lag_p50_ms":..,"kv_lag_p99_ms":..,"compute_lag_p50_ms":..,..,"idle_lag_p99_ms":..,
//!  "compute_throttle_ms":..,
//!  "kv_log_mbit_s":..,"compute_log_mbit_s":..,"idle_log_mbit_s":..,
//!  "or_total_p50_us":..,"or_total_p99_us":..,"or_log_write_p50_us":..,..,
//!  "or_ack_p50_us":..,..,"or_backup_turnaround_p50_us":..,..,"or_release_p50_us":..,..}
//! ```
//!
//! - `*_kv_*_rps`: `redis-benchmark -c 1 -n 2000 -t set,get,incr` against
//!   the `kv` image; ratios are FT over solo;
//! - `*_pinned_ping_*`: the same PINGs with `--vcpu-cpu 1` (the vCPU on
//!   CPU 1 alone, the VMM's other threads elsewhere), solo and FT, the FT
//!   backup confined to CPU 0 as if on another host: what the Output Rule
//!   costs when the channel threads do not preempt the guest;
//! - `*_ping_*_us`: round trips of 500 sequential inline PINGs over one raw
//!   TCP connection; `output_rule_added_*` is FT minus solo, what holding
//!   output until the backup acknowledges costs a client;
//!   `ft_verify_ping_*` are the same PINGs against a pair with
//!   `--verify-outputs` (each reply byte waits for the backup to replay its
//!   exit and check it and the digest after it), and `verify_added_*` is
//!   that minus solo: what verified output costs a client in all;
//! - `*_compute_wall_s`: the whole `compute` run as the host saw it;
//!   `*_compute_guest_s`: the guest's own `elapsed_ns`; `*_digest50_*`:
//!   the FT run with a state digest every 50 ms (`--digest-interval-ms
//!   50`) instead of the default, against the same solo runs;
//!   `record_compute_*`: `duet record` to a file, no backup (what logging
//!   itself costs); `ft_compute_unbounded_*`: the pair with the
//!   execution-lag bound off (`--max-lag-ms` an hour), so that
//!   `compute_unbounded_*_ratio` is what pairing costs without the
//!   primary ever waiting, and the rest of `compute_*_ratio` the bound's
//!   price (its waits plus their side effects);
//! - `woken_compute_*`: `compute` solo beside one thread per CPU, pinned
//!   there, that wakes every millisecond (`wakeups_per_cpu_s`) to do
//!   nothing; `preemption_cost_us` is the guest time lost per wake-up on
//!   the vCPU's CPU. A pair on one host exchanges messages while both
//!   guests run, and each wake-up they cause preempts one of them: this
//!   is what each costs, and so what no change to Duet's own work can
//!   win back;
//! - `*_lag_*_ms`: the primary's execution lag percentiles (how far the
//!   backup runs behind), scraped from `--metrics` at the end of each FT
//!   workload: kv after redis-benchmark and the PINGs, compute just before
//!   it powers off, idle after 3 s of an idle `kv`;
//! - `compute_throttle_ms`: how long the FT compute primary's guest waited
//!   for the backup to catch up (`duet_throttle_seconds_total`), the price
//!   of the execution-lag bound;
//! - `*_log_mbit_s`: log bytes sent during the workload over its duration;
//! - `or_*_us`: where an output's time under the Output Rule goes, from the
//!   pair's own histograms over the PINGs (both sides' `--metrics`):
//!   `total` from the vCPU producing it (a gathered serial reply: its
//!   first byte, so `log_write` includes the gathering) to the gate handing it to the
//!   serial writer; `log_write` to the channel thread having written the
//!   batch with its records; `ack` from that write to the ack read back,
//!   of which `backup_turnaround` is the backup's own time (batch read to
//!   ack written) and the rest the wire and the two channel threads'
//!   wake-ups; `release` from the ack read to the hand-over. The last hop
//!   (serial writer thread to the socket) is the same solo and under FT,
//!   so `output_rule_added_*` (client-side) is to be compared with
//!   `or_total_*`.
//!
//! Every child runs under a time limit and is killed if it overruns; a
//! backup that does not finish with exit 0 (a digest mismatch) fails the
//! benchmark.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use common::*;

/// `--max-lag-ms` for the FT compute run without the lag bound: an hour,
/// far longer than the run.
const UNBOUNDED_LAG_MS: &str = "3600000";
/// Rounds of (solo, FT) per workload.
const ROUNDS: usize = 3;
/// Limit for one guest run or one process exit.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Limit for the whole `redis-benchmark` run.
const REDIS_LIMIT: Duration = Duration::from_secs(300);
/// Requests per `redis-benchmark` test.
const REDIS_REQUESTS: &str = "2000";
/// Sequential PING round trips measured per run.
const PINGS: usize = 500;
/// How long the idle `kv` is watched.
const IDLE: Duration = Duration::from_secs(3);

/// Round trips of `PINGS` sequential inline PINGs, in microseconds, sorted.
fn ping_round_trips(addr: SocketAddr) -> anyhow::Result<Vec<f64>> {
    let mut c = Conn::connect(addr, Duration::from_secs(10))?;
    let mut times = Vec::with_capacity(PINGS);
    for i in 0..PINGS {
        let start = Instant::now();
        c.send_raw(b"PING\r\n")?;
        let got = c
            .reply(Duration::from_secs(10))
            .with_context(|| format!("no reply to PING #{i}"))?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
        ensure!(got == Reply::simple("PONG"), "PING #{i} got {got:?}");
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// The `q` quantile of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The median (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `e`, with the last lines each of `procs` printed (they are stopped
/// first): a workload that failed against a pair says what the pair said.
fn with_stderr(mut e: anyhow::Error, procs: Vec<Proc>) -> anyhow::Error {
    for mut p in procs {
        let _ = p.terminate();
        let name = p.name().to_string();
        let text = match p.finish(RUN_LIMIT) {
            Ok(o) => stderr(&o),
            Err(why) => format!("{why:#}"),
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        e = e.context(format!("{name} printed: {tail}"));
    }
    e
}

/// The `compute result=.. rounds=.. elapsed_ns=N` line: N in seconds.
fn compute_guest_s(out: &str) -> anyhow::Result<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("compute "))
        .with_context(|| format!("no compute line in output:\n{out}"))?;
    let ns = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ns="))
        .with_context(|| format!("no elapsed_ns= in {line:?}"))?;
    Ok(ns.parse::<f64>()? / 1e9)
}

/// The primary's metrics, scraped now; fails if they do not answer.
fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    metrics::scrape(addr, Duration::from_secs(2))
        .with_context(|| format!("the primary's metrics at {addr}"))
}

/// Execution lag (p50, p99) in milliseconds of the samples taken between
/// two scrapes (`before` empty: since start); NaN (reported as null) if
/// none was taken.
fn lag_ms(before: &Metrics, now: &Metrics) -> anyhow::Result<(f64, f64)> {
    now.require("duet_lag_seconds_count")?;
    let q = |q| {
        now.quantile_since(before, "duet_lag_seconds", q)
            .unwrap_or(f64::NAN)
    };
    Ok((q(0.50) * 1e3, q(0.99) * 1e3))
}

/// A running primary and backup.
struct Pair {
    primary: Proc,
    backup: Proc,
    metrics: SocketAddr,
    backup_metrics: SocketAddr,
}

/// The Output Rule stages: (JSON name, histogram, which side's metrics).
const STAGES: [(&str, &str, bool); 5] = [
    ("total", "duet_output_rule_seconds", false),
    ("log_write", "duet_output_log_write_seconds", false),
    ("ack", "duet_output_ack_seconds", false),
    ("backup_turnaround", "duet_ack_turnaround_seconds", true),
    ("release", "duet_output_release_seconds", false),
];

/// (p50, p99) in µs of each of [`STAGES`] between two scrapes of each
/// side (primary, backup).
fn stage_us(before: &(Metrics, Metrics), after: &(Metrics, Metrics)) -> Vec<(f64, f64)> {
    STAGES
        .iter()
        .map(|(_, name, backup)| {
            let (b, a) = if *backup {
                (&before.1, &after.1)
            } else {
                (&before.0, &after.0)
            };
            let q = |q| a.quantile_since(b, name, q).unwrap_or(f64::NAN) * 1e6;
            (q(0.5), q(0.99))
        })
        .collect()
}

impl Pair {
    /// Starts a backup and a primary of `image`; `serial` is the primary's
    /// `--serial` value.
    fn start(image: &str, serial: &str) -> Pair {
        Pair::start_with(image, serial, &[])
    }

    /// [`Pair::start`] with more flags for the primary.
    fn start_with(image: &str, serial: &str, primary_args: &[&str]) -> Pair {
        let (chan, metrics, backup_metrics) = (free_addr(), free_addr(), free_addr());
        let backup = launch(
            backup_cmd(image, "bench", chan).args(["--metrics", &backup_metrics.to_string()]),
            false,
        );
        let primary = launch(
            primary_cmd(image, "bench", chan)
                .args(["--serial", serial])
                .args(["--metrics", &metrics.to_string()])
                .args(primary_args),
            false,
        );
        Pair {
            primary,
            backup,
            metrics,
            backup_metrics,
        }
    }

    /// A workload against the pair failed with `e`: stops both and adds
    /// what each printed.
    fn fail(self, e: anyhow::Error) -> anyhow::Error {
        with_stderr(e, vec![self.primary, self.backup])
    }

    /// Waits for both to exit (after `stop`, or by themselves) and checks
    /// that both exited 0 with the same final state; the primary's output.
    fn finish(mut self, stop: bool) -> anyhow::Result<Output> {
        if stop {
            self.primary.terminate()?;
        }
        let p = self.primary.finish(RUN_LIMIT)?;
        let b = self.backup.finish(RUN_LIMIT)?;
        ensure!(p.status.success(), "primary: {}: {}", p.status, stderr(&p));
        ensure!(
            b.status.success(),
            "backup (4 = diverged): {}: {}",
            b.status,
            stderr(&b)
        );
        ensure!(
            final_state(&p) == final_state(&b),
            "final states differ: {} vs {}",
            final_state(&p),
            final_state(&b)
        );
        Ok(p)
    }
}

/// Results of one kv run.
struct KvRun {
    rps: BTreeMap<String, f64>,
    pings: Vec<f64>,
}

/// `between_pings` runs after redis-benchmark and again after the PINGs.
fn kv_workload(
    addr: SocketAddr,
    mut between_pings: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<KvRun> {
    let rps = redis_benchmark(addr, REDIS_REQUESTS, REDIS_LIMIT)?;
    between_pings()?;
    let pings = ping_round_trips(addr)?;
    between_pings()?;
    Ok(KvRun { rps, pings })
}

fn solo_kv() -> anyhow::Result<KvRun> {
    let addr = free_addr();
    let _vm = start_tcp_guest("kv", addr);
    kv_workload(addr, || Ok(()))
}

/// FT kv: the workload, then 3 s idle.
struct FtKvRun {
    kv: KvRun,
    lag: (f64, f64),
    mbit: f64,
    idle_lag: (f64, f64),
    idle_mbit: f64,
    /// (p50, p99) µs of each of [`STAGES`] over the PINGs.
    stages: Vec<(f64, f64)>,
}

fn ft_kv() -> anyhow::Result<FtKvRun> {
    let addr = free_addr();
    let pair = Pair::start("kv", &format!("tcp:{addr}"));
    wait_for_port(addr, Duration::from_secs(10));
    let start = scrape(pair.metrics)?;
    let (t0, b0) = (Instant::now(), start.require("duet_log_bytes_total")?);
    let mut both = Vec::new();
    let kv = kv_workload(addr, || {
        both.push((scrape(pair.metrics)?, scrape(pair.backup_metrics)?));
        Ok(())
    });
    let kv = match kv {
        Ok(kv) => kv,
        Err(e) => return Err(pair.fail(e.context("FT kv"))),
    };
    let stages = stage_us(&both[0], &both[1]);
    let busy = scrape(pair.metrics)?;
    let (t1, b1) = (Instant::now(), busy.require("duet_log_bytes_total")?);
    std::thread::sleep(IDLE);
    let idle = scrape(pair.metrics)?;
    let (t2, b2) = (Instant::now(), idle.require("duet_log_bytes_total")?);
    pair.finish(true)?;
    let mbit = |bytes: f64, d: Duration| bytes * 8.0 / 1e6 / d.as_secs_f64();
    Ok(FtKvRun {
        kv,
        lag: lag_ms(&start, &busy)?,
        mbit: mbit(b1 - b0, t1 - t0),
        idle_lag: lag_ms(&busy, &idle)?,
        idle_mbit: mbit(b2 - b1, t2 - t1),
        stages,
    })
}

/// PING round trips against an FT kv pair with `--verify-outputs`.
fn ft_verify_pings() -> anyhow::Result<Vec<f64>> {
    let addr = free_addr();
    let pair = Pair::start_with("kv", &format!("tcp:{addr}"), &["--verify-outputs"]);
    wait_for_port(addr, Duration::from_secs(10));
    let pings = match ping_round_trips(addr) {
        Ok(p) => p,
        Err(e) => return Err(pair.fail(e.context("FT PINGs with --verify-outputs"))),
    };
    pair.finish(true)?;
    Ok(pings)
}

/// PING round trips with the vCPU on a CPU of its own (`--vcpu-cpu 1`):
/// solo, and FT with the backup confined to CPU 0 (`taskset -c 0`), as
/// if it ran on another host. (solo, FT), or None on a single-CPU host.
fn pinned_pings() -> anyhow::Result<Option<(Vec<f64>, Vec<f64>)>> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(None);
    }
    let addr = free_addr();
    let solo = {
        let vm = Proc::captured(
            "pinned solo kv",
            duet()
                .args(["--vcpu-cpu", "1", "run", "--image", "kv"])
                .args(["--serial", &format!("tcp:{addr}")]),
            false,
        )?;
        wait_for_port(addr, Duration::from_secs(10));
        ping_round_trips(addr).map_err(|e| with_stderr(e.context("pinned solo PINGs"), vec![vm]))?
    };
    let (addr, chan) = (free_addr(), free_addr());
    let mut backup = Command::new("taskset");
    backup
        .args(["-c", "0", env!("CARGO_BIN_EXE_duet")])
        .args(["backup", "--image", "kv", "--vm-id", "bench"])
        .args(["--listen", &chan.to_string()]);
    let backup = launch(&mut backup, false);
    let primary = launch(
        primary_cmd("kv", "bench", chan).args([
            "--vcpu-cpu",
            "1",
            "--serial",
            &format!("tcp:{addr}"),
        ]),
        false,
    );
    wait_for_port(addr, Duration::from_secs(10));
    let ft = match ping_round_trips(addr) {
        Ok(ft) => ft,
        Err(e) => {
            return Err(with_stderr(
                e.context("pinned FT PINGs"),
                vec![primary, backup],
            ))
        }
    };
    let mut primary = primary;
    primary.terminate()?;
    let p = primary.finish(RUN_LIMIT)?;
    let b = backup.finish(RUN_LIMIT)?;
    ensure!(
        p.status.success(),
        "pinned primary: {}: {}",
        p.status,
        stderr(&p)
    );
    ensure!(
        b.status.success(),
        "pinned backup: {}: {}",
        b.status,
        stderr(&b)
    );
    Ok(Some((solo, ft)))
}

/// `compute` solo: (wall s, guest s).
fn solo_compute() -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let o = run_bounded(duet().args(["run", "--image", "compute"]), None, RUN_LIMIT);
    let wall = start.elapsed().as_secs_f64();
    ensure!(o.status.success(), "compute: {}: {}", o.status, stderr(&o));
    Ok((wall, compute_guest_s(&stdout(&o))?))
}

/// `compute` recorded to a log file (`duet record`), no backup: what
/// logging itself costs, (wall s, guest s).
fn record_compute() -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("compute.log");
    let start = Instant::now();
    let o = run_bounded(
        duet()
            .args(["record", "--image", "compute", "--log"])
            .arg(&log),
        None,
        RUN_LIMIT,
    );
    let wall = start.elapsed().as_secs_f64();
    ensure!(
        o.status.success(),
        "compute record: {}: {}",
        o.status,
        stderr(&o)
    );
    Ok((wall, compute_guest_s(&stdout(&o))?))
}

/// How often each [`Wakers`] thread wakes.
const WAKE_EVERY: Duration = Duration::from_millis(1);

/// One thread per CPU, pinned there, that wakes every [`WAKE_EVERY`] to
/// do almost nothing: run beside a solo guest, what the guest loses is
/// what a wake-up that preempts a vCPU costs on this host, the price of
/// every message a pair on one host exchanges while both guests run.
struct Wakers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
    started: Instant,
}

impl Wakers {
    fn start() -> Wakers {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (0..cpus)
            .map(|cpu| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let _ = logchannel::sched::pin_current_thread(cpu);
                    let mut wakes = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(WAKE_EVERY);
                        wakes += 1;
                    }
                    wakes
                })
            })
            .collect();
        Wakers {
            stop,
            threads,
            started: Instant::now(),
        }
    }

    /// Stops them; wake-ups per CPU per second.
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let n = self.threads.len() as f64;
        let wakes: u64 = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap_or(0))
            .sum();
        wakes as f64 / n / secs
    }
}

/// `compute` solo beside [`Wakers`]: (guest s, wake-ups per CPU per s).
fn woken_compute() -> anyhow::Result<(f64, f64)> {
    let wakers = Wakers::start();
    let run = solo_compute();
    let rate = wakers.stop();
    Ok((run?.1, rate))
}

/// What one FT `compute` run measured.
struct FtCompute {
    wall_s: f64,
    guest_s: f64,
    /// Execution lag (p50, p99), ms.
    lag_ms: (f64, f64),
    log_mbit_s: f64,
    /// How long the primary's guest waited for the backup (the lag bound).
    throttle_ms: f64,
}

/// `compute` under FT. The primary's metrics are scraped every 100 ms
/// while it runs; the last scrape stands for the end of the workload.
fn ft_compute(primary_args: &[&str]) -> anyhow::Result<FtCompute> {
    let start = Instant::now();
    let pair = Pair::start_with("compute", "stdio", primary_args);
    let last: Arc<Mutex<Option<(Metrics, Instant)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (last, done, addr) = (last.clone(), done.clone(), pair.metrics);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(m) = metrics::scrape(addr, Duration::from_secs(2)) {
                    *last.lock().unwrap() = Some((m, Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let o = pair.finish(false)?;
    let wall = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    let (m, at) = last
        .lock()
        .unwrap()
        .take()
        .context("the FT compute primary's metrics never answered")?;
    let bytes = m.require("duet_log_bytes_total")?;
    let mbit = bytes * 8.0 / 1e6 / (at - start).as_secs_f64();
    Ok(FtCompute {
        wall_s: wall,
        guest_s: compute_guest_s(&stdout(&o))?,
        lag_ms: lag_ms(&Metrics::default(), &m)?,
        log_mbit_s: mbit,
        throttle_ms: m.require("duet_throttle_seconds_total")? * 1e3,
    })
}

/// A JSON number: finite, three decimals.
fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".to_string()
    }
}

/// Samples of every named quantity, one per round.
#[derive(Default)]
struct Samples(BTreeMap<String, Vec<f64>>);

impl Samples {
    fn add(&mut self, name: &str, v: f64) {
        self.add_owned(name.to_string(), v);
    }

    fn add_owned(&mut self, name: String, v: f64) {
        self.0.entry(name).or_default().push(v);
    }

    fn median(&self, name: &str) -> f64 {
        median(self.0.get(name).cloned().unwrap_or_default())
    }
}

fn main() -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("the ft benchmark needs /dev/kvm");
    }
    if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("redis-benchmark not found on PATH: install Debian's redis-tools");
    }
    let bench_start = Instant::now();
    let mut s = Samples::default();
    for round in 1..=ROUNDS {
        eprintln!("ft bench: round {round}/{ROUNDS}: solo kv");
        let solo = solo_kv()?;
        eprintln!("ft bench: round {round}/{ROUNDS}: FT kv (+{IDLE:?} idle)");
        let ft = ft_kv()?;
        for (test, key_solo, key_ft) in [
            ("SET", "solo_kv_set_rps", "ft_kv_set_rps"),
            ("GET", "solo_kv_get_rps", "ft_kv_get_rps"),
            ("INCR", "solo_kv_incr_rps", "ft_kv_incr_rps"),
        ] {
            s.add(key_solo, solo.rps[test]);
            s.add(key_ft, ft.kv.rps[test]);
        }
        s.add("solo_ping_p50_us", quantile(&solo.pings, 0.5));
        s.add("solo_ping_p99_us", quantile(&solo.pings, 0.99));
        s.add("ft_ping_p50_us", quantile(&ft.kv.pings, 0.5));
        s.add("ft_ping_p99_us", quantile(&ft.kv.pings, 0.99));
        eprintln!("ft bench: round {round}/{ROUNDS}: FT kv PINGs with --verify-outputs");
        eprintln!("ft bench: round {round}/{ROUNDS}: PINGs with the vCPU pinned, solo and FT");
        if let Some((solo, ft)) = pinned_pings()? {
            for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
                s.add(&format!("solo_pinned_ping_{name}_us"), quantile(&solo, q));
                s.add(&format!("ft_pinned_ping_{name}_us"), quantile(&ft, q));
            }
        }
        let verify = ft_verify_pings()?;
        s.add("ft_verify_ping_p50_us", quantile(&verify, 0.5));
        s.add("ft_verify_ping_p99_us", quantile(&verify, 0.99));
        s.add("kv_lag_p50_ms", ft.lag.0);
        s.add("kv_lag_p99_ms", ft.lag.1);
        s.add("kv_log_mbit_s", ft.mbit);
        s.add("idle_lag_p50_ms", ft.idle_lag.0);
        s.add("idle_lag_p99_ms", ft.idle_lag.1);
        s.add("idle_log_mbit_s", ft.idle_mbit);
        for ((stage, _, _), (p50, p99)) in STAGES.iter().zip(&ft.stages) {
            s.add_owned(format!("or_{stage}_p50_us"), *p50);
            s.add_owned(format!("or_{stage}_p99_us"), *p99);
        }

        eprintln!("ft bench: round {round}/{ROUNDS}: solo compute");
        let (wall, guest) = solo_compute()?;
        s.add("solo_compute_wall_s", wall);
        s.add("solo_compute_guest_s", guest);
        eprintln!("ft bench: round {round}/{ROUNDS}: solo compute beside a waking thread per CPU");
        let (woken, rate) = woken_compute()?;
        s.add("woken_compute_guest_s", woken);
        s.add("wakeups_per_cpu_s", rate);
        // Each wake-up on the vCPU's CPU preempts it.
        s.add("preemption_cost_us", (woken - guest) / (rate * woken) * 1e6);
        eprintln!("ft bench: round {round}/{ROUNDS}: FT compute");
        let c = ft_compute(&[])?;
        s.add("ft_compute_wall_s", c.wall_s);
        s.add("ft_compute_guest_s", c.guest_s);
        s.add("compute_lag_p50_ms", c.lag_ms.0);
        s.add("compute_lag_p99_ms", c.lag_ms.1);
        s.add("compute_log_mbit_s", c.log_mbit_s);
        s.add("compute_throttle_ms", c.throttle_ms);
        // The cost of frequent digests: the same, with one every 50 ms of
        // run time instead of the default.
        eprintln!("ft bench: round {round}/{ROUNDS}: FT compute, a digest every 50 ms");
        let c = ft_compute(&["--digest-interval-ms", "50"])?;
        s.add("ft_compute_digest50_wall_s", c.wall_s);
        s.add("ft_compute_digest50_guest_s", c.guest_s);
        // Where compute's FT cost comes from: logging alone (recorded to
        // a file), and the pair without the execution-lag bound (an hour
        // of lag allowed: the primary never waits for its backup).
        eprintln!("ft bench: round {round}/{ROUNDS}: compute recorded to a file");
        let (wall, guest) = record_compute()?;
        s.add("record_compute_wall_s", wall);
        s.add("record_compute_guest_s", guest);
        eprintln!("ft bench: round {round}/{ROUNDS}: FT compute without the lag bound");
        let c = ft_compute(&["--max-lag-ms", UNBOUNDED_LAG_MS])?;
        s.add("ft_compute_unbounded_wall_s", c.wall_s);
        s.add("ft_compute_unbounded_guest_s", c.guest_s);
        s.add("compute_unbounded_throttle_ms", c.throttle_ms);
        s.add("compute_unbounded_lag_p99_ms", c.lag_ms.1);
    }
    eprintln!("ft bench: {:?} in all", bench_start.elapsed());

    let m = |k: &str| s.median(k);
    let mut pairs: Vec<(String, f64)> = vec![("rounds".into(), ROUNDS as f64)];
    for t in ["set", "get", "incr"] {
        let (solo, ft) = (m(&format!("solo_kv_{t}_rps")), m(&format!("ft_kv_{t}_rps")));
        pairs.push((format!("solo_kv_{t}_rps"), solo));
        pairs.push((format!("ft_kv_{t}_rps"), ft));
        pairs.push((format!("kv_{t}_ratio"), ft / solo));
    }
    for q in ["p50", "p99"] {
        let (solo, ft) = (
            m(&format!("solo_ping_{q}_us")),
            m(&format!("ft_ping_{q}_us")),
        );
        pairs.push((format!("solo_ping_{q}_us"), solo));
        pairs.push((format!("ft_ping_{q}_us"), ft));
        pairs.push((format!("output_rule_added_{q}_us"), ft - solo));
        let (solo_pin, ft_pin) = (
            m(&format!("solo_pinned_ping_{q}_us")),
            m(&format!("ft_pinned_ping_{q}_us")),
        );
        pairs.push((format!("solo_pinned_ping_{q}_us"), solo_pin));
        pairs.push((format!("ft_pinned_ping_{q}_us"), ft_pin));
        pairs.push((
            format!("output_rule_added_pinned_{q}_us"),
            ft_pin - solo_pin,
        ));
        let verify = m(&format!("ft_verify_ping_{q}_us"));
        pairs.push((format!("ft_verify_ping_{q}_us"), verify));
        pairs.push((format!("verify_added_{q}_us"), verify - solo));
    }
    for what in ["wall", "guest"] {
        let (solo, ft) = (
            m(&format!("solo_compute_{what}_s")),
            m(&format!("ft_compute_{what}_s")),
        );
        pairs.push((format!("solo_compute_{what}_s"), solo));
        pairs.push((format!("ft_compute_{what}_s"), ft));
        pairs.push((format!("compute_{what}_ratio"), ft / solo));
        let d50 = m(&format!("ft_compute_digest50_{what}_s"));
        pairs.push((format!("ft_compute_digest50_{what}_s"), d50));
        pairs.push((format!("compute_digest50_{what}_ratio"), d50 / solo));
        let rec = m(&format!("record_compute_{what}_s"));
        pairs.push((format!("record_compute_{what}_s"), rec));
        pairs.push((format!("compute_record_{what}_ratio"), rec / solo));
        let free = m(&format!("ft_compute_unbounded_{what}_s"));
        pairs.push((format!("ft_compute_unbounded_{what}_s"), free));
        pairs.push((format!("compute_unbounded_{what}_ratio"), free / solo));
    }
    let woken = m("woken_compute_guest_s");
    pairs.push(("woken_compute_guest_s".into(), woken));
    pairs.push((
        "woken_compute_guest_ratio".into(),
        woken / m("solo_compute_guest_s"),
    ));
    for k in [
        "wakeups_per_cpu_s",
        "preemption_cost_us",
        "kv_lag_p50_ms",
        "kv_lag_p99_ms",
        "compute_lag_p50_ms",
        "compute_lag_p99_ms",
        "compute_throttle_ms",
        "compute_unbounded_throttle_ms",
        "compute_unbounded_lag_p99_ms",
        "idle_lag_p50_ms",
        "idle_lag_p99_ms",
        "kv_log_mbit_s",
        "compute_log_mbit_s",
        "idle_log_mbit_s",
    ] {
        pairs.push((k.to_string(), m(k)));
    }
    for (stage, _, _) in STAGES {
        for q in ["p50", "p99"] {
            let k = format!("or_{stage}_{q}_us");
            pairs.push((k.clone(), m(&k)));
        }
    }
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            if k == "rounds" {
                format!("\"{k}\":{v}")
            } else {
                format!("\"{k}\":{}", json_number(*v))
            }
        })
        .collect();
    println!("{{{}}}", body.join(","));
    Ok(())
}
