//! The handshake refuses a primary that does not match its backup: another
//! image, another VM id, another pairing epoch. The primary exits non-zero
//! with the reason; the backup reports each refusal and keeps waiting, so
//! one backup serves all three.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn mismatched_primaries_are_refused() {
    if !kvm_available("mismatched_primaries_are_refused") {
        return;
    }
    let chan = free_addr();
    let backup = launch(
        backup_cmd("hello", "ft-hs", chan).args(["--epoch", "7"]),
        false,
    );
    let cases: [(&str, &str, &str, &str); 3] = [
        ("another image", "kv", "ft-hs", "7"),
        ("another VM id", "hello", "someone-else", "7"),
        ("another epoch", "hello", "ft-hs", "8"),
    ];
    let reasons = ["image", "VM id", "epoch"];
    for ((what, image, vm_id, epoch), reason) in cases.into_iter().zip(reasons) {
        let o = run_bounded(
            primary_cmd(image, vm_id, chan).args([
                "--epoch",
                epoch,
                "--serial",
                "none",
                "--connect-timeout-ms",
                "10000",
            ]),
            None,
            LIMIT,
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {:?}\n{err}", o.status);
        assert!(
            err.contains("duet: the peer refused us:") && err.contains(reason),
            "{what}: expected a refusal naming the {reason}, got:\n{err}"
        );
        assert!(
            !err.contains("final state"),
            "{what}: a refused primary must not run the guest:\n{err}"
        );
    }
    // The backup is still waiting; stop it and read what it said.
    let mut backup = backup;
    let early = backup.status();
    assert!(early.is_none(), "the backup gave up: {early:?}");
    backup.kill();
    let b = finish(backup, LIMIT);
    let err = stderr(&b);
    let refusals: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("duet: refused a primary:"))
        .collect();
    assert_eq!(refusals.len(), 3, "backup stderr:\n{err}");
    for (line, reason) in refusals.iter().zip(reasons) {
        assert!(line.contains(reason), "{line:?} should name the {reason}");
    }
}
