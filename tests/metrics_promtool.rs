//! The metrics endpoint passes Prometheus' own linter: a real primary and
//! backup run `kv` with `--metrics 127.0.0.1:0` (each logs the port it
//! picked), serve some Redis traffic, and both endpoints, scraped while the
//! pair runs, must pass `promtool check metrics` (Debian's `prometheus`
//! package) and carry the values the traffic implies: role gauges, the same
//! epoch, records sent and acknowledged, records replayed by the backup, a
//! lag histogram whose `+Inf` bucket equals its count. The OpenMetrics form
//! (asked for with `Accept`) must agree and end with `# EOF`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Panics unless `promtool` runs: the test must not pass without it.
fn require_promtool() {
    match Command::new("promtool").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`promtool --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "promtool is not installed ({e}): install Debian's `prometheus` package \
             (apt-get install --no-install-recommends prometheus), or run tests/run.sh, \
             which installs what the suite needs"
        ),
    }
}

/// `promtool check metrics` on `text`: (success, everything it printed).
fn promtool_check(text: &str) -> (bool, String) {
    let o = run_bounded(
        Command::new("promtool").args(["check", "metrics"]),
        Some(text.as_bytes()),
        LIMIT,
    );
    (o.status.success(), format!("{}{}", stdout(&o), stderr(&o)))
}

/// A `duet` process whose stderr is read line by line as it comes.
struct Live {
    guard: Guard,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Live {
    fn start(cmd: &mut Command) -> Live {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("DUET_LOG", "warn,vmm::ft=info");
        let mut child = cmd.spawn().expect("spawn duet");
        let err = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        let log = Arc::new(Mutex::new(String::new()));
        let all = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push_str(&line);
                all.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        Live {
            guard: Guard(child),
            lines,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The address in the `metrics: serving on ADDR` line.
    fn metrics_addr(&self) -> SocketAddr {
        let end = Instant::now() + LIMIT;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Some((_, rest)) = line.split_once("metrics: serving on ") {
                let addr = rest.split_whitespace().next().unwrap_or("");
                return addr
                    .parse()
                    .unwrap_or_else(|e| panic!("bad address {addr:?} in {line:?}: {e}"));
            }
        }
        panic!("no `metrics: serving on` line; stderr:\n{}", self.log())
    }

    /// Sends SIGTERM and waits for the exit code.
    fn stop(&mut self) -> Option<i32> {
        send_signal(self.guard.0.id(), libc::SIGTERM);
        self.guard.wait_timeout(LIMIT).and_then(|s| s.code())
    }
}

/// Samples of a Prometheus text exposition, keyed by name and labels as
/// written (`name{k="v",...}`), every line checked for its shape.
fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in sample line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in sample line {line:?}")),
        };
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series in {line:?}"
        );
    }
    samples
}

/// One side's scrape, with lookups that fail loudly.
struct Scrape {
    side: &'static str,
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn take(side: &'static str, addr: SocketAddr) -> Scrape {
        let text = scrape_metrics(addr).unwrap_or_else(|| panic!("the {side}'s {addr} is silent"));
        let samples = parse_samples(&text);
        Scrape {
            side,
            text,
            samples,
        }
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("the {} has no {series}:\n{}", self.side, self.text))
    }
}

/// The OpenMetrics form, asked for as a Prometheus server does.
fn scrape_openmetrics(addr: SocketAddr) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: duet\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

#[test]
fn both_endpoints_pass_promtool() {
    require_promtool();
    if !kvm_available("both_endpoints_pass_promtool") {
        return;
    }
    let (chan, serial) = (free_addr(), free_addr());
    let backup =
        Live::start(backup_cmd("kv", "metrics-promtool", chan).args(["--metrics", "127.0.0.1:0"]));
    let backup_metrics = backup.metrics_addr();
    let primary = Live::start(
        primary_cmd("kv", "metrics-promtool", chan)
            .args(["--serial", &format!("tcp:{serial}")])
            .args(["--metrics", "127.0.0.1:0"]),
    );
    let primary_metrics = primary.metrics_addr();
    assert_ne!(primary_metrics.port(), 0);
    assert_ne!(backup_metrics.port(), 0);
    wait_for_port(serial, LIMIT);

    // Some traffic: 200 SETs and GETs in pipelined batches.
    let mut client = connect(serial, LIMIT);
    client.set_nodelay(true).unwrap();
    for batch in 0..4 {
        let mut input = Vec::new();
        for i in 0..50 {
            let (k, v) = (format!("k{batch}-{i}"), format!("v{i}"));
            input.extend(resp_command(&[b"SET", k.as_bytes(), v.as_bytes()]));
            input.extend(resp_command(&[b"GET", k.as_bytes()]));
        }
        client.write_all(&input).unwrap();
        let replies = read_replies(&mut client, 100, LIMIT);
        for (i, pair) in replies.chunks(2).enumerate() {
            assert_eq!(pair[0], Reply::Simple("OK".into()));
            assert_eq!(pair[1], Reply::bulk(&format!("v{i}")));
        }
    }

    // The backup replays behind the primary: wait until it has replayed
    // something and the primary has seen acknowledgements and lag samples.
    let end = Instant::now() + LIMIT;
    let (p, b) = loop {
        let p = Scrape::take("primary", primary_metrics);
        let b = Scrape::take("backup", backup_metrics);
        let ready = b.get("duet_records_replayed_total") > 0.0
            && p.get("duet_records_acked_total") > 0.0
            && p.get("duet_lag_seconds_count") > 0.0;
        if ready || Instant::now() >= end {
            break (p, b);
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    let mut failed = Vec::new();
    for s in [&p, &b] {
        let (ok, out) = promtool_check(&s.text);
        eprintln!(
            "promtool check metrics, {}: {} {}",
            s.side,
            if ok { "passed" } else { "FAILED" },
            if out.is_empty() {
                "(no output)"
            } else {
                out.trim_end()
            }
        );
        if !ok {
            failed.push(format!("{}:\n{out}\nscraped text:\n{}", s.side, s.text));
        }
    }
    assert!(
        failed.is_empty(),
        "promtool check metrics failed on {}",
        failed.join("\n")
    );

    // Roles.
    assert_eq!(p.get("duet_role{role=\"primary\"}"), 1.0);
    assert_eq!(p.get("duet_role{role=\"backup\"}"), 0.0);
    assert_eq!(b.get("duet_role{role=\"backup\"}"), 1.0);
    assert_eq!(b.get("duet_role{role=\"primary\"}"), 0.0);
    // One pair, one epoch; nobody claims.
    assert!(p.get("duet_epoch") >= 1.0, "{}", p.text);
    assert_eq!(p.get("duet_epoch"), b.get("duet_epoch"));
    assert_eq!(p.get("duet_arbiter_state"), 0.0);
    assert_eq!(b.get("duet_arbiter_state"), 0.0);
    assert_eq!(p.get("duet_channel_failed"), 0.0);
    assert_eq!(b.get("duet_channel_failed"), 0.0);
    // The log: sent, acknowledged, received, replayed.
    let (sent, acked) = (
        p.get("duet_records_sent_total"),
        p.get("duet_records_acked_total"),
    );
    assert!(
        sent > 0.0 && acked > 0.0 && acked <= sent,
        "sent {sent} acked {acked}"
    );
    let (received, replayed) = (
        b.get("duet_records_sent_total"),
        b.get("duet_records_replayed_total"),
    );
    assert!(replayed > 0.0, "the backup replayed nothing:\n{}", b.text);
    assert!(
        replayed <= received,
        "replayed {replayed} > received {received}"
    );
    assert!(p.get("duet_log_bytes_total") > 0.0);
    assert!(b.get("duet_log_bytes_total") > 0.0);
    assert!(p.get("duet_outputs_held") >= 0.0);
    assert!(p.get("duet_oldest_output_held_seconds") >= 0.0);
    // The lag histogram: samples on the primary, buckets consistent.
    let count = p.get("duet_lag_seconds_count");
    assert!(count > 0.0, "no lag samples:\n{}", p.text);
    assert_eq!(p.get("duet_lag_seconds_bucket{le=\"+Inf\"}"), count);
    assert!(p.get("duet_lag_seconds_bucket{le=\"0.0001\"}") <= count);
    assert!(p.get("duet_lag_seconds_sum") >= 0.0);

    // The OpenMetrics form of the same registry.
    let (head, om) = scrape_openmetrics(primary_metrics);
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE duet_records_sent counter\n"), "{om}");
    let om_samples = parse_samples(&om);
    assert_eq!(om_samples.get("duet_role{role=\"primary\"}"), Some(&1.0));
    assert!(om_samples
        .get("duet_records_sent_total")
        .is_some_and(|&v| v >= sent));

    let mut primary = primary;
    assert_eq!(primary.stop(), Some(0), "primary:\n{}", primary.log());
    let mut backup = backup;
    let code = backup.guard.wait_timeout(LIMIT).and_then(|s| s.code());
    assert_eq!(code, Some(0), "backup:\n{}", backup.log());
}
