//! Failover benchmark: N trials of `duet demo` (arbiter, primary and backup
//! as processes; SIGKILL of the primary in the middle of a checked write
//! workload), reporting the failover time from the SIGKILL to the first
//! reply from the new primary as p50, p99 and max; then an idle soak of a
//! pair with the default heartbeat timeout, counting false failovers.
//! Prints one JSON object; `failover_times_ms` lists the successful trials'
//! times in trial order (for `duet bench`'s chart), and a figure that
//! cannot be computed (no successful trial) is `null`.
//!
//! `DUET_FAILOVER_TRIALS` (default 10) and `DUET_SOAK_SECS` (default 30;
//! the target is stated for 600) set the sizes.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A JSON number with one decimal, or `null` (Rust prints NaN as `NaN`,
/// which is not JSON).
fn json_ms(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "null".to_string()
    }
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("failover bench: /dev/kvm is missing");
        std::process::exit(1);
    }
    let tas = tas_server_bin();
    let trials = env_u64("DUET_FAILOVER_TRIALS", 10);
    let mut times = Vec::new();
    let mut failed = 0;
    for t in 0..trials {
        let o = run_bounded(
            duet().args([
                "demo",
                "--serial",
                "--out",
                std::env::temp_dir().to_str().unwrap_or("/tmp"),
                "--ops",
                "120",
                "--kill-after",
                &(40 + (t * 7) % 60).to_string(),
                "--tas-server",
                tas.to_str().unwrap(),
            ]),
            None,
            Duration::from_secs(120),
        );
        let out = stdout(&o);
        let ms = out
            .lines()
            .find_map(|l| l.strip_prefix("failover time"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        match (o.status.success(), ms) {
            (true, Some(ms)) => times.push(ms),
            _ => {
                failed += 1;
                eprintln!("trial {t} failed: {:?}\n{out}", o.status);
            }
        }
    }
    let in_order: Vec<String> = times.iter().map(|t| json_ms(*t)).collect();
    times.sort_by(|a, b| a.total_cmp(b));

    // Idle soak: a paired kv with default timeouts and nothing to do.
    let soak = env_u64("DUET_SOAK_SECS", 30);
    let dir = tempdir("failover-bench");
    let (tas_addr, chan, service, metrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let _arbiter = Proc::spawn(
        "arbiter",
        Command::new(&tas)
            .args(["--listen", &tas_addr.to_string()])
            .arg("--state")
            .arg(dir.path().join("tas.state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    wait_for_port(tas_addr, Duration::from_secs(10));
    let backup = launch(
        backup_cmd("kv", "soak", chan).args(["--tas", &tas_addr.to_string()]),
        false,
    );
    let mut primary = launch(
        primary_cmd("kv", "soak", chan)
            .args(["--tas", &tas_addr.to_string()])
            .args(["--serial", &format!("tcp:{service}")])
            .args(["--metrics", &metrics.to_string()]),
        false,
    );
    wait_for_port(metrics, Duration::from_secs(20));
    let start = Instant::now();
    let mut false_failovers = 0;
    while start.elapsed() < Duration::from_secs(soak) {
        std::thread::sleep(Duration::from_secs(1));
        let m = metrics::scrape(metrics, Duration::from_secs(2)).unwrap_or_default();
        if m.get("duet_arbiter_state") != Some(0.0) {
            false_failovers += 1;
            break;
        }
    }
    let m = metrics::scrape(metrics, Duration::from_secs(2)).unwrap_or_default();
    primary.terminate().unwrap();
    let p = finish(primary, Duration::from_secs(20));
    let b = finish(backup, Duration::from_secs(20));
    let clean = p.status.success() && b.status.success() && final_state(&p) == final_state(&b);

    println!(
        "{{\"trials\":{trials},\"failed_trials\":{failed},\"failover_ms_p50\":{},\"failover_ms_p99\":{},\"failover_ms_max\":{},\"failover_times_ms\":[{}],\"soak_secs\":{soak},\"soak_false_failovers\":{false_failovers},\"soak_pair_ended_identical\":{clean},\"soak_lag_p99_ms\":{:.3},\"soak_log_mbit_s\":{:.4}}}",
        json_ms(times.first().map_or(f64::NAN, |_| percentile(&times, 0.5))),
        json_ms(times.first().map_or(f64::NAN, |_| percentile(&times, 0.99))),
        json_ms(times.last().copied().unwrap_or(f64::NAN)),
        in_order.join(","),
        m.quantile("duet_lag_seconds", 0.99).unwrap_or(0.0) * 1e3,
        m.get("duet_log_mbit_per_second").unwrap_or(0.0),
    );
}
