//! A real etcd cluster for the tests: members as child processes (killed
//! and reaped with the cluster, on every path), data in a temporary
//! directory, bounded waits. On loopback with ports from the kit, or
//! ([`Cluster::start_in`]) inside a host namespace of a `vmm::netns`
//! topology, listening on that host's service address, so that the hosts
//! of a two-host test reach it over the service network.
//!
//! Tests that need etcd fail, with a message saying how to get it, when the
//! `etcd` binary is missing: they are never skipped silently.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tas_server::tls::TlsFiles;
use vmm::ft::arbiter::etcd::EtcdArbiter;
use vmm::ft::arbiter::ArbiterTls;
use vmm::kit::process::Proc;
use vmm::netns::{Host, Topology};

/// Raft timing for loopback: elections in about half a second instead of
/// the default second, still ten heartbeats, so a loaded two-core machine
/// does not see false elections.
const HEARTBEAT_MS: &str = "50";
const ELECTION_MS: &str = "500";

struct Member {
    name: String,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    proc: Option<Proc>,
    /// How many times it was started, so each run gets its own log file.
    runs: u32,
}

/// A running etcd cluster.
pub struct Cluster {
    /// Before `dir`: fields drop in order, and the members must be dead
    /// before their data goes.
    members: Vec<Member>,
    dir: tempfile::TempDir,
    initial_cluster: String,
    token: String,
    /// With TLS: the members' certificate (naming arbiter.duet) and the
    /// harness's own client credentials (CN root, etcd's superuser).
    tls: Option<(TlsFiles, ArbiterTls)>,
    /// Where the members run when not on the test's own loopback: a
    /// handle on the topology (attached: it does not tear it down) and
    /// the host. The harness's own clients then connect from that
    /// namespace too ([`Cluster::in_ns`]).
    netns: Option<(Topology, Host)>,
}

/// Fails the test unless `etcd` is on PATH.
pub fn require_etcd(test: &str) {
    let found = Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{test} needs the `etcd` binary (Debian package etcd-server; \
         tests/run.sh installs it: apt-get install etcd-server)"
    );
}

fn take_port() -> u16 {
    vmm::kit::ports::take().expect("a free loopback port")
}

impl Cluster {
    /// Starts `n` members and waits until each answers a linearizable read.
    pub fn start(test: &str, n: usize) -> Cluster {
        Self::start_with(test, n, None, None)
    }

    /// Like [`Cluster::start`], clients served only in TLS with a client
    /// certificate from `server`'s CA (`--client-cert-auth`); the harness
    /// itself connects with `root`, whose CN must be `root`. Peers talk
    /// plaintext among themselves (loopback only).
    pub fn start_tls(test: &str, n: usize, server: TlsFiles, root: TlsFiles) -> Cluster {
        let root = ArbiterTls::load(root).expect("the harness's TLS credentials");
        Self::start_with(test, n, Some((server, root)), None)
    }

    /// Like [`Cluster::start`], the members inside `host`'s namespace of
    /// `topo`, listening (clients and peers) on its service address with
    /// ports from 2379 up. The namespace is new, so the ports are free.
    /// The cluster must be dropped before the topology goes down.
    pub fn start_in(test: &str, n: usize, topo: &Topology, host: Host) -> Cluster {
        let handle = Topology::attach(topo.prefix()).expect("the topology's prefix");
        Self::start_with(test, n, None, Some((handle, host)))
    }

    fn start_with(
        test: &str,
        n: usize,
        tls: Option<(TlsFiles, ArbiterTls)>,
        netns: Option<(Topology, Host)>,
    ) -> Cluster {
        require_etcd(test);
        let dir = tempfile::Builder::new()
            .prefix(&format!("duet-etcd-{test}-"))
            .tempdir()
            .expect("a temp dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                ip: netns
                    .as_ref()
                    .map_or(Ipv4Addr::LOCALHOST, |(_, host)| host.service_ip()),
                client_port: if netns.is_some() {
                    2379 + 2 * i as u16
                } else {
                    take_port()
                },
                peer_port: if netns.is_some() {
                    2380 + 2 * i as u16
                } else {
                    take_port()
                },
                data: dir.path().join(format!("m{i}.etcd")),
                proc: None,
                runs: 0,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.ip, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            token: format!("duet-{test}-{}", std::process::id()),
            dir,
            members,
            initial_cluster,
            tls,
            netns,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.proc.is_none(), "member {} is running", m.name);
        m.runs += 1;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:{}", m.ip, m.client_port);
        let peer = format!("http://{}:{}", m.ip, m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            // Ignored once the data directory exists (a restart).
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", HEARTBEAT_MS])
            .args(["--election-timeout", ELECTION_MS])
            .args(["--logger", "zap", "--log-level", "warn"]);
        if let Some((server, _)) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&server.ca)
                .arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key);
        }
        if let Some((topo, host)) = &self.netns {
            cmd = topo.exec(*host, &cmd);
        }
        let log = self.dir.path().join(format!("{}.{}.log", m.name, m.runs));
        m.proc = Some(
            Proc::logged(&format!("etcd {}", m.name), &mut cmd, &log)
                .unwrap_or_else(|e| panic!("{e:#}")),
        );
    }

    /// Client addresses of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}:{}", m.ip, m.client_port))
            .collect()
    }

    /// The `--tas` value for this cluster.
    pub fn tas_arg(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Runs `f` where the members are reachable: on this thread for a
    /// loopback cluster, else on a thread inside the members' namespace.
    /// An [`EtcdArbiter`] connects lazily, from the thread that uses it,
    /// so with [`Cluster::start_in`] make and use it inside `f`.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.netns {
            None => f(),
            Some((topo, host)) => topo
                .in_namespace(*host, f)
                .unwrap_or_else(|e| panic!("cannot enter the etcd namespace: {e}")),
        }
    }

    /// Every key under `prefix` with its value, read linearizably (the
    /// harness's view of what the arbiter decided), retried for a few
    /// seconds while the cluster has no leader.
    pub fn keys(&self, prefix: &str) -> Vec<(String, String)> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let read = self.in_ns(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                let mut options = etcd_client::ConnectOptions::new()
                    .with_timeout(Duration::from_secs(2))
                    .with_connect_timeout(Duration::from_millis(500));
                if let Some(root) = self.root() {
                    options = options.with_tls(root.etcd_options());
                }
                runtime.block_on(async {
                    let mut c =
                        etcd_client::Client::connect(self.endpoints(), Some(options)).await?;
                    let got = c
                        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                        .await?;
                    Ok::<_, etcd_client::Error>(
                        got.kvs()
                            .iter()
                            .map(|kv| {
                                (
                                    String::from_utf8_lossy(kv.key()).into_owned(),
                                    String::from_utf8_lossy(kv.value()).into_owned(),
                                )
                            })
                            .collect(),
                    )
                })
            });
            match read {
                Ok(kvs) => return kvs,
                Err(e) if Instant::now() < end => {
                    eprintln!("reading etcd's keys under {prefix}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!(
                    "cannot read etcd's keys under {prefix}: {e}\n{}",
                    self.logs()
                ),
            }
        }
    }

    /// A client of the whole cluster.
    pub fn arbiter(&self) -> EtcdArbiter {
        EtcdArbiter::connect_with(&self.endpoints(), self.root()).expect("an etcd client")
    }

    /// A client of member `i` alone.
    pub fn arbiter_of(&self, i: usize) -> EtcdArbiter {
        EtcdArbiter::connect_with(&self.endpoints()[i..=i], self.root()).expect("an etcd client")
    }

    /// The harness's own credentials, with TLS.
    fn root(&self) -> Option<&ArbiterTls> {
        self.tls.as_ref().map(|(_, root)| root)
    }

    /// Turns on etcd's auth, with the user names taken from the client
    /// certificates' CN: `root` may do anything; `V.vm.duet` may read and
    /// write the keys of VM `V` (and no other) for each of `vms`;
    /// `operator.duet` may read every VM's keys. Needs [`Cluster::start_tls`]
    /// (on loopback).
    pub fn enable_rbac(&self, vms: &[&str]) {
        use etcd_client::{Permission, UserAddOptions};
        use vmm::ft::arbiter::etcd::{vm_prefix, PREFIX};
        let root = self
            .root()
            .expect("RBAC by certificate needs a TLS cluster");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(5))
            .with_tls(root.etcd_options());
        let result: Result<(), etcd_client::Error> = runtime.block_on(async {
            let mut c = etcd_client::Client::connect(self.endpoints(), Some(options)).await?;
            let user = |name: &str| (name.to_owned(), UserAddOptions::new().with_no_pwd());
            let mut grant = Vec::new();
            for vm in vms {
                let role = format!("vm-{vm}");
                c.role_add(role.as_str()).await?;
                c.role_grant_permission(
                    role.as_str(),
                    Permission::read_write(vm_prefix(vm)).with_prefix(),
                )
                .await?;
                grant.push((user(&vmm::kit::certs::vm_name(vm)), role));
            }
            c.role_add("operator").await?;
            c.role_grant_permission("operator", Permission::read(PREFIX).with_prefix())
                .await?;
            grant.push((user(vmm::kit::certs::OPERATOR_NAME), "operator".to_owned()));
            grant.push((user("root"), "root".to_owned()));
            for ((name, opts), role) in grant {
                c.user_add(name.as_str(), "", Some(opts)).await?;
                c.user_grant_role(name.as_str(), role).await?;
            }
            c.auth_enable().await?;
            Ok(())
        });
        result.unwrap_or_else(|e| panic!("cannot set up etcd's RBAC: {e}\n{}", self.logs()));
    }

    /// SIGKILL member `i` (it keeps its data).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Starts member `i` again on its data; does not wait.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    pub fn running(&mut self, i: usize) -> bool {
        self.members[i]
            .proc
            .as_mut()
            .is_some_and(|p| p.status().is_none())
    }

    /// The index of the member that is the Raft leader, as the running
    /// members report it (None while there is none, or none answers).
    /// Loopback clusters only.
    pub fn leader(&mut self) -> Option<usize> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let endpoints = self.endpoints();
        let mut ids = vec![None; endpoints.len()];
        let mut leader = None;
        for (i, ep) in endpoints.iter().enumerate() {
            if self.members[i].proc.is_none() {
                continue;
            }
            let options = etcd_client::ConnectOptions::new()
                .with_timeout(Duration::from_millis(500))
                .with_connect_timeout(Duration::from_millis(300));
            let status = runtime.block_on(async {
                let mut c = etcd_client::Client::connect([ep.as_str()], Some(options)).await?;
                c.status().await
            });
            if let Ok(s) = status {
                ids[i] = s.header().map(|h| h.member_id());
                if s.leader() != 0 {
                    leader = Some(s.leader());
                }
            }
        }
        let leader = leader?;
        ids.iter().position(|id| *id == Some(leader))
    }

    /// Waits until every running member answers a linearizable read (so
    /// the cluster has a quorum and that member a leader).
    pub fn wait_healthy(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        for i in 0..self.members.len() {
            if self.members[i].proc.is_none() {
                continue;
            }
            loop {
                // A client per try, made where the members are.
                let probe = self.in_ns(|| {
                    self.arbiter_of(i)
                        .decision("health-check", 0)
                        .map_err(|e| tas_server::protocol::error_chain(&e))
                });
                match probe {
                    Ok(_) => break,
                    Err(e) => {
                        if !self.running(i) {
                            panic!("etcd {} exited: {}", self.members[i].name, self.logs());
                        }
                        if Instant::now() >= end {
                            panic!(
                                "etcd {} not healthy after {limit:?}: {e}\n{}",
                                self.members[i].name,
                                self.logs()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    /// The tail of every member's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for path in entries {
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {}\n", path.display()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}
