//! The event log: each side's state changes as JSON lines, one object per
//! line with a wall-clock timestamp, so that the two sides' logs can be
//! merged into one timeline of a failover (`duet demo` charts it) and an
//! operator can see what happened without reading prose logs.
//!
//! ```text
//! {"ts":1764612345.123456,"role":"backup","event":"peer_lost","failure":"..."}
//! ```
//!
//! Writing is best effort: an event log that cannot be written is reported
//! once and then ignored, since it must never stop a replica.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The pair formed: the handshake succeeded.
    Paired { epoch: u64 },
    /// The link to the peer failed.
    PeerLost { peer: String, failure: String },
    /// A claim went to the arbiter.
    ClaimSent { vm_id: String, epoch: u64 },
    /// The arbiter granted the claim.
    ClaimGranted { after_ms: u64 },
    /// The arbiter gave the pair to someone else: halting.
    ClaimLost { rival: String },
    /// A backup went live: it serves the guest's clients from here on.
    Live { exit: u64 },
    /// A primary that lost its backup goes on alone, unprotected.
    Alone,
    /// Replay diverged from the primary.
    Diverged { detail: String },
    /// The process ended its run.
    Stopped { how: String },
    /// A new backup began joining this running VM (survivor).
    JoinStarted { epoch: u64 },
    /// The join handed over: the pair is protected again (survivor).
    Protected {
        epoch: u64,
        exit: u64,
        blackout_us: u64,
        total_ms: u64,
        bytes: u64,
    },
    /// The join was given up; the survivor still runs alone.
    JoinFailed { why: String },
    /// This backup joined a running VM and resumes after `exit` (joiner).
    Joined {
        epoch: u64,
        exit: u64,
        bytes: u64,
        total_ms: u64,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    ts: f64,
    role: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

/// Where events go (nowhere, without `--events`).
#[derive(Default)]
pub struct EventLog {
    out: Mutex<Option<BufWriter<File>>>,
    failed: AtomicBool,
}

impl EventLog {
    /// Creates (truncates) the file at `path`.
    pub fn create(path: &Path) -> std::io::Result<EventLog> {
        Ok(EventLog {
            out: Mutex::new(Some(BufWriter::new(File::create(path)?))),
            failed: AtomicBool::new(false),
        })
    }

    /// Appends `event`, as seen by a side now in `role`, and flushes it.
    pub fn emit(&self, role: &str, event: Event) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = out.as_mut() else {
            return;
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let line = Line {
            ts,
            role,
            event: &event,
        };
        let written = serde_json::to_writer(&mut *w, &line)
            .map_err(std::io::Error::other)
            .and_then(|_| w.write_all(b"\n"))
            .and_then(|_| w.flush());
        if let Err(e) = written {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!("cannot write the event log ({e}); events are no longer recorded");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_with_a_timestamp_and_a_role() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let log = EventLog::create(file.path()).unwrap();
        log.emit("backup", Event::Paired { epoch: 3 });
        log.emit(
            "backup",
            Event::PeerLost {
                peer: "primary".into(),
                failure: "silent".into(),
            },
        );
        log.emit("primary", Event::Live { exit: 99 });
        let text = std::fs::read_to_string(file.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "paired");
        assert_eq!(lines[0]["epoch"], 3);
        assert_eq!(lines[0]["role"], "backup");
        assert_eq!(lines[1]["event"], "peer_lost");
        assert_eq!(lines[1]["failure"], "silent");
        assert_eq!(lines[2]["event"], "live");
        assert_eq!(lines[2]["exit"], 99);
        assert!(lines[0]["ts"].as_f64().unwrap() > 1.6e9);
        assert!(lines[0]["ts"].as_f64() <= lines[2]["ts"].as_f64());
    }

    #[test]
    fn without_a_file_nothing_happens() {
        EventLog::default().emit("primary", Event::Alone);
    }
}
