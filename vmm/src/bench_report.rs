//! `duet bench DIR`: runs the benchmark suite and writes a Markdown report
//! with tables and charts into DIR.
//!
//! The benchmarks are Cargo bench targets (`vmm/benches/*.rs`) that need
//! the source tree (they boot the embedded guests and share helpers with
//! the end-to-end tests), so this runs `cargo bench -p vmm --bench NAME`
//! in the workspace this `duet` was built from, one benchmark at a time
//! (they would disturb each other's figures on a small machine). Each one
//! prints one JSON object on stdout; that is kept as DIR/NAME.json, its
//! stderr as DIR/NAME.log, and the report, DIR/report.md, puts our figures
//! beside the VMware FT paper's where the two measure comparable things.
//!
//! Rendering is pure (the JSON in, Markdown out) so that it is tested on
//! sample JSON without running anything; the charts are drawn with
//! plotters, like the demo's failover chart, as PNG (to look at) and SVG
//! (to zoom).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// Every benchmark, in the order they run: cheapest and most basic first,
/// so that a quick look at a partial report already says something.
pub const BENCHES: [&str; 6] = ["solo", "record", "ft", "failover", "rejoin", "net"];

/// What `--quick` sets (unless already set in the environment, so that a
/// single size can still be overridden). `solo`, `record` and `ft` have no
/// size knob: their rounds are constants in the bench files.
pub const QUICK_ENV: [(&str, &str); 4] = [
    ("DUET_FAILOVER_TRIALS", "3"),
    ("DUET_SOAK_SECS", "5"),
    ("DUET_REJOIN_TRIALS", "1"),
    ("DUET_NET_TRIALS", "1"),
];

/// The VMware FT paper's figures: Scales, Nelson and Venkitachalam, "The
/// Design of a Practical System for Fault-Tolerant Virtual Machines", ACM
/// SIGOPS Operating Systems Review 44(4), 2010.
pub mod paper {
    /// Table 1: FT over non-FT performance of four server workloads.
    pub const PERF_RATIO: (f64, f64) = (0.94, 0.99);
    /// Logging bandwidth of those workloads, Mbit/s.
    pub const LOG_MBIT: (f64, f64) = (1.5, 18.0);
    /// netperf receive on a 1 Gbit/s logging link: FT, non-FT (Mbit/s).
    pub const NET_RECEIVE_MBIT: (f64, f64) = (604.0, 940.0);
    /// Execution lag of the backup, typically under this (ms).
    pub const LAG_MS: f64 = 100.0;
    /// Pre-copy live migration's downtimes, ms: Clark et al., "Live
    /// Migration of Virtual Machines", NSDI 2005 (issue 10's anchor for a
    /// join's pause).
    pub const MIGRATION_DOWNTIME_MS: (f64, f64) = (60.0, 210.0);
    /// QEMU's default migration downtime limit, ms.
    pub const QEMU_DOWNTIME_MS: f64 = 300.0;
    /// How the paper is cited in the report.
    pub const CITATION: &str = "Scales, Nelson, Venkitachalam, \"The Design of a Practical System \
        for Fault-Tolerant Virtual Machines\", ACM SIGOPS OSR 44(4), 2010";
}

/// What `duet bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Benchmarks to run; empty means all of [`BENCHES`].
    pub only: Vec<String>,
    pub quick: bool,
}

/// How one benchmark ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It exited 0 and printed this JSON object.
    Ok(Value),
    /// It did not: how it exited, and the line of its log that says why.
    Failed { status: String, reason: String },
}

/// One benchmark's run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    pub name: String,
    pub outcome: Outcome,
    /// Wall time, including Cargo building the bench if it had to.
    pub secs: f64,
}

impl BenchRun {
    fn json(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Ok(v) => Some(v),
            Outcome::Failed { .. } => None,
        }
    }
}

/// Where and how the report was made, for its header.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub date: String,
    pub command: String,
    pub quick: bool,
    pub commit: String,
    pub machine: String,
    pub total_secs: f64,
}

/// A chart the report links to, by file stem (STEM.png and STEM.svg), and
/// whether drawing it worked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartFile {
    pub stem: &'static str,
    pub result: Result<(), String>,
}

/// Runs the benchmarks, writes DIR/NAME.json, DIR/NAME.log, the charts
/// and DIR/report.md. Returns the exit status: 0 if every benchmark and
/// chart worked, [`crate::cli::EXIT_ERROR`] otherwise (the report is
/// written either way, saying what failed).
pub fn run(opts: &Options) -> anyhow::Result<u8> {
    let names = select(&opts.only)?;
    let ws = workspace_at(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let started = Instant::now();
    let mut runs = Vec::new();
    for name in names {
        eprintln!("duet bench: running {name} (cargo bench -p vmm --bench {name})");
        let run = run_one(&ws, name, &opts.dir, opts.quick)?;
        match &run.outcome {
            Outcome::Ok(v) => {
                let path = opts.dir.join(format!("{name}.json"));
                let text = serde_json::to_string_pretty(v)? + "\n";
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("duet bench: {name} done in {:.0} s", run.secs);
            }
            Outcome::Failed { status, .. } => {
                eprintln!(
                    "duet bench: {name} FAILED ({status}) after {:.0} s",
                    run.secs
                );
            }
        }
        runs.push(run);
    }
    let charts = write_charts(&opts.dir, &runs);
    let meta = Meta {
        date: utc_date_time(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        command: command_line(),
        quick: opts.quick,
        commit: commit(&ws),
        machine: machine(),
        total_secs: started.elapsed().as_secs_f64(),
    };
    let report = opts.dir.join("report.md");
    std::fs::write(&report, render(&meta, &runs, &charts))
        .with_context(|| format!("cannot write {}", report.display()))?;
    eprintln!("duet bench: report in {}", report.display());
    let all_ok = runs.iter().all(|r| r.json().is_some()) && charts.iter().all(|c| c.result.is_ok());
    Ok(if all_ok { 0 } else { crate::cli::EXIT_ERROR })
}

/// The benchmarks `--only` names, in [`BENCHES`] order; all without it.
pub fn select(only: &[String]) -> anyhow::Result<Vec<&'static str>> {
    for name in only {
        if !BENCHES.contains(&name.as_str()) {
            bail!(
                "no benchmark {name:?}: the benchmarks are {}",
                BENCHES.join(", ")
            );
        }
    }
    Ok(BENCHES
        .iter()
        .copied()
        .filter(|b| only.is_empty() || only.iter().any(|o| o == b))
        .collect())
}

/// The workspace a `duet` built from `manifest_dir` (vmm/) belongs to:
/// its parent, if it still has the sources.
pub fn workspace_at(manifest_dir: &Path) -> anyhow::Result<PathBuf> {
    let ws = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
    if !ws.join("Cargo.toml").is_file() || !manifest_dir.join("benches").is_dir() {
        bail!(
            "duet bench must run from a source checkout: {} (where this duet was built) has no Cargo.toml and vmm/benches",
            ws.display()
        );
    }
    Ok(ws)
}

/// Runs one benchmark with Cargo in `ws`. Its stderr goes to DIR/NAME.log
/// and, prefixed, to ours (a run takes minutes: one wants to see it move).
fn run_one(ws: &Path, name: &str, dir: &Path, quick: bool) -> anyhow::Result<BenchRun> {
    let log_path = dir.join(format!("{name}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["bench", "-p", "vmm", "--bench", name])
        .current_dir(ws)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if quick {
        for (k, v) in QUICK_ENV {
            if std::env::var_os(k).is_none() {
                cmd.env(k, v);
            }
        }
    }
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot run cargo")?;
    let stderr = child.stderr.take().expect("piped");
    let tag = name.to_string();
    let mut log_copy = log.try_clone()?;
    let tee = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  [{tag}] {line}");
            let _ = writeln!(log_copy, "{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)?;
    let status = child.wait()?;
    let err = tee.join().unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    let json = parse_last_json(&out);
    if json.is_none() && !out.trim().is_empty() {
        writeln!(log, "--- stdout ---\n{out}")?;
    }
    let outcome = match (status.success(), json) {
        (true, Some(v)) => Outcome::Ok(v),
        (true, None) => Outcome::Failed {
            status: "exit status 0 but no JSON object on stdout".into(),
            reason: failure_reason(&err),
        },
        (false, _) => Outcome::Failed {
            status: status.to_string(),
            reason: failure_reason(&err),
        },
    };
    Ok(BenchRun {
        name: name.to_string(),
        outcome,
        secs,
    })
}

/// The last line of `stdout` that parses as a JSON object (a bench may
/// print other things before it).
pub fn parse_last_json(stdout: &str) -> Option<Value> {
    stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(Value::is_object)
}

/// The line of a failed bench's log that most likely says why: the last
/// one naming an error or a panic, else the last one.
pub fn failure_reason(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| {
            let l = l.to_lowercase();
            l.contains("error") || l.contains("panicked") || l.contains("failed")
        })
        .or(lines.last())
        .copied()
        .unwrap_or("(empty log)");
    let mut s: String = line.chars().take(240).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

/// `secs` since the epoch as "YYYY-MM-DD HH:MM UTC" (days to civil date
/// by the usual era arithmetic; no date crate for one line of a report).
pub fn utc_date_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.join(" ")
}

fn commit(ws: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(ws)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c} (with uncommitted changes)"),
            _ => c,
        },
        None => "unknown".into(),
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores ({model}), Linux {kernel}")
}

// ---------------------------------------------------------------------------
// Figures from the JSON.

/// A number at a dotted path ("compute.log_mbit_per_s"); `None` if absent
/// or null (the benches print null for what they could not measure).
pub fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

fn find<'a>(runs: &'a [BenchRun], name: &str) -> Option<&'a BenchRun> {
    runs.iter().find(|r| r.name == name)
}

fn json<'a>(runs: &'a [BenchRun], name: &str) -> Option<&'a Value> {
    find(runs, name).and_then(BenchRun::json)
}

/// A figure with `dp` decimals, or "n/a".
fn fmt(x: Option<f64>, dp: usize) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{x:.dp$}"),
        _ => "n/a".into(),
    }
}

/// "min–max" of the figures that exist, or the one, or "n/a".
fn span(xs: &[Option<f64>], dp: usize) -> String {
    let xs: Vec<f64> = xs
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match xs.len() {
        0 => "n/a".into(),
        _ if format!("{lo:.dp$}") == format!("{hi:.dp$}") => format!("{lo:.dp$}"),
        _ => format!("{lo:.dp$}–{hi:.dp$}"),
    }
}

fn inverse(x: Option<f64>) -> Option<f64> {
    x.filter(|x| *x > 0.0).map(|x| 1.0 / x)
}

/// The FT/solo throughput ratios (1.0 = FT is free), labelled: from `ft`
/// (kv over the serial port, compute as 1/time) and `net` (netkv over
/// virtio-net).
fn throughput_ratios(runs: &[BenchRun]) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    if let Some(ft) = json(runs, "ft") {
        for t in ["set", "get", "incr"] {
            out.push((
                format!("kv {}", t.to_uppercase()),
                get(ft, &format!("kv_{t}_ratio")),
            ));
        }
        out.push(("compute".into(), inverse(get(ft, "compute_guest_ratio"))));
    }
    if let Some(net) = json(runs, "net") {
        for t in ["set", "get"] {
            out.push((
                format!("netkv {}", t.to_uppercase()),
                get(net, &format!("{t}_rps_ratio")),
            ));
        }
    }
    out
}

/// Logging traffic figures under FT, labelled.
fn log_rates(runs: &[BenchRun]) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    if let Some(ft) = json(runs, "ft") {
        for w in ["kv", "compute", "idle"] {
            out.push((w.to_string(), get(ft, &format!("{w}_log_mbit_s"))));
        }
    }
    if let Some(net) = json(runs, "net") {
        out.push(("netkv".into(), get(net, "log_mbit_s")));
    }
    out
}

fn labelled(xs: &[(String, Option<f64>)], dp: usize) -> String {
    xs.iter()
        .map(|(l, x)| format!("{l} {}", fmt(*x, dp)))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Markdown.

fn row(cells: &[&str]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = row(head);
    s += &row(&vec!["---"; head.len()]);
    for r in rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        s += &row(&cells);
    }
    s
}

/// What a section says instead of its figures when its bench did not
/// produce any: failed (how, where the log is) or not run.
fn missing(runs: &[BenchRun], name: &str) -> Option<String> {
    match find(runs, name) {
        None => Some(format!(
            "*Not run* (`--only` left `{name}` out).\n\n"
        )),
        Some(BenchRun {
            outcome: Outcome::Failed { status, reason },
            secs,
            ..
        }) => Some(format!(
            "**FAILED**: `cargo bench -p vmm --bench {name}` ended with {status} after {secs:.0} s. \
             Log: [{name}.log]({name}.log). Last error: `{}`\n\n",
            reason.replace('`', "'")
        )),
        Some(_) => None,
    }
}

fn chart_link(charts: &[ChartFile], stem: &str, alt: &str) -> String {
    match charts.iter().find(|c| c.stem == stem) {
        Some(ChartFile { result: Ok(()), .. }) => {
            format!("![{alt}]({stem}.png)\n\n([SVG]({stem}.svg))\n\n")
        }
        Some(ChartFile { result: Err(e), .. }) => {
            format!("*Chart {stem}.png could not be drawn: {e}*\n\n")
        }
        None => String::new(),
    }
}

/// The whole report.
pub fn render(meta: &Meta, runs: &[BenchRun], charts: &[ChartFile]) -> String {
    let mut s = String::from("# Duet benchmark report\n\n");
    s += &format!(
        "Made {} by `{}`{}, at commit {}, on {}; {:.0} s in all.\n\n",
        meta.date,
        meta.command,
        if meta.quick {
            format!(
                " (quick: {})",
                QUICK_ENV
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        } else {
            String::new()
        },
        meta.commit,
        meta.machine,
        meta.total_secs
    );
    s += "Each benchmark interleaves its solo and FT runs within one run and reports medians, \
          because the machine is noisy: compare the ratios within one report rather than \
          absolute figures across reports.\n\n";
    s += &summary_of_runs(runs);
    s += &beside_vmware(runs);
    s += &ft_section(runs, charts);
    s += &lag_section(runs);
    s += &record_section(runs);
    s += &solo_section(runs);
    s += &failover_section(runs, charts);
    s += &net_section(runs, charts);
    s += "## How to reproduce\n\n";
    s += "From a source checkout, as root (the `net` benchmark needs network namespaces), \
          with `redis-benchmark` on the PATH:\n\n";
    s += "```sh\ncargo build --release --workspace\n./target/release/duet bench DIR            # everything, full size\n./target/release/duet bench DIR --quick    # small sizes\n./target/release/duet bench DIR --only solo,ft\n```\n\n";
    s += "Each benchmark is also `cargo bench -p vmm --bench NAME`, printing the JSON kept \
          here as NAME.json.\n";
    s
}

fn summary_of_runs(runs: &[BenchRun]) -> String {
    let mut rows = Vec::new();
    for name in BENCHES {
        rows.push(match find(runs, name) {
            None => vec![name.into(), "not run".into(), String::new(), String::new()],
            Some(r) => match &r.outcome {
                Outcome::Ok(_) => vec![
                    name.into(),
                    "ok".into(),
                    format!("{:.0} s", r.secs),
                    format!("[{name}.json]({name}.json), [{name}.log]({name}.log)"),
                ],
                Outcome::Failed { status, .. } => vec![
                    name.into(),
                    format!("**FAILED** ({status})"),
                    format!("{:.0} s", r.secs),
                    format!("[{name}.log]({name}.log)"),
                ],
            },
        });
    }
    table(&["benchmark", "result", "took", "output"], &rows) + "\n"
}

fn beside_vmware(runs: &[BenchRun]) -> String {
    let mut s = String::from("## Beside VMware FT\n\n");
    s += &format!(
        "VMware FT's figures are from {}. They ran large server workloads on real \
         hardware with a dedicated logging link; ours are small guests on a shared \
         two-core machine with the pair on one host (loopback or network namespaces), \
         so the comparison is of shape, not of size.\n\n",
        paper::CITATION
    );
    let ratios = throughput_ratios(runs);
    let rates = log_rates(runs);
    let ft = json(runs, "ft");
    let net = json(runs, "net");
    let fo = json(runs, "failover");
    let lag: Vec<(String, Option<f64>)> = ft
        .map(|ft| {
            ["kv", "compute", "idle"]
                .iter()
                .map(|w| (w.to_string(), get(ft, &format!("{w}_lag_p99_ms"))))
                .collect()
        })
        .unwrap_or_default();
    let (rx_ft, rx_solo) = paper::NET_RECEIVE_MBIT;
    let nr = |k: &str| net.and_then(|n| get(n, k));
    let rows = vec![
        vec![
            "FT/solo throughput (1.0 = free)".into(),
            if ratios.is_empty() {
                "n/a".into()
            } else {
                format!(
                    "{} ({})",
                    span(&ratios.iter().map(|r| r.1).collect::<Vec<_>>(), 2),
                    labelled(&ratios, 2)
                )
            },
            format!(
                "{:.2}–{:.2} (Table 1)",
                paper::PERF_RATIO.0,
                paper::PERF_RATIO.1
            ),
            "Throughput under FT over throughput alone; compute is 1/time.".into(),
        ],
        vec![
            "Logging traffic, Mbit/s".into(),
            if rates.is_empty() {
                "n/a".into()
            } else {
                format!(
                    "{} ({})",
                    span(&rates.iter().map(|r| r.1).collect::<Vec<_>>(), 3),
                    labelled(&rates, 3)
                )
            },
            format!("{}–{}", paper::LOG_MBIT.0, paper::LOG_MBIT.1),
            "Log bytes the primary sent during the workload over its duration.".into(),
        ],
        vec![
            "Network service under FT, FT/solo".into(),
            match net {
                Some(_) => format!(
                    "{} (SET), {} (GET)",
                    fmt(nr("set_rps_ratio"), 2),
                    fmt(nr("get_rps_ratio"), 2)
                ),
                None => "n/a".into(),
            },
            format!(
                "{:.2} (netperf receive, {rx_ft:.0} of {rx_solo:.0} Mbit/s, 1 Gbit/s logging link)",
                rx_ft / rx_solo
            ),
            "Ours: requests/s of 50 redis-benchmark clients against netkv over virtio-net, \
             not bulk bandwidth: every reply waits for the backup's acknowledgement."
                .into(),
        ],
        vec![
            "Execution lag, p99, ms".into(),
            if lag.is_empty() {
                "n/a".into()
            } else {
                format!(
                    "{} ({})",
                    span(&lag.iter().map(|r| r.1).collect::<Vec<_>>(), 1),
                    labelled(&lag, 1)
                )
            },
            format!("typically under {:.0}", paper::LAG_MS),
            "How far the backup runs behind the primary.".into(),
        ],
        vec![
            "Failover, ms".into(),
            match fo {
                Some(f) => format!(
                    "p50 {}, max {} (a killed primary's sockets close, so the backup notices at once; a partition waits out the 500 ms heartbeat timeout)",
                    fmt(get(f, "failover_ms_p50"), 0),
                    fmt(get(f, "failover_ms_max"), 0)
                ),
                None => "n/a".into(),
            },
            "failure detection on the order of seconds".into(),
            "SIGKILL of the primary to the first reply from the new primary (`duet demo`).".into(),
        ],
        vec![
            "A client's longest gap across a failover, ms".into(),
            match net {
                Some(_) => format!(
                    "p50 {}, max {}",
                    fmt(nr("failover_gap_p50_ms"), 0),
                    fmt(nr("failover_gap_max_ms"), 0)
                ),
                None => "n/a".into(),
            },
            "not given".into(),
            "The longest wait between two PING replies on one TCP connection through the \
             failover (includes TCP retransmission)."
                .into(),
        ],
        vec![
            "Re-protection (a new backup after a failover)".into(),
            match json(runs, "rejoin") {
                Some(r) => format!(
                    "protected in p50 {} ms at 64 MiB, {} ms at 512 MiB (idle kv)",
                    fmt(get(r, "kv_idle_64m.protected_ms.p50"), 0),
                    fmt(get(r, "kv_idle_512m.protected_ms.p50"), 0)
                ),
                None => "n/a".into(),
            },
            "automatic: a new backup is started on another host (FT VMotion, \"within minutes\")"
                .into(),
            "From starting `duet backup --join` to the survivor's `protected again` \
             (`rejoin`)."
                .into(),
        ],
        vec![
            "Re-protection pause, ms".into(),
            match json(runs, "rejoin") {
                Some(r) => format!(
                    "max {} (of every scenario and trial)",
                    fmt(rejoin_worst(r, "blackout_us.max").map(|us| us / 1e3), 1)
                ),
                None => "n/a".into(),
            },
            format!(
                "not given; pre-copy migration {:.0}–{:.0} (Clark et al., NSDI 2005), QEMU's default limit {:.0}",
                paper::MIGRATION_DOWNTIME_MS.0,
                paper::MIGRATION_DOWNTIME_MS.1,
                paper::QEMU_DOWNTIME_MS
            ),
            "How long the survivor's guest stops while the last pages and the machine state go over.".into(),
        ],
    ];
    s += &table(&["figure", "ours", "VMware FT", "what it is"], &rows);
    s + "\n"
}

fn ft_section(runs: &[BenchRun], charts: &[ChartFile]) -> String {
    let mut s = String::from("## FT against solo\n\n");
    s += "The same workloads alone (`duet run`) and under FT (`duet primary` with a `duet backup` \
          on loopback), interleaved in rounds within one run; medians over the rounds.\n\n";
    if let Some(m) = missing(runs, "ft") {
        return s + &m;
    }
    let ft = json(runs, "ft").expect("checked");
    let g = |k: &str| get(ft, k);
    let mut rows = Vec::new();
    for t in ["set", "get", "incr"] {
        rows.push(vec![
            format!("kv {}, requests/s", t.to_uppercase()),
            fmt(g(&format!("solo_kv_{t}_rps")), 0),
            fmt(g(&format!("ft_kv_{t}_rps")), 0),
            fmt(g(&format!("kv_{t}_ratio")), 3),
            "`redis-benchmark -c 1 -n 2000` over the serial port; higher is better.".into(),
        ]);
    }
    for q in ["p50", "p99"] {
        rows.push(vec![
            format!("PING round trip {q}, µs"),
            fmt(g(&format!("solo_ping_{q}_us")), 0),
            fmt(g(&format!("ft_ping_{q}_us")), 0),
            match (
                g(&format!("solo_ping_{q}_us")),
                g(&format!("ft_ping_{q}_us")),
            ) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.3}", b / a),
                _ => "n/a".into(),
            },
            format!(
                "Sequential PINGs on one connection; the Output Rule adds {} µs (FT holds a reply until the backup has the log up to it).",
                fmt(g(&format!("output_rule_added_{q}_us")), 0)
            ),
        ]);
    }
    // (label, solo key, FT key, ratio key, what it is)
    let compute = [
        ("compute, guest seconds", "solo_compute_guest_s", "ft_compute_guest_s", "compute_guest_ratio",
         "The CPU-bound guest's own elapsed time; lower is better."),
        ("compute, wall seconds", "solo_compute_wall_s", "ft_compute_wall_s", "compute_wall_ratio",
         "The whole run as the host saw it (boot and pairing included)."),
        ("compute recorded to a file, guest seconds", "solo_compute_guest_s", "record_compute_guest_s",
         "compute_record_guest_ratio", "`duet record`, no backup: what logging itself costs."),
        ("compute FT without the lag bound, guest seconds", "solo_compute_guest_s",
         "ft_compute_unbounded_guest_s", "compute_unbounded_guest_ratio",
         "The pair with `--max-lag-ms` an hour: what pairing costs when the primary never waits; the rest of the FT ratio is the bound's price."),
    ];
    for (label, solo, ft, ratio, what) in compute {
        rows.push(vec![
            label.into(),
            fmt(g(solo), 3),
            fmt(g(ft), 3),
            fmt(g(ratio), 3),
            what.into(),
        ]);
    }
    s += &format!("Rounds: {}.\n\n", fmt(g("rounds"), 0));
    s += &table(&["workload", "solo", "FT", "FT/solo", "what it is"], &rows);
    s += "\n";
    s += &chart_link(charts, "ft-vs-solo", "FT against solo");
    s
}

fn lag_section(runs: &[BenchRun]) -> String {
    let mut s = String::from("## Execution lag and logging traffic\n\n");
    s += &format!(
        "Lag: how far the backup runs behind, from the primary's `duet_lag_seconds` (VMware FT: \
         typically under {:.0} ms). Log: bytes the primary sent over the workload's duration \
         (VMware FT: {}–{} Mbit/s).\n\n",
        paper::LAG_MS,
        paper::LOG_MBIT.0,
        paper::LOG_MBIT.1
    );
    if let Some(m) = missing(runs, "ft") {
        return s + &m;
    }
    let ft = json(runs, "ft").expect("checked");
    let rows: Vec<Vec<String>> = [
        ("kv", "after redis-benchmark and the PINGs"),
        ("compute", "just before the CPU-bound guest powers off"),
        ("idle", "after 3 s of an idle kv"),
    ]
    .iter()
    .map(|(w, when)| {
        vec![
            w.to_string(),
            fmt(get(ft, &format!("{w}_lag_p50_ms")), 2),
            fmt(get(ft, &format!("{w}_lag_p99_ms")), 2),
            fmt(get(ft, &format!("{w}_log_mbit_s")), 3),
            when.to_string(),
        ]
    })
    .collect();
    s += &table(
        &[
            "workload",
            "lag p50, ms",
            "lag p99, ms",
            "log, Mbit/s",
            "measured",
        ],
        &rows,
    );
    s + "\n"
}

fn record_section(runs: &[BenchRun]) -> String {
    let mut s = String::from("## Recording and replay\n\n");
    s += "Solo, `duet record` and `duet replay` of that recording, interleaved per image; \
          record/solo is what writing the log costs (1.0 = free), replay/record below 1.0 \
          means a backup can keep up.\n\n";
    if let Some(m) = missing(runs, "record") {
        return s + &m;
    }
    let r = json(runs, "record").expect("checked");
    let rows: Vec<Vec<String>> = ["compute", "ticker", "hello", "kv_idle", "kv_busy"]
        .iter()
        .map(|img| {
            let g = |k: &str| get(r, &format!("{img}.{k}"));
            vec![
                img.to_string(),
                fmt(g("record_over_solo_wall"), 3),
                fmt(g("replay_over_record_wall"), 3),
                fmt(g("log_mbit_per_s"), 3),
                fmt(g("log_bytes"), 0),
            ]
        })
        .collect();
    s += &format!("Rounds: {}.\n\n", fmt(get(r, "rounds"), 0));
    s += &table(
        &[
            "image",
            "record/solo wall",
            "replay/record wall",
            "log, Mbit/s",
            "log bytes",
        ],
        &rows,
    );
    s += &format!(
        "\nAlso: compute guest time record/solo {}; ticker exits record/solo {} (the guest gets \
         less done in its fixed 2 s when recording slows its exits); kv_busy requests/s \
         record/solo SET {}, GET {}, INCR {}.\n\n",
        fmt(get(r, "compute.record_over_solo_guest_elapsed"), 3),
        fmt(get(r, "ticker.record_over_solo_exits"), 3),
        fmt(get(r, "kv_busy.record_over_solo_set_rps"), 3),
        fmt(get(r, "kv_busy.record_over_solo_get_rps"), 3),
        fmt(get(r, "kv_busy.record_over_solo_incr_rps"), 3),
    );
    s
}

fn solo_section(runs: &[BenchRun]) -> String {
    let mut s = String::from("## Solo baseline\n\n");
    s += "What the monitor itself costs, without fault tolerance.\n\n";
    if let Some(m) = missing(runs, "solo") {
        return s + &m;
    }
    let v = json(runs, "solo").expect("checked");
    let rows = vec![
        vec![
            "PIO exit, µs".into(),
            fmt(get(v, "pio_exit_us"), 2),
            "One port I/O round trip guest → duet → guest.".into(),
        ],
        vec![
            "MMIO exit, µs".into(),
            fmt(get(v, "mmio_exit_us"), 2),
            "One MMIO round trip.".into(),
        ],
        vec![
            "Timer interrupt, µs".into(),
            fmt(get(v, "irq_injection_iter_us"), 2),
            "One PIT interrupt injected and handled, at 20 kHz.".into(),
        ],
        vec![
            "kv SET / GET / INCR, requests/s".into(),
            format!(
                "{} / {} / {}",
                fmt(get(v, "kv_set_rps"), 0),
                fmt(get(v, "kv_get_rps"), 0),
                fmt(get(v, "kv_incr_rps"), 0)
            ),
            "`redis-benchmark -c 1 -n 2000` over the serial port.".into(),
        ],
        vec![
            "compute, s (guest / wall)".into(),
            format!(
                "{} / {}",
                fmt(get(v, "compute_guest_s"), 3),
                fmt(get(v, "compute_wall_s"), 3)
            ),
            "The CPU-bound guest's own time, and the whole run's.".into(),
        ],
    ];
    s += &table(&["figure", "value", "what it is"], &rows);
    s + "\n"
}

fn failover_section(runs: &[BenchRun], charts: &[ChartFile]) -> String {
    let mut s = String::from("## Failover\n\n");
    s += "Trials of `duet demo --serial` (arbiter, primary and backup as processes, a checked \
          kv workload): the primary is SIGKILLed mid-workload; the failover time runs from the \
          SIGKILL to the first reply from the new primary. Then an idle pair with the default \
          500 ms heartbeat timeout soaks, counting false failovers.\n\n";
    if let Some(m) = missing(runs, "failover") {
        s += &m;
    } else {
        let f = json(runs, "failover").expect("checked");
        let g = |k: &str| get(f, k);
        let times: Vec<String> = f
            .get("failover_times_ms")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|t| fmt(t.as_f64(), 0)).collect())
            .unwrap_or_default();
        let rows = vec![
            vec![
                "trials (failed)".into(),
                format!("{} ({})", fmt(g("trials"), 0), fmt(g("failed_trials"), 0)),
                "A failed trial: the demo's client saw a wrong or missing reply.".into(),
            ],
            vec![
                "failover p50 / p99 / max, ms".into(),
                format!(
                    "{} / {} / {}",
                    fmt(g("failover_ms_p50"), 0),
                    fmt(g("failover_ms_p99"), 0),
                    fmt(g("failover_ms_max"), 0)
                ),
                "Detection (at once: a killed process's sockets close), the arbiter's grant, replaying the backlog, going live.".into(),
            ],
            vec![
                "per trial, ms".into(),
                if times.is_empty() {
                    "n/a".into()
                } else {
                    times.join(", ")
                },
                "In trial order.".into(),
            ],
            vec![
                "idle soak: seconds, false failovers".into(),
                format!(
                    "{} s, {}",
                    fmt(g("soak_secs"), 0),
                    fmt(g("soak_false_failovers"), 0)
                ),
                "A pair with nothing to do must not fail over.".into(),
            ],
            vec![
                "soak: pair ended identical".into(),
                f.get("soak_pair_ended_identical")
                    .and_then(Value::as_bool)
                    .map_or("n/a".into(), |b| if b { "yes".into() } else { "**no**".into() }),
                "Both sides exit 0 with the same final state.".into(),
            ],
            vec![
                "soak: lag p99, ms; log, Mbit/s".into(),
                format!(
                    "{}; {}",
                    fmt(g("soak_lag_p99_ms"), 2),
                    fmt(g("soak_log_mbit_s"), 4)
                ),
                "An idle pair's lag and heartbeat/log traffic.".into(),
            ],
        ];
        s += &table(&["figure", "value", "what it is"], &rows);
        s += "\n";
        s += &chart_link(charts, "failover", "Failover times");
    }
    s + &rejoin_section(runs)
}

/// The scenarios of the `rejoin` bench, as (JSON key, label), in the
/// order it runs them.
pub const REJOIN_SCENARIOS: [(&str, &str); 6] = [
    ("kv_idle_64m", "kv idle, 64 MiB"),
    ("kv_writes_64m", "kv under writes, 64 MiB"),
    ("compute_churn_64m", "compute (memory churn), 64 MiB"),
    ("kv_idle_512m", "kv idle, 512 MiB"),
    ("kv_writes_512m", "kv under writes, 512 MiB"),
    ("compute_churn_512m", "compute (memory churn), 512 MiB"),
];

/// The largest figure at `path` (below each scenario) over the scenarios
/// that have it.
fn rejoin_worst(r: &Value, path: &str) -> Option<f64> {
    REJOIN_SCENARIOS
        .iter()
        .filter_map(|(key, _)| get(r, &format!("{key}.{path}")))
        .reduce(f64::max)
}

/// A figure as "p50 / max" (`scale` applied), from `{"p50":..,"max":..}`.
fn p50_max(v: &Value, path: &str, scale: f64, dp: usize) -> String {
    let g = |q: &str| get(v, &format!("{path}.{q}")).map(|x| x * scale);
    format!("{} / {}", fmt(g("p50"), dp), fmt(g("max"), dp))
}

fn yes_no(v: Option<&Value>) -> String {
    match v.and_then(Value::as_bool) {
        Some(true) => "yes".into(),
        Some(false) => "**no**".into(),
        None => "n/a".into(),
    }
}

fn rejoin_section(runs: &[BenchRun]) -> String {
    let mut s = String::from("### Re-protection\n\n");
    s += "A new backup joins the survivor while its guest runs (`duet backup --join`): trials of \
          a pair on loopback whose backup is SIGKILLed, so that the primary goes on alone, and \
          then a joiner, which copies memory with KVM's dirty log while the guest runs and \
          pauses it once for the last pages and the machine state. \"Protected\" runs from \
          starting the joiner process to the survivor's `protected` event; the survivor's own \
          figure starts when the joiner arrives. The survivor counts itself protected once it has \
          sent the handover; \"joiner ready\" runs to the joiner's own `joined`, after it has \
          applied the stream and checked the state digest. The pause includes a digest of all \
          guest memory, which grows with the memory size. Under writes, a client sends SETs over the \
          serial line throughout; `compute` rewrites its 4 MiB buffer at random.\n\n";
    if let Some(m) = missing(runs, "rejoin") {
        return s + &m;
    }
    let r = json(runs, "rejoin").expect("checked");
    let mut rows = Vec::new();
    for (key, label) in REJOIN_SCENARIOS {
        let Some(v) = r.get(key) else {
            continue;
        };
        let gap = if v.get("client_worst_gap_ms").is_some() {
            p50_max(v, "client_worst_gap_ms", 1.0, 0)
        } else {
            "–".into()
        };
        rows.push(vec![
            label.to_string(),
            format!(
                "{} ({})",
                fmt(get(v, "ok_trials"), 0),
                fmt(get(v, "failed_trials"), 0)
            ),
            p50_max(v, "protected_ms", 1.0, 0),
            p50_max(v, "survivor_total_ms", 1.0, 0),
            p50_max(v, "joined_ms", 1.0, 0),
            p50_max(v, "blackout_us", 1e-3, 2),
            p50_max(v, "blackout_parts_us.digest", 1e-3, 2),
            p50_max(v, "bytes", 1.0 / 1_048_576.0, 1),
            p50_max(v, "rounds", 1.0, 0),
            gap,
        ]);
    }
    s += &format!("Trials per scenario: {}.\n\n", fmt(get(r, "trials"), 0));
    s += &table(
        &[
            "scenario",
            "trials (failed)",
            "protected p50 / max, ms",
            "survivor's p50 / max, ms",
            "joiner ready p50 / max, ms",
            "pause p50 / max, ms",
            "of it the digest, ms",
            "sent p50 / max, MiB",
            "pre-copy rounds p50 / max",
            "client's worst gap p50 / max, ms",
        ],
        &rows,
    );
    let met = r.get("targets_met");
    s += &format!(
        "\nTargets (issue 10), by the worst trial: protected within {} ms at 64 MiB: {}; a pause \
         under {} ms: {}. For scale: pre-copy migration downtimes of {:.0}–{:.0} ms (Clark et \
         al., NSDI 2005), QEMU's default downtime limit of {:.0} ms.\n\n",
        fmt(get(r, "targets.protected_64m_ms"), 0),
        yes_no(met.and_then(|m| m.get("protected_64m"))),
        fmt(get(r, "targets.blackout_us").map(|us| us / 1e3), 0),
        yes_no(met.and_then(|m| m.get("blackout"))),
        paper::MIGRATION_DOWNTIME_MS.0,
        paper::MIGRATION_DOWNTIME_MS.1,
        paper::QEMU_DOWNTIME_MS
    );
    let failures: Vec<String> = REJOIN_SCENARIOS
        .iter()
        .flat_map(|(key, label)| {
            r.get(*key)
                .and_then(|v| v.get("failures"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(move |f| format!("- {label}: `{}`\n", f.replace('`', "'")))
        })
        .collect();
    if !failures.is_empty() {
        s += "Failed trials:\n\n";
        s += &failures.concat();
        s += "\n";
    }
    s
}

fn net_section(runs: &[BenchRun], charts: &[ChartFile]) -> String {
    let mut s = String::from("## Network\n\n");
    s += "The `netkv` guest on its virtio-net NIC in two-host network namespaces, solo and under \
          FT (primary on host A, backup on B, the arbiter on its own host), interleaved trial by \
          trial; `redis-benchmark -c 50 -n 20000 -t set,get`; medians over the trials. After each \
          FT trial the primary is SIGKILLed under a client sending PINGs back to back.\n\n";
    if let Some(m) = missing(runs, "net") {
        return s + &m;
    }
    let n = json(runs, "net").expect("checked");
    let g = |k: &str| get(n, k);
    let mut rows = Vec::new();
    for t in ["set", "get"] {
        let up = t.to_uppercase();
        rows.push(vec![
            format!("{up}, requests/s"),
            fmt(g(&format!("solo_{t}_rps")), 0),
            fmt(g(&format!("ft_{t}_rps")), 0),
            fmt(g(&format!("{t}_rps_ratio")), 3),
            "Higher is better (VMware FT's netperf receive: 0.64).".into(),
        ]);
        for q in ["p50", "p99"] {
            rows.push(vec![
                format!("{up} latency {q}, ms"),
                fmt(g(&format!("solo_{t}_{q}_ms")), 2),
                fmt(g(&format!("ft_{t}_{q}_ms")), 2),
                fmt(g(&format!("{t}_{q}_ratio")), 3),
                "Above 1 is slower: the Output Rule holds each reply until the backup acknowledges the log up to it.".into(),
            ]);
        }
    }
    s += &format!("Trials: {}.\n\n", fmt(g("trials"), 0));
    s += &table(&["figure", "solo", "FT", "FT/solo", "what it is"], &rows);
    let gaps: Vec<String> = n
        .get("failover_gaps_ms")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|t| fmt(t.as_f64(), 0)).collect())
        .unwrap_or_default();
    s += &format!(
        "\nLogging traffic under FT: {} Mbit/s. A client's longest gap between two replies \
         across a failover: p50 {} ms, max {} ms (per trial: {}); the connection survived \
         every one (the benchmark fails otherwise).\n\n",
        fmt(g("log_mbit_s"), 3),
        fmt(g("failover_gap_p50_ms"), 0),
        fmt(g("failover_gap_max_ms"), 0),
        if gaps.is_empty() {
            "n/a".into()
        } else {
            gaps.join(", ")
        }
    );
    s += &chart_link(
        charts,
        "net",
        "Network throughput, latency and failover gaps",
    );
    s
}

// ---------------------------------------------------------------------------
// Charts.

const SOLO_COLOUR: RGBColor = RGBColor(70, 130, 180);
const FT_COLOUR: RGBColor = RGBColor(230, 120, 30);
const PAPER_COLOUR: RGBColor = RGBColor(40, 160, 70);
const MARK_COLOUR: RGBColor = RGBColor(200, 30, 30);
/// Reference lines, in order.
const LINE_COLOURS: [RGBColor; 3] = [
    RGBColor(200, 30, 30),
    RGBColor(120, 60, 180),
    RGBColor(60, 60, 60),
];

/// One series of bars: a value (or none) per category.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub colour: RGBColor,
    pub values: Vec<Option<f64>>,
}

/// A bar chart panel: grouped bars, one group per category, with optional
/// horizontal reference lines and a shaded reference band.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    /// (y, label): e.g. a percentile.
    pub lines: Vec<(f64, String)>,
    /// (low, high, label): e.g. the paper's range.
    pub band: Option<(f64, f64, String)>,
}

/// Writes the charts for the benches that produced figures.
pub fn write_charts(dir: &Path, runs: &[BenchRun]) -> Vec<ChartFile> {
    let mut out = Vec::new();
    let mut put = |stem: &'static str, title: &str, panels: Vec<Panel>| {
        let result = write_panels(
            &dir.join(format!("{stem}.svg")),
            &dir.join(format!("{stem}.png")),
            title,
            &panels,
        );
        out.push(ChartFile { stem, result });
    };
    if let Some(ft) = json(runs, "ft") {
        put("ft-vs-solo", "FT against solo", ft_panels(ft, runs));
    }
    if let Some(f) = json(runs, "failover") {
        put(
            "failover",
            "Failover: SIGKILL of the primary to the new primary's first reply",
            vec![failover_panel(f)],
        );
    }
    if let Some(n) = json(runs, "net") {
        put(
            "net",
            "netkv over virtio-net: solo against FT",
            net_panels(n),
        );
    }
    out
}

fn ft_panels(ft: &Value, runs: &[BenchRun]) -> Vec<Panel> {
    let tests = ["set", "get", "incr"];
    let rps = Panel {
        title: "kv over the serial port (redis-benchmark -c 1)".into(),
        y_desc: "requests/s".into(),
        categories: tests.iter().map(|t| t.to_uppercase()).collect(),
        series: vec![
            Series {
                name: "solo".into(),
                colour: SOLO_COLOUR,
                values: tests
                    .iter()
                    .map(|t| get(ft, &format!("solo_kv_{t}_rps")))
                    .collect(),
            },
            Series {
                name: "FT".into(),
                colour: FT_COLOUR,
                values: tests
                    .iter()
                    .map(|t| get(ft, &format!("ft_kv_{t}_rps")))
                    .collect(),
            },
        ],
        ..Panel::default()
    };
    let ratios = throughput_ratios(runs);
    let ratio = Panel {
        title: "FT/solo throughput (1.0 = free)".into(),
        y_desc: "FT / solo".into(),
        categories: ratios.iter().map(|r| r.0.clone()).collect(),
        series: vec![Series {
            name: "ours".into(),
            colour: FT_COLOUR,
            values: ratios.iter().map(|r| r.1).collect(),
        }],
        lines: vec![(
            paper::NET_RECEIVE_MBIT.0 / paper::NET_RECEIVE_MBIT.1,
            "VMware FT netperf receive 0.64".into(),
        )],
        band: Some((
            paper::PERF_RATIO.0,
            paper::PERF_RATIO.1,
            "VMware FT Table 1: 0.94–0.99".into(),
        )),
    };
    vec![rps, ratio]
}

fn failover_panel(f: &Value) -> Panel {
    let times: Vec<Option<f64>> = f
        .get("failover_times_ms")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or_default();
    let pct = |k: &str, label: &str| get(f, k).map(|v| (v, format!("{label} {v:.0} ms")));
    if times.is_empty() {
        // Older JSON without the per-trial list: the percentiles as bars.
        let keys = ["failover_ms_p50", "failover_ms_p99", "failover_ms_max"];
        return Panel {
            title: "failover time".into(),
            y_desc: "ms".into(),
            categories: vec!["p50".into(), "p99".into(), "max".into()],
            series: vec![Series {
                name: "failover".into(),
                colour: FT_COLOUR,
                values: keys.iter().map(|k| get(f, k)).collect(),
            }],
            ..Panel::default()
        };
    }
    Panel {
        title: format!("{} successful trials", times.len()),
        y_desc: "failover time, ms".into(),
        categories: (1..=times.len()).map(|i| format!("trial {i}")).collect(),
        series: vec![Series {
            name: "failover".into(),
            colour: FT_COLOUR,
            values: times,
        }],
        lines: [pct("failover_ms_p50", "p50"), pct("failover_ms_p99", "p99")]
            .into_iter()
            .flatten()
            .collect(),
        band: None,
    }
}

fn net_panels(n: &Value) -> Vec<Panel> {
    let two = |name: &str, colour, keys: &[String]| Series {
        name: name.into(),
        colour,
        values: keys.iter().map(|k| get(n, k)).collect(),
    };
    let rps_keys = |mode: &str| -> Vec<String> {
        ["set", "get"]
            .iter()
            .map(|t| format!("{mode}_{t}_rps"))
            .collect()
    };
    let lat_cats = ["set_p50", "set_p99", "get_p50", "get_p99"];
    let lat_keys =
        |mode: &str| -> Vec<String> { lat_cats.iter().map(|c| format!("{mode}_{c}_ms")).collect() };
    let gaps: Vec<Option<f64>> = n
        .get("failover_gaps_ms")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or_default();
    vec![
        Panel {
            title: "throughput (redis-benchmark -c 50)".into(),
            y_desc: "requests/s".into(),
            categories: vec!["SET".into(), "GET".into()],
            series: vec![
                two("solo", SOLO_COLOUR, &rps_keys("solo")),
                two("FT", FT_COLOUR, &rps_keys("ft")),
            ],
            ..Panel::default()
        },
        Panel {
            title: "latency".into(),
            y_desc: "ms".into(),
            categories: lat_cats
                .iter()
                .map(|c| c.replace('_', " ").to_uppercase())
                .collect(),
            series: vec![
                two("solo", SOLO_COLOUR, &lat_keys("solo")),
                two("FT", FT_COLOUR, &lat_keys("ft")),
            ],
            ..Panel::default()
        },
        Panel {
            title: "a client's longest reply gap across a failover".into(),
            y_desc: "ms".into(),
            categories: (1..=gaps.len()).map(|i| format!("trial {i}")).collect(),
            series: vec![Series {
                name: "gap".into(),
                colour: MARK_COLOUR,
                values: gaps,
            }],
            ..Panel::default()
        },
    ]
}

/// Draws `panels` side by side under `title` into `svg` and `png`.
pub fn write_panels(svg: &Path, png: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    if panels.is_empty() {
        return Err("no panels".into());
    }
    let size = ((560 * panels.len() as u32 + 40).max(800), 560);
    draw_all(
        SVGBackend::new(svg, size).into_drawing_area(),
        title,
        panels,
    )
    .map_err(|e| format!("{}: {e}", svg.display()))?;
    draw_all(
        BitMapBackend::new(png, size).into_drawing_area(),
        title,
        panels,
    )
    .map_err(|e| format!("{}: {e}", png.display()))?;
    Ok(())
}

fn draw_all<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Panel],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let titled = root.titled(title, ("sans-serif", 22)).map_err(e)?;
    let areas = titled.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// An x axis of `n` categories, each a unit wide, ticked at its middle
/// (plotters' own key points on an f64 axis fall on round numbers, i.e.
/// between the groups of bars).
struct Categories(usize);

impl Ranged for Categories {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let n = self.0.max(1) as f64;
        limit.0 + ((limit.1 - limit.0) as f64 * value / n).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0.max(1) as f64
    }
}

/// A y tick: 5000 rather than plotters' "5000.0", and no float noise.
fn tick(y: &f64) -> String {
    let s = format!("{y:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A bar's label: few digits, as a person reads a chart.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let n = p.categories.len().max(1);
    let top = p
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .chain(p.lines.iter().map(|l| l.0))
        .chain(p.band.iter().map(|b| b.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.22 } else { 1.0 };
    let cats = p.categories.clone();
    let label = move |x: &f64| {
        cats.get(x.floor().max(0.0) as usize)
            .cloned()
            .unwrap_or_default()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(Categories(n), 0.0..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(p.y_desc.as_str())
        .y_label_formatter(&tick)
        .x_label_formatter(&label)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    if let Some((lo, hi, text)) = &p.band {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, *lo), (n as f64, *hi)],
                PAPER_COLOUR.mix(0.25).filled(),
            )))
            .map_err(e)?
            .label(text.as_str())
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 14, y + 5)],
                    PAPER_COLOUR.mix(0.4).filled(),
                )
            });
    }
    let groups = p.series.len().max(1) as f64;
    // A lone group would be one bar the whole width: keep it narrower.
    let group = if n == 1 { 0.4 } else { 0.8 };
    let width = group / groups;
    let above =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (j, s) in p.series.iter().enumerate() {
        let colour = s.colour;
        let bar = |i: usize| {
            let x0 = i as f64 + (1.0 - group) / 2.0 + j as f64 * width;
            (x0, x0 + width)
        };
        let bars: Vec<(usize, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.filter(|v| v.is_finite()).map(|v| (i, v)))
            .collect();
        chart
            .draw_series(bars.iter().map(|&(i, v)| {
                let (x0, x1) = bar(i);
                Rectangle::new([(x0, 0.0), (x1, v)], colour.filled())
            }))
            .map_err(e)?
            .label(s.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
        chart
            .draw_series(bars.iter().map(|&(i, v)| {
                let (x0, x1) = bar(i);
                Text::new(short(v), ((x0 + x1) / 2.0, v), above.clone())
            }))
            .map_err(e)?;
    }
    for (k, (y, text)) in p.lines.iter().enumerate() {
        let colour = LINE_COLOURS[k % LINE_COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                [(0.0, *y), (n as f64, *y)],
                colour.stroke_width(2),
            ))
            .map_err(e)?
            .label(text.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Value {
        let text = match name {
            "solo" => {
                r#"{"pio_exit_us":2.511,"mmio_exit_us":3.104,"irq_injection_iter_us":6.2,"kv_set_rps":4100.5,"kv_get_rps":4300.0,"kv_incr_rps":4200.0,"compute_guest_s":1.234,"compute_wall_s":1.5}"#
            }
            "record" => {
                r#"{"rounds":3,"compute":{"solo_wall_s":1.5,"record_wall_s":1.6,"record_over_solo_wall":1.0667,"replay_wall_s":1.4,"replay_over_record_wall":0.875,"log_bytes":1000,"log_bytes_per_s":625.0,"log_mbit_per_s":0.005,"solo_guest_elapsed_s":1.2,"record_guest_elapsed_s":1.21,"record_over_solo_guest_elapsed":1.0083},"ticker":{"record_over_solo_exits":0.97},"hello":{"record_wall_s":0.1,"replay_wall_s":0.05,"replay_over_record_wall":0.5,"log_bytes":300,"log_bytes_per_s":3000.0,"log_mbit_per_s":0.024},"kv_idle":{"log_mbit_per_s":0.01},"kv_busy":null}"#
            }
            "ft" => {
                r#"{"rounds":2,"solo_kv_set_rps":4000.0,"ft_kv_set_rps":2000.0,"kv_set_ratio":0.5,"solo_kv_get_rps":4400.0,"ft_kv_get_rps":3300.0,"kv_get_ratio":0.75,"solo_kv_incr_rps":4000.0,"ft_kv_incr_rps":2400.0,"kv_incr_ratio":0.6,"solo_ping_p50_us":100.0,"ft_ping_p50_us":350.0,"output_rule_added_p50_us":250.0,"solo_ping_p99_us":200.0,"ft_ping_p99_us":900.0,"output_rule_added_p99_us":700.0,"solo_compute_wall_s":1.5,"ft_compute_wall_s":1.8,"compute_wall_ratio":1.2,"solo_compute_guest_s":1.2,"ft_compute_guest_s":1.25,"compute_guest_ratio":1.25,"kv_lag_p50_ms":0.4,"kv_lag_p99_ms":2.5,"compute_lag_p50_ms":1.0,"compute_lag_p99_ms":7.25,"idle_lag_p50_ms":0.1,"idle_lag_p99_ms":0.3,"kv_log_mbit_s":3.21,"compute_log_mbit_s":0.456,"idle_log_mbit_s":0.012}"#
            }
            "failover" => {
                r#"{"trials":3,"failed_trials":0,"failover_ms_p50":612.0,"failover_ms_p99":700.5,"failover_ms_max":700.5,"failover_times_ms":[612.0,700.5,580.2],"soak_secs":5,"soak_false_failovers":0,"soak_pair_ended_identical":true,"soak_lag_p99_ms":0.2,"soak_log_mbit_s":0.0123}"#
            }
            "net" => {
                r#"{"trials":1,"solo_set_rps":20000.0,"ft_set_rps":12000.0,"set_rps_ratio":0.6,"solo_set_p50_ms":1.2,"ft_set_p50_ms":2.4,"set_p50_ratio":2.0,"solo_set_p99_ms":3.0,"ft_set_p99_ms":9.0,"set_p99_ratio":3.0,"solo_get_rps":22000.0,"ft_get_rps":15400.0,"get_rps_ratio":0.7,"solo_get_p50_ms":1.1,"ft_get_p50_ms":2.2,"get_p50_ratio":2.0,"solo_get_p99_ms":2.0,"ft_get_p99_ms":4.0,"get_p99_ratio":2.0,"log_mbit_s":45.678,"failover_gap_p50_ms":812.0,"failover_gap_max_ms":812.0,"failover_gaps_ms":[812.0]}"#
            }
            "rejoin" => {
                r#"{"trials":2,"targets":{"protected_64m_ms":2000.0,"blackout_us":50000.0},"kv_idle_64m":{"image":"kv","mem_mib":64,"load":"idle","ok_trials":2,"failed_trials":0,"protected_ms":{"p50":420.5,"max":480.0,"trials":[420.5,480.0]},"survivor_total_ms":{"p50":150.0,"max":170.0,"trials":[150.0,170.0]},"blackout_us":{"p50":2500.0,"max":3100.0,"trials":[2500.0,3100.0]},"bytes":{"p50":2097152.0,"max":2097152.0,"trials":[2097152.0,2097152.0]},"rounds":{"p50":2.0,"max":2.0,"trials":[2.0,2.0]},"joined_ms":{"p50":600.0,"max":650.0},"blackout_parts_us":{"digest":{"p50":2100.0,"max":2200.0}},"failures":[]},"kv_writes_64m":{"ok_trials":2,"failed_trials":0,"protected_ms":{"p50":500.0,"max":520.0},"blackout_us":{"p50":4000.0,"max":61000.0},"client_worst_gap_ms":{"p50":35.0,"max":70.0},"failures":[]},"compute_churn_64m":{"ok_trials":1,"failed_trials":1,"protected_ms":{"p50":900.0,"max":900.0},"blackout_us":{"p50":9000.0,"max":9000.0},"failures":["the a never logged `protected again`, exited (exit status: 0)"]},"kv_idle_512m":{"ok_trials":2,"failed_trials":0,"protected_ms":{"p50":2400.0,"max":2600.0},"blackout_us":{"p50":3000.0,"max":3500.0},"failures":[]},"targets_met":{"protected_64m":true,"blackout":false}}"#
            }
            _ => unreachable!(),
        };
        serde_json::from_str(text).unwrap()
    }

    fn ok(name: &str) -> BenchRun {
        BenchRun {
            name: name.into(),
            outcome: Outcome::Ok(sample(name)),
            secs: 42.0,
        }
    }

    fn all_ok() -> Vec<BenchRun> {
        BENCHES.iter().map(|b| ok(b)).collect()
    }

    fn charts_ok() -> Vec<ChartFile> {
        ["ft-vs-solo", "failover", "net"]
            .iter()
            .map(|stem| ChartFile {
                stem,
                result: Ok(()),
            })
            .collect()
    }

    /// The section under the heading `title`, up to the next one.
    fn section<'a>(md: &'a str, title: &str) -> &'a str {
        let at = md.find(&format!("## {title}\n")).expect(title);
        let rest = &md[at + 3..];
        &rest[..rest.find("\n## ").unwrap_or(rest.len())]
    }

    /// The table row whose first cell is `first`.
    fn row_of<'a>(md: &'a str, first: &str) -> &'a str {
        md.lines()
            .find(|l| l.starts_with(&format!("| {first} |")))
            .unwrap_or_else(|| panic!("no row {first:?} in\n{md}"))
    }

    #[test]
    fn the_tables_carry_the_figures_and_the_papers() {
        let md = render(&Meta::default(), &all_ok(), &charts_ok());
        let set = row_of(&md, "kv SET, requests/s");
        assert!(set.contains("| 4000 | 2000 | 0.500 |"), "{set}");
        let ping = row_of(&md, "PING round trip p99, µs");
        assert!(
            ping.contains("| 200 | 900 | 4.500 |") && ping.contains("adds 700 µs"),
            "{ping}"
        );
        let compute = row_of(&md, "compute, guest seconds");
        assert!(compute.contains("| 1.200 | 1.250 | 1.250 |"), "{compute}");

        // Beside VMware: ours (compute as 1/time = 0.80) and the paper's.
        let thr = row_of(&md, "FT/solo throughput (1.0 = free)");
        assert!(thr.contains("0.50–0.80"), "{thr}");
        assert!(
            thr.contains("compute 0.80") && thr.contains("netkv GET 0.70"),
            "{thr}"
        );
        assert!(thr.contains("0.94–0.99"), "{thr}");
        let log = row_of(&md, "Logging traffic, Mbit/s");
        assert!(
            log.contains("0.012–45.678") && log.contains("1.5–18"),
            "{log}"
        );
        let net = row_of(&md, "Network service under FT, FT/solo");
        assert!(
            net.contains("0.60 (SET), 0.70 (GET)") && net.contains("0.64"),
            "{net}"
        );
        assert!(net.contains("604 of 940"), "{net}");
        let lag = row_of(&md, "Execution lag, p99, ms");
        assert!(lag.contains("0.3–7.2") || lag.contains("0.3–7.3"), "{lag}");
        assert!(lag.contains("under 100"), "{lag}");
        let fo = row_of(&md, "Failover, ms");
        assert!(
            fo.contains("p50 612, max 700") || fo.contains("max 701"),
            "{fo}"
        );
        assert!(fo.contains("order of seconds"), "{fo}");
        let re = row_of(&md, "Re-protection (a new backup after a failover)");
        assert!(
            re.contains("p50 420 ms at 64 MiB, 2400 ms at 512 MiB"),
            "{re}"
        );
        assert!(!md.contains("does not exist yet"));
        let pause = row_of(&md, "Re-protection pause, ms");
        assert!(
            pause.contains("max 61.0") && pause.contains("60–210"),
            "{pause}"
        );
        let idle = row_of(&md, "kv idle, 64 MiB");
        assert!(
            idle.contains(
                "| 2 (0) | 420 / 480 | 150 / 170 | 600 / 650 | 2.50 / 3.10 | 2.10 / 2.20 | 2.0 / 2.0 | 2 / 2 | – |"
            ),
            "{idle}"
        );
        let writes = row_of(&md, "kv under writes, 64 MiB");
        assert!(writes.contains("| 35 / 70 |"), "{writes}");
        // A scenario the JSON lacks is left out; a failure is quoted.
        assert!(!md.contains("| kv under writes, 512 MiB |"));
        assert!(
            md.contains("- compute (memory churn), 64 MiB: `the a never logged 'protected again'")
        );
        assert!(md.contains("within 2000 ms at 64 MiB: yes; a pause under 50 ms: **no**"));

        let per = row_of(&md, "per trial, ms");
        assert!(
            per.contains("612, 700, 580") || per.contains("612, 701, 580"),
            "{per}"
        );
        let rec = row_of(section(&md, "Recording and replay"), "compute");
        assert!(rec.contains("| 1.067 | 0.875 | 0.005 | 1000 |"), "{rec}");
        let lag = row_of(section(&md, "Execution lag and logging traffic"), "compute");
        assert!(lag.contains("| 1.00 | 7.25 | 0.456 |"), "{lag}");
        let busy = row_of(&md, "kv_busy");
        assert!(busy.contains("| n/a | n/a | n/a | n/a |"), "{busy}");
        assert!(row_of(&md, "PIO exit, µs").contains("2.51"));
        assert!(row_of(&md, "GET latency p99, ms").contains("| 2.00 | 4.00 | 2.000 |"));
        assert!(md.contains("45.678 Mbit/s"));

        assert!(md.contains("![FT against solo](ft-vs-solo.png)"));
        assert!(md.contains("(failover.png)") && md.contains("(net.png)"));
        assert!(md.contains("(ft-vs-solo.svg)"));
        assert!(row_of(&md, "solo").contains("| ok | 42 s | [solo.json](solo.json)"));
        assert!(md.contains("## How to reproduce"));
    }

    #[test]
    fn a_failed_bench_shows_as_failed_and_a_left_out_one_as_not_run() {
        let runs = vec![
            ok("solo"),
            BenchRun {
                name: "net".into(),
                outcome: Outcome::Failed {
                    status: "exit status: 101".into(),
                    reason: failure_reason(
                        "   Compiling vmm\nnet bench: trial 1/1: solo\nError: the net benchmark needs root\n",
                    ),
                },
                secs: 3.0,
            },
        ];
        let md = render(&Meta::default(), &runs, &[]);
        let net = row_of(&md, "net");
        assert!(
            net.contains("**FAILED** (exit status: 101)") && net.contains("[net.log](net.log)"),
            "{net}"
        );
        assert!(md.contains("ended with exit status: 101 after 3 s"), "{md}");
        assert!(
            md.contains("Last error: `Error: the net benchmark needs root`"),
            "{md}"
        );
        assert!(row_of(&md, "ft").contains("not run"));
        assert!(md.contains("*Not run* (`--only` left `ft` out)"));
        assert!(!md.contains("(net.png)"));
        // The comparison still renders, with what is missing as n/a.
        assert!(row_of(&md, "Execution lag, p99, ms").contains("| n/a |"));
    }

    #[test]
    fn the_last_json_object_line_counts() {
        let out = "progress\n{\"a\":1}\nnot json\n{\"a\":2}\n[1,2]\n";
        assert_eq!(parse_last_json(out), Some(serde_json::json!({"a": 2})));
        assert_eq!(parse_last_json("nothing\n"), None);
        // The failover bench's old NaN is not JSON.
        assert_eq!(parse_last_json("{\"p50\":NaN}"), None);
        assert_eq!(failure_reason(""), "(empty log)");
        assert_eq!(failure_reason("a\nb\n"), "b");
    }

    #[test]
    fn ticks_and_labels() {
        assert_eq!(tick(&5000.0), "5000");
        assert_eq!(tick(&0.30000000000000004), "0.3");
        assert_eq!(tick(&0.0), "0");
        assert_eq!(short(4321.4), "4321");
        assert_eq!(short(12.34), "12.3");
        assert_eq!(short(0.5), "0.50");
    }

    #[test]
    fn dates_and_selection() {
        assert_eq!(utc_date_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date_time(951_782_400 + 3_660), "2000-02-29 01:01 UTC");
        assert_eq!(utc_date_time(1_735_689_599), "2024-12-31 23:59 UTC");
        assert_eq!(select(&[]).unwrap(), BENCHES.to_vec());
        assert_eq!(
            select(&["net".into(), "solo".into()]).unwrap(),
            vec!["solo", "net"]
        );
        assert!(select(&["nope".into()]).is_err());
    }

    #[test]
    fn outside_a_checkout_it_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = dir.path().join("vmm");
        std::fs::create_dir_all(&vmm).unwrap();
        let e = workspace_at(&vmm).unwrap_err().to_string();
        assert!(
            e.starts_with("duet bench must run from a source checkout"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        assert_eq!(
            workspace_at(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap(),
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
        );
    }

    #[test]
    fn charts_are_valid_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let charts = write_charts(dir.path(), &all_ok());
        assert_eq!(charts, charts_ok());
        for stem in ["ft-vs-solo", "failover", "net"] {
            let png = std::fs::read(dir.path().join(format!("{stem}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
            let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{stem}.svg"
            );
        }
        let svg = std::fs::read_to_string(dir.path().join("ft-vs-solo.svg")).unwrap();
        assert!(
            svg.contains("VMware FT Table 1: 0.94–0.99"),
            "no band label"
        );
        assert!(
            svg.contains(">\n2000\n</text>") || svg.contains(">2000<"),
            "no bar label"
        );
        let svg = std::fs::read_to_string(dir.path().join("failover.svg")).unwrap();
        assert!(svg.contains("trial 3") && svg.contains("p50 612 ms"));
        // Only what ran is drawn.
        assert!(write_charts(dir.path(), &[ok("solo")]).is_empty());
    }
}
