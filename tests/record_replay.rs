//! `duet record` then `duet replay` reproduces the run bit for bit: the
//! same serial transcript and the same final state (exit count, registers,
//! memory hash). Replay checks every logged event against the position it
//! reaches it at (exit ordinal, RIP, register checksum) and stops with exit
//! 4 at the first mismatch, so a replay that exits 0 has also met every
//! event at the position where it was recorded. Edited logs must diverge,
//! at the record that was edited.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use logchannel::{Event, Record};

const LIMIT: Duration = Duration::from_secs(120);

fn assert_ok(o: &Output, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: status {:?}, stderr: {}",
        o.status,
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{what}: {}", stderr(o));
}

fn replay(image: &str, log: &std::path::Path, output: Option<&std::path::Path>) -> Output {
    let mut cmd = duet();
    cmd.args(["replay", "--image", image, "--log"]).arg(log);
    if let Some(p) = output {
        cmd.arg("--output").arg(p);
    }
    run_bounded(&mut cmd, None, LIMIT)
}

/// Records `ticker` with no input (its default 2000 ticks) into `log`.
fn record_ticker(dir: &tempfile::TempDir, log: &std::path::Path) -> Output {
    let o = run_bounded(
        duet()
            .args(["record", "--image", "ticker", "--serial", "stdio", "--log"])
            .arg(log)
            .arg("--transcript")
            .arg(dir.path().join("ticker.transcript")),
        None,
        LIMIT,
    );
    assert_ok(&o, "duet record --image ticker");
    o
}

/// 64-bit FNV-1a, the ticker's input digest.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The value of `key=` on the first line containing `marker`.
fn field(text: &str, marker: &str, key: &str) -> String {
    text.lines()
        .filter_map(|l| Some(&l[l.find(marker)? + marker.len()..]))
        .flat_map(|rest| rest.split_whitespace())
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= after {marker:?} in {text}"))
        .to_string()
}

/// Whether the ticker stopped at the run length `limit` it was given rather
/// than its default of 2000 ticks. It stops at the first tick count it reads
/// that is at least `limit`, and one pass of its loop can span several ticks
/// on a loaded host (CI saw 1505 for 1500), so the count it prints may pass
/// `limit` a little.
fn stopped_at(text: &str, limit: u64) -> bool {
    let done: u64 = field(text, "ticker done ", "ticks")
        .parse()
        .unwrap_or_else(|e| panic!("ticker done ticks= is not a number ({e}) in {text}"));
    (limit..limit + 100).contains(&done)
}

/// The length of a ticker report line (`tick=N input=H all=H\n` or
/// `ticker done ticks=N input=H all=H\n`) at the start of `b`, if there
/// is one.
fn report_len(b: &[u8]) -> Option<usize> {
    let rest = b
        .strip_prefix(b"tick=")
        .or_else(|| b.strip_prefix(b"ticker done ticks="))?;
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut at = &rest[digits..];
    if digits == 0 {
        return None;
    }
    for key in [&b" input="[..], b" all="] {
        at = at.strip_prefix(key)?;
        let hex = at.get(..16)?;
        if !hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        at = &at[16..];
    }
    at.strip_prefix(b"\n")?;
    Some(b.len() - at.len() + 1)
}

/// The ticker's output less its report lines: the echo of its input.
fn echoed(transcript: &[u8]) -> Vec<u8> {
    let mut echo = Vec::with_capacity(transcript.len());
    let mut i = 0;
    while i < transcript.len() {
        match report_len(&transcript[i..]) {
            Some(n) => i += n,
            None => {
                echo.push(transcript[i]);
                i += 1;
            }
        }
    }
    echo
}

#[test]
fn ticker_with_random_input_replays_identically() {
    if !kvm_available("ticker_with_random_input_replays_identically") {
        return;
    }
    let dir = tempdir("rr-ticker-input");
    let (log, transcript, replayed) = (
        dir.path().join("ticker.log"),
        dir.path().join("record.transcript"),
        dir.path().join("replay.out"),
    );
    let mut rng = seed::rng("ticker_with_random_input_replays_identically", None);

    let mut rec = launch(
        duet()
            .args(["record", "--image", "ticker", "--serial", "stdio", "--log"])
            .arg(&log)
            .arg("--transcript")
            .arg(&transcript),
        true,
    );
    // Input at random moments while the guest runs: first a shorter run
    // length, then printable noise (with the odd newline) in random bursts.
    let mut stdin = rec.stdin.take().unwrap();
    let mut sent = b"ticks=1500\n".to_vec();
    stdin.write_all(&sent).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && rec.status().is_none() {
        std::thread::sleep(Duration::from_millis(rng.below(51)));
        let burst: Vec<u8> = (0..1 + rng.below(24))
            .map(|_| match rng.below(40) {
                0 => b'\n',
                _ => b' ' + rng.below(95) as u8,
            })
            .collect();
        if stdin.write_all(&burst).is_err() {
            break; // the guest powered off and duet closed its stdin
        }
        sent.extend_from_slice(&burst);
    }
    drop(stdin);
    let recorded = finish(rec, LIMIT);
    assert_ok(&recorded, "duet record --image ticker");

    let transcript = std::fs::read(&transcript).unwrap();
    let text = String::from_utf8_lossy(&transcript);
    assert_eq!(
        transcript, recorded.stdout,
        "the transcript should be what the client saw"
    );
    assert!(
        stopped_at(&text, 1500),
        "ticks=1500 was not applied: {text}"
    );
    // What the guest took: it echoes every byte it reads, and its input=
    // digest covers exactly those bytes. So the echo must be the digest's
    // preimage, and a prefix of what was sent (input arriving after the
    // guest stopped reading is not taken, but nothing is lost, reordered or
    // made up), reaching beyond the first line.
    let echo = echoed(&transcript);
    let digest = field(&text, "ticker done ", "input");
    assert_eq!(
        format!("{:016x}", fnv1a(&echo)),
        digest,
        "the echo is not what the guest's input digest covers:\n{text}"
    );
    assert!(
        sent.starts_with(&echo),
        "the guest echoed bytes that were not sent, or out of order:\nsent {:?}\necho {:?}",
        String::from_utf8_lossy(&sent),
        String::from_utf8_lossy(&echo)
    );
    assert!(
        echo.len() > b"ticks=1500\n".len(),
        "the guest took only {} of {} bytes sent",
        echo.len(),
        sent.len()
    );
    let (_, records) = read_log(&log);
    let serial_in = records
        .iter()
        .filter(|r| matches!(r.event, Event::SerialIn { .. }))
        .count();
    assert!(serial_in >= 2, "only {serial_in} serial input records");

    let replay = replay("ticker", &log, Some(&replayed));
    // Exit 0 also means every logged event was met at its recorded position:
    // replay exits 4 at the first event whose position differs.
    assert_ok(&replay, "duet replay --image ticker");
    assert!(
        std::fs::read(&replayed).unwrap() == transcript,
        "replayed output differs from the recorded transcript"
    );
    assert!(
        replay.stdout.is_empty(),
        "--output given, but replay wrote to stdout"
    );
    assert_eq!(final_state(&replay), final_state(&recorded));
}

/// Two thousand and more mixed commands, as redis-cli sends them one at a
/// time, with a reply between each.
fn kv_workload(rng: &mut Rng) -> (String, usize) {
    let mut script = String::new();
    let mut n = 0;
    while n < 2200 {
        let key = format!("key:{}", rng.below(64));
        let line = match rng.below(8) {
            0 => format!("SET {key} v{}", rng.next()),
            1 => format!("GET {key}"),
            2 => format!("INCR n:{}", rng.below(16)),
            3 => format!("INCRBY n:{} {}", rng.below(16), rng.below(1000)),
            4 => format!("DEL {key}"),
            5 => format!("EXISTS {key}"),
            6 => "DBSIZE".to_string(),
            _ => format!("ECHO hello-{}", rng.next()),
        };
        script.push_str(&line);
        script.push('\n');
        n += 1;
    }
    (script, n)
}

#[test]
fn kv_under_redis_cli_replays_identically() {
    if !kvm_available("kv_under_redis_cli_replays_identically") {
        return;
    }
    let dir = tempdir("rr-kv");
    let (log, transcript, replayed) = (
        dir.path().join("kv.log"),
        dir.path().join("record.transcript"),
        dir.path().join("replay.out"),
    );
    let addr: SocketAddr = free_addr();
    let mut rec = launch(
        duet()
            .args(["record", "--image", "kv", "--serial"])
            .arg(format!("tcp:{addr}"))
            .arg("--log")
            .arg(&log)
            .arg("--transcript")
            .arg(&transcript),
        false,
    );
    wait_for_port(addr, Duration::from_secs(10));

    let (script, n) = kv_workload(&mut seed::rng(
        "kv_under_redis_cli_replays_identically",
        Some(0x6b76_2d72_6563_6f72),
    ));
    let cli = redis_cli(addr, &[], Some(script.as_bytes()), LIMIT);
    let replies = stdout(&cli);
    assert!(
        cli.status.success(),
        "redis-cli failed: {:?} {}",
        cli.status,
        stderr(&cli)
    );
    assert_eq!(
        replies.lines().count(),
        n,
        "one reply line per command expected: {replies}"
    );
    assert!(!replies.contains("ERR"), "kv refused a command: {replies}");

    rec.terminate().unwrap();
    let recorded = finish(rec, Duration::from_secs(30));
    assert_ok(&recorded, "duet record --image kv, stopped by SIGTERM");
    let (_, records) = read_log(&log);
    assert_eq!(
        records.iter().rev().nth(1).map(|r| &r.event),
        Some(&Event::Stop),
        "a stopped recording ends with Stop and the final digest"
    );

    let replay = replay("kv", &log, Some(&replayed));
    assert_ok(&replay, "duet replay --image kv");
    let transcript = std::fs::read(&transcript).unwrap();
    assert!(
        transcript.len() > 2000,
        "transcript has only {} bytes",
        transcript.len()
    );
    assert!(
        std::fs::read(&replayed).unwrap() == transcript,
        "replayed output differs from the recorded transcript"
    );
    assert_eq!(final_state(&replay), final_state(&recorded));
}

/// Rewrites `log` to `edited` with `edit` applied to record `seq`.
fn edit_record(
    log: &std::path::Path,
    edited: &std::path::Path,
    seq: u64,
    edit: impl FnOnce(&mut Record),
) {
    let (header, mut records) = read_log(log);
    edit(&mut records[seq as usize]);
    write_log(edited, &header, &records);
}

#[test]
fn changed_clock_value_diverges_at_the_next_exit() {
    if !kvm_available("changed_clock_value_diverges_at_the_next_exit") {
        return;
    }
    let dir = tempdir("rr-clock");
    let (log, edited) = (dir.path().join("ticker.log"), dir.path().join("edited.log"));
    record_ticker(&dir, &log);
    let (_, records) = read_log(&log);

    // A clock read in the middle of the run.
    let target = records[records.len() / 2..]
        .iter()
        .find(|r| matches!(r.event, Event::Clock { .. }))
        .expect("ticker reads the clock")
        .clone();
    edit_record(&log, &edited, target.seq, |r| match &mut r.event {
        Event::Clock { ns } => *ns += 1,
        _ => unreachable!(),
    });

    // The edited record itself is met where the log says (the value it
    // carries is only seen once the read returns), and so is every later
    // record at the same exit. Ticker folds the value into its running
    // digest, which it keeps in a register, so the general registers at the
    // next exit that has a record differ from the recording: that is the
    // first record whose position check can fail, and it must.
    let first_later = records[target.seq as usize + 1..]
        .iter()
        .find(|r| r.pos.exit > target.pos.exit)
        .expect("records after the edited one")
        .seq;
    let o = replay("ticker", &edited, None);
    let seq = diverged_at(&o);
    assert!(
        seq >= target.seq,
        "divergence reported at {seq}, before the edit at {}",
        target.seq
    );
    assert_eq!(
        seq,
        first_later,
        "clock record {} ({}) edited; expected the divergence at the next \
         exit's record {first_later}; stderr: {}",
        target.seq,
        target.pos,
        stderr(&o)
    );
}

#[test]
fn moved_interrupt_diverges_at_that_record() {
    if !kvm_available("moved_interrupt_diverges_at_that_record") {
        return;
    }
    let dir = tempdir("rr-interrupt");
    let (log, edited) = (dir.path().join("ticker.log"), dir.path().join("edited.log"));
    record_ticker(&dir, &log);
    let (_, records) = read_log(&log);

    let target = records[records.len() / 2..]
        .iter()
        .find(|r| matches!(r.event, Event::Interrupt { .. }))
        .expect("ticker takes timer interrupts")
        .clone();
    edit_record(&log, &edited, target.seq, |r| r.pos.exit += 1);

    // Everything before the record still matches, so replay reaches the exit
    // where the interrupt was injected, injects it there (the timer tick
    // before it is unchanged) and finds the log placing it one exit later.
    let o = replay("ticker", &edited, None);
    assert_eq!(
        diverged_at(&o),
        target.seq,
        "interrupt record {} moved from {}; stderr: {}",
        target.seq,
        target.pos,
        stderr(&o)
    );
}

#[test]
fn replaying_twice_gives_the_same_output_and_state() {
    if !kvm_available("replaying_twice_gives_the_same_output_and_state") {
        return;
    }
    let dir = tempdir("rr-twice");
    let log = dir.path().join("ticker.log");
    let recorded = run_bounded(
        duet()
            .args(["record", "--image", "ticker", "--log"])
            .arg(&log),
        Some(b"ticks=400\nsome input, replayed twice\n"),
        LIMIT,
    );
    assert_ok(&recorded, "duet record --image ticker");

    let first = replay("ticker", &log, None);
    let second = replay("ticker", &log, None);
    assert_ok(&first, "first replay");
    assert_ok(&second, "second replay");
    assert!(stopped_at(&stdout(&first), 400), "{}", stdout(&first));
    assert!(
        first.stdout == second.stdout,
        "two replays of one log printed different output"
    );
    assert_eq!(first.stdout, recorded.stdout);
    assert_eq!(final_state(&first), final_state(&second));
    assert_eq!(final_state(&first), final_state(&recorded));
}

#[test]
fn echo_is_the_ticker_output_less_its_report_lines() {
    let out = b"ticks=5\nab tick=100 input=0123456789abcdef all=fedcba9876543210\ncd\n\
        tick=7 input=xyz\nticker done ticks=5 input=0123456789abcdef all=0000000000000000\n";
    assert_eq!(echoed(out), b"ticks=5\nab cd\ntick=7 input=xyz\n");
    assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
}

/// A solo run stopped by SIGTERM ends at the guest's next exit, exits 0 and
/// says where it ended, as `duet record` does: an operator (or a benchmark)
/// can count the exits a run made without recording it.
#[test]
fn a_solo_run_stopped_by_sigterm_prints_its_final_state() {
    if !kvm_available("a_solo_run_stopped_by_sigterm_prints_its_final_state") {
        return;
    }
    let addr: SocketAddr = free_addr();
    let mut run = launch(
        duet()
            .args(["run", "--image", "kv", "--serial"])
            .arg(format!("tcp:{addr}")),
        false,
    );
    wait_for_port(addr, Duration::from_secs(10));
    run.terminate().unwrap();
    let out = finish(run, Duration::from_secs(30));
    assert_ok(&out, "duet run --image kv, stopped by SIGTERM");
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("duet: final state exits="))
        .unwrap_or_else(|| panic!("no final state: {err}"));
    let exits: u64 = field(line, "final state", "exits").parse().unwrap();
    assert!(exits > 0, "{line}");
}
