//! Harness for the end-to-end tests: runs the real `tas-server` binary on a
//! loopback port with its state file in a temporary directory, and makes
//! sure neither outlives the test (the child is killed on drop, the
//! directory removed). Every wait is bounded.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tas_server::client::Client;

/// Bound on starting or stopping the server, and on any one exchange.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tas-it-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `state.jsonl` inside the directory.
    pub fn state(&self) -> PathBuf {
        self.0.join("state.jsonl")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn command(args: &[&OsStr]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tas-server"));
    cmd.args(args)
        .env("TAS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Collects a child's stream on a thread so that the child never blocks on
/// a full pipe.
fn collect(mut stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut text) = sink.lock() {
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    text
}

/// A running `tas-server`, killed (SIGKILL) on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server on a free loopback port and waits until it says it
    /// is listening.
    pub fn start(state: &Path) -> Server {
        let mut child = command(&[
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--state"),
            state.as_os_str(),
        ])
        .spawn()
        .expect("spawn tas-server");
        let stderr = collect(child.stderr.take().expect("stderr piped"));
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("tas-server: listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
        };
        match rx.recv_timeout(TIMEOUT) {
            Ok(addr) => server.addr = addr.parse().expect("announced address parses"),
            Err(_) => panic!(
                "tas-server did not start; stderr:\n{}",
                server.stderr_text()
            ),
        }
        server
    }

    /// A client with the harness's timeout.
    pub fn client(&self) -> Client {
        Client::new(self.addr, TIMEOUT)
    }

    /// Everything the server logged so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill tas-server");
        self.child.wait().expect("reap tas-server");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tas-server` with `args`, which must make it exit by itself, and
/// returns its exit status and stderr.
pub fn run_to_exit(args: &[&OsStr]) -> (ExitStatus, String) {
    let mut child = command(args).spawn().expect("spawn tas-server");
    let stderr = collect(child.stderr.take().expect("stderr piped"));
    let _stdout = collect(child.stdout.take().expect("stdout piped"));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll tas-server") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tas-server {args:?} did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The collector thread sees EOF once the child is gone; give it a moment.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && !stderr.lock().map(|s| s.ends_with('\n')).unwrap_or(true) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    let text = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    (status, text)
}

/// A raw connection for speaking the protocol by hand.
pub struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(TIMEOUT))
            .expect("write timeout");
        let writer = stream.try_clone().expect("clone stream");
        Raw {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Sends raw bytes (add the newline yourself).
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Reads one reply line and parses it; `None` at end of stream.
    pub fn reply(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        if n == 0 {
            return None;
        }
        assert!(
            line.ends_with('\n'),
            "reply not newline-terminated: {line:?}"
        );
        assert_eq!(line.matches('\n').count(), 1);
        Some(serde_json::from_str(&line).expect("reply is JSON"))
    }

    /// Sends one line and returns the reply.
    pub fn ask(&mut self, line: &str) -> serde_json::Value {
        self.send(line.as_bytes());
        self.send(b"\n");
        self.reply().expect("a reply")
    }

    /// Closes the sending side.
    pub fn shutdown_write(&mut self) {
        self.writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    }
}
