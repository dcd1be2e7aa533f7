//! Startup failures are one clear line on stderr and a non-zero exit: the
//! address in use, an unreadable state file, bad flags.

mod common;

use std::ffi::OsStr;
use std::net::TcpListener;

use common::{run_to_exit, TempDir};

#[test]
fn address_in_use_is_a_clear_error() {
    let dir = TempDir::new("inuse");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (status, stderr) = run_to_exit(&[
        OsStr::new("--listen"),
        OsStr::new(&addr),
        OsStr::new("--state"),
        dir.state().as_os_str(),
    ]);
    assert!(!status.success());
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("tas-server: cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(last.to_lowercase().contains("in use"), "{stderr}");
    drop(taken);
}

#[test]
fn an_unreadable_state_file_is_a_clear_error() {
    let dir = TempDir::new("unreadable");
    // A directory cannot be a state file.
    let (status, stderr) = run_to_exit(&[
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--state"),
        dir.path().as_os_str(),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("tas-server: cannot load state file"),
        "{stderr}"
    );
    // A state file in a directory that does not exist.
    let missing = dir.path().join("no/such/dir/state.jsonl");
    let (status, stderr) = run_to_exit(&[
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--state"),
        missing.as_os_str(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("cannot open"), "{stderr}");
}

#[test]
fn bad_flags_are_rejected() {
    let dir = TempDir::new("flags");
    for args in [
        vec![OsStr::new("--listen"), OsStr::new("127.0.0.1:0")],
        vec![OsStr::new("--state"), dir.state().as_os_str()],
        vec![
            OsStr::new("--listen"),
            OsStr::new("not-an-address"),
            OsStr::new("--state"),
            dir.state().as_os_str(),
        ],
        vec![OsStr::new("--frobnicate")],
    ] {
        let (status, stderr) = run_to_exit(&args);
        assert!(!status.success(), "{args:?} succeeded");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
    }
    // Nothing was created by a rejected invocation.
    assert!(!dir.state().exists());
}
