//! Shared harness for the end-to-end tests and the benchmarks: starting
//! `duet` as a real process, with bounded waits. The process guard, the
//! RESP client, the metrics scraper, the port allocator and the seeded PRNG
//! are the library's [`vmm::kit`], shared with `duet demo`; what is here
//! turns their errors into test failures and knows the duet command lines.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// Not every test uses every part of the kit.
#[allow(unused_imports)]
pub use vmm::kit::metrics::{self, Metrics};
pub use vmm::kit::process::Proc;
#[allow(unused_imports)]
pub use vmm::kit::resp::{self, Conn, Reply};
#[allow(unused_imports)]
pub use vmm::kit::seed::{self, Rng};

/// The `duet` binary Cargo built for these tests.
pub fn duet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet"))
}

/// True if KVM is usable. Without `/dev/kvm` a test fails, unless
/// `DUET_ALLOW_NO_KVM=1`, in which case it says loudly that it did not run.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("DUET_ALLOW_NO_KVM").as_deref() == Ok("1") {
        eprintln!("NOT RUN: {test} needs /dev/kvm (DUET_ALLOW_NO_KVM=1 is set)");
        return false;
    }
    panic!("{test} needs /dev/kvm; set DUET_ALLOW_NO_KVM=1 to allow running without it");
}

/// A scratch directory for one test, removed on drop (pass or fail).
pub fn tempdir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("duet-{test}-"))
        .tempdir()
        .expect("create a temp dir")
}

/// A loopback address for a child to listen on (see [`vmm::kit::ports`]
/// for why this does not race).
pub fn free_addr() -> SocketAddr {
    vmm::kit::ports::loopback().expect("a free loopback port")
}

/// Runs a command to completion with a time limit; panics on timeout.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    vmm::kit::process::run_bounded(cmd, stdin, limit).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Spawns `cmd` (a `duet` command, say) with stdout and stderr collected,
/// and stdin piped if `stdin`; [`Proc::finish`] returns what it printed.
pub fn launch(cmd: &mut Command, stdin: bool) -> Proc {
    Proc::captured("duet", cmd, stdin).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits up to `limit` for `p` to exit; panics (with its stderr) if not.
pub fn finish(p: Proc, limit: Duration) -> Output {
    p.finish(limit).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until something accepts connections at `addr`.
pub fn wait_for_port(addr: SocketAddr, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr} after {limit:?}");
}

/// Starts `duet run --image IMAGE --serial tcp:ADDR` and waits for the port.
pub fn start_tcp_guest(image: &str, addr: SocketAddr) -> Proc {
    let p = Proc::spawn(
        image,
        duet()
            .args(["run", "--image", image, "--serial", &format!("tcp:{addr}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_port(addr, Duration::from_secs(10));
    p
}

/// Runs `redis-cli` against `addr` with the given arguments and stdin.
pub fn redis_cli(addr: SocketAddr, args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Output {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    run_bounded(&mut cmd, stdin, limit)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A RESP connection to `addr`; panics if it cannot connect within `limit`.
pub fn connect(addr: SocketAddr, limit: Duration) -> Conn {
    Conn::connect(addr, limit).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Reads exactly `n` replies within `limit`; panics if they do not all
/// arrive in time or if more bytes follow the last one.
pub fn read_replies(c: &mut Conn, n: usize, limit: Duration) -> Vec<Reply> {
    let replies = c
        .replies(n, limit)
        .unwrap_or_else(|e| panic!("{n} replies within {limit:?}: {e}"));
    assert!(
        c.pending().is_empty(),
        "bytes after the last reply: {:?}",
        String::from_utf8_lossy(c.pending())
    );
    replies
}

/// Scrapes the metrics at `addr` (two seconds at most); panics if they do
/// not answer or do not parse.
pub fn scrape(addr: SocketAddr) -> Metrics {
    metrics::scrape(addr, Duration::from_secs(2)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The `duet: final state exits=.. regs=.. mem=..` line of a record or
/// replay run; panics if there is none.
pub fn final_state(o: &Output) -> String {
    final_state_in(&stderr(o))
}

/// The `duet: final state ...` line in `text` (a stderr or a log file).
pub fn final_state_in(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("duet: final state "))
        .unwrap_or_else(|| panic!("no final state line in: {text}"))
        .to_string()
}

/// duet's exit status when replay or a backup diverges.
pub const EXIT_DIVERGENCE: i32 = 4;

/// The record number in `duet: replay diverged: divergence at record N ...`;
/// panics unless `o` is such a divergence (exit 4, no panic).
pub fn diverged_at(o: &Output) -> u64 {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(EXIT_DIVERGENCE),
        "expected a divergence, got {:?}; stderr: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    let prefix = "duet: replay diverged: divergence at record ";
    let line = err
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no divergence line in stderr: {err}"));
    line[prefix.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no record number in {line:?}"))
}

/// Reads a whole log with the logchannel crate; panics on a bad log.
pub fn read_log(path: &Path) -> (logchannel::Header, Vec<logchannel::Record>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let (mut reader, header) = logchannel::LogReader::open(file).unwrap();
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        records.push(r);
    }
    (header, records)
}

/// Writes a log with `header` and these records, renumbered 0, 1, 2, ...
/// with correct checksums.
pub fn write_log(path: &Path, header: &logchannel::Header, records: &[logchannel::Record]) {
    let mut w = logchannel::LogWriter::new(Vec::new(), header).unwrap();
    for r in records {
        w.append(r.pos, r.event.clone()).unwrap();
    }
    std::fs::write(path, w.into_inner()).unwrap();
}

/// Byte ranges of the record frames of a log (after the magic and the
/// header frame), found by walking the length prefixes.
pub fn record_frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let frame_len = |at: usize| {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        logchannel::FRAME_PREFIX + len
    };
    let mut at = logchannel::MAGIC.len();
    at += frame_len(at);
    let mut frames = Vec::new();
    while at < bytes.len() {
        let end = at + frame_len(at);
        assert!(end <= bytes.len(), "log ends inside a frame at {at}");
        frames.push(at..end);
        at = end;
    }
    frames
}

/// `duet backup --image IMAGE --vm-id VM_ID --listen LISTEN`; add more
/// flags, then start it with [`launch`].
pub fn backup_cmd(image: &str, vm_id: &str, listen: SocketAddr) -> Command {
    let mut cmd = duet();
    cmd.args(["backup", "--image", image, "--vm-id", vm_id])
        .args(["--listen", &listen.to_string()]);
    cmd
}

/// `duet primary --image IMAGE --vm-id VM_ID --backup BACKUP`; add more
/// flags, then start it with [`launch`].
pub fn primary_cmd(image: &str, vm_id: &str, backup: SocketAddr) -> Command {
    let mut cmd = duet();
    cmd.args(["primary", "--image", image, "--vm-id", vm_id])
        .args(["--backup", &backup.to_string()]);
    cmd
}

/// Polls until the file at `path` contains `needle`; false after `limit`.
pub fn wait_for_file_containing(path: &Path, needle: &[u8], limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every thread of process `pid` is stopped (after SIGSTOP:
/// kill(2) returns before the group stop completes); false after `limit`.
pub fn wait_until_stopped(pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    let stopped = || -> Option<bool> {
        let mut all = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            // pid (comm) STATE ...: the state follows the last ')'.
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
            all &= state == "T";
        }
        Some(all)
    };
    loop {
        if stopped() == Some(true) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The tas-server binary next to `duet`. `cargo test --workspace` builds it;
/// a narrower `cargo test -p vmm` may not, so it is built here (same
/// profile, bounded) if missing.
pub fn tas_server_bin() -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_duet")).with_file_name("tas-server");
    if path.exists() {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "tas-server"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    eprintln!("{} is missing; running {cmd:?}", path.display());
    let o = run_bounded(&mut cmd, None, Duration::from_secs(600));
    assert!(
        o.status.success() && path.exists(),
        "tas-server is missing at {} and `{cargo} build -p tas-server` did not make it: {}; \
         build it with `cargo build --release --workspace`",
        path.display(),
        stderr(&o)
    );
    path
}

/// `redis-benchmark -c 1 -n REQUESTS -t set,get,incr --csv` against `addr`:
/// requests per second by test name (SET, GET, INCR). Its CSV looks like
///
/// ```text
/// "test","rps","avg_latency_ms",...
/// "SET","179.69","5.131",...
/// ```
pub fn redis_benchmark(
    addr: SocketAddr,
    requests: &str,
    limit: Duration,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    use anyhow::Context;
    let o = run_bounded(
        Command::new("redis-benchmark").args([
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-c",
            "1",
            "-n",
            requests,
            "-t",
            "set,get,incr",
            "--csv",
        ]),
        None,
        limit,
    );
    anyhow::ensure!(
        o.status.success(),
        "redis-benchmark failed ({}): {}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    let mut rps = std::collections::BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        if cols.len() < 2 || cols[0] == "test" {
            continue;
        }
        let value = cols[1]
            .parse()
            .with_context(|| format!("bad rps in redis-benchmark line {line:?}"))?;
        rps.insert(cols[0].to_string(), value);
    }
    for test in ["SET", "GET", "INCR"] {
        anyhow::ensure!(
            rps.contains_key(test),
            "redis-benchmark reported no {test}: {out}"
        );
    }
    Ok(rps)
}
