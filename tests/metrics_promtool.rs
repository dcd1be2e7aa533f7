//! The metrics endpoint passes Prometheus' own linter: a real primary and
//! backup run `kv` with `--metrics 127.0.0.1:0` (each logs the port it
//! picked), serve some Redis traffic, and both endpoints, scraped while the
//! pair runs, must pass `promtool check metrics` (Debian's `prometheus`
//! package) and carry the values the traffic implies: role gauges, the same
//! epoch, records sent and acknowledged, records replayed by the backup, a
//! lag histogram whose `+Inf` bucket equals its count. The OpenMetrics form
//! (asked for with `Accept`) must agree and end with `# EOF`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
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

/// The address in a side's `metrics: serving on ADDR` log line.
fn metrics_addr(p: &mut Proc) -> SocketAddr {
    assert!(
        p.wait_for_log("metrics: serving on ", LIMIT),
        "no `metrics: serving on` line:\n{}",
        p.log_text()
    );
    let log = p.log_text();
    let rest = log
        .split_once("metrics: serving on ")
        .map(|(_, r)| r)
        .unwrap_or("");
    let addr = rest.split_whitespace().next().unwrap_or("");
    addr.parse()
        .unwrap_or_else(|e| panic!("bad address {addr:?} in the log: {e}\n{log}"))
}

/// One side's scrape: the text promtool checks, and the parsed samples.
struct Scrape {
    side: &'static str,
    text: String,
    samples: Metrics,
}

impl Scrape {
    fn take(side: &'static str, addr: SocketAddr) -> Scrape {
        let stream = TcpStream::connect_timeout(&addr, LIMIT)
            .unwrap_or_else(|e| panic!("the {side}'s {addr}: {e}"));
        let text = metrics::fetch(stream, LIMIT).unwrap_or_else(|e| panic!("the {side}: {e}"));
        let samples = Metrics::parse(&text).unwrap_or_else(|e| panic!("the {side}: {e}\n{text}"));
        Scrape {
            side,
            text,
            samples,
        }
    }

    fn get(&self, name: &str) -> f64 {
        self.samples
            .get(name)
            .unwrap_or_else(|| panic!("the {} has no {name}:\n{}", self.side, self.text))
    }

    fn get_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .get_with(name, labels)
            .unwrap_or_else(|| panic!("the {} has no {name}{labels:?}:\n{}", self.side, self.text))
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
    let dir = tempdir("metrics_promtool");
    let mut backup = Proc::logged(
        "backup",
        backup_cmd("kv", "metrics-promtool", chan)
            .args(["--metrics", "127.0.0.1:0"])
            .env("DUET_LOG", "warn,vmm::ft=info"),
        &dir.path().join("backup.log"),
    )
    .unwrap();
    let backup_metrics = metrics_addr(&mut backup);
    let mut primary = Proc::logged(
        "primary",
        primary_cmd("kv", "metrics-promtool", chan)
            .args(["--serial", &format!("tcp:{serial}")])
            .args(["--metrics", "127.0.0.1:0"])
            .env("DUET_LOG", "warn,vmm::ft=info"),
        &dir.path().join("primary.log"),
    )
    .unwrap();
    let primary_metrics = metrics_addr(&mut primary);
    assert_ne!(primary_metrics.port(), 0);
    assert_ne!(backup_metrics.port(), 0);
    wait_for_port(serial, LIMIT);

    // Some traffic: 200 SETs and GETs in pipelined batches.
    let mut client = connect(serial, LIMIT);
    for batch in 0..4 {
        let mut input = Vec::new();
        for i in 0..50 {
            let (k, v) = (format!("k{batch}-{i}"), format!("v{i}"));
            input.extend(resp::encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
            input.extend(resp::encode(&[b"GET", k.as_bytes()]));
        }
        client.send_raw(&input).unwrap();
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
    assert_eq!(p.get_with("duet_role", &[("role", "primary")]), 1.0);
    assert_eq!(p.get_with("duet_role", &[("role", "backup")]), 0.0);
    assert_eq!(b.get_with("duet_role", &[("role", "backup")]), 1.0);
    assert_eq!(b.get_with("duet_role", &[("role", "primary")]), 0.0);
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
    assert_eq!(
        p.get_with("duet_lag_seconds_bucket", &[("le", "+Inf")]),
        count
    );
    assert!(p.get_with("duet_lag_seconds_bucket", &[("le", "0.0001")]) <= count);
    assert!(p.get("duet_lag_seconds_sum") >= 0.0);

    // The OpenMetrics form of the same registry.
    let (head, om) = scrape_openmetrics(primary_metrics);
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE duet_records_sent counter\n"), "{om}");
    let om_samples = Metrics::parse(&om).unwrap();
    assert_eq!(
        om_samples.get_with("duet_role", &[("role", "primary")]),
        Some(1.0)
    );
    assert!(om_samples
        .get("duet_records_sent_total")
        .is_some_and(|v| v >= sent));

    primary.terminate().unwrap();
    let code = primary.wait_timeout(LIMIT).and_then(|s| s.code());
    assert_eq!(code, Some(0), "primary:\n{}", primary.log_text());
    let code = backup.wait_timeout(LIMIT).and_then(|s| s.code());
    assert_eq!(code, Some(0), "backup:\n{}", backup.log_text());
}
