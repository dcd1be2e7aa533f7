//! What the arbiter does with a damaged state file: a torn last line (a
//! crash mid-write, never acknowledged) is dropped with a warning; damage
//! anywhere else stops it from starting, with a one-line error naming the
//! line and a non-zero exit.

mod common;

use std::ffi::OsStr;

use common::{run_to_exit, Server, TempDir};
use tas_server::ClaimOutcome;

const GRANT: &str = r#"{"v":1,"kind":"grant","vm_id":"kv1","epoch":1,"claimant":"host-a"}"#;
const EPOCH: &str = r#"{"v":1,"kind":"new_epoch","vm_id":"kv1","epoch":2}"#;

#[test]
fn a_torn_last_line_is_tolerated() {
    let dir = TempDir::new("torn");
    std::fs::write(
        dir.state(),
        format!("{GRANT}\n{EPOCH}\n{{\"v\":1,\"kind\":\"grant\",\"vm_id\":\"kv1\",\"ep"),
    )
    .expect("write state");
    let server = Server::start(&dir.state());
    let client = server.client();
    let status = client.status().expect("status");
    assert_eq!(status.vms[0].epoch, 2);
    assert_eq!(status.vms[0].holders[&1], "host-a");
    assert!(
        server.stderr_text().contains("torn last line"),
        "{}",
        server.stderr_text()
    );
    // New decisions land on a fresh line and survive a restart.
    assert_eq!(
        client.test_and_set("kv1", 2, "host-b").expect("claim"),
        ClaimOutcome::Granted
    );
    server.kill9();
    let server = Server::start(&dir.state());
    let outcome = server
        .client()
        .test_and_set("kv1", 2, "host-a")
        .expect("claim");
    assert_eq!(
        outcome,
        ClaimOutcome::HeldBy {
            holder: "host-b".into()
        }
    );
    assert!(!server.stderr_text().contains("torn last line"));
}

#[test]
fn garbage_in_the_middle_is_a_startup_error() {
    let dir = TempDir::new("corrupt");
    std::fs::write(dir.state(), format!("{GRANT}\n#!garbage\x00\n{EPOCH}\n")).expect("write");
    let (status, stderr) = run_to_exit(&[
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--state"),
        dir.state().as_os_str(),
    ]);
    assert!(!status.success());
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tas-server: cannot load state file"),
        "{stderr}"
    );
    assert!(last.contains("line 2: corrupt record"), "{stderr}");
    // The file is left exactly as it was.
    let text = std::fs::read_to_string(dir.state()).expect("read");
    assert!(text.contains("#!garbage"));
}

#[test]
fn contradicting_records_are_a_startup_error() {
    let dir = TempDir::new("conflict");
    let other = GRANT.replace("host-a", "host-b");
    std::fs::write(dir.state(), format!("{GRANT}\n{other}\n")).expect("write");
    let (status, stderr) = run_to_exit(&[
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--state"),
        dir.state().as_os_str(),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("line 2: inconsistent record: second winner"),
        "{stderr}"
    );
}
