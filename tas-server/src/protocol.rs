//! The arbiter's wire protocol, version 1.
//!
//! Why JSON lines: a person can debug the arbiter with `nc` and read its
//! replies, and malformed input is easy to produce in tests. The volume is a
//! handful of requests per failover, so the encoding cost does not matter.
//!
//! # Framing
//!
//! Newline-delimited JSON over TCP. The client sends one JSON object per line
//! (`\n`; a trailing `\r` is tolerated) and the server answers each line with
//! exactly one JSON object on one line, in order. A connection may carry any
//! number of requests. A line longer than [`MAX_LINE`] bytes gets an error
//! reply and the server then closes the connection. A connection idle for
//! longer than the server's idle timeout is closed.
//!
//! # Requests
//!
//! Every request carries `"version": 1` ([`PROTOCOL_VERSION`]); unknown extra
//! fields are ignored so that later versions can add optional ones.
//!
//! ```text
//! {"version":1,"op":"test_and_set","vm_id":"kv1","epoch":3,"claimant":"host-b"}
//! {"version":1,"op":"new_epoch","vm_id":"kv1"}
//! {"version":1,"op":"status"}
//! ```
//!
//! `vm_id` and `claimant` are non-empty strings; `epoch` is an unsigned 64-bit
//! integer.
//!
//! # Replies
//!
//! ```text
//! test_and_set -> {"ok":true,"granted":true,"holder":"host-b","epoch":3}
//! new_epoch    -> {"ok":true,"epoch":4}
//! status       -> {"ok":true,"vms":[{"vm_id":"kv1","epoch":4,"holders":{"3":"host-b"}}]}
//! any error    -> {"ok":false,"error":"unsupported protocol version 7 (this server speaks 1)"}
//! ```
//!
//! # Semantics of `test_and_set`
//!
//! Exactly one claimant wins each `(vm_id, epoch)`:
//!
//! - The first claim for a `(vm_id, epoch)` is granted and recorded durably
//!   before the reply is sent. `holder` is that claimant.
//! - A later claim by another claimant gets `granted: false` and the recorded
//!   `holder`. A later claim by the *same* claimant gets `granted: true` again,
//!   so a claimant whose reply was lost can simply retry.
//! - A claim for an epoch lower than the VM's current epoch is denied:
//!   `granted: false`, `holder: "superseded by epoch N"` where N is the current
//!   epoch. This holds even for the claimant that once won that older epoch:
//!   a newer pairing exists, so the old one must not go live again.
//! - A claim for an epoch higher than the current one is allowed (a pair may
//!   form without calling `new_epoch`) and raises the current epoch to it.
//! - `epoch` in the reply is always the epoch that was claimed.
//!
//! # Semantics of `new_epoch` and `status`
//!
//! `new_epoch` makes `current + 1` the VM's current epoch (the first call for
//! a VM returns 1), records it durably, and returns it. Every claim for an
//! older epoch is denied from then on.
//!
//! `status` lists every VM the arbiter knows, sorted by `vm_id`: its current
//! `epoch` and `holders`, an object from epoch (a decimal string, since JSON
//! keys are strings) to the claimant that holds it.
//!
//! # Errors
//!
//! `{"ok":false,"error":"..."}` with a one-line message naming the problem:
//! malformed JSON, a request that is not an object, a missing or mistyped
//! field, an unsupported version, an unknown op, an over-long line, or a
//! failure to record a decision (in which case nothing was decided).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version this crate speaks; every request must carry it.
pub const PROTOCOL_VERSION: u64 = 1;

/// Longest request or reply line accepted, in bytes (without the newline).
/// Caps the memory one connection can make the server hold.
pub const MAX_LINE: usize = 64 * 1024;

/// Why a request line was rejected. Each message is one line, sent back to
/// the client verbatim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The line is not valid JSON (includes binary garbage).
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// Valid JSON, but not an object.
    #[error("request must be a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field \"{0}\"")]
    MissingField(&'static str),
    /// A field has the wrong type or an unusable value.
    #[error("field \"{field}\" must be {expected}")]
    BadField {
        /// The field's name.
        field: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// The request speaks another protocol version.
    #[error("unsupported protocol version {0} (this server speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u64),
    /// The op is not one this version knows.
    #[error("unknown op \"{0}\" (expected test_and_set, new_epoch or status)")]
    UnknownOp(String),
    /// The line exceeded [`MAX_LINE`].
    #[error("request line longer than {MAX_LINE} bytes")]
    LineTooLong,
}

/// One request, as parsed from a line or about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Claim `(vm_id, epoch)` for `claimant`.
    TestAndSet {
        /// The VM being fought over.
        vm_id: String,
        /// The pairing epoch being claimed.
        epoch: u64,
        /// Who claims it (a host name).
        claimant: String,
    },
    /// Start a new pairing epoch for `vm_id`.
    NewEpoch {
        /// The VM whose epoch advances.
        vm_id: String,
    },
    /// List everything the arbiter has decided.
    Status,
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Request, ProtocolError> {
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| ProtocolError::Malformed(one_line(&e.to_string())))?;
        let Value::Object(obj) = value else {
            return Err(ProtocolError::NotAnObject);
        };
        let version = obj
            .get("version")
            .ok_or(ProtocolError::MissingField("version"))?
            .as_u64()
            .ok_or(ProtocolError::BadField {
                field: "version",
                expected: "an unsigned integer",
            })?;
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        let op = string_field(&obj, "op")?;
        match op {
            "test_and_set" => Ok(Request::TestAndSet {
                vm_id: string_field(&obj, "vm_id")?.to_owned(),
                epoch: obj
                    .get("epoch")
                    .ok_or(ProtocolError::MissingField("epoch"))?
                    .as_u64()
                    .ok_or(ProtocolError::BadField {
                        field: "epoch",
                        expected: "an unsigned 64-bit integer",
                    })?,
                claimant: string_field(&obj, "claimant")?.to_owned(),
            }),
            "new_epoch" => Ok(Request::NewEpoch {
                vm_id: string_field(&obj, "vm_id")?.to_owned(),
            }),
            "status" => Ok(Request::Status),
            other => Err(ProtocolError::UnknownOp(truncate(other, 64))),
        }
    }

    /// Encodes the request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Wire<'a> {
            version: u64,
            op: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            vm_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            epoch: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            claimant: Option<&'a str>,
        }
        let wire = match self {
            Request::TestAndSet {
                vm_id,
                epoch,
                claimant,
            } => Wire {
                version: PROTOCOL_VERSION,
                op: "test_and_set",
                vm_id: Some(vm_id),
                epoch: Some(*epoch),
                claimant: Some(claimant),
            },
            Request::NewEpoch { vm_id } => Wire {
                version: PROTOCOL_VERSION,
                op: "new_epoch",
                vm_id: Some(vm_id),
                epoch: None,
                claimant: None,
            },
            Request::Status => Wire {
                version: PROTOCOL_VERSION,
                op: "status",
                vm_id: None,
                epoch: None,
                claimant: None,
            },
        };
        encode_line(&wire)
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Whether the claimant holds `(vm_id, epoch)` and may go live.
    pub granted: bool,
    /// The claimant that holds `(vm_id, epoch)`, or `superseded by epoch N`
    /// when the claimed epoch is older than the current one.
    pub holder: String,
    /// The epoch that was claimed.
    pub epoch: u64,
}

/// What the arbiter knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The VM's id.
    pub vm_id: String,
    /// Its current epoch: claims for older epochs are denied.
    pub epoch: u64,
    /// Epoch → claimant that won it.
    pub holders: BTreeMap<u64, String>,
}

/// Everything the arbiter has decided, as `status` returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// One entry per VM, sorted by `vm_id`.
    pub vms: Vec<VmStatus>,
}

/// One reply, as the server sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Reply to `test_and_set`.
    Claim(Claim),
    /// Reply to `new_epoch`: the new current epoch.
    NewEpoch(u64),
    /// Reply to `status`.
    Status(Status),
    /// Any failure; the message is one line.
    Error(String),
}

impl Response {
    /// An error reply; newlines in `message` are flattened.
    pub fn error(message: impl std::fmt::Display) -> Response {
        Response::Error(one_line(&message.to_string()))
    }

    /// Encodes the reply as one line, newline included, `ok` first.
    pub fn to_line(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct ClaimReply<'a> {
            ok: bool,
            #[serde(flatten)]
            claim: &'a Claim,
        }
        #[derive(Serialize)]
        struct EpochReply {
            ok: bool,
            epoch: u64,
        }
        #[derive(Serialize)]
        struct StatusReply<'a> {
            ok: bool,
            vms: &'a [VmStatus],
        }
        #[derive(Serialize)]
        struct ErrorReply<'a> {
            ok: bool,
            error: &'a str,
        }
        match self {
            Response::Claim(claim) => encode_line(&ClaimReply { ok: true, claim }),
            Response::NewEpoch(epoch) => encode_line(&EpochReply {
                ok: true,
                epoch: *epoch,
            }),
            Response::Status(status) => encode_line(&StatusReply {
                ok: true,
                vms: &status.vms,
            }),
            Response::Error(error) => encode_line(&ErrorReply { ok: false, error }),
        }
    }
}

/// Encodes one value as a line. These types have string keys and no
/// fallible `Serialize` impls, so encoding cannot fail; should it anyway, the
/// line says so rather than the server panicking.
fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!(
            r#"{{"ok":false,"error":"cannot encode reply: {}"}}"#,
            one_line(&e.to_string()).replace('"', "'")
        )
        .into_bytes()
    });
    line.push(b'\n');
    line
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, ProtocolError> {
    let s = obj
        .get(field)
        .ok_or(ProtocolError::MissingField(field))?
        .as_str()
        .ok_or(ProtocolError::BadField {
            field,
            expected: "a string",
        })?;
    if s.is_empty() {
        return Err(ProtocolError::BadField {
            field,
            expected: "a non-empty string",
        });
    }
    Ok(s)
}

/// Flattens a message to one line so that a reply stays one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Shortens a client-supplied string before echoing it in an error.
fn truncate(s: &str, max_chars: usize) -> String {
    let mut out: String = s.chars().take(max_chars).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    one_line(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Result<Request, ProtocolError> {
        Request::parse(s.as_bytes())
    }

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse(
                r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":3,"claimant":"host-b"}"#
            ),
            Ok(Request::TestAndSet {
                vm_id: "kv1".into(),
                epoch: 3,
                claimant: "host-b".into()
            })
        );
        assert_eq!(
            parse(r#"{"version":1,"op":"new_epoch","vm_id":"kv1"}"#),
            Ok(Request::NewEpoch {
                vm_id: "kv1".into()
            })
        );
        assert_eq!(
            parse(r#" {"op":"status","version":1,"extra":[1,2]} "#),
            Ok(Request::Status)
        );
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::TestAndSet {
                vm_id: "v\"m\n".into(),
                epoch: u64::MAX,
                claimant: "ü".into(),
            },
            Request::NewEpoch { vm_id: "x".into() },
            Request::Status,
        ] {
            let line = req.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(Request::parse(&line), Ok(req));
        }
    }

    #[test]
    fn rejects_bad_requests_with_one_line_messages() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "malformed JSON"),
            (b"\xff\x00\xfe garbage", "malformed JSON"),
            (b"", "malformed JSON"),
            (b"[1,2]", "must be a JSON object"),
            (br#"{"op":"status"}"#, "missing field \"version\""),
            (br#"{"version":"1","op":"status"}"#, "\"version\" must be"),
            (
                br#"{"version":7,"op":"status"}"#,
                "unsupported protocol version 7 (this server speaks 1)",
            ),
            (br#"{"version":1}"#, "missing field \"op\""),
            (br#"{"version":1,"op":"fly"}"#, "unknown op \"fly\""),
            (
                br#"{"version":1,"op":"test_and_set","epoch":1,"claimant":"a"}"#,
                "missing field \"vm_id\"",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","claimant":"a"}"#,
                "missing field \"epoch\"",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":-1,"claimant":"a"}"#,
                "\"epoch\" must be an unsigned",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":1.5,"claimant":"a"}"#,
                "\"epoch\" must be an unsigned",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":1}"#,
                "missing field \"claimant\"",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":1,"claimant":""}"#,
                "\"claimant\" must be a non-empty string",
            ),
            (
                br#"{"version":1,"op":"new_epoch","vm_id":5}"#,
                "\"vm_id\" must be a string",
            ),
        ];
        for (line, want) in cases {
            let err = Request::parse(line).expect_err("should be rejected");
            let reply = String::from_utf8(Response::error(&err).to_line()).expect("utf-8");
            assert!(err.to_string().contains(want), "{err} lacks {want}");
            assert_eq!(reply.matches('\n').count(), 1, "{reply}");
            let value: Value = serde_json::from_str(&reply).expect("reply is JSON");
            assert_eq!(value["ok"], false);
        }
    }

    #[test]
    fn unknown_op_is_truncated() {
        let op = "x".repeat(1000);
        let err = parse(&format!(r#"{{"version":1,"op":"{op}"}}"#)).expect_err("unknown op");
        assert!(err.to_string().len() < 200);
    }

    #[test]
    fn replies_have_the_documented_shape() {
        let claim = Response::Claim(Claim {
            granted: true,
            holder: "host-b".into(),
            epoch: 3,
        });
        assert_eq!(
            claim.to_line(),
            br#"{"ok":true,"granted":true,"holder":"host-b","epoch":3}"#
                .iter()
                .chain(b"\n")
                .copied()
                .collect::<Vec<u8>>()
        );
        assert_eq!(
            Response::NewEpoch(4).to_line(),
            b"{\"ok\":true,\"epoch\":4}\n"
        );
        let status = Response::Status(Status {
            vms: vec![VmStatus {
                vm_id: "kv1".into(),
                epoch: 4,
                holders: BTreeMap::from([(3, "host-b".to_owned())]),
            }],
        });
        let value: Value = serde_json::from_slice(&status.to_line()).expect("JSON");
        assert_eq!(
            value,
            json!({"ok":true,"vms":[{"vm_id":"kv1","epoch":4,"holders":{"3":"host-b"}}]})
        );
        let back: Status = serde_json::from_value(value).expect("status parses back");
        assert_eq!(back.vms[0].holders[&3], "host-b");
        assert_eq!(
            Response::error("a\nb").to_line(),
            b"{\"ok\":false,\"error\":\"a b\"}\n"
        );
    }
}
