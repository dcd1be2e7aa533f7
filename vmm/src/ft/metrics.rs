//! Status of a fault-tolerant pair: counters shared by the vCPU thread, the
//! log channel and the output gate, served as Prometheus text over HTTP on
//! an opt-in address, and summarised in a periodic log line.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logchannel::channel::LinkState;

/// Lag samples kept for the percentiles.
const LAG_WINDOW: usize = 4096;

/// Errors starting the status endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve metrics on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Which end this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

/// Where this process stands with the arbiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ArbiterState {
    /// Paired; nothing to claim.
    Paired = 0,
    /// Lost the peer; claiming (retrying while the arbiter is unreachable).
    Claiming = 1,
    /// Won: running alone.
    Won = 2,
    /// Lost: halting.
    Lost = 3,
}

/// The counters of one process of the pair.
pub struct Metrics {
    role: Mutex<Role>,
    epoch: AtomicU64,
    started: Instant,
    link: Mutex<Option<Arc<LinkState>>>,
    /// Records appended (primary) or replayed (backup).
    pub seq: AtomicU64,
    /// The backup's replayed events.
    pub replayed: AtomicU64,
    /// Outputs waiting for the backup's acknowledgement.
    pub outputs_held: AtomicU64,
    /// Age in microseconds of the oldest held output, updated by the gate.
    pub oldest_held_us: AtomicU64,
    lag_us: Mutex<VecDeque<u64>>,
    /// An [`ArbiterState`] as a number.
    pub arbiter: AtomicU64,
}

impl Metrics {
    pub fn new(role: Role, epoch: u64) -> Arc<Self> {
        Arc::new(Metrics {
            role: Mutex::new(role),
            epoch: AtomicU64::new(epoch),
            started: Instant::now(),
            link: Mutex::new(None),
            seq: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            outputs_held: AtomicU64::new(0),
            oldest_held_us: AtomicU64::new(0),
            lag_us: Mutex::new(VecDeque::with_capacity(LAG_WINDOW)),
            arbiter: AtomicU64::new(ArbiterState::Paired as u64),
        })
    }

    pub fn set_link(&self, link: Arc<LinkState>) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
    }

    pub fn set_role(&self, role: Role) {
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
    }

    /// Records one execution-lag sample.
    pub fn record_lag(&self, lag: Duration) {
        let mut w = self.lag_us.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() == LAG_WINDOW {
            w.pop_front();
        }
        w.push_back(lag.as_micros() as u64);
    }

    /// (p50, p99) of the recent lag samples, in microseconds.
    pub fn lag_percentiles(&self) -> Option<(u64, u64)> {
        let mut v: Vec<u64> = self
            .lag_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.50), at(0.99)))
    }

    /// Log throughput since start, in Mbit/s.
    pub fn log_mbit_per_s(&self) -> f64 {
        let bytes = self.link_counters().map_or(0, |c| c.record_bytes);
        bytes as f64 * 8.0 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn link_counters(&self) -> Option<logchannel::channel::LinkCounters> {
        self.link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.snapshot())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let role = *self.role.lock().unwrap_or_else(|e| e.into_inner());
        let c = self.link_counters().unwrap_or_default();
        let mut s = String::new();
        let mut g = |name: &str, help: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let role_name = match role {
            Role::Primary => "primary",
            Role::Backup => "backup",
        };
        g(
            &format!("duet_role{{role=\"{role_name}\"}}"),
            "this process's role",
            "1".into(),
        );
        g(
            "duet_epoch",
            "pairing epoch",
            self.epoch.load(Ordering::Relaxed).to_string(),
        );
        g(
            "duet_seq_sent",
            "log records appended (primary) or received (backup)",
            match role {
                Role::Primary => self.seq.load(Ordering::Relaxed),
                Role::Backup => c.records,
            }
            .to_string(),
        );
        g(
            "duet_seq_acked",
            "log records acknowledged by the backup",
            c.acked.to_string(),
        );
        g(
            "duet_seq_replayed",
            "log records replayed by the backup",
            self.replayed.load(Ordering::Relaxed).to_string(),
        );
        g(
            "duet_replayed_exit",
            "the backup's executed position (synchronous exits)",
            c.replayed_exit.to_string(),
        );
        let (p50, p99) = self.lag_percentiles().unwrap_or((0, 0));
        g(
            "duet_lag_p50_seconds",
            "execution lag, median",
            format!("{:.6}", p50 as f64 / 1e6),
        );
        g(
            "duet_lag_p99_seconds",
            "execution lag, 99th percentile",
            format!("{:.6}", p99 as f64 / 1e6),
        );
        g(
            "duet_log_bytes_total",
            "bytes of log records sent or received",
            c.record_bytes.to_string(),
        );
        g(
            "duet_log_mbit_per_second",
            "average log throughput since start",
            format!("{:.3}", self.log_mbit_per_s()),
        );
        g(
            "duet_outputs_held",
            "outputs waiting for the backup's acknowledgement",
            self.outputs_held.load(Ordering::Relaxed).to_string(),
        );
        g(
            "duet_oldest_output_held_seconds",
            "age of the oldest held output",
            format!(
                "{:.6}",
                self.oldest_held_us.load(Ordering::Relaxed) as f64 / 1e6
            ),
        );
        g(
            "duet_arbiter_state",
            "0 paired, 1 claiming (arbiter unreachable or answering), 2 won and alone, 3 lost",
            self.arbiter.load(Ordering::Relaxed).to_string(),
        );
        g(
            "duet_channel_failed",
            "1 once the log channel failed",
            u8::from(c.failure.is_some()).to_string(),
        );
        s
    }

    /// The periodic one-line summary.
    pub fn summary(&self) -> String {
        let c = self.link_counters().unwrap_or_default();
        let (p50, p99) = self.lag_percentiles().unwrap_or((0, 0));
        format!(
            "seq {} acked {} replayed-exit {} lag p50 {:.1} ms p99 {:.1} ms log {:.2} Mbit/s held {}",
            self.seq.load(Ordering::Relaxed).max(c.records),
            c.acked,
            c.replayed_exit,
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            self.log_mbit_per_s(),
            self.outputs_held.load(Ordering::Relaxed)
        )
    }
}

/// Serves `metrics` as Prometheus text on `addr`, on a thread of its own.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let body = metrics.render();
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|source| Error::Listen { addr, source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_percentiles() {
        let m = Metrics::new(Role::Primary, 3);
        for ms in 1..=100 {
            m.record_lag(Duration::from_millis(ms));
        }
        let (p50, p99) = m.lag_percentiles().unwrap();
        assert!((49_000..=51_000).contains(&p50), "{p50}");
        assert_eq!(p99, 99_000);
        let text = m.render();
        assert!(text.contains("duet_role{role=\"primary\"} 1"));
        assert!(text.contains("duet_epoch 3"));
        assert!(text.contains("# TYPE duet_lag_p99_seconds gauge"));
    }

    #[test]
    fn serves_over_http() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        serve(addr, Metrics::new(Role::Backup, 1)).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.0 200 OK"));
        assert!(text.contains("duet_role{role=\"backup\"} 1"));
    }
}
