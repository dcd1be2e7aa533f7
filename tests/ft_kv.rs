//! `kv` under fault tolerance on loopback: a primary and a backup serve
//! 2,000+ Redis commands (raw RESP checked against a model, `redis-cli
//! --pipe`, single `redis-cli` commands), then the primary is stopped with
//! SIGTERM. Both must exit 0 with the same final state, the backup having
//! matched every periodic digest (100 ms apart), and the backup's replayed
//! serial output must equal what the primary's guest produced, byte for
//! byte.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Bound on one `redis-cli` run, one exchange of replies, one exit.
const LIMIT: Duration = Duration::from_secs(30);
/// Commands sent over raw RESP, in pipelined batches.
const RAW_COMMANDS: usize = 1600;
const BATCH: usize = 100;
/// Commands sent with `redis-cli --pipe`.
const PIPE_COMMANDS: usize = 500;

/// What the store should hold, to predict every reply.
#[derive(Default)]
struct Model(HashMap<String, Vec<u8>>);

impl Model {
    /// A random command and the reply it must get.
    fn command(&mut self, rng: &mut Rng, i: usize) -> (Vec<Vec<u8>>, Reply) {
        let string_key = |rng: &mut Rng| format!("s{}", rng.below(40));
        let counter_key = |rng: &mut Rng| format!("c{}", rng.below(10));
        let any_key = |rng: &mut Rng| {
            if rng.below(2) == 0 {
                format!("s{}", rng.below(40))
            } else {
                format!("c{}", rng.below(10))
            }
        };
        let b = |s: &str| s.as_bytes().to_vec();
        match rng.below(6) {
            0 => {
                let (k, v) = (string_key(rng), format!("value-{i}-{}", rng.below(1000)));
                self.0.insert(k.clone(), b(&v));
                (vec![b("SET"), b(&k), b(&v)], Reply::Simple("OK".into()))
            }
            1 => {
                let k = any_key(rng);
                let want = Reply::Bulk(self.0.get(&k).cloned());
                (vec![b("GET"), b(&k)], want)
            }
            2 | 3 => {
                let k = counter_key(rng);
                let delta = if rng.below(2) == 0 {
                    None
                } else {
                    Some(rng.below(201) as i64 - 100)
                };
                let old: i64 = self
                    .0
                    .get(&k)
                    .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                let new = old + delta.unwrap_or(1);
                self.0.insert(k.clone(), b(&new.to_string()));
                let cmd = match delta {
                    None => vec![b("INCR"), b(&k)],
                    Some(d) => vec![b("INCRBY"), b(&k), b(&d.to_string())],
                };
                (cmd, Reply::Integer(new))
            }
            4 => {
                let k = any_key(rng);
                let n = i64::from(self.0.remove(&k).is_some());
                (vec![b("DEL"), b(&k)], Reply::Integer(n))
            }
            _ => {
                let k = any_key(rng);
                let n = i64::from(self.0.contains_key(&k));
                (vec![b("EXISTS"), b(&k)], Reply::Integer(n))
            }
        }
    }
}

/// Sends `RAW_COMMANDS` mixed commands in pipelined batches and checks
/// every reply against the model.
fn raw_workload(addr: SocketAddr, model: &mut Model) {
    let seed = seed::seed("kv_under_ft_matches_backup", Some(0x5eed_f7c0_ffee));
    let mut rng = Rng::new(seed);
    let mut s = connect(addr, LIMIT);
    for start in (0..RAW_COMMANDS).step_by(BATCH) {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for i in start..start + BATCH {
            let (args, reply) = model.command(&mut rng, i);
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            input.extend(resp::encode(&args));
            want.push((String::from_utf8_lossy(&args.concat()).into_owned(), reply));
        }
        s.send_raw(&input).unwrap();
        let got = read_replies(&mut s, BATCH, LIMIT);
        for (i, ((cmd, w), g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(g, w, "command #{} ({cmd}), seed {seed:#x}", start + i);
        }
    }
}

/// `redis-cli --pipe` with `PIPE_COMMANDS` SETs and INCRs.
fn pipe_workload(addr: SocketAddr, model: &mut Model) {
    let mut input = Vec::new();
    for i in 0..PIPE_COMMANDS / 2 {
        let (k, v) = (format!("p{i}"), format!("piped-{i}"));
        input.extend(resp::encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
        input.extend(resp::encode(&[b"INCR", b"piped"]));
        model.0.insert(k, v.into_bytes());
    }
    model
        .0
        .insert("piped".into(), (PIPE_COMMANDS / 2).to_string().into_bytes());
    let o = redis_cli(addr, &["--pipe"], Some(&input), LIMIT * 2);
    let out = stdout(&o);
    assert!(o.status.success(), "{:?}: {out} {}", o.status, stderr(&o));
    assert!(
        out.contains(&format!("errors: 0, replies: {PIPE_COMMANDS}")),
        "{out}"
    );
}

/// One `redis-cli --no-raw` command; its trimmed stdout.
fn cli(addr: SocketAddr, args: &[&str]) -> String {
    let mut all = vec!["--no-raw"];
    all.extend_from_slice(args);
    let o = redis_cli(addr, &all, None, LIMIT);
    assert!(o.status.success(), "redis-cli {args:?}: {}", stderr(&o));
    stdout(&o).trim_end().to_string()
}

#[test]
fn kv_under_ft_matches_backup() {
    if !kvm_available("kv_under_ft_matches_backup") {
        return;
    }
    let dir = tempdir("ft_kv");
    let (chan, serial, metrics) = (free_addr(), free_addr(), free_addr());
    let backup = launch(
        backup_cmd("kv", "ft-kv", chan)
            .arg("--transcript")
            .arg(dir.path().join("backup.txt")),
        false,
    );
    let mut primary = launch(
        primary_cmd("kv", "ft-kv", chan)
            .args(["--serial", &format!("tcp:{serial}")])
            .args(["--metrics", &metrics.to_string()])
            .args(["--digest-interval-ms", "100"])
            .arg("--transcript")
            .arg(dir.path().join("primary.txt")),
        false,
    );
    wait_for_port(serial, LIMIT);

    let mut model = Model::default();
    assert_eq!(cli(serial, &["PING"]), "PONG");
    raw_workload(serial, &mut model);
    pipe_workload(serial, &mut model);
    assert_eq!(cli(serial, &["GET", "piped"]), "\"250\"");
    assert_eq!(cli(serial, &["GET", "p0"]), "\"piped-0\"");
    assert_eq!(cli(serial, &["GET", "p249"]), "\"piped-249\"");
    assert_eq!(cli(serial, &["INCRBY", "piped", "-300"]), "(integer) -50");
    assert_eq!(
        cli(serial, &["DBSIZE"]),
        format!("(integer) {}", model.0.len())
    );

    let m = scrape(metrics);
    let sent = m.require("duet_records_sent_total").unwrap();
    let acked = m.require("duet_records_acked_total").unwrap();
    assert!(
        sent > 0.0 && acked > 0.0,
        "sent {sent} acked {acked}: {m:?}"
    );
    assert!(acked <= sent, "acked {acked} > sent {sent}");

    primary.terminate().unwrap();
    let p = finish(primary, LIMIT);
    let b = finish(backup, LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", stderr(&p));
    assert_eq!(
        b.status.code(),
        Some(0),
        "backup (4 = a digest mismatched): {}",
        stderr(&b)
    );
    assert_eq!(final_state(&p), final_state(&b));

    let pt = std::fs::read(dir.path().join("primary.txt")).unwrap();
    let bt = std::fs::read(dir.path().join("backup.txt")).unwrap();
    assert!(
        pt.windows(6).any(|w| w == b"+PONG\r"),
        "primary transcript lacks the PING reply: {} bytes",
        pt.len()
    );
    assert!(
        pt == bt,
        "transcripts differ: primary {} bytes, backup {} bytes, first difference at byte {}",
        pt.len(),
        bt.len(),
        pt.iter()
            .zip(&bt)
            .position(|(a, b)| a != b)
            .unwrap_or(pt.len().min(bt.len()))
    );
}
