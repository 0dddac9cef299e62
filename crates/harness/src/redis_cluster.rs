//! `RedisCluster`: a throwaway local Redis Cluster for integration tests:
//! three masters, optionally with one replica each, every node a
//! [`RedisServer`] with `cluster-enabled yes`, joined by
//! `redis-cli --cluster create` and handed over only once every node
//! reports `cluster_state:ok`. Every node is killed when the cluster is
//! dropped.
//!
//! A cluster node also listens on its *bus port*, its port + 10000, so
//! ports are picked below 55535 with both free. A machine without
//! `redis-server` or `redis-cli` makes `start` panic with how to install
//! them: a cluster test must never pass because it could not run.

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::redis::{NOT_FOUND, RedisServer};

/// Masters in every cluster started here (the smallest Redis accepts).
pub const MASTERS: usize = 3;
/// Redis Cluster puts each node's bus on its port + this.
const BUS_PORT_OFFSET: u16 = 10_000;
/// Ports are picked from here up to `u16::MAX - BUS_PORT_OFFSET`.
const LOWEST_PORT: u16 = 20_000;
/// How long a node may be unreachable before the others mark it failed and
/// its replica takes over. Short, so a failover test takes seconds, and
/// still well above the stalls a busy 2-core CI machine causes.
const NODE_TIMEOUT_MS: &str = "2000";
/// How long `start` waits for the cluster to form, and `wait_until_ok` for
/// a failover to finish, before the test fails.
const FORM_WITHIN: Duration = Duration::from_secs(30);
const CLI: &str = "redis-cli";

/// A running local Redis Cluster owned by a test.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters without replicas, ready (`cluster_state:ok` on every
    /// node).
    ///
    /// # Panics
    /// If `redis-server` or `redis-cli` is missing or the cluster does not
    /// form within 30 s.
    pub fn start() -> Self {
        Self::start_with(0, &[])
    }

    /// Three masters with one replica each: a master killed with
    /// [`kill`](Self::kill) is replaced by its replica within a few node
    /// timeouts (2 s each).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_replicas() -> Self {
        Self::start_with(1, &[])
    }

    /// `replicas_per_master` replicas for each of the three masters, every
    /// node started with `extra_args` too (e.g. `--appendonly yes`).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with(replicas_per_master: usize, extra_args: &[&str]) -> Self {
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
            // A replica takes over however long it was cut off from its
            // master: in a test, availability after the kill is the point.
            "--cluster-replica-validity-factor",
            "0",
        ];
        args.extend_from_slice(extra_args);
        let size = MASTERS * (1 + replicas_per_master);
        let nodes: Vec<RedisServer> = (0..size)
            .map(|_| RedisServer::start_with(port_with_free_bus, &args))
            .collect();
        let cluster = Self { nodes };
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(cluster.nodes.iter().map(|node| address(node.port())));
        create.extend([
            "--cluster-replicas".to_owned(),
            replicas_per_master.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let output = cli_command(&create);
        if !output.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cluster.wait_until_ok();
        cluster
    }

    /// `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,…`, every node a seed,
    /// for `RedisStore::connect`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|node| address(node.port())).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// Every node's port, running or not, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The running nodes that are masters owning slots, as the cluster
    /// sees it now.
    ///
    /// # Panics
    /// If no node answers `CLUSTER NODES`.
    pub fn masters(&self) -> Vec<u16> {
        let nodes = self
            .running()
            .find_map(|node| cli(node.port(), &["CLUSTER", "NODES"]))
            .unwrap_or_else(|| panic!("no cluster node answers CLUSTER NODES"));
        let mut masters: Vec<u16> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                let owns_slots = fields.len() > 8;
                let healthy = !flags.contains("fail") && !flags.contains("noaddr");
                if !(flags.contains("master") && owns_slots && healthy) {
                    return None;
                }
                // `127.0.0.1:PORT@BUSPORT`
                let address = fields.get(1)?.split('@').next()?;
                address.rsplit(':').next()?.parse().ok()
            })
            .filter(|port| self.is_running(*port))
            .collect();
        masters.sort_unstable();
        masters
    }

    /// How many keys each running master holds, by port.
    pub fn keys_per_master(&self) -> Vec<(u16, usize)> {
        self.masters()
            .into_iter()
            .map(|port| {
                let keys = cli(port, &["DBSIZE"])
                    .and_then(|text| text.trim().parse().ok())
                    .unwrap_or_else(|| panic!("master {port} does not answer DBSIZE"));
                (port, keys)
            })
            .collect()
    }

    /// The fewest connections subscribed to any of the shard channels
    /// `channels`, each counted over every running master
    /// (`PUBSUB SHARDNUMSUB` counts a node's own subscribers).
    pub fn shard_subscribers(&self, channels: &[&str]) -> usize {
        let mut counts = vec![0; channels.len()];
        for port in self.masters() {
            let mut args = vec!["PUBSUB", "SHARDNUMSUB"];
            args.extend_from_slice(channels);
            let Some(reply) = cli(port, &args) else {
                continue;
            };
            // Channel and count lines, alternating.
            let lines: Vec<&str> = reply.lines().collect();
            for (count, pair) in counts.iter_mut().zip(lines.chunks(2)) {
                *count += pair
                    .get(1)
                    .and_then(|count| count.trim().parse::<usize>().ok())
                    .unwrap_or(0);
            }
        }
        counts.into_iter().min().unwrap_or(0)
    }

    /// Kills the node on `port` (SIGKILL): a crash, as far as the rest of
    /// the cluster can tell.
    ///
    /// # Panics
    /// If no node of this cluster has that port.
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).stop();
    }

    /// Starts the killed node on `port` again, with its `nodes.conf`, so it
    /// rejoins the cluster (as a replica, if another node took its slots).
    ///
    /// # Panics
    /// If no node of this cluster has that port, or it does not come up.
    pub fn restart(&mut self, port: u16) {
        self.node_mut(port).restart();
    }

    /// Waits until every running node reports `cluster_state:ok` and
    /// every slot is served by a running master: after `start`, and after
    /// a [`kill`](Self::kill) until a replica has taken over.
    ///
    /// # Panics
    /// If that does not happen within 30 s (no replica to promote, say).
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + FORM_WITHIN;
        loop {
            let states: Vec<(u16, Option<String>)> = self
                .running()
                .map(|node| (node.port(), cli(node.port(), &["CLUSTER", "INFO"])))
                .collect();
            let all_ok = states.iter().all(|(_, info)| {
                info.as_deref()
                    .is_some_and(|info| info.lines().any(|line| line.trim() == "cluster_state:ok"))
            });
            if all_ok && self.masters().len() == MASTERS && self.replicas_in_sync() {
                return;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| format!("node {}:\n{}", node.port(), node.log_tail()))
                    .collect();
                panic!(
                    "the cluster did not reach cluster_state:ok with {MASTERS} masters within \
                     {FORM_WITHIN:?}: {states:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every running replica's link to its master is up (so a later
    /// failover promotes a replica that has the data).
    fn replicas_in_sync(&self) -> bool {
        self.running().all(|node| {
            let Some(info) = cli(node.port(), &["INFO", "replication"]) else {
                return false;
            };
            let is_replica = info.lines().any(|line| line.trim() == "role:slave");
            !is_replica
                || info
                    .lines()
                    .any(|line| line.trim() == "master_link_status:up")
        })
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|node| node.is_running())
    }

    fn is_running(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|node| node.port() == port && node.is_running())
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|node| node.port() == port)
            .unwrap_or_else(|| panic!("no node of this cluster listens on {port}"))
    }
}

fn address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A port below 55535 that is free now, and whose bus port is free too.
/// Consecutive calls walk a sequence starting at a point set by the
/// process id, so parallel test processes rarely probe the same ports.
fn port_with_free_bus() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(u16::MAX - BUS_PORT_OFFSET - LOWEST_PORT);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = LOWEST_PORT + u16::try_from(offset).unwrap_or(0);
        if is_free(port) && is_free(port + BUS_PORT_OFFSET) {
            return port;
        }
    }
    panic!("no free port with a free bus port (port + {BUS_PORT_OFFSET}) on 127.0.0.1");
}

fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// `redis-cli -p PORT ARGS…`'s output, or `None` when the node does not
/// answer or answers an error.
pub(crate) fn cli(port: u16, args: &[&str]) -> Option<String> {
    let mut full = vec!["-p".to_owned(), port.to_string()];
    full.extend(args.iter().map(|&arg| arg.to_owned()));
    let output = cli_command(&full);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let failed = !output.status.success()
        || text.starts_with("ERR")
        || text.starts_with("Could not connect")
        || text.starts_with("Error");
    (!failed).then_some(text)
}

fn cli_command(args: &[String]) -> std::process::Output {
    Command::new(CLI)
        .args(["-h", "127.0.0.1"])
        .args(args)
        .output()
        .unwrap_or_else(|error| match error.kind() {
            std::io::ErrorKind::NotFound => panic!("redis-cli not found on PATH: {NOT_FOUND}"),
            _ => panic!("could not run {CLI}: {error}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_masters_form_a_cluster_and_a_replica_replaces_a_killed_master() {
        let mut cluster = RedisCluster::start_with_replicas();
        assert_eq!(cluster.ports().len(), 6);
        let masters = cluster.masters();
        assert_eq!(masters.len(), MASTERS, "{masters:?}");
        assert!(cluster.url().starts_with("redis-cluster://127.0.0.1:"));
        for port in cluster.ports() {
            assert!(port < u16::MAX - BUS_PORT_OFFSET, "{port}");
        }
        cluster.kill(masters[0]);
        cluster.wait_until_ok();
        let after = cluster.masters();
        assert_eq!(after.len(), MASTERS, "{after:?}");
        assert!(!after.contains(&masters[0]), "{after:?}");
    }

    #[test]
    fn a_cluster_without_replicas_has_three_masters_and_no_replicas() {
        let cluster = RedisCluster::start();
        assert_eq!(cluster.ports().len(), MASTERS);
        assert_eq!(cluster.masters(), {
            let mut ports = cluster.ports();
            ports.sort_unstable();
            ports
        });
    }
}
