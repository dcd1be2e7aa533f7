//! Status of a fault-tolerant pair: metrics shared by the vCPU thread, the
//! log channel and the output gate, kept in a `prometheus-client`
//! [`Registry`], served over HTTP on an opt-in address, and summarised in a
//! periodic log line.
//!
//! The endpoint speaks both exposition formats the crate encodes: the
//! OpenMetrics text format to a client whose `Accept` header asks for
//! `application/openmetrics-text` (as a Prometheus server does), and the
//! Prometheus text format 0.0.4 to everyone else (`curl`, `promtool check
//! metrics`, whose parser reads only 0.0.4: an OpenMetrics counter's
//! `# TYPE foo` / `foo_total` split reads to it as two families).
//!
//! Exported (names as in the 0.0.4 format):
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `duet_role{role="primary"\|"backup"}` | gauge | 1 for this process's role, 0 for the other |
//! | `duet_epoch` | gauge | pairing epoch |
//! | `duet_arbiter_state` | gauge | 0 paired, 1 claiming, 2 won and alone, 3 lost |
//! | `duet_outputs_held` | gauge | outputs waiting for the backup's acknowledgement |
//! | `duet_oldest_output_held_seconds` | gauge | age of the oldest held output |
//! | `duet_channel_failed` | gauge | 1 once the log channel failed |
//! | `duet_log_mbit_per_second` | gauge | average log throughput since start |
//! | `duet_records_sent_total` | counter | log records appended (primary) or received (backup) |
//! | `duet_records_acked_total` | counter | log records acknowledged by the backup |
//! | `duet_records_replayed_total` | counter | log records replayed by the backup |
//! | `duet_replayed_exits_total` | counter | the backup's executed position, in synchronous exits |
//! | `duet_log_bytes_total` | counter | bytes of log records sent or received |
//! | `duet_lag_seconds` | histogram | execution lag of the backup behind the primary |
//! | `duet_output_rule_seconds` | histogram | primary: an output produced until the gate handed it to its backend |
//! | `duet_output_log_write_seconds` | histogram | primary: an output produced until the batch with its records was written to the channel |
//! | `duet_output_ack_seconds` | histogram | primary: that batch written until the ack covering it was read |
//! | `duet_output_release_seconds` | histogram | primary: that ack read until the output was handed to its backend |
//! | `duet_ack_turnaround_seconds` | histogram | backup: a batch's last byte read until its ack was written |
//! | `duet_throttle_seconds_total` | counter | primary: time the guest waited for the backup to catch up (the lag bound) |
//! | `duet_peer_silence_max_seconds` | gauge | the longest this side waited for the peer's next bytes (the failure timeout's margin) |

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logchannel::channel::{LinkCounters, LinkState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds of the execution-lag histogram's buckets, in seconds:
/// 100 µs to 1 s in 1-2.5-5 steps (a slower lag lands in `+Inf`).
pub const LAG_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Upper bounds of the Output Rule stage histograms' buckets, in seconds:
/// fine from 10 µs to a few ms, where the stages of a healthy pair fall,
/// then coarse up to 1 s.
pub const STAGE_BUCKETS: [f64; 22] = [
    0.00001, 0.00002, 0.00003, 0.00004, 0.00005, 0.000075, 0.0001, 0.000125, 0.00015, 0.0002,
    0.00025, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.1, 1.0,
];

/// The stages of an output's path under the Output Rule, each a histogram
/// (see the module docs), so that the cost of each hand-off can be seen
/// rather than guessed at.
#[derive(Clone)]
struct Stages {
    total: Histogram,
    log_write: Histogram,
    ack: Histogram,
    release: Histogram,
    turnaround: Histogram,
}

impl Stages {
    fn register(registry: &mut Registry) -> Stages {
        let mut one = |name: &str, help: &str| {
            let h = Histogram::new(STAGE_BUCKETS);
            registry.register_with_unit(name, help, Unit::Seconds, h.clone());
            h
        };
        Stages {
            total: one(
                "duet_output_rule",
                "Primary: an output produced until the gate handed it to its backend",
            ),
            log_write: one(
                "duet_output_log_write",
                "Primary: an output produced until the batch with its records was written to the channel",
            ),
            ack: one(
                "duet_output_ack",
                "Primary: the batch with an output's records written until the ack covering it was read",
            ),
            release: one(
                "duet_output_release",
                "Primary: the ack covering an output read until the output was handed to its backend",
            ),
            turnaround: one(
                "duet_ack_turnaround",
                "Backup: a batch's last byte read until its ack was written",
            ),
        }
    }
}

/// Where an output's time under the Output Rule went, for
/// [`Metrics::record_output`].
#[derive(Debug, Clone, Copy)]
pub struct OutputStages {
    /// Produced until the batch carrying its records was written.
    pub log_write: Duration,
    /// That write until the ack covering it was read.
    pub ack: Duration,
    /// That ack until the output was handed to its backend.
    pub release: Duration,
}

/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

impl Role {
    fn label(self) -> [(&'static str, &'static str); 1] {
        [("role", self.name())]
    }

    /// "primary" or "backup".
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// Where this process stands with the arbiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
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

type RoleFamily = Family<[(&'static str, &'static str); 1], Gauge>;

/// The metrics of one process of the pair.
pub struct Metrics {
    registry: Registry,
    role: Mutex<Role>,
    roles: RoleFamily,
    epoch: Gauge,
    arbiter: Gauge,
    outputs_held: Gauge,
    oldest_held: Gauge<f64, AtomicU64>,
    replayed: Arc<AtomicU64>,
    lag: Histogram,
    /// The lag histogram's buckets again (not cumulative; the last one is
    /// `+Inf`), for [`Metrics::summary`]: the crate does not expose a
    /// histogram's bucket counts, and a second set of atomics is cheaper
    /// and more faithful than a window of samples.
    lag_counts: [AtomicU64; LAG_BUCKETS.len() + 1],
    link: Arc<LinkCollector>,
    digest_matched: Gauge<f64, AtomicU64>,
    joins: Counter,
    throttle: Counter<f64, AtomicU64>,
    join_blackout: Gauge<f64, AtomicU64>,
    join_seconds: Gauge<f64, AtomicU64>,
    join_bytes: Gauge,
    events: std::sync::OnceLock<super::events::EventLog>,
    stages: Stages,
}

/// What the log channel counts, read at each scrape.
#[derive(Debug)]
struct LinkCollector {
    started: Instant,
    link: Mutex<Option<Arc<LinkState>>>,
    /// Records appended by the primary (its next sequence number).
    seq: AtomicU64,
    /// Records replayed by the backup.
    replayed: Arc<AtomicU64>,
    /// Log bytes of the links before the current one: each pairing has a
    /// new link whose counters start at zero, and a `_total` counter must
    /// not go back while the process runs.
    earlier_bytes: AtomicU64,
}

impl LinkCollector {
    fn counters(&self) -> LinkCounters {
        let mut c: LinkCounters = self
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.snapshot())
            .unwrap_or_default();
        c.record_bytes += self.earlier_bytes.load(Ordering::Relaxed);
        c
    }

    /// Appended (primary) or received (backup); the larger one, so that the
    /// count never goes back when a backup takes over as primary.
    fn records_sent(&self, c: &LinkCounters) -> u64 {
        self.seq.load(Ordering::Relaxed).max(c.records)
    }

    fn mbit_per_s(&self, c: &LinkCounters) -> f64 {
        c.record_bytes as f64 * 8.0 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

impl Collector for LinkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.counters();
        let counters: [(&str, &str, Option<Unit>, u64); 5] = [
            (
                "duet_records_sent",
                "Log records appended (primary) or received (backup).",
                None,
                self.records_sent(&c),
            ),
            (
                "duet_records_acked",
                "Log records acknowledged by the backup.",
                None,
                c.acked,
            ),
            (
                "duet_records_replayed",
                "Log records replayed by the backup.",
                None,
                self.replayed.load(Ordering::Relaxed),
            ),
            (
                "duet_replayed_exits",
                "The backup's executed position, in synchronous exits, as last reported.",
                None,
                c.replayed_exit,
            ),
            (
                "duet_log",
                "Bytes of log records sent or received.",
                Some(Unit::Bytes),
                c.record_bytes,
            ),
        ];
        for (name, help, unit, value) in counters {
            let counter = ConstCounter::new(value);
            let m = encoder.encode_descriptor(name, help, unit.as_ref(), counter.metric_type())?;
            counter.encode(m)?;
        }
        let failed = ConstGauge::new(i64::from(c.failure.is_some()));
        failed.encode(encoder.encode_descriptor(
            "duet_channel_failed",
            "1 once the log channel failed.",
            None,
            failed.metric_type(),
        )?)?;
        let mbit = ConstGauge::new(self.mbit_per_s(&c));
        mbit.encode(encoder.encode_descriptor(
            "duet_log_mbit_per_second",
            "Average log throughput since start, in Mbit/s.",
            None,
            mbit.metric_type(),
        )?)?;
        let silence = self
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0.0, |l| l.longest_wait().as_secs_f64());
        let silence = ConstGauge::new(silence);
        silence.encode(encoder.encode_descriptor(
            "duet_peer_silence_max",
            "The longest this side waited for the peer's next bytes, in seconds (the failure timeout's margin).",
            Some(&Unit::Seconds),
            silence.metric_type(),
        )?)?;
        Ok(())
    }
}

impl Metrics {
    pub fn new(role: Role, epoch: u64) -> Arc<Self> {
        let mut registry = Registry::default();
        let roles = RoleFamily::default();
        for r in [Role::Primary, Role::Backup] {
            roles.get_or_create(&r.label()).set(i64::from(r == role));
        }
        registry.register(
            "duet_role",
            "1 for this process's role (primary or backup), 0 for the other",
            roles.clone(),
        );
        let epoch_gauge = Gauge::default();
        epoch_gauge.set(i64::try_from(epoch).unwrap_or(i64::MAX));
        registry.register("duet_epoch", "Pairing epoch", epoch_gauge.clone());
        let arbiter = Gauge::default();
        arbiter.set(ArbiterState::Paired as i64);
        registry.register(
            "duet_arbiter_state",
            "0 paired, 1 claiming (arbiter unreachable or answering), 2 won and alone, 3 lost",
            arbiter.clone(),
        );
        let outputs_held = Gauge::default();
        registry.register(
            "duet_outputs_held",
            "Outputs waiting for the backup's acknowledgement",
            outputs_held.clone(),
        );
        let oldest_held = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "duet_oldest_output_held",
            "Age of the oldest held output",
            Unit::Seconds,
            oldest_held.clone(),
        );
        let lag = Histogram::new(LAG_BUCKETS);
        registry.register_with_unit(
            "duet_lag",
            "Execution lag: how long after the primary the backup executed the same point",
            Unit::Seconds,
            lag.clone(),
        );
        let replayed = Arc::<AtomicU64>::default();
        let link = Arc::new(LinkCollector {
            started: Instant::now(),
            link: Mutex::new(None),
            seq: AtomicU64::new(0),
            replayed: replayed.clone(),
            earlier_bytes: AtomicU64::new(0),
        });
        registry.register_collector(Box::new(link.clone()));
        let digest_matched = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "duet_last_digest_match_timestamp_seconds",
            "When the backup last found its state digest equal to the primary's (Unix time; 0: not yet)",
            digest_matched.clone(),
        );
        let joins = Counter::default();
        registry.register(
            "duet_joins",
            "Backups that joined this running VM (re-protection)",
            joins.clone(),
        );
        let throttle = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "duet_throttle",
            "Primary: time the guest waited for the backup's replay to catch up (the execution-lag bound)",
            Unit::Seconds,
            throttle.clone(),
        );
        let join_blackout = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "duet_join_blackout",
            "How long the guest paused for the last join's handover",
            Unit::Seconds,
            join_blackout.clone(),
        );
        let join_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "duet_join_duration",
            "From the last joiner's arrival to protection (or, on a joiner, to resuming)",
            Unit::Seconds,
            join_seconds.clone(),
        );
        let join_bytes = Gauge::default();
        registry.register_with_unit(
            "duet_join_transferred",
            "State bytes the last join sent (or received)",
            Unit::Bytes,
            join_bytes.clone(),
        );
        let stages = Stages::register(&mut registry);
        Arc::new(Metrics {
            stages,
            registry,
            role: Mutex::new(role),
            roles,
            epoch: epoch_gauge,
            arbiter,
            outputs_held,
            oldest_held,
            replayed,
            lag,
            lag_counts: std::array::from_fn(|_| AtomicU64::new(0)),
            link,
            digest_matched,
            joins,
            throttle,
            join_blackout,
            join_seconds,
            join_bytes,
            events: std::sync::OnceLock::new(),
        })
    }

    /// Where [`Metrics::event`] writes; only the first call takes effect.
    pub fn set_events(&self, log: super::events::EventLog) {
        let _ = self.events.set(log);
    }

    /// Records a state change in the event log, if there is one.
    pub fn event(&self, event: super::events::Event) {
        if let Some(log) = self.events.get() {
            log.emit(self.role().name(), event);
        }
    }

    /// A join finished: the figures of its state transfer. `blackout` is
    /// the survivor's pause (zero on a joiner).
    pub fn join_done(&self, blackout: Duration, total: Duration, bytes: u64) {
        self.joins.inc();
        self.join_blackout.set(blackout.as_secs_f64());
        self.join_seconds.set(total.as_secs_f64());
        self.join_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The backup's digest matched the primary's just now.
    pub fn digest_matched(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.digest_matched.set(now);
    }

    pub fn set_link(&self, link: Arc<LinkState>) {
        // The backup times its acks on its channel thread; the primary's
        // stages are timed by its gate.
        let turnaround = self.stages.turnaround.clone();
        link.on_ack_sent(Box::new(move |d| turnaround.observe(d.as_secs_f64())));
        let mut current = self.link.link.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = current.replace(link) {
            let bytes = old.snapshot().record_bytes;
            self.link.earlier_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn set_role(&self, role: Role) {
        let mut current = self.role.lock().unwrap_or_else(|e| e.into_inner());
        self.roles.get_or_create(&current.label()).set(0);
        self.roles.get_or_create(&role.label()).set(1);
        *current = role;
    }

    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pairing epoch, once known (a backup learns it from the primary).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }

    pub fn epoch(&self) -> u64 {
        u64::try_from(self.epoch.get()).unwrap_or(0)
    }

    /// Where this process stands with the arbiter.
    pub fn set_arbiter(&self, state: ArbiterState) {
        self.arbiter.set(state as i64);
    }

    /// The primary's next sequence number: records appended so far.
    pub fn set_seq(&self, next_seq: u64) {
        self.link.seq.fetch_max(next_seq, Ordering::Relaxed);
    }

    /// The backup replayed one more record.
    pub fn replayed_inc(&self) {
        self.replayed.fetch_add(1, Ordering::Relaxed);
    }

    /// The primary's guest waited `waited` for the backup to catch up.
    pub fn throttled(&self, waited: Duration) {
        self.throttle.inc_by(waited.as_secs_f64());
    }

    /// One more output waits for the backup's acknowledgement.
    pub fn outputs_held_inc(&self) {
        self.outputs_held.inc();
    }

    /// One held output was released.
    pub fn outputs_held_dec(&self) {
        self.outputs_held.dec();
    }

    pub fn outputs_held(&self) -> u64 {
        u64::try_from(self.outputs_held.get()).unwrap_or(0)
    }

    /// Age of the oldest held output (zero when none is held).
    pub fn set_oldest_held(&self, age: Duration) {
        self.oldest_held.set(age.as_secs_f64());
    }

    /// Records how long one output was held, and where the time went when
    /// the gate could tell (`stages`).
    pub fn record_output(&self, total: Duration, stages: Option<OutputStages>) {
        self.stages.total.observe(total.as_secs_f64());
        if let Some(s) = stages {
            self.stages.log_write.observe(s.log_write.as_secs_f64());
            self.stages.ack.observe(s.ack.as_secs_f64());
            self.stages.release.observe(s.release.as_secs_f64());
        }
    }

    /// Records one ack's turnaround on the backup.
    pub fn record_ack_turnaround(&self, d: Duration) {
        self.stages.turnaround.observe(d.as_secs_f64());
    }

    /// Records one execution-lag sample.
    pub fn record_lag(&self, lag: Duration) {
        let s = lag.as_secs_f64();
        self.lag.observe(s);
        let bucket = LAG_BUCKETS
            .iter()
            .position(|&le| s <= le)
            .unwrap_or(LAG_BUCKETS.len());
        self.lag_counts[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Approximate (p50, p99) of the lag since start, in microseconds,
    /// interpolated within the histogram's buckets as PromQL's
    /// `histogram_quantile` does; `None` before the first sample.
    pub fn lag_percentiles(&self) -> Option<(u64, u64)> {
        let mut total = 0.0;
        let cumulative: Vec<(f64, f64)> = LAG_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.lag_counts)
            .map(|(le, n)| {
                total += n.load(Ordering::Relaxed) as f64;
                (le, total)
            })
            .collect();
        let us = |q| bucket_quantile(&cumulative, q).map(|s| (s * 1e6).round() as u64);
        Some((us(0.50)?, us(0.99)?))
    }

    /// Log throughput since start, in Mbit/s.
    pub fn log_mbit_per_s(&self) -> f64 {
        self.link.mbit_per_s(&self.link.counters())
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut s, &self.registry);
        s
    }

    /// The OpenMetrics text exposition.
    pub fn render_openmetrics(&self) -> String {
        let mut s = String::new();
        let _ = text::encode(&mut s, &self.registry);
        s
    }

    /// The periodic one-line summary.
    pub fn summary(&self) -> String {
        let c = self.link.counters();
        let (p50, p99) = self.lag_percentiles().unwrap_or((0, 0));
        format!(
            "seq {} acked {} replayed-exit {} lag p50 {:.1} ms p99 {:.1} ms log {:.2} Mbit/s held {}",
            self.link.records_sent(&c),
            c.acked,
            c.replayed_exit,
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            self.link.mbit_per_s(&c),
            self.outputs_held()
        )
    }
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count)
/// pairs in increasing order, the last bound `+Inf`: linear interpolation
/// inside the bucket holding the rank, with 0 as the first bucket's lower
/// bound; a rank in `+Inf` gives the highest finite bound. `None` if the
/// histogram is empty.
pub fn bucket_quantile(cumulative: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in cumulative {
        if count >= rank && count > lower.1 {
            if le.is_infinite() {
                return Some(lower.0);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / (count - lower.1));
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// Serves `metrics` over HTTP (`GET /metrics`) on `addr`, on a thread of
/// its own, and returns the address it is bound to (so that port 0 picks a
/// free one), which it also logs as `metrics: serving on ADDR`.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            logchannel::sched::keep_off_vcpu();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                answer(stream, &metrics);
            }
        })
        .map_err(|source| Error::Listen { addr, source })?;
    tracing::info!("metrics: serving on {bound}");
    Ok(bound)
}

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Answers one HTTP request.
fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.lines();
    let mut request = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept")
                && v.to_ascii_lowercase()
                    .contains("application/openmetrics-text")
        })
    });
    let (status, content_type, body) = match (method, path.split('?').next()) {
        ("GET", Some("/metrics")) if openmetrics => (
            "200 OK",
            OPENMETRICS_CONTENT_TYPE,
            metrics.render_openmetrics(),
        ),
        ("GET", Some("/metrics")) => ("200 OK", prometheus_text::CONTENT_TYPE, metrics.render()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let mut response = String::with_capacity(body.len() + 128);
    let _ = write!(
        response,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of sample `name` (labels included, exactly) in `text`.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A primary link on loopback that has sent `bytes` bytes of log.
    fn link_that_sent(bytes: u64) -> (Arc<LinkState>, std::thread::JoinHandle<()>) {
        use crate::ft::test_hello as hello;
        use logchannel::channel::{BackupLink, ChannelConfig, PrimaryLink, Role as LinkRole};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backup = std::thread::spawn(move || {
            let cfg = ChannelConfig::default();
            let mut b = BackupLink::accept_on(listener, hello(LinkRole::Backup), cfg, |_| {});
            while b.as_mut().unwrap().recv().unwrap().is_some() {}
        });
        let timeout = Duration::from_secs(5);
        let cfg = ChannelConfig::default();
        let p = PrimaryLink::connect(addr, hello(LinkRole::Primary), cfg, timeout).unwrap();
        let rec = logchannel::Record {
            seq: 0,
            pos: logchannel::Position::default(),
            event: logchannel::Event::TimerTick,
        };
        let mut frames = Vec::new();
        logchannel::encode_frame(&rec, &mut frames).unwrap();
        p.send(frames, 1, bytes, true).unwrap();
        let state = p.state();
        p.close(timeout).unwrap();
        (state, backup)
    }

    #[test]
    fn log_bytes_never_go_back_when_a_new_backup_pairs() {
        let m = Metrics::new(Role::Primary, 1);
        let (first, b1) = link_that_sent(100);
        m.set_link(first);
        assert_eq!(sample(&m.render(), "duet_log_bytes_total"), Some(100.0));
        let (second, b2) = link_that_sent(40);
        m.set_link(second);
        assert_eq!(sample(&m.render(), "duet_log_bytes_total"), Some(140.0));
        b1.join().unwrap();
        b2.join().unwrap();
    }

    #[test]
    fn percentiles_from_the_buckets() {
        let m = Metrics::new(Role::Primary, 3);
        assert_eq!(m.lag_percentiles(), None);
        for ms in 1..=100 {
            m.record_lag(Duration::from_millis(ms));
        }
        let (p50, p99) = m.lag_percentiles().unwrap();
        // True p50 50 ms lies in (25 ms, 50 ms]; p99 99 ms in (50 ms, 100 ms].
        assert!((25_000..=50_000).contains(&p50), "{p50}");
        assert!((50_000..=100_000).contains(&p99), "{p99}");
        // The same quantiles from the scraped text.
        let text = crate::kit::metrics::Metrics::parse(&m.render()).unwrap();
        let from_text = text.quantile("duet_lag_seconds", 0.5).unwrap();
        assert!(
            (from_text * 1e6 - p50 as f64).abs() < 1.0,
            "{from_text} {p50}"
        );
        // Only what came after a first scrape: 100 samples of 2 s, in +Inf.
        for _ in 0..100 {
            m.record_lag(Duration::from_secs(2));
        }
        let later = crate::kit::metrics::Metrics::parse(&m.render()).unwrap();
        let p = |q| later.quantile_since(&text, "duet_lag_seconds", q);
        assert_eq!(p(0.01), Some(1.0));
        assert_eq!(later.quantile_since(&later, "duet_lag_seconds", 0.5), None);
        assert!(m.summary().contains("lag p50 "), "{}", m.summary());
    }

    #[test]
    fn quantile_edges() {
        let inf = f64::INFINITY;
        assert_eq!(bucket_quantile(&[(1.0, 0.0), (inf, 0.0)], 0.5), None);
        assert_eq!(bucket_quantile(&[(1.0, 4.0), (inf, 4.0)], 0.5), Some(0.5));
        // Everything above the last finite bound: that bound.
        assert_eq!(bucket_quantile(&[(1.0, 0.0), (inf, 3.0)], 0.99), Some(1.0));
        assert_eq!(
            bucket_quantile(&[(1.0, 2.0), (2.0, 2.0), (4.0, 4.0), (inf, 4.0)], 0.75),
            Some(3.0)
        );
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new(Role::Backup, 3);
        m.replayed_inc();
        m.replayed_inc();
        m.outputs_held_inc();
        m.outputs_held_inc();
        m.outputs_held_dec();
        m.set_arbiter(ArbiterState::Claiming);
        m.set_oldest_held(Duration::from_millis(1500));
        m.record_lag(Duration::from_micros(300));
        let text = m.render();
        assert_eq!(sample(&text, "duet_role{role=\"backup\"}"), Some(1.0));
        assert_eq!(sample(&text, "duet_role{role=\"primary\"}"), Some(0.0));
        assert_eq!(sample(&text, "duet_epoch"), Some(3.0));
        assert_eq!(sample(&text, "duet_records_replayed_total"), Some(2.0));
        assert_eq!(sample(&text, "duet_records_sent_total"), Some(0.0));
        assert_eq!(sample(&text, "duet_log_bytes_total"), Some(0.0));
        assert_eq!(sample(&text, "duet_outputs_held"), Some(1.0));
        assert_eq!(sample(&text, "duet_arbiter_state"), Some(1.0));
        assert_eq!(sample(&text, "duet_oldest_output_held_seconds"), Some(1.5));
        assert_eq!(sample(&text, "duet_lag_seconds_count"), Some(1.0));
        assert_eq!(
            sample(&text, "duet_lag_seconds_bucket{le=\"0.00025\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "duet_lag_seconds_bucket{le=\"0.0005\"}"),
            Some(1.0)
        );
        assert!(text.contains("# TYPE duet_records_replayed_total counter\n"));
        assert!(text.contains("# TYPE duet_lag_seconds histogram\n"));

        m.set_role(Role::Primary);
        m.set_seq(7);
        let text = m.render();
        assert_eq!(sample(&text, "duet_role{role=\"backup\"}"), Some(0.0));
        assert_eq!(sample(&text, "duet_role{role=\"primary\"}"), Some(1.0));
        assert_eq!(sample(&text, "duet_records_sent_total"), Some(7.0));

        let om = m.render_openmetrics();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE duet_records_replayed counter\n"));
        assert_eq!(sample(&om, "duet_records_replayed_total"), Some(2.0));
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn serves_both_formats_over_http_on_a_picked_port() {
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Metrics::new(Role::Backup, 1),
        )
        .unwrap();
        assert_ne!(addr.port(), 0);

        let text = get(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(sample(body, "duet_role{role=\"backup\"}"), Some(1.0));

        let om = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        );
        assert!(
            om.contains(&format!("Content-Type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");

        assert!(get(addr, "GET /other HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
    }
}
