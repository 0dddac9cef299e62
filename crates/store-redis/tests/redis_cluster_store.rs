//! `RedisStore` on a local Redis Cluster started by the harness: the shared
//! conformance suite, sessions spread over every master, the per-group
//! bound, and takeover notices on shard channels.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use numstream_harness::redis_cluster::{MASTERS, RedisCluster};
use numstream_harness::wait;
use numstream_store::conformance::{self, LONG, random_session};
use numstream_store::{Occupancy, SessionStore, StoreError};
use numstream_store_redis::{CLUSTER_GROUPS, DEFAULT_PREFIX, RedisStore, RedisStoreConfig};

async fn cluster_store(cluster: &RedisCluster, prefix: &str, max_sessions: usize) -> RedisStore {
    let config = RedisStoreConfig {
        prefix: prefix.to_owned(),
        max_sessions,
        ..RedisStoreConfig::default()
    };
    let store = RedisStore::connect_lazy(&cluster.url(), config).expect("a valid cluster URL");
    // The first connection loads the slot map and connects to every
    // master: on a loaded machine running several clusters at once that
    // can take longer than one operation timeout, so wait for it to answer.
    wait::until_value(
        Duration::from_secs(30),
        "the cluster to answer",
        || store.ping(),
        Result::is_ok,
    )
    .await
    .expect("answered");
    store
}

#[tokio::test]
async fn redis_store_on_a_cluster_passes_the_conformance_suite() {
    let cluster = RedisCluster::start();
    let store = cluster_store(&cluster, DEFAULT_PREFIX, 100_000).await;
    assert!(store.is_cluster());
    assert_eq!(store.kind(), "redis");
    let started = Instant::now();
    conformance::run_all(&store).await;
    eprintln!(
        "conformance suite on the cluster took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sessions_spread_over_every_master_and_renew_in_one_call_per_group() {
    let cluster = RedisCluster::start();
    let store = cluster_store(&cluster, DEFAULT_PREFIX, 100_000).await;
    let sessions: Vec<_> = (0..300).map(|_| random_session()).collect();
    for session in &sessions {
        store.create(*session, LONG).await.expect("create");
    }
    let keys = cluster.keys_per_master();
    assert_eq!(keys.len(), MASTERS, "{keys:?}");
    for (port, count) in &keys {
        // 300 sessions (and their groups' indexes) over 3 masters with 21
        // or 22 groups each: far from empty on every one.
        assert!(*count > 50, "master {port} holds {count} keys: {keys:?}");
    }
    // Renewals over every group at once, a stale one among them: each
    // answered as `renew` would.
    let mut renewals: Vec<_> = sessions.iter().map(|s| (s.client_id, 1)).collect();
    renewals[7].1 = 5;
    let results = store.renew_many(&renewals, LONG).await;
    assert_eq!(results.len(), renewals.len());
    for (position, result) in results.iter().enumerate() {
        if position == 7 {
            assert_eq!(result, &Err(StoreError::Superseded { current: 1 }));
        } else {
            assert_eq!(result, &Ok(()), "renewal {position}");
        }
    }
    assert_eq!(
        store.occupancy().await,
        Ok(Some(Occupancy {
            sessions: 300,
            max: 100_000
        }))
    );
}

#[tokio::test]
async fn the_bound_holds_per_group_and_never_past_the_deployment_bound() {
    let cluster = RedisCluster::start();
    let per_group = 2;
    let max = CLUSTER_GROUPS * per_group;
    let store = cluster_store(&cluster, "bounded:", max).await;
    let candidates: Vec<_> = (0..4 * max).map(|_| random_session()).collect();
    let attempts = candidates.iter().map(|session| {
        let store = store.clone();
        async move { (session, store.create(*session, LONG).await) }
    });
    let mut admitted_per_group: HashMap<String, usize> = HashMap::new();
    let mut admitted = Vec::new();
    for (session, result) in futures::future::join_all(attempts).await {
        match result {
            Ok(_) => {
                *admitted_per_group
                    .entry(store.index_key_of(session.client_id).to_owned())
                    .or_default() += 1;
                admitted.push(*session);
            }
            Err(StoreError::Full { max: reported }) => assert_eq!(reported, max),
            Err(other) => panic!("create failed: {other}"),
        }
    }
    assert!(admitted.len() <= max, "{} admitted", admitted.len());
    for (index, count) in &admitted_per_group {
        assert!(*count <= per_group, "{index} admitted {count}");
    }
    // 512 random ids over 64 groups: nearly every group fills.
    assert!(admitted.len() > max * 3 / 4, "{} admitted", admitted.len());
    assert_eq!(
        store.occupancy().await,
        Ok(Some(Occupancy {
            sessions: admitted.len(),
            max
        }))
    );
    for session in &admitted {
        store
            .complete(session.client_id, 1)
            .await
            .expect("complete");
    }
    assert_eq!(
        store.occupancy().await,
        Ok(Some(Occupancy { sessions: 0, max }))
    );
}

#[tokio::test]
async fn takeovers_are_announced_on_shard_channels_to_every_instance() {
    let cluster = RedisCluster::start();
    let a = cluster_store(&cluster, DEFAULT_PREFIX, 100_000).await;
    let b = cluster_store(&cluster, DEFAULT_PREFIX, 100_000).await;
    let mut on_a = a.takeover_notices().expect("notices");
    let mut on_b = b.takeover_notices().expect("notices");
    let channels = a.takeover_channels();
    assert_eq!(channels.len(), CLUSTER_GROUPS);
    assert!(
        channels[0].starts_with("numstream:takeovers:{"),
        "{channels:?}"
    );
    wait::until_sync(Duration::from_secs(20), "both stores to subscribe", || {
        cluster.shard_subscribers(&channels) >= 2
    })
    .await;
    // Every group's channel is subscribed, whichever master it is on:
    // sessions of many groups are each announced to both instances.
    for session in 0..20 {
        let context = format!("session {session}");
        conformance::assert_attach_announced_to_both(&a, &b, &mut on_a, &mut on_b, &context).await;
    }
}

#[tokio::test]
async fn a_session_created_with_a_replica_wait_survives_its_masters_kill() {
    let mut cluster = RedisCluster::start_with_replicas();
    let config = RedisStoreConfig {
        wait_replicas: 1,
        replica_wait: Duration::from_secs(1),
        ..RedisStoreConfig::default()
    };
    let store = RedisStore::connect_lazy(&cluster.url(), config).expect("a valid cluster URL");
    let session = random_session();
    store.create(session, LONG).await.expect("create");
    let attached = store
        .attach(session.client_id, &session.token, LONG)
        .await
        .expect("attach");
    // Kill whichever master holds the session, at once: the create and
    // the generation bump were acknowledged by a replica before returning.
    let key = store.session_key(session.client_id);
    let mut holder = None;
    for port in cluster.masters() {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "EXISTS", &key])
            .output()
            .expect("redis-cli");
        if String::from_utf8_lossy(&output.stdout).trim() == "1" {
            holder = Some(port);
        }
    }
    let holder = holder.expect("a master holds the session");
    cluster.kill(holder);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_until_ok();
        cluster
    })
    .await
    .expect("the cluster recovers");
    let info = wait::until_value(
        Duration::from_secs(30),
        "the recovered cluster to answer a lookup",
        || store.lookup(session.client_id),
        Result::is_ok,
    )
    .await
    .expect("answered");
    let info = info.expect("the session survived the failover");
    assert_eq!(info.generation, attached.generation);
    assert!(!cluster.masters().contains(&holder));
}
