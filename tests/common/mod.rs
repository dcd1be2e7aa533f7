//! Shared harness for the end-to-end tests: starting `duet` as a real
//! process, with bounded waits, and killing it on drop.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A child process that is killed when dropped, so a failing test never
/// leaves a VM running.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    /// Waits up to `limit` for the process to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Runs a command to completion with a time limit; panics on timeout.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(data) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut guard = Guard(child);
    let status = guard
        .wait_timeout(limit)
        .unwrap_or_else(|| panic!("command {cmd:?} did not finish within {limit:?}"));
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
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
pub fn start_tcp_guest(image: &str, addr: SocketAddr) -> Guard {
    let child = duet()
        .args(["run", "--image", image, "--serial", &format!("tcp:{addr}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn duet");
    let guard = Guard(child);
    wait_for_port(addr, Duration::from_secs(10));
    guard
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

/// Encodes one command as a RESP2 multibulk request.
pub fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A bulk string reply holding `s`.
    pub fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }
}

/// Parses one reply from the front of `buf`: the reply and the bytes it
/// took, or `None` if `buf` holds only part of one. Panics on bytes that
/// are not RESP2.
pub fn parse_reply(buf: &[u8]) -> Option<(Reply, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end])
        .unwrap_or_else(|_| panic!("reply line is not UTF-8: {buf:?}"));
    let after = line_end + 2;
    let number = || -> i64 {
        line.parse()
            .unwrap_or_else(|_| panic!("bad number in reply line {line:?}"))
    };
    match buf.first()? {
        b'+' => Some((Reply::Simple(line.to_string()), after)),
        b'-' => Some((Reply::Error(line.to_string()), after)),
        b':' => Some((Reply::Integer(number()), after)),
        b'$' => {
            let n = number();
            if n < 0 {
                return Some((Reply::Bulk(None), after));
            }
            let end = after + n as usize;
            if buf.len() < end + 2 {
                return None;
            }
            assert_eq!(&buf[end..end + 2], b"\r\n", "bulk reply not terminated");
            Some((Reply::Bulk(Some(buf[after..end].to_vec())), end + 2))
        }
        b'*' => {
            let n = number();
            if n < 0 {
                return Some((Reply::Array(None), after));
            }
            let mut items = Vec::new();
            let mut used = after;
            for _ in 0..n {
                let (item, len) = parse_reply(&buf[used..])?;
                items.push(item);
                used += len;
            }
            Some((Reply::Array(Some(items)), used))
        }
        other => panic!("not a RESP2 reply: first byte {other:#x} in {buf:?}"),
    }
}

/// Reads exactly `n` replies from `stream` within `limit`; panics if they
/// do not all arrive in time or if more bytes follow the last one.
pub fn read_replies(stream: &mut TcpStream, n: usize, limit: Duration) -> Vec<Reply> {
    let end = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut replies = Vec::with_capacity(n);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while replies.len() < n {
            let Some((reply, used)) = parse_reply(&buf) else {
                break;
            };
            replies.push(reply);
            buf.drain(..used);
        }
        if replies.len() == n {
            assert!(buf.is_empty(), "bytes after the last reply: {buf:?}");
            return replies;
        }
        let left = end.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {n} replies within {limit:?}",
            replies.len()
        );
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => panic!("connection closed after {} of {n} replies", replies.len()),
            Ok(got) => buf.extend_from_slice(&chunk[..got]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("read failed after {} of {n} replies: {e}", replies.len()),
        }
    }
}

/// Connects to `addr` with bounded connect, read and write times.
pub fn connect(addr: SocketAddr, limit: Duration) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, limit)
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream.set_write_timeout(Some(limit)).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    stream
}

/// A scratch directory for one test, removed on drop (pass or fail).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A fresh, empty directory named after the test and this process.
    pub fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("duet-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `duet` process started with piped stdio, whose output is collected on
/// threads so that it can never block on a full pipe.
pub struct Running {
    pub guard: Guard,
    pub stdin: Option<std::process::ChildStdin>,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

impl Running {
    /// Spawns `cmd` with stdin piped (or null) and stdout and stderr piped.
    pub fn start(cmd: &mut Command, stdin: bool) -> Running {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let stdin = child.stdin.take();
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        Running {
            guard: Guard(child),
            stdin,
            out,
            err,
        }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// Sends SIGTERM (a clean stop for `duet record`).
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: kill(2) takes plain integers and touches no memory of
        // ours; the pid is our own child, not yet reaped (the Guard reaps it).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill({pid}, SIGTERM) failed");
    }

    /// Waits up to `limit` for the exit and returns everything it printed;
    /// panics (killing the process) on timeout.
    pub fn finish(mut self, limit: Duration) -> Output {
        drop(self.stdin.take());
        let status = self.guard.wait_timeout(limit).unwrap_or_else(|| {
            let err = String::from_utf8_lossy(&self.err_so_far()).into_owned();
            panic!("duet did not exit within {limit:?}; stderr so far: {err}")
        });
        Output {
            status,
            stdout: self.out.join().unwrap(),
            stderr: self.err.join().unwrap(),
        }
    }

    fn err_so_far(&mut self) -> Vec<u8> {
        let _ = self.guard.0.kill();
        let _ = self.guard.0.wait();
        let err = std::mem::replace(&mut self.err, std::thread::spawn(Vec::new));
        err.join().unwrap_or_default()
    }
}

/// The `duet: final state exits=.. regs=.. mem=..` line of a record or
/// replay run; panics if there is none.
pub fn final_state(o: &Output) -> String {
    let err = stderr(o);
    err.lines()
        .find(|l| l.starts_with("duet: final state "))
        .unwrap_or_else(|| panic!("no final state line in stderr: {err}"))
        .to_string()
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

/// A small deterministic PRNG (xorshift64*), so that a failing run can be
/// repeated from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Sends signal `sig` to our child `pid` (SIGTERM, SIGSTOP, SIGCONT...).
pub fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // the pid is our own child, not yet reaped (its Guard reaps it).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// `duet backup --image IMAGE --vm-id VM_ID --listen LISTEN`; add more
/// flags, then start it with [`Running::start`].
pub fn backup_cmd(image: &str, vm_id: &str, listen: SocketAddr) -> Command {
    let mut cmd = duet();
    cmd.args(["backup", "--image", image, "--vm-id", vm_id])
        .args(["--listen", &listen.to_string()]);
    cmd
}

/// `duet primary --image IMAGE --vm-id VM_ID --backup BACKUP`; add more
/// flags, then start it with [`Running::start`].
pub fn primary_cmd(image: &str, vm_id: &str, backup: SocketAddr) -> Command {
    let mut cmd = duet();
    cmd.args(["primary", "--image", image, "--vm-id", vm_id])
        .args(["--backup", &backup.to_string()]);
    cmd
}

/// One HTTP GET of the Prometheus text served by `--metrics ADDR`, or
/// `None` if nothing answers within two seconds.
pub fn scrape_metrics(addr: SocketAddr) -> Option<String> {
    use std::io::Write;
    let limit = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.set_write_timeout(Some(limit)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

/// The value of the sample `name` (exactly, labels included) in Prometheus
/// text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
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
