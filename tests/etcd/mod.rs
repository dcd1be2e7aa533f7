//! A real etcd cluster on loopback for the tests: members as child
//! processes (killed and reaped with the cluster, on every path), data in a
//! temporary directory, ports from the kit, bounded waits.
//!
//! Tests that need etcd fail, with a message saying how to get it, when the
//! `etcd` binary is missing: they are never skipped silently.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tas_server::tls::TlsFiles;
use vmm::ft::arbiter::etcd::EtcdArbiter;
use vmm::ft::arbiter::ArbiterTls;
use vmm::kit::process::Proc;

/// Raft timing for loopback: elections in about half a second instead of
/// the default second, still ten heartbeats, so a loaded two-core machine
/// does not see false elections.
const HEARTBEAT_MS: &str = "50";
const ELECTION_MS: &str = "500";

struct Member {
    name: String,
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
        Self::start_with(test, n, None)
    }

    /// Like [`Cluster::start`], clients served only in TLS with a client
    /// certificate from `server`'s CA (`--client-cert-auth`); the harness
    /// itself connects with `root`, whose CN must be `root`. Peers talk
    /// plaintext among themselves (loopback only).
    pub fn start_tls(test: &str, n: usize, server: TlsFiles, root: TlsFiles) -> Cluster {
        let root = ArbiterTls::load(root).expect("the harness's TLS credentials");
        Self::start_with(test, n, Some((server, root)))
    }

    fn start_with(test: &str, n: usize, tls: Option<(TlsFiles, ArbiterTls)>) -> Cluster {
        require_etcd(test);
        let dir = tempfile::Builder::new()
            .prefix(&format!("duet-etcd-{test}-"))
            .tempdir()
            .expect("a temp dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: take_port(),
                peer_port: take_port(),
                data: dir.path().join(format!("m{i}.etcd")),
                proc: None,
                runs: 0,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            token: format!("duet-{test}-{}", std::process::id()),
            dir,
            members,
            initial_cluster,
            tls,
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
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
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
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The `--tas` value for this cluster.
    pub fn tas_arg(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
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
    /// `operator.duet` may read every VM's keys. Needs [`Cluster::start_tls`].
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
            let mut client = self.arbiter_of(i);
            loop {
                match client.decision("health-check", 0) {
                    Ok(_) => break,
                    Err(e) => {
                        if !self.running(i) {
                            panic!("etcd {} exited: {}", self.members[i].name, self.logs());
                        }
                        if Instant::now() >= end {
                            panic!(
                                "etcd {} not healthy after {limit:?}: {e:#}\n{}",
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
