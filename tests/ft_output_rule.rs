//! The Output Rule, seen from a client: with the backup frozen (SIGSTOP),
//! the primary's guest still answers a PING (its transcript shows `+PONG`
//! at once), but the client receives nothing until the backup, resumed,
//! has acknowledged the log up to that reply.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn reply_waits_for_the_backup() {
    if !kvm_available("reply_waits_for_the_backup") {
        return;
    }
    let dir = tempdir("ft_output_rule");
    let transcript = dir.path().join("primary.txt");
    let (chan, serial, metrics) = (free_addr(), free_addr(), free_addr());
    // Long timeouts: a frozen backup is the point here, not a failure.
    // And a long lag bound: on a loaded host the guest's handling of the
    // request can take more than the default 5 ms of busy time, after
    // which the primary waits for the frozen backup before its guest
    // produces the reply at all.
    let mut backup = launch(
        backup_cmd("kv", "ft-rule", chan).args(["--timeout-ms", "60000"]),
        false,
    );
    let mut primary = launch(
        primary_cmd("kv", "ft-rule", chan)
            .args(["--timeout-ms", "60000", "--max-lag-ms", "60000"])
            .args(["--serial", &format!("tcp:{serial}")])
            .args(["--metrics", &metrics.to_string()])
            .arg("--transcript")
            .arg(&transcript),
        false,
    );
    wait_for_port(serial, LIMIT);
    let mut client = connect(serial, LIMIT);
    // A first round trip with the backup running: the pair works.
    client.send_raw(b"PING\r\n").unwrap();
    assert_eq!(
        read_replies(&mut client, 1, LIMIT),
        [Reply::Simple("PONG".into())]
    );

    backup.signal(libc::SIGSTOP).unwrap();
    assert!(
        wait_until_stopped(backup.pid(), Duration::from_secs(5)),
        "the backup did not stop"
    );
    client.send(&["ECHO", "held"]).unwrap();
    assert!(
        wait_for_file_containing(&transcript, b"$4\r\nheld\r\n", Duration::from_secs(10)),
        "the primary's guest did not produce its reply within 10 s"
    );

    // For a second, nothing reaches the client, and the primary says why.
    let mut held_seen = 0.0f64;
    let end = Instant::now() + Duration::from_secs(1);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if let Ok(m) = metrics::scrape(metrics, Duration::from_secs(2)) {
            held_seen = held_seen.max(m.get("duet_outputs_held").unwrap_or(0.0));
        }
        let wait = left.clamp(Duration::from_millis(1), Duration::from_millis(100));
        match client.reply(wait) {
            Err(resp::Error::Timeout) => assert!(
                client.pending().is_empty(),
                "the client got {:?} while the backup was stopped",
                String::from_utf8_lossy(client.pending())
            ),
            Ok(r) => panic!("the client got {r:?} while the backup was stopped"),
            Err(e) => panic!("the client connection failed: {e}"),
        }
    }
    assert!(
        held_seen >= 1.0,
        "duet_outputs_held stayed below 1 while the reply was held"
    );

    backup.signal(libc::SIGCONT).unwrap();
    let start = Instant::now();
    assert_eq!(
        read_replies(&mut client, 1, Duration::from_secs(5)),
        [Reply::bulk("held")]
    );
    eprintln!("reply released {:?} after SIGCONT", start.elapsed());
    drop(client);

    primary.terminate().unwrap();
    let p = finish(primary, LIMIT);
    let b = finish(backup, LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", stderr(&p));
    assert_eq!(b.status.code(), Some(0), "backup: {}", stderr(&b));
    assert_eq!(final_state(&p), final_state(&b));
}
