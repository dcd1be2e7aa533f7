//! Scraping `--metrics`: one HTTP/1.0 GET of `/metrics`, and a parser of
//! the Prometheus text exposition format into `(name, labels) -> value`.
//!
//! The parser reads each sample line whole (`name{label="value",...} value
//! [timestamp]`, label values with `\\`, `\"` and `\n` escapes, values
//! including `NaN` and `±Inf`), skips `#` comments, and rejects anything
//! else, so a metric is found by its name and labels, never by a prefix of
//! some other line.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::ft::metrics::bucket_quantile;

/// Label pairs of one sample, sorted by label name.
pub type Labels = BTreeMap<String, String>;

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: BTreeMap<(String, Labels), f64>,
}

impl Metrics {
    /// Parses Prometheus text exposition.
    pub fn parse(text: &str) -> anyhow::Result<Metrics> {
        let mut samples = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) =
                parse_sample(line).with_context(|| format!("line {}: {line:?}", n + 1))?;
            if samples.insert(key.clone(), value).is_some() {
                bail!("line {}: sample {key:?} appears twice", n + 1);
            }
        }
        Ok(Metrics { samples })
    }

    /// The value of `name` without labels.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.samples
            .get(&(name.to_string(), Labels::new()))
            .copied()
    }

    /// The value of `name` with exactly these labels.
    pub fn get_with(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    /// [`Metrics::get`], or an error naming what is missing.
    pub fn require(&self, name: &str) -> anyhow::Result<f64> {
        self.get(name)
            .with_context(|| format!("no sample {name} among {:?}", self.names()))
    }

    /// Every sample of `name`, whatever its labels.
    pub fn family(&self, name: &str) -> Vec<(&Labels, f64)> {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| (l, *v))
            .collect()
    }

    /// The (upper bound, cumulative count) pairs of histogram `name`, from
    /// its `name_bucket{le="..."}` samples, in increasing order of bound.
    pub fn histogram(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut cumulative: Vec<(f64, f64)> = self
            .family(&bucket)
            .into_iter()
            .filter_map(|(labels, n)| {
                let le = labels.get("le")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, n))
            })
            .collect();
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        cumulative
    }

    /// The `q` quantile of histogram `name`, interpolated within buckets
    /// as PromQL's `histogram_quantile` does; `None` if it has no samples.
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        bucket_quantile(&self.histogram(name), q)
    }

    /// The `q` quantile of the samples histogram `name` gained since the
    /// scrape `before` of the same process.
    pub fn quantile_since(&self, before: &Metrics, name: &str, q: f64) -> Option<f64> {
        let old = before.histogram(name);
        let delta: Vec<(f64, f64)> = self
            .histogram(name)
            .into_iter()
            .map(|(le, n)| (le, n - old.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1)))
            .collect();
        bucket_quantile(&delta, q)
    }

    /// The distinct metric names.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.samples.keys().map(|(n, _)| n.as_str()).collect();
        v.dedup();
        v
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True if there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

/// Splits a leading metric or label name off `s`.
fn take_name(s: &str, colons: bool) -> anyhow::Result<(&str, &str)> {
    let ok = |c: char| is_name_char(c) && (colons || c != ':');
    match s.chars().next() {
        Some(c) if is_name_start(c) && (colons || c != ':') => {}
        _ => bail!("expected a name at {s:?}"),
    }
    let end = s.find(|c: char| !ok(c)).unwrap_or(s.len());
    Ok(s.split_at(end))
}

/// Parses the `{...}` label set at the front of `s` (after the `{`).
fn take_labels(mut s: &str) -> anyhow::Result<(Labels, &str)> {
    let mut labels = Labels::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (name, rest) = take_name(s, false)?;
        let rest = rest
            .trim_start()
            .strip_prefix('=')
            .with_context(|| format!("expected = after label {name}"))?;
        let mut chars = rest
            .trim_start()
            .strip_prefix('"')
            .with_context(|| format!("expected a quoted value for label {name}"))?
            .chars();
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => bail!("bad escape {other:?} in label {name}"),
                },
                Some(c) => value.push(c),
                None => bail!("unterminated value of label {name}"),
            }
        }
        // What follows the closing quote.
        let rest = chars.as_str();
        if labels.insert(name.to_string(), value).is_some() {
            bail!("label {name} given twice");
        }
        s = rest.trim_start();
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            bail!("expected , or }} after label {name}");
        }
    }
}

fn parse_value(v: &str) -> anyhow::Result<f64> {
    Ok(match v {
        "NaN" => f64::NAN,
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => v
            .parse()
            .with_context(|| format!("bad sample value {v:?}"))?,
    })
}

fn parse_sample(line: &str) -> anyhow::Result<((String, Labels), f64)> {
    let (name, rest) = take_name(line, true)?;
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(r) => take_labels(r)?,
        None => (Labels::new(), rest),
    };
    if !rest.starts_with([' ', '\t']) {
        bail!("expected a space before the value");
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().context("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        bail!("text after the timestamp");
    }
    Ok(((name.to_string(), labels), value))
}

/// One HTTP/1.0 GET of `/metrics` over `stream`: the body of a 200 reply.
pub fn fetch(mut stream: TcpStream, limit: Duration) -> anyhow::Result<String> {
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("metrics answered {status:?}");
    }
    Ok(body.to_string())
}

/// Scrapes and parses the metrics served at `addr`, within `limit` for the
/// connection and again for the reply.
pub fn scrape(addr: SocketAddr, limit: Duration) -> anyhow::Result<Metrics> {
    let stream = TcpStream::connect_timeout(&addr, limit)
        .with_context(|| format!("cannot reach the metrics at {addr}"))?;
    Metrics::parse(&fetch(stream, limit)?).with_context(|| format!("metrics at {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP duet_role{role=\"primary\"} this process's role\n\
        # TYPE duet_role{role=\"primary\"} gauge\n\
        duet_role{role=\"primary\"} 1\n\
        duet_epoch 3\n\
        duet_epoch_next 4\n\
        duet_lag_p99_seconds 0.001250\n\
        odd{a=\"x\\\"y\", b = \"line\\nbreak\\\\\",} -2.5e3 1700000000000\n\
        not_a_number NaN\n\
        up +Inf\n";

    #[test]
    fn finds_samples_by_name_and_labels() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(m.len(), 7);
        assert_eq!(m.get("duet_epoch"), Some(3.0));
        // `duet_epoch` is not found by a prefix of `duet_epoch_next`, nor
        // `duet_role` without its label.
        assert_eq!(m.get("duet_epoch_next"), Some(4.0));
        assert_eq!(m.get("duet_role"), None);
        assert_eq!(m.get_with("duet_role", &[("role", "primary")]), Some(1.0));
        assert_eq!(m.get_with("duet_role", &[("role", "backup")]), None);
        assert_eq!(m.get("duet_lag_p99_seconds"), Some(0.00125));
        assert_eq!(
            m.get_with("odd", &[("b", "line\nbreak\\"), ("a", "x\"y")]),
            Some(-2500.0)
        );
        assert!(m.get("not_a_number").unwrap().is_nan());
        assert_eq!(m.get("up"), Some(f64::INFINITY));
        assert_eq!(m.family("duet_role").len(), 1);
        assert!(m.require("missing").is_err());
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "duet_epoch",
            "duet_epoch three",
            "duet_epoch{role=\"x\" 1",
            "duet_epoch{role=x} 1",
            "duet_epoch{role=\"x\",role=\"y\"} 1",
            "9lives 1",
            "a 1 2 3",
            "a 1\na 2",
        ] {
            assert!(Metrics::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
