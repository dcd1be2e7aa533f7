//! Hostile and broken input gets an error reply where one is possible and
//! never stops the server: it answers a valid status request afterwards.

mod common;

use common::{Raw, Server, TempDir};
use serde_json::Value;

const STATUS: &str = r#"{"version":1,"op":"status"}"#;

fn assert_error(reply: &Value, needle: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    let message = reply["error"].as_str().expect("error message");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    assert!(!message.contains('\n'));
}

fn assert_status_works(server: &Server) {
    let mut raw = Raw::connect(server.addr);
    assert_eq!(raw.ask(STATUS)["ok"], true);
    server.client().status().expect("typed status");
}

#[test]
fn bad_lines_on_one_connection_each_get_an_error() {
    let dir = TempDir::new("bad");
    let server = Server::start(&dir.state());
    let mut raw = Raw::connect(server.addr);
    let cases = [
        (
            "{\"version\":1,\"op\":",
            "malformed JSON: EOF while parsing",
        ),
        ("not json at all", "malformed JSON: expected"),
        ("", "malformed JSON: EOF while parsing"),
        ("42", "request must be a JSON object"),
        (r#"["status"]"#, "request must be a JSON object"),
        (r#"{"op":"status"}"#, "missing field \"version\""),
        (
            r#"{"version":"1","op":"status"}"#,
            "field \"version\" must be an unsigned 64-bit integer",
        ),
        (
            r#"{"version":7,"op":"status"}"#,
            "unsupported protocol version 7 (this server speaks 1)",
        ),
        (r#"{"version":1}"#, "missing field \"op\""),
        (
            r#"{"version":1,"vm_id":"kv1","epoch":1,"claimant":"a"}"#,
            "missing field \"op\"",
        ),
        (r#"{"version":1,"op":7}"#, "field \"op\" must be a string"),
        (
            r#"{"version":1,"op":"launch"}"#,
            "unknown op \"launch\" (expected test_and_set, new_epoch or status)",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","claimant":"a"}"#,
            "missing field \"epoch\"",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":1}"#,
            "missing field \"claimant\"",
        ),
        (
            r#"{"version":1,"op":"new_epoch"}"#,
            "missing field \"vm_id\"",
        ),
        (
            r#"{"version":1,"op":"new_epoch","vm_id":""}"#,
            "field \"vm_id\" must be a non-empty string",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"","epoch":1,"claimant":"a"}"#,
            "field \"vm_id\" must be a non-empty string",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":["kv1"],"epoch":1,"claimant":"a"}"#,
            "field \"vm_id\" must be a string",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":1,"claimant":null}"#,
            "field \"claimant\" must be a string",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":"3","claimant":"a"}"#,
            "field \"epoch\" must be an unsigned 64-bit integer",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":"18446744073709551616","claimant":"a"}"#,
            "field \"epoch\" must be an unsigned 64-bit integer",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":18446744073709551616,"claimant":"a"}"#,
            "field \"epoch\" must be an unsigned 64-bit integer",
        ),
        (
            r#"{"version":1,"op":"test_and_set","vm_id":"kv1","epoch":-3,"claimant":"a"}"#,
            "field \"epoch\" must be an unsigned 64-bit integer",
        ),
    ];
    for (line, needle) in cases {
        assert_error(&raw.ask(line), needle);
    }
    // Binary garbage, newline-terminated.
    raw.send(b"\x00\xff\xfe\x01\x80\x9f garbage \x1b[31m\n");
    assert_error(&raw.reply().expect("reply"), "malformed JSON");
    // Extra fields are ignored, in every op.
    assert_eq!(
        raw.ask(r#"{"version":1,"op":"status","future":{"x":[1]},"vm_id":7}"#)["ok"],
        true
    );
    // The same connection still works, and nothing was decided.
    let status = raw.ask(STATUS);
    assert_eq!(status["ok"], true);
    assert_eq!(status["vms"], Value::Array(vec![]));
    // A good request without a trailing newline before close is answered.
    raw.send(STATUS.as_bytes());
    raw.shutdown_write();
    assert_eq!(raw.reply().expect("reply")["ok"], true);
    assert!(raw.reply().is_none());
    assert_status_works(&server);
}

#[test]
fn extra_fields_are_ignored() {
    let dir = TempDir::new("extra");
    let server = Server::start(&dir.state());
    let mut raw = Raw::connect(server.addr);
    assert_eq!(
        raw.ask(r#"{"version":1,"op":"new_epoch","vm_id":"kv1","epoch":"x","why":null}"#),
        serde_json::json!({"ok":true,"epoch":1})
    );
    assert_eq!(
        raw.ask(
            r#"{"claimant":"host-a","priority":9,"epoch":1,"vm_id":"kv1","op":"test_and_set","version":1}"#
        ),
        serde_json::json!({"ok":true,"outcome":"granted","epoch":1})
    );
    assert_status_works(&server);
}

#[test]
fn a_huge_line_gets_an_error_and_the_connection_closes() {
    let dir = TempDir::new("huge");
    let server = Server::start(&dir.state());
    let mut raw = Raw::connect(server.addr);
    let mut huge = vec![b'x'; 200 * 1024];
    huge.push(b'\n');
    raw.send(&huge);
    assert_error(&raw.reply().expect("reply"), "longer than 65536 bytes");
    assert!(raw.reply().is_none(), "connection should close");
    assert_status_works(&server);
}

#[test]
fn binary_garbage_without_newlines_does_not_stop_the_server() {
    let dir = TempDir::new("garbage");
    let server = Server::start(&dir.state());
    // Pseudo-random bytes with no newline, then the client closes.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..10_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            match state.to_le_bytes()[0] {
                b'\n' => 0,
                b => b,
            }
        })
        .collect();
    let mut raw = Raw::connect(server.addr);
    raw.send(&garbage);
    raw.shutdown_write();
    assert_error(&raw.reply().expect("reply"), "malformed JSON");
    assert!(raw.reply().is_none());
    // A client that connects and leaves without a word.
    drop(Raw::connect(server.addr));
    assert_status_works(&server);
}
