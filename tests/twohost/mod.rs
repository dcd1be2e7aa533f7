//! Shared harness of the two-host failover tests: the namespaces of
//! `vmm::netns`, an arbiter (a `tas-server`, or a three-member etcd
//! cluster) on the arbiter host, a primary on host A and a backup on host
//! B, each process run with `ip netns exec`, and a RESP client whose socket
//! is made inside the client namespace. The partition scenario itself
//! ([`partition_once`]) is here too, so that it runs unchanged against
//! either arbiter.
//!
//! Everything is bounded and cleaned up on every path: processes are killed
//! when their [`Proc`] (the kit's) drops, then the namespaces go with the
//! [`Topology`], then the scratch directory.

#![allow(dead_code)]

// The etcd test cluster, here so that a two-host test can run it in the
// arbiter namespace without declaring it itself.
#[path = "../etcd/mod.rs"]
pub mod etcd;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tas_server::protocol::Status;
use vmm::netns::{self, Host, Topology};

use crate::common::{resp, Conn, Proc, Reply};

/// The arbiter's port on 198.18.0.3.
pub const TAS_PORT: u16 = 7700;
/// The log channel's port on B's logging address.
pub const CHANNEL_PORT: u16 = 7000;
/// The kv service's port on the VIP.
pub const SERVICE_PORT: u16 = 6380;
/// The VM id both sides claim for.
pub const VM_ID: &str = "kv-netns";

/// netkv's port, on the guest's own address.
pub const NETKV_PORT: u16 = 6379;
/// The port of `--metrics` on a host's service address.
pub const METRICS_PORT: u16 = 9100;

/// What a pair (or a solo VM) runs, which decides how clients reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// `kv` on COM1, served at the VIP, which the backup's go-live hook
    /// moves to B.
    Kv,
    /// `netkv` on a virtio-net NIC bridged onto the service network: the
    /// guest keeps [`netns::GUEST_IP`] wherever it runs.
    NetKv,
}

impl Guest {
    /// The image name.
    pub fn image(self) -> &'static str {
        match self {
            Guest::Kv => "kv",
            Guest::NetKv => "netkv",
        }
    }

    /// Where clients reach it.
    pub fn service_addr(self) -> SocketAddr {
        match self {
            Guest::Kv => SocketAddr::from((netns::VIP, SERVICE_PORT)),
            Guest::NetKv => SocketAddr::from((netns::GUEST_IP, NETKV_PORT)),
        }
    }
}

/// The NIC flags of a netkv VM on a host of the topology (`run`, `record`,
/// `primary`, `backup`); `duet replay` takes the last two.
pub fn netkv_args() -> [String; 4] {
    [
        "--tap".into(),
        netns::TAP_IF.into(),
        "--guest-ip".into(),
        guest_cidr(),
    ]
}

/// The guest's address with its prefix, as `--guest-ip` takes it.
pub fn guest_cidr() -> String {
    format!("{}/{}", netns::GUEST_IP, netns::SERVICE_PREFIX_LEN)
}

/// Where `host`'s VMM serves `--metrics`.
pub fn metrics_addr(host: Host) -> SocketAddr {
    SocketAddr::from((host.service_ip(), METRICS_PORT))
}

/// A TCP connection to `addr` made in the client namespace, with writes
/// bounded.
pub fn connect_from_client(topo: &Topology, addr: SocketAddr) -> std::io::Result<Conn> {
    let stream = topo
        .in_namespace(Host::Client, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        })
        .map_err(std::io::Error::other)??;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    Conn::from_stream(stream)
}

/// Connects from the client namespace until a PING at `addr` is answered
/// with PONG, within `limit`; panics with `logs()` if it never is.
pub fn wait_for_pong(
    topo: &Topology,
    addr: SocketAddr,
    limit: Duration,
    logs: impl Fn() -> String,
) -> Conn {
    let end = Instant::now() + limit;
    loop {
        if let Ok(mut c) = connect_from_client(topo, addr) {
            match c.call(&["PING"], Duration::from_secs(2)) {
                Ok(Reply::Simple(s)) if s == "PONG" => return c,
                Ok(other) => panic!("PING got {other:?}"),
                Err(_) => {}
            }
        }
        assert!(
            Instant::now() < end,
            "the service at {addr} did not answer PING within {limit:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The failure detector's timing a [`Pair`] runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// `--timeout-ms 300 --heartbeat-ms 50`, what the tests were written
    /// for.
    Tests,
    /// The binary's defaults (what the detection benchmark measures).
    Defaults,
}

/// How a [`Solo`] netkv VM runs on host A.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SoloMode {
    /// `duet run`.
    Run,
    /// `duet record --log PATH`.
    Record(PathBuf),
}

/// One netkv VM without a backup, on host A's `tap0`, in a topology of its
/// own. Field order is drop order: the VM, the namespaces, the directory.
pub struct Solo {
    pub vm: Proc,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
}

impl Solo {
    /// Builds the namespaces and starts netkv on host A as `mode` says.
    pub fn start(prefix: &str, mode: SoloMode) -> Solo {
        Solo::start_in(
            Topology::up(prefix).unwrap_or_else(|e| panic!("netns up: {e}")),
            mode,
        )
    }

    /// Starts netkv on host A of a topology already built (one whose links
    /// the caller changed first, say).
    pub fn start_in(topo: Topology, mode: SoloMode) -> Solo {
        let dir = crate::common::tempdir(topo.prefix());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
        match &mode {
            SoloMode::Run => cmd.arg("run"),
            SoloMode::Record(log) => cmd.arg("record").arg("--log").arg(log),
        };
        cmd.args(["--image", "netkv", "--serial", "none"])
            .args(netkv_args())
            .env("DUET_LOG", "info");
        let vm = spawn(
            "solo VM",
            topo.exec(Host::A, &cmd),
            &dir.path().join("vm.log"),
        );
        Solo { vm, topo, dir }
    }

    /// Where clients reach the guest.
    pub fn service(&self) -> SocketAddr {
        Guest::NetKv.service_addr()
    }

    /// A connection to the guest from the client namespace.
    pub fn connect(&self) -> std::io::Result<Conn> {
        connect_from_client(&self.topo, self.service())
    }

    /// Connects until a PING is answered with PONG, within `limit`.
    pub fn wait_for_service(&self, limit: Duration) -> Conn {
        wait_for_pong(&self.topo, self.service(), limit, || self.logs())
    }

    /// The VM's output, for failure messages.
    pub fn logs(&self) -> String {
        format!("----- {} -----\n{}\n", self.vm.name(), self.vm.log_text())
    }
}

/// Fails the test unless we are root, or says loudly that it did not run
/// when DUET_ALLOW_NO_NETNS=1.
pub fn netns_available(test: &str) -> bool {
    if netns::is_root() {
        return true;
    }
    if std::env::var("DUET_ALLOW_NO_NETNS").as_deref() == Ok("1") {
        eprintln!("NOT RUN: {test} needs root for network namespaces (DUET_ALLOW_NO_NETNS=1)");
        return false;
    }
    panic!("{test} needs root for network namespaces; set DUET_ALLOW_NO_NETNS=1 to allow skipping");
}

pub use crate::common::tas_server_bin;

/// Starts `cmd` with its output in `log`; panics if it cannot.
fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
    Proc::logged(name, &mut cmd, log).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Which side survived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Primary,
    Backup,
}

/// Which arbiter a [`Pair`] runs on the arbiter host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArbiterKind {
    /// `tas-server` on [`Pair::tas_addr`].
    Tas,
    /// A three-member etcd cluster, every member on the arbiter host's
    /// service address (ports 2379, 2381, 2383).
    Etcd,
}

/// One two-host pair with its arbiter. Field order is drop order:
/// processes first, then the namespaces, then the directory.
pub struct Pair {
    pub arbiter: Option<Proc>,
    pub primary: Proc,
    pub backup: Proc,
    /// The etcd cluster, with [`ArbiterKind::Etcd`].
    pub etcd: Option<etcd::Cluster>,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    /// The tas-server binary, for a pair on [`ArbiterKind::Tas`] only (it
    /// may have to be built first).
    tas_bin: Option<PathBuf>,
    arbiter_starts: u32,
    guest: Guest,
}

impl Pair {
    pub fn tas_addr() -> SocketAddr {
        SocketAddr::from((Host::Arbiter.service_ip(), TAS_PORT))
    }

    /// The `kv` pair's service address (the VIP); see [`Pair::service`].
    pub fn service_addr() -> SocketAddr {
        Guest::Kv.service_addr()
    }

    /// Builds the namespaces and starts the arbiter, the backup (B) and
    /// the primary (A) of `kv` on COM1, with a 300 ms failure timeout on
    /// both sides.
    pub fn start(prefix: &str) -> Pair {
        Pair::start_with(prefix, Guest::Kv)
    }

    /// [`Pair::start`] for `netkv`: the guest's NIC on each host's `tap0`,
    /// served at [`netns::GUEST_IP`], with both sides' `--metrics` on
    /// their service addresses (see [`Pair::metrics_addr`]).
    pub fn start_netkv(prefix: &str) -> Pair {
        Pair::start_with(prefix, Guest::NetKv)
    }

    /// Builds the namespaces and starts the arbiter, the backup and the
    /// primary of `guest`.
    pub fn start_with(prefix: &str, guest: Guest) -> Pair {
        Pair::start_full(prefix, guest, ArbiterKind::Tas, Timing::Tests)
    }

    /// Builds the namespaces and starts `arbiter`, the backup and the
    /// primary of `guest`.
    pub fn start_on(prefix: &str, guest: Guest, arbiter_kind: ArbiterKind) -> Pair {
        Pair::start_full(prefix, guest, arbiter_kind, Timing::Tests)
    }

    /// [`Pair::start_with`] with the failure detector's `timing`. Each side
    /// writes its events to `primary.events` or `backup.events` in the
    /// pair's directory (see [`Pair::events`]) and serves `--metrics` on
    /// its service address.
    pub fn start_timed(prefix: &str, guest: Guest, timing: Timing) -> Pair {
        Pair::start_full(prefix, guest, ArbiterKind::Tas, timing)
    }

    /// The pair of `guest` with `arbiter_kind` as arbiter and `timing`.
    pub fn start_full(
        prefix: &str,
        guest: Guest,
        arbiter_kind: ArbiterKind,
        timing: Timing,
    ) -> Pair {
        let tas_bin = (arbiter_kind == ArbiterKind::Tas).then(tas_server_bin);
        let topo = Topology::up(prefix).unwrap_or_else(|e| panic!("netns up: {e}"));
        // Started before anything else that could panic, so that it is
        // killed before the namespaces go.
        let etcd = (arbiter_kind == ArbiterKind::Etcd)
            .then(|| etcd::Cluster::start_in(prefix, 3, &topo, Host::Arbiter));
        let tas = match &etcd {
            Some(cluster) => cluster.tas_arg(),
            None => Self::tas_addr().to_string(),
        };
        let dir = crate::common::tempdir(prefix);
        let duet = env!("CARGO_BIN_EXE_duet");
        let channel = SocketAddr::from((Host::B.log_ip().unwrap(), CHANNEL_PORT));
        let events_dir = dir.path().to_path_buf();
        let pair_args = |role: &str| -> Vec<String> {
            let mut args: Vec<String> = [
                role,
                "--image",
                guest.image(),
                "--vm-id",
                VM_ID,
                "--tas",
                &tas,
            ]
            .map(str::to_string)
            .to_vec();
            if timing == Timing::Tests {
                args.extend(["--timeout-ms", "300", "--heartbeat-ms", "50"].map(str::to_string));
            }
            let events = events_dir.join(format!("{role}.events"));
            args.extend(["--events".into(), events.display().to_string()]);
            let host = if role == "primary" { Host::A } else { Host::B };
            args.extend(["--metrics".into(), metrics_addr(host).to_string()]);
            match guest {
                Guest::Kv => {
                    args.extend(["--serial".into(), format!("tcp:{}", Self::service_addr())]);
                }
                Guest::NetKv => {
                    args.extend(netkv_args().iter().map(|a| a.to_string()));
                    args.extend(["--serial".into(), "none".into()]);
                }
            }
            args
        };
        let mut backup_cmd = Command::new(duet);
        backup_cmd
            .args(pair_args("backup"))
            .args(["--listen", &channel.to_string()])
            .env("DUET_LOG", "info");
        if guest == Guest::Kv {
            // netkv needs no hook: the guest keeps its address and MAC, and
            // the backup announces them with a gratuitous ARP.
            backup_cmd.args([
                "--go-live-exec",
                &format!("{duet} netns move-vip --prefix {prefix} --to b"),
            ]);
        }
        let mut primary_cmd = Command::new(duet);
        primary_cmd
            .args(pair_args("primary"))
            .args(["--backup", &channel.to_string()])
            .env("DUET_LOG", "info");

        // Fields are filled in drop-safe order: if a later step panics, the
        // processes started so far are killed before the namespaces go.
        let mut arbiter = None;
        if let Some(bin) = &tas_bin {
            start_arbiter_into(&mut arbiter, &topo, bin, dir.path(), 1);
        }
        let mut backup = spawn(
            "backup",
            topo.exec(Host::B, &backup_cmd),
            &dir.path().join("backup.log"),
        );
        assert!(
            backup.wait_for_log("waiting for a primary", Duration::from_secs(10)),
            "the backup did not start listening: {}",
            backup.log_text()
        );
        let primary = spawn(
            "primary",
            topo.exec(Host::A, &primary_cmd),
            &dir.path().join("primary.log"),
        );
        Pair {
            arbiter,
            primary,
            backup,
            etcd,
            topo,
            dir,
            tas_bin,
            arbiter_starts: 1,
            guest,
        }
    }

    /// Where clients reach the guest: the VIP for `kv`, the guest's own
    /// address for `netkv`.
    pub fn service(&self) -> SocketAddr {
        self.guest.service_addr()
    }

    /// The `--metrics` address of `side`, reachable from the client
    /// namespace.
    pub fn metrics_addr(&self, side: Side) -> SocketAddr {
        metrics_addr(match side {
            Side::Primary => Host::A,
            Side::Backup => Host::B,
        })
    }

    /// Scrapes `side`'s metrics from the client namespace.
    pub fn scrape(&self, side: Side) -> anyhow::Result<crate::common::Metrics> {
        let addr = self.metrics_addr(side);
        self.topo
            .in_namespace(Host::Client, || {
                crate::common::metrics::scrape(addr, Duration::from_secs(2))
            })
            .map_err(anyhow::Error::from)?
    }

    /// `side`'s event log so far (JSON lines; see `vmm::ft::events`).
    pub fn events(&self, side: Side) -> String {
        let name = match side {
            Side::Primary => "primary.events",
            Side::Backup => "backup.events",
        };
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Starts (or restarts) the arbiter on the same address and state file.
    pub fn start_arbiter(&mut self) {
        self.arbiter_starts += 1;
        let bin = self
            .tas_bin
            .as_ref()
            .expect("only a pair on tas-server restarts its arbiter");
        start_arbiter_into(
            &mut self.arbiter,
            &self.topo,
            bin,
            self.dir.path(),
            self.arbiter_starts,
        );
    }

    /// The arbiter's decisions, asked from the client namespace.
    pub fn arbiter_status(&self) -> Status {
        self.topo
            .in_namespace(Host::Client, || {
                tas_server::client::Client::new(Self::tas_addr(), Duration::from_secs(2)).status()
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("arbiter status: {e}"))
    }

    /// A connection to the service from the client namespace.
    pub fn connect(&self) -> std::io::Result<Conn> {
        connect_from_client(&self.topo, self.service())
    }

    /// Connects until a PING is answered with PONG, within `limit`.
    pub fn wait_for_service(&mut self, limit: Duration) -> Conn {
        wait_for_pong(&self.topo, self.service(), limit, || self.logs())
    }

    /// Waits up to `limit` for one side to exit, checks that it lost the
    /// arbiter (exit 5 and the halting message) and that the other side is
    /// still running; returns the survivor and when the loser's exit was
    /// seen.
    pub fn outcome(&mut self, limit: Duration) -> (Side, Instant) {
        let end = Instant::now() + limit;
        let (loser, survivor) = loop {
            if self.primary.status().is_some() {
                break (Side::Primary, Side::Backup);
            }
            if self.backup.status().is_some() {
                break (Side::Backup, Side::Primary);
            }
            assert!(
                Instant::now() < end,
                "neither side exited within {limit:?} of the failure\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let seen = Instant::now();
        // The survivor must not follow the loser out.
        std::thread::sleep(Duration::from_millis(300));
        let logs = self.logs();
        let (l, s) = match loser {
            Side::Primary => (&mut self.primary, &mut self.backup),
            Side::Backup => (&mut self.backup, &mut self.primary),
        };
        let status = l.status().unwrap();
        assert_eq!(
            status.code(),
            Some(5),
            "the {} exited with {status}, not 5 (lost arbitration)\n{logs}",
            l.name()
        );
        let halt = format!("duet: the arbiter gave {VM_ID}/epoch ");
        assert!(
            l.log_text().contains(&halt) && l.log_text().contains(": halting"),
            "the {} exited 5 without the halting message\n{logs}",
            l.name()
        );
        let other = s.status();
        assert!(
            other.is_none(),
            "both sides exited: the {} with {status}, the {} with {other:?}\n{logs}",
            l.name(),
            s.name(),
        );
        (survivor, seen)
    }

    /// The survivor's process.
    pub fn proc_of(&mut self, side: Side) -> &mut Proc {
        match side {
            Side::Primary => &mut self.primary,
            Side::Backup => &mut self.backup,
        }
    }

    /// The name the arbiter knows `side` by (duet's default, role@pid; the
    /// pid is duet's own, since `ip netns exec` execs it).
    pub fn claimant(&self, side: Side) -> String {
        match side {
            Side::Primary => format!("primary@{}", self.primary.pid()),
            Side::Backup => format!("backup@{}", self.backup.pid()),
        }
    }

    /// The epoch in the loser's halting message.
    pub fn halted_epoch(&self, loser: Side) -> u64 {
        let out = match loser {
            Side::Primary => self.primary.log_text(),
            Side::Backup => self.backup.log_text(),
        };
        let tail = out
            .split(&format!("the arbiter gave {VM_ID}/epoch "))
            .nth(1)
            .unwrap_or_else(|| panic!("no halting message in {out}"));
        tail.split(' ').next().unwrap().parse().unwrap()
    }

    /// Checks that the arbiter's record names `survivor` for the pair's
    /// epoch. For etcd, from its keys: the VM's epoch key holds that
    /// epoch, and there is exactly one claim key, that epoch's, holding
    /// the survivor's name.
    pub fn check_arbiter_names(&self, survivor: Side) {
        let loser = match survivor {
            Side::Primary => Side::Backup,
            Side::Backup => Side::Primary,
        };
        let epoch = self.halted_epoch(loser);
        if let Some(cluster) = &self.etcd {
            use vmm::ft::arbiter::etcd::{claim_key, epoch_key, vm_prefix};
            let keys = cluster.keys(&vm_prefix(VM_ID));
            eprintln!("etcd's keys for {VM_ID}: {keys:?}");
            let value = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            assert_eq!(
                value(&epoch_key(VM_ID)),
                Some(epoch.to_string()),
                "etcd's current epoch is not the halted one: {keys:?}"
            );
            let claims: Vec<_> = keys
                .iter()
                .filter(|(k, _)| k.contains("/claims/"))
                .collect();
            assert_eq!(
                claims,
                [&(claim_key(VM_ID, epoch), self.claimant(survivor))],
                "etcd does not show exactly one winner, the {survivor:?}, for epoch {epoch}"
            );
            return;
        }
        let status = self.arbiter_status();
        let vm = status
            .vms
            .iter()
            .find(|v| v.vm_id == VM_ID)
            .unwrap_or_else(|| panic!("the arbiter knows nothing of {VM_ID}: {status:?}"));
        assert_eq!(
            vm.holders.get(&epoch),
            Some(&self.claimant(survivor)),
            "the arbiter's holder of epoch {epoch} is not the {survivor:?} that went on: {status:?}"
        );
    }

    /// Every process's output, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        let procs = [
            self.arbiter.as_ref(),
            Some(&self.primary),
            Some(&self.backup),
        ];
        for p in procs.into_iter().flatten() {
            all.push_str(&format!("----- {} -----\n{}\n", p.name(), p.log_text()));
        }
        if let Some(cluster) = &self.etcd {
            all.push_str(&format!("----- etcd -----\n{}", cluster.logs()));
        }
        all
    }

    /// Kills everything and removes the namespaces, reporting errors.
    pub fn shutdown(mut self) {
        self.primary.kill();
        self.backup.kill();
        if let Some(a) = self.arbiter.as_mut() {
            a.kill();
        }
        drop(self.etcd.take());
        let namespaces = self.topo.namespaces();
        self.topo.down().unwrap();
        let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let left = String::from_utf8_lossy(&left.stdout);
        for ns in namespaces {
            assert!(
                !left
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(&ns)),
                "{ns} left behind"
            );
        }
    }
}

fn start_arbiter_into(slot: &mut Option<Proc>, topo: &Topology, bin: &Path, dir: &Path, n: u32) {
    if let Some(mut old) = slot.take() {
        old.kill();
    }
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", &Pair::tas_addr().to_string()])
        .arg("--state")
        .arg(dir.join("tas.state"));
    let mut p = spawn(
        "arbiter",
        topo.exec(Host::Arbiter, &cmd),
        &dir.join(format!("tas-{n}.log")),
    );
    let ok = p.wait_for_log("tas-server: listening on", Duration::from_secs(10));
    let out = p.log_text();
    *slot = Some(p);
    assert!(ok, "the arbiter did not start: {out}");
}

/// Sets `key` to `value` and insists on +OK within `limit`.
pub fn set_ok(c: &mut Conn, key: &str, value: &str, limit: Duration, logs: impl Fn() -> String) {
    match c.call(&["SET", key, value], limit) {
        Ok(Reply::Simple(s)) if s == "OK" => {}
        other => panic!("SET {key} got {other:?}\n{}", logs()),
    }
}

/// Checks that every acknowledged (key, value) is on the server `c` talks to.
pub fn check_acked(c: &mut Conn, acked: &[(String, String)], logs: impl Fn() -> String) {
    for (k, v) in acked {
        match c.call(&["GET", k], Duration::from_secs(5)) {
            Ok(Reply::Bulk(Some(got))) if got == v.as_bytes() => {}
            other => panic!(
                "acknowledged {k}={v} is not on the survivor: GET got {other:?}\n{}",
                logs()
            ),
        }
    }
}

/// Keys written before and after a partition.
const KEYS: usize = 20;

/// What goes wrong besides the logging link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Also {
    Nothing,
    /// This host is also unplugged from the service network until the
    /// other side has won.
    Unplug(Host),
}

/// One partition of a `kv` pair on `arbiter`, built under `prefix`; run
/// `run` of its test (it tags the values written). Returns the survivor
/// and how long after the cut the loser's exit was seen.
///
/// Checks: exactly one side goes on (the other exits 5 with the halting
/// message), the client never gets an answer from the loser after the
/// cut, the survivor serves and holds every acknowledged write, and the
/// arbiter's record names the survivor for the epoch.
pub fn partition_once(
    prefix: &str,
    run: u32,
    also: Also,
    arbiter: ArbiterKind,
) -> (Side, Duration) {
    let mut pair = Pair::start_on(prefix, Guest::Kv, arbiter);
    let mut conn = pair.wait_for_service(Duration::from_secs(30));
    let limit = Duration::from_secs(5);
    let mut acked = Vec::new();
    for i in 0..KEYS {
        let (k, v) = (format!("before:{i}"), format!("b{run}-{i}"));
        set_ok(&mut conn, &k, &v, limit, || pair.logs());
        acked.push((k, v));
    }

    let cut = Instant::now();
    pair.topo.cut_logging_link().unwrap();
    if let Also::Unplug(host) = also {
        pair.topo.unplug(host).unwrap();
    }
    // Sent on the primary's connection during the partition: its reply is
    // held until someone wins.
    conn.send(&["SET", "during", "d"]).unwrap();
    if let Also::Unplug(host) = also {
        // The connected side wins; then the isolated one comes back.
        let winner = if host == Host::A {
            "backup: going live"
        } else {
            "continuing alone"
        };
        let side = if host == Host::A {
            &mut pair.backup
        } else {
            &mut pair.primary
        };
        assert!(
            side.wait_for_log(winner, Duration::from_secs(10)),
            "with {host} unplugged, the other side did not win\n{}",
            pair.logs()
        );
        assert!(
            pair.primary.status().is_none() && pair.backup.status().is_none(),
            "the unplugged side halted without reaching the arbiter\n{}",
            pair.logs()
        );
        pair.topo.plug(host).unwrap();
    }
    let (survivor, seen) = pair.outcome(Duration::from_secs(15));
    let decided = seen - cut;
    eprintln!("run {run}: the {survivor:?} won {decided:?} after the cut");

    let logs = pair.logs();
    let went_live = pair.backup.log_text().contains("backup: going live");
    match survivor {
        Side::Primary => {
            // The primary goes on alone and releases what it held.
            match conn.reply(limit) {
                Ok(Reply::Simple(s)) if s == "OK" => acked.push(("during".into(), "d".into())),
                other => {
                    panic!("the winning primary did not answer the held SET: {other:?}\n{logs}")
                }
            }
            assert!(!went_live, "the losing backup went live\n{logs}");
            assert_eq!(pair.topo.vip_holder().unwrap(), Some(Host::A), "{logs}");
        }
        Side::Backup => {
            // The loser must never release held output. It has exited, so
            // anything it sent is already on the way.
            match conn.reply(Duration::from_secs(1)) {
                Err(resp::Error::Timeout | resp::Error::Closed(_)) => {}
                Err(e @ resp::Error::Protocol(_)) => panic!("{e}\n{logs}"),
                Ok(r) => panic!("the losing primary answered after the cut: {r:?}\n{logs}"),
            }
            assert!(went_live, "the backup won but never went live\n{logs}");
            assert_eq!(pair.topo.vip_holder().unwrap(), Some(Host::B), "{logs}");
            conn = pair.wait_for_service(Duration::from_secs(15));
        }
    }
    pair.check_arbiter_names(survivor);

    // The survivor serves new writes, and has every acknowledged one.
    for i in 0..KEYS {
        let (k, v) = (format!("after:{i}"), format!("a{run}-{i}"));
        set_ok(&mut conn, &k, &v, limit, || pair.logs());
        acked.push((k, v));
    }
    check_acked(&mut conn, &acked, || pair.logs());
    assert!(
        pair.proc_of(survivor).status().is_none(),
        "the surviving {survivor:?} exited\n{}",
        pair.logs()
    );
    drop(conn);
    pair.shutdown();
    (survivor, decided)
}
