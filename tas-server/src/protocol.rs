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
//! A request is a [`Request`]: an object tagged by `op` (`test_and_set`,
//! `new_epoch` or `status`) that also carries `"version": 1`
//! ([`PROTOCOL_VERSION`]). Unknown extra fields are ignored so that later
//! versions can add optional ones.
//!
//! ```text
//! {"version":1,"op":"test_and_set","vm_id":"kv1","epoch":3,"claimant":"host-b"}
//! {"version":1,"op":"new_epoch","vm_id":"kv1"}
//! {"version":1,"op":"status"}
//! ```
//!
//! `vm_id` and `claimant` are non-empty strings; `epoch` is an unsigned 64-bit
//! JSON integer (not a string, not a float).
//!
//! A line is checked in this order, and the first problem found is the
//! [`ProtocolError`] returned: valid JSON ([`ProtocolError::Malformed`]), an
//! object ([`ProtocolError::NotAnObject`]), `version` present and an unsigned
//! integer, then equal to 1 ([`ProtocolError::UnsupportedVersion`]), `op`
//! present and a string, then a known one ([`ProtocolError::UnknownOp`]),
//! then the op's fields in the order listed above: each present
//! ([`ProtocolError::MissingField`]), of the right type
//! ([`ProtocolError::WrongType`]) and, for strings, non-empty
//! ([`ProtocolError::EmptyField`]).
//!
//! # Replies
//!
//! Every reply carries `ok`. The reply to `test_and_set` is a [`Claim`]: the
//! claimed `epoch` and an `outcome` ([`ClaimOutcome`]), one of
//!
//! ```text
//! {"ok":true,"outcome":"granted","epoch":3}
//! {"ok":true,"outcome":"held_by","holder":"host-a","epoch":3}
//! {"ok":true,"outcome":"superseded","current_epoch":4,"epoch":3}
//! ```
//!
//! The others:
//!
//! ```text
//! new_epoch    -> {"ok":true,"epoch":4}
//! status       -> {"ok":true,"vms":[{"vm_id":"kv1","epoch":4,"holders":{"3":"host-b"}}]}
//! any error    -> {"ok":false,"error":"unsupported protocol version 7 (this server speaks 1)"}
//! ```
//!
//! # Semantics of `test_and_set`
//!
//! Exactly one claimant wins each `(vm_id, epoch)`:
//!
//! - The first claim for a `(vm_id, epoch)` is `granted`, and recorded
//!   durably before the reply is sent.
//! - A later claim by another claimant is answered `held_by` with the
//!   recorded `holder`. A later claim by the *same* claimant is `granted`
//!   again, so a claimant whose reply was lost can simply retry.
//! - A claim for an epoch lower than the VM's current epoch is answered
//!   `superseded` with that `current_epoch`. This holds even for the claimant
//!   that once won the older epoch: a newer pairing exists, so the old one
//!   must not go live again.
//! - A claim for an epoch higher than the current one is allowed (a pair may
//!   form without calling `new_epoch`) and raises the current epoch to it.
//! - `epoch` in the reply is always the epoch that was claimed.
//!
//! Only `granted` lets the claimant go live.
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
//! a [`ProtocolError`] with its causes, or a failure to record a decision (in
//! which case nothing was decided).

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks; every request must carry it.
pub const PROTOCOL_VERSION: u64 = 1;

/// Longest request or reply line accepted, in bytes (without the newline).
/// Caps the memory one connection can make the server hold.
pub const MAX_LINE: usize = 64 * 1024;

/// Longest client-supplied string echoed back in an error, in characters.
const ECHO_CHARS: usize = 64;

/// What a field should have been, for [`ProtocolError::WrongType`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// A JSON string.
    String,
    /// A JSON integer in `0..=u64::MAX`.
    UnsignedInteger,
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expected::String => "a string",
            Expected::UnsignedInteger => "an unsigned 64-bit integer",
        })
    }
}

/// Why a request line was rejected. Each message is one line; the server
/// sends it back with its causes (see [`error_chain`]).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The line is not valid JSON (includes binary garbage and empty lines).
    #[error("malformed JSON")]
    Malformed(#[source] serde_json::Error),
    /// Valid JSON, but not an object.
    #[error("request must be a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field \"{0}\"")]
    MissingField(&'static str),
    /// A field has the wrong JSON type, or a number out of range.
    #[error("field \"{field}\" must be {expected}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What it should have been.
        expected: Expected,
    },
    /// A string field that must not be empty is.
    #[error("field \"{0}\" must be a non-empty string")]
    EmptyField(&'static str),
    /// The request speaks another protocol version.
    #[error("unsupported protocol version {0} (this server speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u64),
    /// The op is not one this version knows (echoed shortened).
    #[error("unknown op \"{0}\" (expected test_and_set, new_epoch or status)")]
    UnknownOp(String),
    /// The object could not be decoded although every field checked out;
    /// not expected to happen, but reported rather than assumed away.
    #[error("undecodable request")]
    Undecodable(#[source] serde_json::Error),
    /// The line exceeded [`MAX_LINE`].
    #[error("request line longer than {MAX_LINE} bytes")]
    LineTooLong,
}

/// One request, as parsed from a line or about to be sent.
///
/// On the wire it is tagged by `op` next to `version` (see the module doc).
/// It is only serialized by serde: parsing goes through a lenient twin so
/// that each bad field is reported by name as a [`ProtocolError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
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

/// One field as received: of the expected type, of another one, or absent.
/// Decoding a `Field` never fails, so the caller decides which error a bad
/// field is, by name.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Field<T> {
    Valid(T),
    Invalid(IgnoredAny),
    #[default]
    #[serde(skip_deserializing)]
    Missing,
}

impl<T> Field<T> {
    fn get(self, name: &'static str, expected: Expected) -> Result<T, ProtocolError> {
        match self {
            Field::Valid(value) => Ok(value),
            Field::Invalid(IgnoredAny) => Err(ProtocolError::WrongType {
                field: name,
                expected,
            }),
            Field::Missing => Err(ProtocolError::MissingField(name)),
        }
    }
}

impl Field<String> {
    fn non_empty(self, name: &'static str) -> Result<String, ProtocolError> {
        let value = self.get(name, Expected::String)?;
        if value.is_empty() {
            return Err(ProtocolError::EmptyField(name));
        }
        Ok(value)
    }
}

/// What every request carries, checked before the op's own fields.
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    version: Field<u64>,
    #[serde(default)]
    op: Field<String>,
}

/// [`Request`] as received, every field still unchecked.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum WireRequest {
    TestAndSet {
        #[serde(default)]
        vm_id: Field<String>,
        #[serde(default)]
        epoch: Field<u64>,
        #[serde(default)]
        claimant: Field<String>,
    },
    NewEpoch {
        #[serde(default)]
        vm_id: Field<String>,
    },
    Status,
    #[serde(other)]
    Unknown,
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Request, ProtocolError> {
        let value: Value = serde_json::from_slice(line).map_err(ProtocolError::Malformed)?;
        if !value.is_object() {
            return Err(ProtocolError::NotAnObject);
        }
        let header = Header::deserialize(&value).map_err(ProtocolError::Undecodable)?;
        let version = header.version.get("version", Expected::UnsignedInteger)?;
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        let op = header.op.get("op", Expected::String)?;
        match WireRequest::deserialize(&value).map_err(ProtocolError::Undecodable)? {
            WireRequest::TestAndSet {
                vm_id,
                epoch,
                claimant,
            } => Ok(Request::TestAndSet {
                vm_id: vm_id.non_empty("vm_id")?,
                epoch: epoch.get("epoch", Expected::UnsignedInteger)?,
                claimant: claimant.non_empty("claimant")?,
            }),
            WireRequest::NewEpoch { vm_id } => Ok(Request::NewEpoch {
                vm_id: vm_id.non_empty("vm_id")?,
            }),
            WireRequest::Status => Ok(Request::Status),
            WireRequest::Unknown => Err(ProtocolError::UnknownOp(truncate(&op, ECHO_CHARS))),
        }
    }

    /// Encodes the request as one line, newline included, `version` first.
    pub fn to_line(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            version: u64,
            #[serde(flatten)]
            request: &'a Request,
        }
        encode_line(&Envelope {
            version: PROTOCOL_VERSION,
            request: self,
        })
    }
}

/// How a claim of `(vm_id, epoch)` was decided. On the wire: `outcome` and
/// the variant's field, if any (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimOutcome {
    /// The claimant holds `(vm_id, epoch)` (now, or already from an earlier
    /// claim of its own) and may go live.
    Granted,
    /// Another claimant holds `(vm_id, epoch)`.
    HeldBy {
        /// The claimant that won it.
        holder: String,
    },
    /// The claimed epoch is older than the VM's current one: a newer pairing
    /// exists, and nobody may go live on the old one.
    Superseded {
        /// The VM's current epoch.
        current_epoch: u64,
    },
}

impl ClaimOutcome {
    /// Whether the claimant may go live.
    pub fn is_granted(&self) -> bool {
        matches!(self, ClaimOutcome::Granted)
    }
}

/// The answer to a claim, as the server sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// How the claim was decided.
    #[serde(flatten)]
    pub outcome: ClaimOutcome,
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

    /// An error reply naming `error` and each of its causes.
    pub fn failure(error: &dyn std::error::Error) -> Response {
        Response::Error(error_chain(error))
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

/// Formats an error and its sources on one line: `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    one_line(&message)
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

    fn line(value: &Value) -> Vec<u8> {
        let mut line = serde_json::to_vec(value).expect("encode");
        line.push(b'\n');
        line
    }

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse(
                r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":3,"claimant":"host-b"}"#
            )
            .expect("valid"),
            Request::TestAndSet {
                vm_id: "kv1".into(),
                epoch: 3,
                claimant: "host-b".into()
            }
        );
        assert_eq!(
            parse(r#"{"version":1,"op":"new_epoch","vm_id":"kv1"}"#).expect("valid"),
            Request::NewEpoch {
                vm_id: "kv1".into()
            }
        );
        assert_eq!(
            parse(r#" {"op":"status","version":1} "#).expect("valid"),
            Request::Status
        );
    }

    #[test]
    fn extra_fields_are_ignored() {
        assert_eq!(
            parse(r#"{"op":"status","version":1,"extra":[1,2],"vm_id":5}"#).expect("valid"),
            Request::Status
        );
        assert_eq!(
            parse(
                r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":3,"claimant":"b","why":{"x":null},"epoch2":"z"}"#
            )
            .expect("valid"),
            Request::TestAndSet {
                vm_id: "kv1".into(),
                epoch: 3,
                claimant: "b".into()
            }
        );
        assert_eq!(
            parse(r#"{"version":1,"op":"new_epoch","vm_id":"kv1","claimant":7}"#).expect("valid"),
            Request::NewEpoch {
                vm_id: "kv1".into()
            }
        );
    }

    #[test]
    fn requests_have_the_documented_shape_and_round_trip() {
        let req = Request::TestAndSet {
            vm_id: "kv1".into(),
            epoch: 3,
            claimant: "host-b".into(),
        };
        assert_eq!(
            req.to_line(),
            b"{\"version\":1,\"op\":\"test_and_set\",\"vm_id\":\"kv1\",\"epoch\":3,\"claimant\":\"host-b\"}\n"
        );
        assert_eq!(
            Request::Status.to_line(),
            b"{\"version\":1,\"op\":\"status\"}\n"
        );
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
            assert_eq!(Request::parse(&line).expect("round trip"), req);
        }
    }

    #[test]
    fn bad_json_is_malformed_with_its_cause() {
        for bad in [
            &b"{not json"[..],
            b"\xff\x00\xfe garbage",
            b"",
            b"{\"version\":1,",
        ] {
            let err = Request::parse(bad).expect_err("not JSON");
            assert!(matches!(err, ProtocolError::Malformed(_)), "{err:?}");
            assert!(std::error::Error::source(&err).is_some());
            let message = error_chain(&err);
            assert!(message.starts_with("malformed JSON: "), "{message}");
        }
        for bad in ["[1,2]", "42", "\"op\"", "null"] {
            assert!(matches!(parse(bad), Err(ProtocolError::NotAnObject)));
        }
    }

    #[test]
    fn version_is_checked_first() {
        assert!(matches!(
            parse(r#"{"op":"status"}"#),
            Err(ProtocolError::MissingField("version"))
        ));
        assert!(matches!(
            parse(r#"{"op":"fly"}"#),
            Err(ProtocolError::MissingField("version"))
        ));
        for bad in [r#""1""#, "-1", "1.0", "null", "[1]"] {
            assert!(
                matches!(
                    parse(&format!(r#"{{"version":{bad},"op":"status"}}"#)),
                    Err(ProtocolError::WrongType {
                        field: "version",
                        expected: Expected::UnsignedInteger
                    })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(r#"{"version":7,"op":"status"}"#),
            Err(ProtocolError::UnsupportedVersion(7))
        ));
        assert!(matches!(
            parse(r#"{"version":0,"op":"fly"}"#),
            Err(ProtocolError::UnsupportedVersion(0))
        ));
    }

    #[test]
    fn op_must_be_a_known_string() {
        assert!(matches!(
            parse(r#"{"version":1}"#),
            Err(ProtocolError::MissingField("op"))
        ));
        assert!(matches!(
            parse(r#"{"version":1,"vm_id":"kv1","epoch":1,"claimant":"a"}"#),
            Err(ProtocolError::MissingField("op"))
        ));
        for bad in ["3", "null", "[\"status\"]", "{\"status\":1}"] {
            assert!(
                matches!(
                    parse(&format!(r#"{{"version":1,"op":{bad}}}"#)),
                    Err(ProtocolError::WrongType {
                        field: "op",
                        expected: Expected::String
                    })
                ),
                "{bad}"
            );
        }
        for unknown in ["fly", "", "Status", "TEST_AND_SET", "testAndSet"] {
            match parse(&format!(r#"{{"version":1,"op":"{unknown}"}}"#)) {
                Err(ProtocolError::UnknownOp(op)) => assert_eq!(op, unknown),
                other => panic!("{unknown}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_op_is_truncated() {
        let op = "x".repeat(1000);
        let err = parse(&format!(r#"{{"version":1,"op":"{op}"}}"#)).expect_err("unknown op");
        assert!(matches!(&err, ProtocolError::UnknownOp(o) if o.chars().count() == 65));
        assert!(err.to_string().len() < 200);
    }

    #[test]
    fn each_field_is_checked_by_name() {
        let good = json!({"version":1,"op":"test_and_set","vm_id":"v","epoch":1,"claimant":"a"});
        let with = |field: &str, value: Value| {
            let mut v = good.clone();
            v[field] = value;
            Request::parse(&line(&v))
        };
        let without = |field: &str| {
            let mut v = good.clone();
            v.as_object_mut().expect("object").remove(field);
            Request::parse(&line(&v))
        };
        for field in ["vm_id", "epoch", "claimant"] {
            match without(field) {
                Err(ProtocolError::MissingField(f)) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        for field in ["vm_id", "claimant"] {
            for bad in [
                json!(5),
                json!(null),
                json!(true),
                json!(["a"]),
                json!({"a":1}),
            ] {
                match with(field, bad.clone()) {
                    Err(ProtocolError::WrongType {
                        field: f,
                        expected: Expected::String,
                    }) => assert_eq!(f, field),
                    other => panic!("{field}={bad}: {other:?}"),
                }
            }
            match with(field, json!("")) {
                Err(ProtocolError::EmptyField(f)) => assert_eq!(f, field),
                other => panic!("{field} empty: {other:?}"),
            }
        }
        for bad in [
            json!("3"),
            json!("18446744073709551616"),
            json!("18446744073709551615"),
            json!(-1),
            json!(1.5),
            json!(1e3),
            json!(null),
            json!([1]),
        ] {
            assert!(
                matches!(
                    with("epoch", bad.clone()),
                    Err(ProtocolError::WrongType {
                        field: "epoch",
                        expected: Expected::UnsignedInteger
                    })
                ),
                "epoch={bad}"
            );
        }
        // One past u64::MAX, written as a JSON number.
        assert!(matches!(
            parse(
                r#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":18446744073709551616,"claimant":"a"}"#
            ),
            Err(ProtocolError::WrongType { field: "epoch", .. })
        ));
        assert!(matches!(
            with("epoch", json!(u64::MAX)),
            Ok(Request::TestAndSet {
                epoch: u64::MAX,
                ..
            })
        ));
        // Fields are checked in order: vm_id before epoch before claimant.
        assert!(matches!(
            parse(r#"{"version":1,"op":"test_and_set","epoch":"x","claimant":""}"#),
            Err(ProtocolError::MissingField("vm_id"))
        ));
        assert!(matches!(
            parse(r#"{"version":1,"op":"test_and_set","vm_id":"v","claimant":""}"#),
            Err(ProtocolError::MissingField("epoch"))
        ));
        assert!(matches!(
            parse(r#"{"version":1,"op":"new_epoch"}"#),
            Err(ProtocolError::MissingField("vm_id"))
        ));
        assert!(matches!(
            parse(r#"{"version":1,"op":"new_epoch","vm_id":""}"#),
            Err(ProtocolError::EmptyField("vm_id"))
        ));
    }

    #[test]
    fn errors_are_one_line_messages() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "malformed JSON: key must be a string"),
            (b"\n\n", "malformed JSON: EOF"),
            (b"[1,2]", "request must be a JSON object"),
            (br#"{"op":"status"}"#, "missing field \"version\""),
            (
                br#"{"version":"1","op":"status"}"#,
                "field \"version\" must be an unsigned 64-bit integer",
            ),
            (
                br#"{"version":7,"op":"status"}"#,
                "unsupported protocol version 7 (this server speaks 1)",
            ),
            (br#"{"version":1}"#, "missing field \"op\""),
            (
                br#"{"version":1,"op":"fly"}"#,
                "unknown op \"fly\" (expected test_and_set, new_epoch or status)",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":"3","claimant":"a"}"#,
                "field \"epoch\" must be an unsigned 64-bit integer",
            ),
            (
                br#"{"version":1,"op":"test_and_set","vm_id":"v","epoch":1,"claimant":""}"#,
                "field \"claimant\" must be a non-empty string",
            ),
            (
                br#"{"version":1,"op":"new_epoch","vm_id":5}"#,
                "field \"vm_id\" must be a string",
            ),
        ];
        for (line, want) in cases {
            let err = Request::parse(line).expect_err("should be rejected");
            let reply = String::from_utf8(Response::failure(&err).to_line()).expect("utf-8");
            assert_eq!(reply.matches('\n').count(), 1, "{reply}");
            let value: Value = serde_json::from_str(&reply).expect("reply is JSON");
            assert_eq!(value["ok"], false);
            let message = value["error"].as_str().expect("message");
            assert!(message.starts_with(want), "{message:?} is not {want:?}");
        }
    }

    #[test]
    fn replies_have_the_documented_shape() {
        let cases = [
            (
                ClaimOutcome::Granted,
                r#"{"ok":true,"outcome":"granted","epoch":3}"#,
            ),
            (
                ClaimOutcome::HeldBy {
                    holder: "host-a".into(),
                },
                r#"{"ok":true,"outcome":"held_by","holder":"host-a","epoch":3}"#,
            ),
            (
                ClaimOutcome::Superseded { current_epoch: 4 },
                r#"{"ok":true,"outcome":"superseded","current_epoch":4,"epoch":3}"#,
            ),
        ];
        for (outcome, want) in cases {
            let claim = Claim { outcome, epoch: 3 };
            let line = Response::Claim(claim.clone()).to_line();
            assert_eq!(String::from_utf8_lossy(&line), format!("{want}\n"));
            let back: Claim = serde_json::from_slice(&line).expect("claim parses back");
            assert_eq!(back, claim);
        }
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

    #[test]
    fn claim_replies_with_a_bad_outcome_do_not_decode() {
        for bad in [
            json!({"outcome":"won","epoch":3}),
            json!({"outcome":"held_by","epoch":3}),
            json!({"outcome":"superseded","current_epoch":"4","epoch":3}),
            json!({"granted":true,"holder":"a","epoch":3}),
            json!({"outcome":"granted"}),
        ] {
            assert!(
                serde_json::from_value::<Claim>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
