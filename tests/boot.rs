//! Each embedded image boots on KVM and does its job; bad input to
//! `duet run` gets a one-line error and a non-zero exit, never a panic.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn assert_clean_error(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got {:?}", o.status);
    assert!(
        !err.contains("panicked"),
        "duet panicked instead of reporting: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr should mention {needle:?}: {err}"
    );
}

#[test]
fn hello_prints_banner_and_exits_zero() {
    if !kvm_available("hello_prints_banner_and_exits_zero") {
        return;
    }
    let o = run_bounded(duet().args(["run", "--image", "hello"]), None, LIMIT);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "status {:?}, stderr {}",
        o.status,
        stderr(&o)
    );
    assert!(out.contains("Hello from Duet"), "stdout: {out}");
    assert!(out.contains("clock_ns="), "stdout: {out}");
    assert!(out.contains("rtc=20"), "stdout: {out}");
}

#[test]
fn compute_finishes_and_reports_its_time() {
    if !kvm_available("compute_finishes_and_reports_its_time") {
        return;
    }
    let o = run_bounded(duet().args(["run", "--image", "compute"]), None, LIMIT);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "status {:?}, stderr {}",
        o.status,
        stderr(&o)
    );
    assert!(out.contains("compute result="), "stdout: {out}");
    assert!(out.contains("elapsed_ns="), "stdout: {out}");
}

#[test]
fn missing_file_is_an_error() {
    let o = run_bounded(
        duet().args(["run", "--image", "/nonexistent/guest.elf"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "unknown image");
}

#[test]
fn unknown_image_name_is_an_error() {
    let o = run_bounded(
        duet().args(["run", "--image", "no-such-image"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "unknown image");
}

#[test]
fn non_elf_file_is_an_error() {
    let dir = tempdir("non-elf");
    let path = dir.path().join("not-an-elf");
    std::fs::write(&path, b"#!/bin/sh\necho this is not an ELF\n").unwrap();
    let o = run_bounded(
        duet().args(["run", "--image", path.to_str().unwrap()]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "ELF");
}

/// A minimal x86-64 ELF with one PT_LOAD segment of `memsz` bytes at `paddr`.
fn tiny_elf(paddr: u64, memsz: u64) -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56 + 16];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little-endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
    e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // filesz
    e[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    e[120..122].copy_from_slice(&[0xeb, 0xfe]); // jmp .
    e
}

fn run_elf(bytes: &[u8], extra: &[&str]) -> std::process::Output {
    let dir = tempdir("elf");
    let path = dir.path().join("guest.elf");
    std::fs::write(&path, bytes).unwrap();
    run_bounded(
        duet()
            .args(["run", "--image", path.to_str().unwrap()])
            .args(extra),
        None,
        LIMIT,
    )
}

#[test]
fn elf_too_big_for_memory_is_an_error() {
    let o = run_elf(&tiny_elf(0x10_0000, 1 << 30), &["--mem", "64M"]);
    assert_clean_error(&o, "beyond the guest");
}

#[test]
fn elf_below_load_floor_is_an_error() {
    let o = run_elf(&tiny_elf(0x1000, 16), &[]);
    assert_clean_error(&o, "below the load minimum");
}

#[test]
fn truncated_elf_is_an_error() {
    let mut e = tiny_elf(0x10_0000, 16);
    e.truncate(100);
    let o = run_elf(&e, &[]);
    assert_clean_error(&o, "ELF");
}

#[test]
fn bad_mem_flag_is_an_error() {
    for bad in ["lots", "1M", "64G", "-5"] {
        let o = run_bounded(
            duet().args(["run", "--image", "hello", "--mem", bad]),
            None,
            LIMIT,
        );
        assert_clean_error(&o, "--mem");
    }
}

#[test]
fn missing_kvm_device_is_an_error() {
    let o = run_bounded(
        duet().args(["run", "--image", "hello", "--kvm", "/nonexistent/kvm"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "cannot open /nonexistent/kvm");
}

#[test]
fn non_kvm_device_is_an_error() {
    let o = run_bounded(
        duet().args(["run", "--image", "hello", "--kvm", "/dev/null"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "/dev/null");
}

#[test]
fn serial_address_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let o = run_bounded(
        duet().args(["run", "--image", "kv", "--serial", &format!("tcp:{addr}")]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "cannot listen");
}

#[test]
fn bad_serial_flag_is_an_error() {
    let o = run_bounded(
        duet().args(["run", "--image", "kv", "--serial", "carrier-pigeon"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "serial");
}

#[test]
fn a_vcpu_cpu_the_process_may_not_use_is_an_error() {
    let o = run_bounded(
        duet().args(["--vcpu-cpu", "4095", "run", "--image", "hello"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "--vcpu-cpu 4095");
    // The only CPU a process may use cannot be given away.
    let o = run_bounded(
        Command::new("taskset")
            .args(["-c", "0", env!("CARGO_BIN_EXE_duet")])
            .args(["--vcpu-cpu", "0", "run", "--image", "hello"]),
        None,
        LIMIT,
    );
    assert_clean_error(&o, "the only one");
}

/// A lag bound of zero would stall every primary at its first exit.
#[test]
fn a_zero_lag_bound_is_a_usage_error() {
    for cmd in ["primary", "backup"] {
        let o = run_bounded(
            duet().args([cmd, "--image", "kv", "--vm-id", "v", "--max-lag-ms", "0"]),
            None,
            LIMIT,
        );
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", stderr(&o));
        assert_clean_error(&o, "--max-lag-ms");
    }
}

/// A guest runs to its end with its vCPU pinned (when there are two CPUs).
#[test]
fn a_guest_runs_with_its_vcpu_pinned() {
    if !kvm_available("a_guest_runs_with_its_vcpu_pinned") {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("a_guest_runs_with_its_vcpu_pinned: one CPU only, --vcpu-cpu cannot apply");
        return;
    }
    let o = run_bounded(
        duet().args([
            "--vcpu-cpu",
            "1",
            "run",
            "--image",
            "hello",
            "--serial",
            "stdio",
        ]),
        None,
        LIMIT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
