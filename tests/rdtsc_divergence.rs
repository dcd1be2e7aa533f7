//! A guest that reads RDTSC (which Duet cannot log) is always reported as
//! diverged, exit 4 with the record and both positions: under replay of a
//! recording and under FT, over repeated runs. Never as a cut-short log
//! (exit 1) and never as a hang, whichever exit the two executions part at.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
const RUNS: usize = 3;

#[test]
fn replay_of_an_rdtsc_guest_always_diverges() {
    if !kvm_available("replay_of_an_rdtsc_guest_always_diverges") {
        return;
    }
    let dir = tempdir("rdtsc-replay");
    for run in 0..RUNS {
        let log = dir.path().join(format!("r{run}.log"));
        let rec = run_bounded(
            duet()
                .args(["record", "--image", "rdtsc", "--serial", "none", "--log"])
                .arg(&log),
            None,
            LIMIT,
        );
        assert_eq!(rec.status.code(), Some(0), "record: {}", stderr(&rec));
        let rep = run_bounded(
            duet()
                .args([
                    "replay",
                    "--image",
                    "rdtsc",
                    "--output",
                    "/dev/null",
                    "--log",
                ])
                .arg(&log),
            None,
            LIMIT,
        );
        let err = stderr(&rep);
        assert_eq!(rep.status.code(), Some(4), "run {run}: {err}");
        assert!(err.contains("divergence at record"), "run {run}: {err}");
    }
}

#[test]
fn a_backup_of_an_rdtsc_guest_always_diverges() {
    if !kvm_available("a_backup_of_an_rdtsc_guest_always_diverges") {
        return;
    }
    for run in 0..RUNS {
        let chan = free_addr();
        let backup = launch(
            &mut backup_cmd("rdtsc", &format!("rdtsc-{run}"), chan),
            false,
        );
        let primary = launch(
            primary_cmd("rdtsc", &format!("rdtsc-{run}"), chan).args(["--serial", "none"]),
            false,
        );
        let b = finish(backup, LIMIT);
        let err = stderr(&b);
        assert_eq!(b.status.code(), Some(4), "run {run}: backup: {err}");
        assert!(
            err.contains("diverged from the primary"),
            "run {run}: {err}"
        );
        assert!(!err.contains("cut short"), "run {run}: {err}");
        // The primary loses its backup; without an arbiter it halts, with
        // an error and not a panic.
        let p = finish(primary, LIMIT);
        assert!(!stderr(&p).contains("panicked"), "{}", stderr(&p));
    }
}
