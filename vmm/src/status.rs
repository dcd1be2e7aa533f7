//! `duet status`: a compact view of a pair, read from each side's
//! `--metrics` endpoint. A side that cannot be reached is a row that says
//! so, not an error that ends the view: when a host dies, the operator
//! still wants to see the survivor.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::kit::metrics::{self, Metrics};
use crate::stop;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);

/// What one side says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SideStatus {
    pub role: String,
    pub epoch: u64,
    /// paired, claiming, alone or halting.
    pub protection: &'static str,
    pub arbiter: &'static str,
    /// Execution lag p50 and p99 in milliseconds (the primary measures it).
    pub lag_ms: Option<(f64, f64)>,
    pub log_mbit: f64,
    pub outputs_held: u64,
    pub oldest_held_ms: f64,
    /// Seconds since the backup's digest last matched the primary's.
    pub digest_age_s: Option<f64>,
}

/// A row of the view.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Up(SideStatus),
    Unreachable(String),
}

/// Reads one side's status from its scraped metrics.
pub fn side_status(m: &Metrics, now_unix_s: f64) -> Result<SideStatus, String> {
    let role = m
        .family("duet_role")
        .into_iter()
        .find(|(_, v)| *v == 1.0)
        .and_then(|(l, _)| l.get("role").cloned())
        .ok_or("no duet_role: not a duet endpoint")?;
    let arbiter_state = m.get("duet_arbiter_state").unwrap_or(0.0) as u64;
    let channel_failed = m.get("duet_channel_failed").unwrap_or(0.0) > 0.0;
    let (protection, arbiter) = match arbiter_state {
        0 if channel_failed => ("unprotected", "not reached yet"),
        0 => ("paired", "idle"),
        1 => ("unprotected", "claiming"),
        2 => ("alone", "won"),
        _ => ("halting", "lost"),
    };
    let lag_ms = match (
        m.quantile("duet_lag_seconds", 0.5),
        m.quantile("duet_lag_seconds", 0.99),
    ) {
        (Some(p50), Some(p99)) => Some((p50 * 1e3, p99 * 1e3)),
        _ => None,
    };
    let matched = m
        .get("duet_last_digest_match_timestamp_seconds")
        .unwrap_or(0.0);
    Ok(SideStatus {
        role,
        epoch: m.get("duet_epoch").unwrap_or(0.0) as u64,
        protection,
        arbiter,
        lag_ms,
        log_mbit: m.get("duet_log_mbit_per_second").unwrap_or(0.0),
        outputs_held: m.get("duet_outputs_held").unwrap_or(0.0) as u64,
        oldest_held_ms: m.get("duet_oldest_output_held_seconds").unwrap_or(0.0) * 1e3,
        digest_age_s: (matched > 0.0).then(|| (now_unix_s - matched).max(0.0)),
    })
}

/// Scrapes every side once.
pub fn rows(addrs: &[SocketAddr]) -> Vec<(SocketAddr, Row)> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    addrs
        .iter()
        .map(|&addr| {
            let row = match metrics::scrape(addr, SCRAPE_TIMEOUT) {
                Ok(m) => match side_status(&m, now) {
                    Ok(s) => Row::Up(s),
                    Err(e) => Row::Unreachable(e),
                },
                Err(e) => Row::Unreachable(format!("{e:#}")),
            };
            (addr, row)
        })
        .collect()
}

/// The view as text: a header and a line per side.
pub fn render(rows: &[(SocketAddr, Row)]) -> String {
    let mut out = format!(
        "{:<22} {:<8} {:>5}  {:<11} {:<9} {:>17} {:>8} {:>14} {:>14}\n",
        "SIDE",
        "ROLE",
        "EPOCH",
        "PROTECTION",
        "ARBITER",
        "LAG p50/p99 ms",
        "LOG Mb/s",
        "HELD (oldest)",
        "DIGEST MATCH"
    );
    for (addr, row) in rows {
        match row {
            Row::Unreachable(why) => {
                out.push_str(&format!("{:<22} unreachable: {why}\n", addr.to_string()));
            }
            Row::Up(s) => {
                let lag = s
                    .lag_ms
                    .map_or("-".to_string(), |(a, b)| format!("{a:.2}/{b:.2}"));
                let held = format!("{} ({:.0} ms)", s.outputs_held, s.oldest_held_ms);
                let digest = s
                    .digest_age_s
                    .map_or("-".to_string(), |a| format!("{a:.1} s ago"));
                out.push_str(&format!(
                    "{:<22} {:<8} {:>5}  {:<11} {:<9} {:>17} {:>8.2} {:>14} {:>14}\n",
                    addr.to_string(),
                    s.role,
                    s.epoch,
                    s.protection,
                    s.arbiter,
                    lag,
                    s.log_mbit,
                    held,
                    digest
                ));
            }
        }
    }
    out
}

/// `duet status`: prints the view once (exit 0 if every side answered, 2
/// otherwise), or with `watch` redraws it in place every `interval` until
/// SIGINT or SIGTERM.
pub fn run(addrs: &[SocketAddr], watch: bool, interval: Duration) -> anyhow::Result<u8> {
    if addrs.is_empty() {
        anyhow::bail!("give at least one --metrics address of a primary or backup");
    }
    if !watch {
        let rows = rows(addrs);
        print!("{}", render(&rows));
        let all_up = rows.iter().all(|(_, r)| matches!(r, Row::Up(_)));
        return Ok(if all_up { 0 } else { 2 });
    }
    stop::install()?;
    while !stop::requested() {
        let view = render(&rows(addrs));
        // Home the cursor and clear the screen, then draw.
        print!("\x1b[H\x1b[2J{view}");
        use std::io::Write;
        std::io::stdout().flush()?;
        stop::wait_until(interval, |slice| {
            std::thread::sleep(slice);
            false
        });
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_and_a_backup_read_from_their_metrics() {
        let primary = Metrics::parse(
            "duet_role{role=\"primary\"} 1\nduet_role{role=\"backup\"} 0\nduet_epoch 4\n\
             duet_arbiter_state 0\nduet_channel_failed 0\nduet_log_mbit_per_second 0.5\n\
             duet_outputs_held 2\nduet_oldest_output_held_seconds 0.003\n\
             duet_lag_seconds_bucket{le=\"0.001\"} 10\nduet_lag_seconds_bucket{le=\"+Inf\"} 10\n\
             duet_lag_seconds_count 10\nduet_lag_seconds_sum 0.005\n\
             duet_last_digest_match_timestamp_seconds 0\n",
        )
        .unwrap();
        let s = side_status(&primary, 100.0).unwrap();
        assert_eq!(s.role, "primary");
        assert_eq!(s.epoch, 4);
        assert_eq!(s.protection, "paired");
        assert_eq!(s.outputs_held, 2);
        assert!((s.oldest_held_ms - 3.0).abs() < 1e-9);
        assert!(s.lag_ms.unwrap().1 <= 1.0);
        assert_eq!(s.digest_age_s, None);

        let backup = Metrics::parse(
            "duet_role{role=\"primary\"} 0\nduet_role{role=\"backup\"} 1\nduet_epoch 4\n\
             duet_arbiter_state 2\nduet_last_digest_match_timestamp_seconds 98.5\n",
        )
        .unwrap();
        let s = side_status(&backup, 100.0).unwrap();
        assert_eq!(s.role, "backup");
        assert_eq!(s.protection, "alone");
        assert_eq!(s.digest_age_s, Some(1.5));
        assert!(side_status(&Metrics::parse("x 1\n").unwrap(), 0.0).is_err());
    }

    #[test]
    fn an_unreachable_side_is_a_row_not_an_error() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        let rows = rows(&[addr]);
        assert!(matches!(rows[0].1, Row::Unreachable(_)));
        assert!(render(&rows).contains("unreachable"));
    }
}
