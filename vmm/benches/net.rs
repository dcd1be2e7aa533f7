//! What fault tolerance costs a TCP service, and what a failover costs its
//! clients: the `netkv` guest on its virtio-net NIC in the two-host
//! namespaces, solo (`duet run` on host A) and under FT (primary on A,
//! backup on B, arbiter on its own host), interleaved trial by trial in one
//! run (solo, FT, solo, FT, ...). `cargo bench -p vmm --bench net` prints
//! one JSON object on stdout (progress goes to stderr):
//!
//! ```text
//! {"trials":..,
//!  "solo_set_rps":..,"ft_set_rps":..,"set_rps_ratio":..,         (also get)
//!  "solo_set_p50_ms":..,"ft_set_p50_ms":..,"set_p50_ratio":..,   (also p99, get)
//!  "log_mbit_s":..,
//!  "failover_gap_p50_ms":..,"failover_gap_max_ms":..,"failover_gaps_ms":[..]}
//! ```
//!
//! - throughput and latency: `redis-benchmark -c 50 -n 20000 -t set,get
//!   --csv` from the client namespace; medians over the trials; ratios are
//!   FT over solo (for latency, above 1 is slower);
//! - `log_mbit_s`: the primary's `duet_log_bytes_total` (from `--metrics`)
//!   gained during the FT benchmark, over its duration;
//! - `failover_gap_*`: after each FT benchmark, a client in the client
//!   namespace sends PINGs back to back on one connection while the primary
//!   is SIGKILLed a second in; the gap is the longest interval between two
//!   consecutive replies, which is what the failover costs that client
//!   (detection, arbitration, the backup replaying its backlog and going
//!   live, the gratuitous ARP, TCP retransmission). The connection must
//!   survive: any error fails the benchmark.
//!
//! `DUET_NET_TRIALS` (default 3) sets the number of trials. Needs root (the
//! namespaces), /dev/kvm and redis-benchmark.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/twohost/mod.rs"]
mod twohost;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use common::*;
use twohost::{Pair, Side, Solo, SoloMode};
use vmm::netns::{Host, Topology};

/// Limit for one redis-benchmark run.
const BENCH_LIMIT: Duration = Duration::from_secs(300);
/// When the primary is killed in the failover measurement.
const KILL_AFTER: Duration = Duration::from_secs(1);
/// How long the client keeps pinging after the kill.
const AFTER_KILL: Duration = Duration::from_secs(2);
/// Longest the whole failover measurement may take.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// A reply later than this is a failure, not a gap.
const REPLY_LIMIT: Duration = Duration::from_secs(20);

/// One row of `redis-benchmark --csv`.
#[derive(Debug, Clone, Copy)]
struct Row {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `redis-benchmark -c 50 -n 20000 -t set,get --csv` from the client
/// namespace of `topo` against `addr`: a row per test (SET, GET). Its CSV
/// names its columns in a header line, which is how they are found.
fn redis_benchmark(topo: &Topology, addr: SocketAddr) -> anyhow::Result<BTreeMap<String, Row>> {
    let mut cmd = topo.command(Host::Client, "redis-benchmark");
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-c", "50", "-n", "20000", "-t", "set,get", "--csv"]);
    let o = vmm::kit::process::run_bounded(&mut cmd, None, BENCH_LIMIT)?;
    let out = stdout(&o);
    ensure!(
        o.status.success() && !out.contains("Error"),
        "redis-benchmark: {}: {out}{}",
        o.status,
        stderr(&o)
    );
    let mut lines = out.lines().map(|l| {
        l.split(',')
            .map(|c| c.trim_matches('"').to_string())
            .collect::<Vec<_>>()
    });
    let header = lines
        .next()
        .with_context(|| format!("no CSV header in {out:?}"))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no column {name} in {header:?}"))
    };
    let (rps, p50, p99) = (col("rps")?, col("p50_latency_ms")?, col("p99_latency_ms")?);
    let mut rows = BTreeMap::new();
    for cols in lines {
        let num = |i: usize| -> anyhow::Result<f64> {
            cols.get(i)
                .with_context(|| format!("short CSV line {cols:?}"))?
                .parse()
                .with_context(|| format!("bad number in {cols:?}"))
        };
        rows.insert(
            cols[0].clone(),
            Row {
                rps: num(rps)?,
                p50_ms: num(p50)?,
                p99_ms: num(p99)?,
            },
        );
    }
    for test in ["SET", "GET"] {
        ensure!(rows.contains_key(test), "no {test} row in {out}");
    }
    Ok(rows)
}

fn solo_trial(prefix: &str) -> anyhow::Result<BTreeMap<String, Row>> {
    let mut solo = Solo::start(prefix, SoloMode::Run);
    drop(solo.wait_for_service(Duration::from_secs(30)));
    let rows = redis_benchmark(&solo.topo, solo.service())?;
    solo.vm.ensure_running().with_context(|| solo.logs())?;
    Ok(rows)
}

struct FtTrial {
    rows: BTreeMap<String, Row>,
    log_mbit_s: f64,
    gap: Duration,
}

/// PINGs back to back on one connection while another thread kills the
/// primary `KILL_AFTER` in: the longest interval between two replies, once
/// `AFTER_KILL` has passed since the kill (a failover slower than that
/// blocks the loop in its wait for a reply, so it is measured whole).
fn failover_gap(pair: &mut Pair) -> anyhow::Result<Duration> {
    let mut conn = pair.connect()?;
    let primary = &mut pair.primary;
    let killed_at = std::sync::OnceLock::new();
    let (gap, replies) = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(KILL_AFTER);
            primary.kill();
            let _ = killed_at.set(Instant::now());
        });
        let start = Instant::now();
        let mut last = Instant::now();
        let (mut gap, mut replies) = (Duration::ZERO, 0u64);
        loop {
            conn.send_raw(b"PING\r\n")?;
            let got = conn.reply(REPLY_LIMIT)?;
            ensure!(got == Reply::simple("PONG"), "PING got {got:?}");
            let now = Instant::now();
            gap = gap.max(now - last);
            last = now;
            replies += 1;
            if killed_at.get().is_some_and(|k| now - *k > AFTER_KILL) {
                break;
            }
            ensure!(
                start.elapsed() < FAILOVER_LIMIT,
                "no end within {FAILOVER_LIMIT:?} (longest gap {gap:?})"
            );
        }
        Ok::<_, anyhow::Error>((gap, replies))
    })?;
    eprintln!("net bench: failover gap {gap:?} over {replies} PINGs");
    Ok(gap)
}

fn ft_trial(prefix: &str) -> anyhow::Result<FtTrial> {
    let mut pair = Pair::start_netkv(prefix);
    drop(pair.wait_for_service(Duration::from_secs(30)));
    let before = pair.scrape(Side::Primary)?;
    let t0 = Instant::now();
    let rows = redis_benchmark(&pair.topo, pair.service())?;
    let elapsed = t0.elapsed();
    let after = pair.scrape(Side::Primary)?;
    let bytes = after.require("duet_log_bytes_total")? - before.require("duet_log_bytes_total")?;
    let log_mbit_s = bytes * 8.0 / 1e6 / elapsed.as_secs_f64();
    let gap = failover_gap(&mut pair).with_context(|| pair.logs())?;
    ensure!(
        pair.backup
            .wait_for_log("backup: going live", Duration::from_secs(5)),
        "the backup did not go live\n{}",
        pair.logs()
    );
    pair.shutdown();
    Ok(FtTrial {
        rows,
        log_mbit_s,
        gap,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".to_string()
    }
}

fn main() -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("the net benchmark needs /dev/kvm");
    }
    if !vmm::netns::is_root() {
        bail!("the net benchmark needs root for network namespaces");
    }
    if std::process::Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("redis-benchmark not found on PATH: install Debian's redis-tools");
    }
    let trials: usize = std::env::var("DUET_NET_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    ensure!(trials > 0, "DUET_NET_TRIALS must be at least 1");
    let started = Instant::now();
    let pid = std::process::id();
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut add = |k: String, v: f64| samples.entry(k).or_default().push(v);
    let mut gaps = Vec::new();
    for t in 0..trials {
        eprintln!("net bench: trial {}/{trials}: solo", t + 1);
        let solo = solo_trial(&format!("nbs{pid}t{t}"))?;
        eprintln!("net bench: trial {}/{trials}: FT", t + 1);
        let ft = ft_trial(&format!("nbf{pid}t{t}"))?;
        for (mode, rows) in [("solo", &solo), ("ft", &ft.rows)] {
            for (test, row) in rows {
                let test = test.to_lowercase();
                add(format!("{mode}_{test}_rps"), row.rps);
                add(format!("{mode}_{test}_p50_ms"), row.p50_ms);
                add(format!("{mode}_{test}_p99_ms"), row.p99_ms);
            }
        }
        add("log_mbit_s".into(), ft.log_mbit_s);
        gaps.push(ft.gap.as_secs_f64() * 1e3);
    }
    eprintln!("net bench: {:?} in all", started.elapsed());

    let m = |k: &str| median(samples.get(k).cloned().unwrap_or_default());
    let mut fields = vec![format!("\"trials\":{trials}")];
    for test in ["set", "get"] {
        for q in ["rps", "p50_ms", "p99_ms"] {
            let (solo, ft) = (m(&format!("solo_{test}_{q}")), m(&format!("ft_{test}_{q}")));
            let ratio = q.trim_end_matches("_ms");
            fields.push(format!("\"solo_{test}_{q}\":{}", json_number(solo)));
            fields.push(format!("\"ft_{test}_{q}\":{}", json_number(ft)));
            fields.push(format!(
                "\"{test}_{ratio}_ratio\":{}",
                json_number(ft / solo)
            ));
        }
    }
    fields.push(format!("\"log_mbit_s\":{}", json_number(m("log_mbit_s"))));
    let max = gaps.iter().copied().fold(f64::NAN, f64::max);
    fields.push(format!(
        "\"failover_gap_p50_ms\":{}",
        json_number(median(gaps.clone()))
    ));
    fields.push(format!("\"failover_gap_max_ms\":{}", json_number(max)));
    let all: Vec<String> = gaps.iter().map(|g| json_number(*g)).collect();
    fields.push(format!("\"failover_gaps_ms\":[{}]", all.join(",")));
    println!("{{{}}}", fields.join(","));
    Ok(())
}
