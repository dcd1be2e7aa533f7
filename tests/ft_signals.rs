//! SIGTERM ends a pair promptly, whichever side gets it and whatever it is
//! waiting for: a backup waiting for the primary's log of an idle guest, a
//! primary with a running backup (which then replays to the recorded stop),
//! and a primary whose backup is frozen (SIGSTOP), so that it waits for
//! acknowledgements that never come.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The most a side may take to end after SIGTERM. A primary with a frozen
/// backup needs the channel's timeout (500 ms) to give up on it.
const PROMPT: Duration = Duration::from_secs(4);
const LIMIT: Duration = Duration::from_secs(30);

/// A pair of `kv` (an idle guest with a 100 Hz timer), serving on a TCP
/// serial port, answering one PING.
fn pair(test: &str, extra: &[&str]) -> (Proc, Proc) {
    let (chan, serial) = (free_addr(), free_addr());
    let backup = launch(backup_cmd("kv", test, chan).args(extra), false);
    let primary = launch(
        primary_cmd("kv", test, chan)
            .args(extra)
            .args(["--serial", &format!("tcp:{serial}")]),
        false,
    );
    wait_for_port(serial, LIMIT);
    let mut client = connect(serial, LIMIT);
    client.send_raw(b"PING\r\n").unwrap();
    assert_eq!(
        read_replies(&mut client, 1, LIMIT),
        [Reply::Simple("PONG".into())]
    );
    (primary, backup)
}

/// Sends SIGTERM and returns the exit code and how long the exit took.
fn terminate(p: &mut Proc) -> (Option<i32>, Duration) {
    let t0 = Instant::now();
    p.terminate().unwrap();
    let status = p.wait_timeout(LIMIT);
    (status.and_then(|s| s.code()), t0.elapsed())
}

#[test]
fn a_backup_waiting_for_the_log_ends_at_once() {
    if !kvm_available("a_backup_waiting_for_the_log_ends_at_once") {
        return;
    }
    let (primary, mut backup) = pair("sig-backup", &[]);
    let (code, took) = terminate(&mut backup);
    let out = finish(backup, LIMIT);
    assert_eq!(code, Some(0), "backup:\n{}", stderr(&out));
    assert!(took < PROMPT, "the backup took {took:?}");
    // Stopped while waiting for the log ("stopped by a signal"), or at an
    // exit (its final state): either way on its own, without the primary.
    let err = stderr(&out);
    assert!(
        err.contains("stopped by a signal") || err.contains("final state"),
        "{err}"
    );
    // Its primary, without an arbiter, halts on the lost backup.
    let out = finish(primary, LIMIT);
    assert_eq!(out.status.code(), Some(1), "primary:\n{}", stderr(&out));
    assert!(stderr(&out).contains("lost the backup"), "{}", stderr(&out));
}

#[test]
fn a_primary_ends_and_its_backup_replays_to_the_stop() {
    if !kvm_available("a_primary_ends_and_its_backup_replays_to_the_stop") {
        return;
    }
    let (mut primary, backup) = pair("sig-primary", &[]);
    let (code, took) = terminate(&mut primary);
    let p = finish(primary, LIMIT);
    assert_eq!(code, Some(0), "primary:\n{}", stderr(&p));
    assert!(took < PROMPT, "the primary took {took:?}");
    let b = finish(backup, LIMIT);
    assert_eq!(b.status.code(), Some(0), "backup:\n{}", stderr(&b));
    // Both ended at the same place, in the same state.
    assert_eq!(final_state(&p), final_state(&b));
}

#[test]
fn a_primary_with_a_frozen_backup_still_ends_promptly() {
    if !kvm_available("a_primary_with_a_frozen_backup_still_ends_promptly") {
        return;
    }
    let (mut primary, mut backup) = pair("sig-frozen", &[]);
    backup.signal(libc::SIGSTOP).unwrap();
    assert!(wait_until_stopped(backup.pid(), Duration::from_secs(5)));
    let (code, took) = terminate(&mut primary);
    let p = finish(primary, LIMIT);
    assert!(took < PROMPT, "the primary took {took:?}:\n{}", stderr(&p));
    // It could not get its last records acknowledged: not a clean end.
    assert_ne!(code, Some(0), "primary:\n{}", stderr(&p));
    assert!(!stderr(&p).contains("panicked"), "{}", stderr(&p));
    backup.signal(libc::SIGCONT).unwrap();
}
