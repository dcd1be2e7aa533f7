//! The state file: every decision, appended and fsynced before it is
//! acknowledged.
//!
//! Why: an arbiter that forgets a grant after a crash could grant the same
//! `(vm_id, epoch)` to the other side, and a partition would then have two
//! primaries. So a decision is on disk before any reply mentions it.
//!
//! # Format
//!
//! JSON lines, one record per line, each ending in `\n`, in decision order:
//!
//! ```text
//! {"v":1,"kind":"new_epoch","vm_id":"kv1","epoch":1}
//! {"v":1,"kind":"grant","vm_id":"kv1","epoch":1,"claimant":"host-b"}
//! ```
//!
//! `v` is the record format version ([`RECORD_VERSION`]).
//!
//! # Damage
//!
//! A record is written with one `write_all` of the line including its
//! newline, then `sync_data`. A crash mid-write can therefore leave only a
//! final line without its newline; that record was never acknowledged, so on
//! load it is dropped with a warning and cut off the file (so later appends
//! start on a fresh line). Anything else that does not parse, or that
//! contradicts earlier records, is corruption and a load error naming the
//! line: the arbiter must not guess about its own decisions.
//!
//! If an append fails, the store refuses every later append until the
//! arbiter restarts and reloads the file: after a failed fsync the kernel's
//! view of the file can no longer be trusted.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ledger::Record;

/// The record format version written to, and accepted from, the file.
pub const RECORD_VERSION: u32 = 1;

/// Why the state file could not be loaded or appended to.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or creating the file failed.
    #[error("cannot open {path}")]
    Open {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading the file failed.
    #[error("cannot read {path}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Making a new file's directory entry durable failed.
    #[error("cannot sync directory of {path}")]
    SyncDir {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A complete line is not a valid record.
    #[error("{path} line {line}: corrupt record: {reason}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Cutting off a torn last line failed.
    #[error("cannot cut torn last line off {path}")]
    Truncate {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing or syncing a record failed; it was not recorded.
    #[error("cannot record decision in {path}")]
    Append {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An earlier append failed; nothing more is recorded until a restart.
    #[error("{path} unusable after an earlier write failure; restart the arbiter")]
    Broken {
        /// The state file.
        path: PathBuf,
    },
}

/// A record with its format version, as one line of the file.
#[derive(Serialize, Deserialize)]
struct Line {
    v: u32,
    #[serde(flatten)]
    record: Record,
}

/// What [`Store::open`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The store, ready for appends.
    pub store: Store,
    /// Each record with its 1-based line number, in file order.
    pub records: Vec<(usize, Record)>,
    /// Length in bytes of a torn last line that was dropped, if any.
    pub torn_bytes: Option<usize>,
}

/// The open state file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    file: File,
    broken: bool,
}

impl Store {
    /// Opens (or creates) the state file and reads every record in it.
    pub fn open(path: &Path) -> Result<Loaded, StoreError> {
        let (mut file, created) = open_or_create(path)?;
        let mut bytes = Vec::new();
        if !created {
            file.read_to_end(&mut bytes)
                .map_err(|source| StoreError::Read {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let (records, good_len) = parse(path, &bytes)?;
        let torn_bytes = (good_len < bytes.len()).then(|| bytes.len() - good_len);
        if torn_bytes.is_some() {
            let len = u64::try_from(good_len).unwrap_or(u64::MAX);
            file.set_len(len)
                .and_then(|()| file.sync_data())
                .map_err(|source| StoreError::Truncate {
                    path: path.to_owned(),
                    source,
                })?;
        }
        Ok(Loaded {
            store: Store {
                path: path.to_owned(),
                file,
                broken: false,
            },
            records,
            torn_bytes,
        })
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and syncs it to disk. Returns only once the record
    /// is durable; on error it was not recorded and the store is closed for
    /// writes.
    pub fn append(&mut self, record: &Record) -> Result<(), StoreError> {
        if self.broken {
            return Err(StoreError::Broken {
                path: self.path.clone(),
            });
        }
        let line = encode(record);
        let result = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        result.map_err(|source| {
            self.broken = true;
            StoreError::Append {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// Encodes a record as one line, newline included.
fn encode(record: &Record) -> Vec<u8> {
    let line = Line {
        v: RECORD_VERSION,
        record: record.clone(),
    };
    // A `Record` has string keys and plain fields: encoding cannot fail.
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn open_or_create(path: &Path) -> Result<(File, bool), StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new().read(true).append(true).open(path) {
        Ok(file) => Ok((file, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create_new(true)
                .open(path)
                .map_err(open_err)?;
            // The new directory entry must be durable too, or a crash could
            // lose the whole file together with its synced records.
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StoreError::SyncDir {
                    path: path.to_owned(),
                    source,
                })?;
            Ok((file, true))
        }
        Err(e) => Err(open_err(e)),
    }
}

/// Parses the file's bytes. Returns the records and the length of the
/// complete lines; bytes after it are a torn last line.
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<(usize, Record)>, usize), StoreError> {
    let mut records = Vec::new();
    let mut start = 0;
    let mut number = 0;
    while let Some(offset) = bytes
        .get(start..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        number += 1;
        let end = start + offset;
        let text = bytes.get(start..end).unwrap_or_default();
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_owned(),
            line: number,
            reason,
        };
        let line: Line = serde_json::from_slice(text).map_err(|e| corrupt(e.to_string()))?;
        if line.v != RECORD_VERSION {
            return Err(corrupt(format!(
                "unsupported record version {} (this server writes {RECORD_VERSION})",
                line.v
            )));
        }
        records.push((number, line.record));
        start = end + 1;
    }
    Ok((records, start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn grant(epoch: u64, who: &str) -> Record {
        Record::Grant {
            vm_id: "kv1".into(),
            epoch,
            claimant: who.into(),
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = TempDir::new();
        let path = dir.path().join("state.jsonl");
        let mut loaded = Store::open(&path).expect("create");
        assert!(loaded.records.is_empty());
        let epoch = Record::NewEpoch {
            vm_id: "kv1".into(),
            epoch: u64::MAX,
        };
        loaded.store.append(&grant(1, "a")).expect("append");
        loaded.store.append(&epoch).expect("append");
        drop(loaded);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text.lines().next(),
            Some(r#"{"v":1,"kind":"grant","vm_id":"kv1","epoch":1,"claimant":"a"}"#)
        );
        let loaded = Store::open(&path).expect("reopen");
        assert_eq!(loaded.records, vec![(1, grant(1, "a")), (2, epoch)]);
        assert_eq!(loaded.torn_bytes, None);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_off() {
        let dir = TempDir::new();
        let path = dir.path().join("state.jsonl");
        let mut whole = encode(&grant(1, "a"));
        whole.extend_from_slice(br#"{"v":1,"kind":"gr"#);
        std::fs::write(&path, &whole).expect("write");
        let mut loaded = Store::open(&path).expect("torn tail is tolerated");
        assert_eq!(loaded.records, vec![(1, grant(1, "a"))]);
        assert_eq!(loaded.torn_bytes, Some(17));
        loaded.store.append(&grant(2, "b")).expect("append");
        drop(loaded);
        let loaded = Store::open(&path).expect("reopen");
        assert_eq!(loaded.records, vec![(1, grant(1, "a")), (2, grant(2, "b"))]);
        assert_eq!(loaded.torn_bytes, None);
    }

    #[test]
    fn damage_before_the_last_line_is_an_error() {
        let dir = TempDir::new();
        let path = dir.path().join("state.jsonl");
        for (bad, line) in [
            (&b"garbage\n"[..], 2),
            (&b"\n"[..], 2),
            (
                &b"{\"v\":2,\"kind\":\"grant\",\"vm_id\":\"x\",\"epoch\":1,\"claimant\":\"a\"}\n"[..],
                2,
            ),
            (&b"{\"v\":1,\"kind\":\"grant\",\"vm_id\":\"x\"}\n"[..], 2),
            (&b"\xff\xfe\n"[..], 2),
        ] {
            let mut bytes = encode(&grant(1, "a"));
            bytes.extend_from_slice(bad);
            bytes.extend_from_slice(&encode(&grant(2, "a")));
            std::fs::write(&path, &bytes).expect("write");
            match Store::open(&path) {
                Err(StoreError::Corrupt { line: l, .. }) => assert_eq!(l, line),
                other => panic!("expected corruption, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_directory_is_not_a_state_file() {
        let dir = TempDir::new();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Open { .. } | StoreError::Read { .. })
        ));
    }
}
