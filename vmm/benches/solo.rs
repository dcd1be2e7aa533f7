//! Solo (no fault tolerance) baseline: what one exit, one timer interrupt,
//! a Redis request and a CPU-bound run cost under `duet run`, measured on
//! real `duet` processes. `cargo bench -p vmm --bench solo` prints one JSON
//! object on stdout (progress goes to stderr):
//!
//! ```text
//! {"pio_exit_us":..,"mmio_exit_us":..,"irq_injection_iter_us":..,
//!  "kv_set_rps":..,"kv_get_rps":..,"kv_incr_rps":..,
//!  "compute_guest_s":..,"compute_wall_s":..}
//! ```
//!
//! - `*_exit_us`, `irq_injection_iter_us`: the `bench` image's own
//!   measurements (guest `clock_ns()`), per PIO exit, per MMIO exit, and
//!   per "timer interrupt injected and handled" with the PIT at 20 kHz;
//! - `kv_*_rps`: `redis-benchmark -c 1 -n 2000` against the `kv` image;
//! - `compute_guest_s`: the `compute` image's `elapsed_ns`;
//!   `compute_wall_s`: the whole `duet run` as the host saw it.
//!
//! Every child runs under a time limit and is killed if it overruns.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use common::{duet, free_addr, redis_benchmark, run_bounded, start_tcp_guest, stderr, stdout};

/// Limit for one guest run (`bench`, `compute`).
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Limit for the whole `redis-benchmark` run.
const REDIS_LIMIT: Duration = Duration::from_secs(300);
/// Requests per `redis-benchmark` test.
const REDIS_REQUESTS: &str = "2000";

/// The `key=value` fields of the first line that starts with `prefix`.
fn fields(out: &str, prefix: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no line starting with {prefix:?} in output:\n{out}"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Field `key` of `f` as a number.
fn number(f: &BTreeMap<String, String>, key: &str) -> anyhow::Result<f64> {
    f.get(key)
        .with_context(|| format!("no {key}= in {f:?}"))?
        .parse()
        .with_context(|| format!("{key}= is not a number"))
}

/// Runs `duet run --image NAME` to completion; returns stdout and the wall
/// time.
fn run_image(name: &str) -> anyhow::Result<(String, Duration)> {
    eprintln!("solo: running image {name}");
    let start = Instant::now();
    let o = run_bounded(duet().args(["run", "--image", name]), None, RUN_LIMIT);
    let wall = start.elapsed();
    if !o.status.success() {
        bail!(
            "duet run --image {name} failed ({}): stdout {} stderr {}",
            o.status,
            stdout(&o),
            stderr(&o)
        );
    }
    Ok((stdout(&o), wall))
}

/// Runs `redis-benchmark` against a fresh `kv` guest.
fn kv_rps() -> anyhow::Result<BTreeMap<String, f64>> {
    let probe = Command::new("redis-benchmark").arg("--version").output();
    if probe.is_err() {
        bail!(
            "redis-benchmark not found on PATH: install Debian's redis-tools \
             (apt-get install redis-tools)"
        );
    }
    let addr = free_addr();
    eprintln!("solo: running image kv on {addr} with redis-benchmark");
    let _vm = start_tcp_guest("kv", addr);
    let rps = redis_benchmark(addr, REDIS_REQUESTS, REDIS_LIMIT)?;
    Ok(rps)
}

/// A JSON number: finite, three decimals.
fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".to_string()
    }
}

fn main() -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("the solo benchmark needs /dev/kvm");
    }

    let (out, _) = run_image("bench")?;
    let b = fields(&out, "bench ")?;
    let pio_us = number(&b, "pio_ns")? / 1e3;
    let mmio_us = number(&b, "mmio_ns")? / 1e3;
    let irq_us = number(&b, "irq_iter_ns")? / 1e3;

    let rps = kv_rps()?;

    let (out, wall) = run_image("compute")?;
    let c = fields(&out, "compute ")?;
    let guest_s = number(&c, "elapsed_ns")? / 1e9;

    let pairs = [
        ("pio_exit_us", pio_us),
        ("mmio_exit_us", mmio_us),
        ("irq_injection_iter_us", irq_us),
        ("kv_set_rps", rps["SET"]),
        ("kv_get_rps", rps["GET"]),
        ("kv_incr_rps", rps["INCR"]),
        ("compute_guest_s", guest_s),
        ("compute_wall_s", wall.as_secs_f64()),
    ];
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("\"{k}\":{}", json_number(*v)))
        .collect();
    println!("{{{}}}", body.join(","));
    Ok(())
}
