//! Child processes that never outlive their owner: a [`Proc`] sends SIGKILL
//! to its child and reaps it when dropped, on every path (a failed
//! assertion included), and every wait is bounded.
//!
//! A child's output goes one of three ways, chosen by the constructor:
//! [`Proc::logged`] (stdout and stderr to one file, readable while it runs),
//! [`Proc::captured`] (pipes drained on threads, so the child never blocks
//! on a full pipe; collected by [`Proc::finish`]), or [`Proc::spawn`] (the
//! command's stdio as the caller set it up).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How often a bounded wait polls.
const POLL: Duration = Duration::from_millis(10);

/// A child process, killed and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log: Option<PathBuf>,
    out: Option<Drain>,
    err: Option<Drain>,
    /// The child's stdin, if [`Proc::captured`] was asked for one.
    pub stdin: Option<ChildStdin>,
}

/// A pipe read to its end on a thread, into a buffer that can be taken
/// without waiting for the end (a grandchild may hold the pipe open).
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Drain {
    fn start(mut pipe: impl Read + Send + 'static) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Drain { buf, thread }
    }

    /// What was read, once the pipe has ended or `grace` has passed.
    fn take(self, grace: Duration) -> Vec<u8> {
        let end = Instant::now() + grace;
        while !self.thread.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Proc {
    /// Spawns `cmd` with the stdio it has; `name` appears in errors.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            status: None,
            log: None,
            out: None,
            err: None,
            stdin: None,
        })
    }

    /// Spawns `cmd` with stdin closed and stdout and stderr both appended to
    /// a new file at `log` (see [`Proc::log_text`]).
    pub fn logged(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let mut p = Proc::spawn(name, cmd)?;
        p.log = Some(log.to_path_buf());
        Ok(p)
    }

    /// Spawns `cmd` with stdout and stderr piped and collected on threads,
    /// and stdin piped (in [`Proc::stdin`]) if `stdin`, else closed.
    pub fn captured(name: &str, cmd: &mut Command, stdin: bool) -> anyhow::Result<Proc> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut p = Proc::spawn(name, cmd)?;
        p.stdin = p.child.stdin.take();
        p.out = p.child.stdout.take().map(Drain::start);
        p.err = p.child.stderr.take().map(Drain::start);
        Ok(p)
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (SIGTERM, SIGSTOP, SIGCONT, ...). Refused once the child
    /// has been reaped, since its pid may then belong to someone else.
    pub fn signal(&mut self, sig: libc::c_int) -> std::io::Result<()> {
        if self.status().is_some() {
            return Err(std::io::Error::other(format!(
                "the {} has already exited",
                self.name
            )));
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) takes plain integers and touches no memory of
        // ours; the pid is our own child, not reaped yet (checked above, and
        // only this Proc reaps it).
        if unsafe { libc::kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&mut self) -> std::io::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// The exit status if the child has exited (reaping it), without
    /// waiting.
    pub fn status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.status() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// An error if the child has exited: for a caller waiting on something
    /// the child should do.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.status() {
            Some(s) => bail!("the {} exited early ({s})", self.name),
            None => Ok(()),
        }
    }

    /// SIGKILL and reap (a no-op if it has exited); the status stays
    /// readable.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// The log file of a [`Proc::logged`] child.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Everything a [`Proc::logged`] child printed so far (empty for the
    /// others).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read(l).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls the log of a [`Proc::logged`] child until it contains
    /// `needle`; false after `limit`, or as soon as the child has exited
    /// without printing it.
    pub fn wait_for_log(&mut self, needle: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if self.status().is_some() || Instant::now() >= end {
                return self.log_text().contains(needle);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Closes stdin, waits up to `limit` for the exit and returns the status
    /// with what a [`Proc::captured`] child printed (a [`Proc::logged`]
    /// child's log is its stdout). On timeout the child is killed and the
    /// error carries its stderr.
    pub fn finish(mut self, limit: Duration) -> anyhow::Result<Output> {
        drop(self.stdin.take());
        let status = self.wait_timeout(limit);
        if status.is_none() {
            self.kill();
        }
        // After an exit the pipes end at once, unless a grandchild still
        // holds them: then what arrived by the grace is what there is.
        let grace = Duration::from_secs(if status.is_some() { 5 } else { 1 });
        let stdout = match self.out.take() {
            Some(d) => d.take(grace),
            None => self.log_text().into_bytes(),
        };
        let stderr = self.err.take().map(|d| d.take(grace)).unwrap_or_default();
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => bail!(
                "the {} did not exit within {limit:?}; stderr: {}",
                self.name,
                String::from_utf8_lossy(&stderr)
            ),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion with `stdin` fed to it (or stdin closed), within
/// `limit`; kills it and fails on timeout.
pub fn run_bounded(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> anyhow::Result<Output> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut p = Proc::captured(&name, cmd, stdin.is_some())?;
    if let (Some(data), Some(mut pipe)) = (stdin, p.stdin.take()) {
        let data = data.to_vec();
        // A writer thread: the child may fill its stdout before reading all
        // of its stdin. A child that exits early just breaks the pipe.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    p.finish(limit).with_context(|| format!("{cmd:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_kills_and_reaps() {
        let mut p = Proc::spawn("sleep", Command::new("sleep").arg("30")).unwrap();
        assert!(p.wait_timeout(Duration::from_millis(50)).is_none());
        p.ensure_running().unwrap();
        let pid = p.pid();
        drop(p);
        // Reaped, not a zombie: the pid is gone from /proc.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn finish_collects_output_and_times_out() {
        let o = run_bounded(
            &mut Command::new("cat"),
            Some(b"in"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(o.status.success());
        assert_eq!(o.stdout, b"in");
        let e = run_bounded(
            Command::new("sh").args(["-c", "echo oops >&2; sleep 30"]),
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("oops"), "{e:#}");
    }

    #[test]
    fn no_signal_after_reaping() {
        let mut p = Proc::spawn("true", &mut Command::new("true")).unwrap();
        assert!(p.wait_timeout(Duration::from_secs(10)).unwrap().success());
        assert!(p.terminate().is_err());
    }
}
