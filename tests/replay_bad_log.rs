//! `duet replay` refuses logs it cannot trust, before the guest runs: one
//! line on stderr that says what is wrong, a non-zero exit, never a panic.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Records `hello` (64M, the default) into `dir/hello.log`.
fn record_hello(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let log = dir.path().join("hello.log");
    let o = run_bounded(
        duet()
            .args(["record", "--image", "hello", "--serial", "none", "--log"])
            .arg(&log),
        None,
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(0), "record failed: {}", stderr(&o));
    let (_, records) = read_log(&log);
    assert!(records.len() >= 3, "hello logged {} records", records.len());
    log
}

fn replay(log: &Path, extra: &[&str]) -> Output {
    run_bounded(
        duet()
            .args(["replay", "--log"])
            .arg(log)
            .args(extra)
            .args(if extra.contains(&"--image") {
                &[][..]
            } else {
                &["--image", "hello"][..]
            }),
        None,
        LIMIT,
    )
}

/// Exit 1, no panic, nothing replayed, and exactly one stderr line, which
/// starts with `duet: ` and mentions `needle`.
fn assert_refused(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1, got {:?}; stderr: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "duet panicked: {err}");
    assert!(
        !err.contains("final state"),
        "the guest ran from a bad log: {err}"
    );
    assert!(o.stdout.is_empty(), "replayed output from a bad log");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one line of error, got: {err}");
    assert!(lines[0].starts_with("duet: "), "{err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr should mention {needle:?}: {err}"
    );
}

#[test]
fn log_truncated_mid_record() {
    if !kvm_available("log_truncated_mid_record") {
        return;
    }
    let dir = tempdir("bad-truncated");
    let log = record_hello(&dir);
    let bytes = std::fs::read(&log).unwrap();
    let frames = record_frames(&bytes);
    let cut = &frames[frames.len() / 2];
    let bad = dir.path().join("cut.log");
    std::fs::write(&bad, &bytes[..cut.start + (cut.end - cut.start) / 2]).unwrap();
    let o = replay(&bad, &[]);
    assert_refused(
        &o,
        &format!("truncated inside the record {} frame", frames.len() / 2),
    );
}

#[test]
fn log_with_a_flipped_bit() {
    if !kvm_available("log_with_a_flipped_bit") {
        return;
    }
    let dir = tempdir("bad-bitflip");
    let log = record_hello(&dir);
    let mut bytes = std::fs::read(&log).unwrap();
    let frames = record_frames(&bytes);
    let k = frames.len() / 2;
    let frame = &frames[k];
    // A bit in the payload, past the 8-byte length and CRC prefix.
    bytes[frame.start + logchannel::FRAME_PREFIX + 1] ^= 0x10;
    let bad = dir.path().join("flipped.log");
    std::fs::write(&bad, &bytes).unwrap();
    let o = replay(&bad, &[]);
    assert_refused(&o, &format!("checksum mismatch in the record {k} frame"));
}

#[test]
fn log_from_another_image() {
    if !kvm_available("log_from_another_image") {
        return;
    }
    let dir = tempdir("bad-image");
    let log = record_hello(&dir);
    let o = replay(&log, &["--image", "ticker"]);
    assert_refused(&o, "different image");
}

#[test]
fn log_with_another_memory_size() {
    if !kvm_available("log_with_another_memory_size") {
        return;
    }
    let dir = tempdir("bad-mem");
    let log = record_hello(&dir);
    let o = replay(&log, &["--mem", "128M"]);
    assert_refused(&o, "memory");
    assert!(
        stderr(&o).contains(&(64u64 << 20).to_string()),
        "{}",
        stderr(&o)
    );
}

#[test]
fn empty_log() {
    let dir = tempdir("bad-empty");
    let bad = dir.path().join("empty.log");
    std::fs::write(&bad, b"").unwrap();
    assert_refused(&replay(&bad, &[]), "log is empty");
}

#[test]
fn log_from_a_newer_format_version() {
    if !kvm_available("log_from_a_newer_format_version") {
        return;
    }
    let dir = tempdir("bad-version");
    let log = record_hello(&dir);
    let (mut header, records) = read_log(&log);
    header.version = logchannel::FORMAT_VERSION + 1;
    let bad = dir.path().join("newer.log");
    write_log(&bad, &header, &records);
    let o = replay(&bad, &[]);
    assert_refused(
        &o,
        &format!(
            "log format version {} is newer than the {} this build reads",
            logchannel::FORMAT_VERSION + 1,
            logchannel::FORMAT_VERSION
        ),
    );
}

#[test]
fn nonexistent_log() {
    let dir = tempdir("bad-missing");
    let o = replay(&dir.path().join("no-such.log"), &[]);
    assert_refused(&o, "cannot open log");
}

#[test]
fn file_that_is_not_a_log() {
    let dir = tempdir("bad-garbage");
    let mut rng = seed::rng("file_that_is_not_a_log", Some(0x6761_7262_6167_6521));
    let garbage: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
    assert_ne!(&garbage[..8], &logchannel::MAGIC[..]);
    let bad = dir.path().join("garbage.log");
    std::fs::write(&bad, &garbage).unwrap();
    assert_refused(&replay(&bad, &[]), "not a Duet log");
}
