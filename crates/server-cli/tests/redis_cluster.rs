//! Server processes sharing a local Redis Cluster: a server killed with
//! sessions spread over every master, and a master killed (its replica
//! taking over) while 60 sessions stream. Clients are the real client
//! library; every OK must be the exact undisturbed result.

use std::time::{Duration, Instant};

use numstream_client::Report;
use numstream_harness::process::{ServerCommand, ServerProcess};
use numstream_harness::redis_cluster::{MASTERS, RedisCluster};
use numstream_harness::wait;
use numstream_protocol::ClientId;
use numstream_store_redis::CLUSTER_GROUPS;

mod common;

use common::{BIN, SEED, assert_undisturbed_result, rotated, spawn_client_as, spawn_client_within};

async fn start_servers(n: usize, cluster: &RedisCluster, interval: &str) -> Vec<ServerProcess> {
    let url = cluster.url();
    let seed = SEED.to_string();
    let args = [
        "--store",
        url.as_str(),
        "--interval",
        interval,
        "--session-ttl",
        "10s",
        "--seed",
        seed.as_str(),
    ];
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        let server = ServerCommand::new(BIN).args(args).start().await;
        servers.push(server.expect("start numstream-server"));
    }
    servers
}

/// A random client id in slot group `group` (the store groups sessions by
/// their id's first two bytes), so a test can place sessions on every
/// master.
fn client_id_in_group(group: usize) -> ClientId {
    let mut bytes = *ClientId::new_v4().as_bytes();
    let group = u16::try_from(group % CLUSTER_GROUPS).expect("fewer than 65536 groups");
    bytes[..2].copy_from_slice(&group.to_be_bytes());
    ClientId::from_bytes(bytes)
}

/// Waits until every master holds at least `at_least` keys.
async fn await_keys_on_every_master(cluster: &RedisCluster, at_least: usize) {
    wait::until_value(
        Duration::from_secs(20),
        "sessions on every master",
        || std::future::ready(cluster.keys_per_master()),
        |keys| keys.len() == MASTERS && keys.iter().all(|&(_, count)| count >= at_least),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_servers_on_a_cluster_gives_every_client_the_undisturbed_result() {
    let cluster = RedisCluster::start();
    let mut servers = start_servers(2, &cluster, "50ms").await;
    let ports: Vec<u16> = servers.iter().map(ServerProcess::port).collect();

    // Twelve clients of 60 numbers (3 s undisturbed), half starting on each
    // server, their ids in groups spread over the whole slot space (so on
    // every master).
    let count = 60;
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let id = client_id_in_group(i * CLUSTER_GROUPS / 12);
            spawn_client_as(id, rotated(&ports, i), count)
        })
        .collect();
    // Each streaming session is a hash and an index entry on its group's
    // master: two keys at least per master once all are streaming.
    await_keys_on_every_master(&cluster, 2).await;
    servers[0].kill().await;

    let mut resumed = 0;
    for (i, (run, _events)) in clients.into_iter().enumerate() {
        let report = run.await.expect("client task");
        assert_undisturbed_result(&report);
        if i % 2 == 0 {
            assert!(
                report.reconnects >= 1,
                "client {i} was on the killed server"
            );
            resumed += 1;
        }
    }
    assert_eq!(resumed, 6);
}

/// What one client's run came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// OK with the exact undisturbed sequence.
    Exact,
    /// A clear final error.
    Failed(String),
}

fn outcome(report: &Report) -> Outcome {
    if report.ok {
        // An OK must be the right one: never a wrong sum or checksum.
        assert_undisturbed_result(report);
        return Outcome::Exact;
    }
    let error = report
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("a failed run without an error: {}", report.render_human()));
    Outcome::Failed(error.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_while_60_sessions_stream_leaves_nearly_all_ok_and_none_wrongly() {
    let mut cluster = RedisCluster::start_with_replicas();
    let servers = start_servers(2, &cluster, "50ms").await;
    let ports: Vec<u16> = servers.iter().map(ServerProcess::port).collect();

    // 60 clients of 100 numbers (5 s undisturbed), ids over every group.
    let count = 100;
    let clients: Vec<_> = (0..60)
        .map(|i| {
            let id = client_id_in_group(i * CLUSTER_GROUPS / 60);
            // Time for a client to give up clearly if the failover were
            // slow: its session outlives a 10 s TTL of failed resumes.
            spawn_client_within(id, rotated(&ports, i), count, Duration::from_secs(90))
        })
        .collect();
    await_keys_on_every_master(&cluster, 2).await;
    let victim = cluster.masters()[0];
    cluster.kill(victim);
    let killed_at = Instant::now();

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_until_ok();
        cluster
    })
    .await
    .expect("the cluster recovers");
    eprintln!(
        "a replica took over {:?} after the kill",
        killed_at.elapsed()
    );
    let mut exact = 0;
    let mut failures = Vec::new();
    for (run, _events) in clients {
        let report = run.await.expect("client task");
        match outcome(&report) {
            Outcome::Exact => exact += 1,
            Outcome::Failed(why) => failures.push(why),
        }
    }
    eprintln!(
        "master {victim} killed: {exact} of 60 exact, {} failed clearly {:?} later: {failures:?}",
        failures.len(),
        killed_at.elapsed()
    );
    assert!(
        exact >= 54,
        "only {exact} of 60 ended OK; failures: {failures:?}"
    );
    // The replica took over: the cluster serves every slot again.
    assert!(!cluster.masters().contains(&victim));
}
