//! The `ticker` image over stdio runs to completion, echoes its input, and
//! its digests depend on exactly the inputs they should: `input=` only on
//! the serial bytes, `all=` also on clock and entropy.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
/// Run length typed into the guest (it parses a `ticks=<n>` line), to keep
/// each run short; progress lines come every 100 ticks.
const TICKS: u64 = 300;

/// What one run printed.
struct Run {
    stdout: String,
    /// The `ticker done` line's `input=` and `all=` digests.
    input: String,
    all: String,
    ticks: u64,
}

/// The value of `key=` in a whitespace-separated line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn run_ticker(stdin: &[u8]) -> Run {
    let o = run_bounded(
        duet().args(["run", "--image", "ticker", "--serial", "stdio"]),
        Some(stdin),
        LIMIT,
    );
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "status {:?}, stdout {out}, stderr {}",
        o.status,
        stderr(&o)
    );
    let done = out
        .lines()
        .find_map(|l| l.split_once("ticker done ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no `ticker done` line: {out}"))
        .to_string();
    let get = |key| {
        field(&done, key)
            .unwrap_or_else(|| panic!("no {key}= in done line {done:?}"))
            .to_string()
    };
    let (input, all) = (get("input"), get("all"));
    for d in [&input, &all] {
        assert!(
            d.len() == 16 && d.bytes().all(|b| b.is_ascii_hexdigit()),
            "digest {d:?} is not 16 hex digits"
        );
    }
    let ticks = get("ticks").parse().expect("ticks= is a number");
    Run {
        stdout: out,
        input,
        all,
        ticks,
    }
}

fn input_with(extra: &str) -> Vec<u8> {
    format!("ticks={TICKS}\n{extra}\n").into_bytes()
}

#[test]
fn runs_to_completion_with_progress_lines() {
    if !kvm_available("runs_to_completion_with_progress_lines") {
        return;
    }
    let run = run_ticker(&input_with("hello"));
    assert!(
        run.ticks >= TICKS,
        "done at tick {} < {TICKS}: {}",
        run.ticks,
        run.stdout
    );
    let progress: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.find("tick=").map(|i| &l[i..]))
        .collect();
    assert_eq!(
        progress.len() as u64,
        TICKS / 100,
        "one tick= line per 100 ticks: {}",
        run.stdout
    );
    for p in &progress {
        assert!(
            field(p, "input").is_some() && field(p, "all").is_some(),
            "{p}"
        );
    }
}

/// The default run length, with nothing typed: 2000 ticks, 20 progress
/// lines.
#[test]
fn default_run_has_twenty_progress_lines() {
    if !kvm_available("default_run_has_twenty_progress_lines") {
        return;
    }
    let run = run_ticker(b"");
    assert!(run.ticks >= 2000, "{}", run.stdout);
    let progress = run
        .stdout
        .lines()
        .filter(|l| l.contains("tick=") && !l.contains("ticker done"))
        .count();
    assert_eq!(progress, 20, "{}", run.stdout);
}

#[test]
fn typed_bytes_are_echoed() {
    if !kvm_available("typed_bytes_are_echoed") {
        return;
    }
    let run = run_ticker(&input_with("the quick brown fox 0123456789"));
    assert!(
        run.stdout.contains(&format!("ticks={TICKS}\n")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("the quick brown fox 0123456789"),
        "{}",
        run.stdout
    );
}

#[test]
fn digests_follow_their_inputs() {
    if !kvm_available("digests_follow_their_inputs") {
        return;
    }
    let a = run_ticker(&input_with("same bytes"));
    let b = run_ticker(&input_with("same bytes"));
    let c = run_ticker(&input_with("other bytes"));
    assert_eq!(
        a.input, b.input,
        "same serial input, different input= digests"
    );
    assert_ne!(
        a.input, c.input,
        "different serial input, same input= digest"
    );
    // Clock and entropy differ between live runs, and `all` mixes them in.
    assert_ne!(a.all, b.all, "all= ignores clock and entropy");
}
