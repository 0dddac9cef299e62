//! Session store benches: the same `SessionStore` operations (create +
//! complete, attach + detach, renew, lookup), written once in
//! `bench_operations` against `&dyn SessionStore`, measured for
//! `InMemoryStore` (group "memory store") and for `RedisStore` on a real
//! local `redis-server` (group "redis store"). Each store already holds
//! 10,000 sessions, as a loaded server's would. The Redis group also times a
//! bare `PING` on the same connection: one loopback round trip, the floor
//! under every Redis operation. The same operations run on a local Redis
//! Cluster (three masters with a replica each), without and with `WAIT 1`
//! after create and attach, and a 512-session `renew_many` is timed on one
//! Redis and on a cluster (one script per slot group there).
//!
//! Run: `cargo bench -p numstream-bench --bench store` (needs
//! `redis-server` on `PATH`; `RedisServer::start` panics with install
//! instructions otherwise).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use numstream_harness::redis::RedisServer;
use numstream_harness::redis_cluster::RedisCluster;
use numstream_protocol::{ResumeToken, SessionSeed};
use numstream_store::{InMemoryStore, NewSession, SessionStore};
use numstream_store_redis::{RedisStore, RedisStoreConfig};
use tokio::runtime::{Builder, Runtime};
use uuid::Uuid;

/// Sessions each store holds before anything is measured.
const PRELOADED: u128 = 10_000;
/// Far longer than a bench run: Redis expires keys in real time, and the
/// preloaded sessions must still be there for the last bench.
const LEASE: Duration = Duration::from_secs(3600);
const TOKEN: ResumeToken = ResumeToken([9; 16]);

/// The runtime driving every store future.
///
/// current_thread: the bench thread itself polls the Redis connection's
/// driver task and the socket, so a round trip involves no hand-off to a
/// worker thread. On a 2-core machine with other work running, a
/// multi-thread runtime's workers would compete with the load for the cores
/// and add cross-thread wake-ups to every operation. Criterion's
/// `to_async` runs a whole sample's iterations inside one `block_on`, so
/// entering the runtime is not counted per operation either.
fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime the store benches run on")
}

fn session(n: u128) -> NewSession {
    NewSession {
        // Bits reversed: the ids differ in their first bytes, which is
        // where a cluster store takes a session's slot group from, so the
        // sessions spread over every group (and master) as random ids do.
        client_id: Uuid::from_u128((n + 1).reverse_bits()),
        seed: SessionSeed([3; 32]),
        count: 100,
        token: TOKEN,
        // Any value: the stores keep it without reading it, and computing
        // it per session would be measured with every create.
        checksum: 0x5EED,
    }
}

/// Measures every store operation on `store` into `group`, after loading
/// `store` with `PRELOADED` sessions.
fn bench_operations(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    store: &dyn SessionStore,
) {
    runtime.block_on(async {
        for n in 0..PRELOADED {
            store
                .create(session(n), LEASE)
                .await
                .expect("preload a session into the store");
        }
    });

    let mut next = 1_000_000u128;
    group.bench_function("create + complete", |b| {
        b.to_async(runtime).iter(|| {
            next += 1;
            let fresh = session(next);
            async move {
                let attached = store
                    .create(fresh, LEASE)
                    .await
                    .expect("create a session with a never-used client id");
                store
                    .complete(attached.client_id, attached.generation)
                    .await
                    .expect("complete the session just created");
            }
        });
    });

    let resumed = session(42).client_id;
    group.bench_function("attach + detach (a resume)", |b| {
        b.to_async(runtime).iter(|| async {
            let attached = store
                .attach(resumed, &TOKEN, LEASE)
                .await
                .expect("attach a preloaded session with its token");
            store
                .detach(resumed, attached.generation, LEASE)
                .await
                .expect("detach the generation just attached");
        });
    });

    let renewed = session(43).client_id;
    let generation = runtime
        .block_on(store.attach(renewed, &TOKEN, LEASE))
        .expect("attach the session the renew bench renews")
        .generation;
    group.bench_function("renew", |b| {
        b.to_async(runtime).iter(|| async {
            store
                .renew(renewed, generation, LEASE)
                .await
                .expect("renew the attached generation");
        });
    });

    group.bench_function("lookup", |b| {
        b.to_async(runtime).iter(|| async {
            black_box(
                store
                    .lookup(renewed)
                    .await
                    .expect("look up a preloaded session"),
            )
        });
    });
}

fn memory_store(c: &mut Criterion) {
    let runtime = runtime();
    let store = InMemoryStore::new(1_000_000);
    let mut group = c.benchmark_group("memory store");
    bench_operations(&mut group, &runtime, &store);
    group.finish();
}

fn redis_store(c: &mut Criterion) {
    let redis = RedisServer::start();
    let runtime = runtime();
    let store = RedisStore::connect_lazy(&redis.url(), RedisStoreConfig::default())
        .expect("the harness's redis:// URL parses");
    let store: &dyn SessionStore = &store;
    let mut group = c.benchmark_group("redis store");
    // First: its warm-up makes the connection, which no timed iteration
    // then pays for.
    group.bench_function("ping (one round trip)", |b| {
        b.to_async(&runtime).iter(|| async {
            store.ping().await.expect("PING the local redis-server");
        });
    });
    bench_operations(&mut group, &runtime, store);
    group.finish();
}

/// A store on a fresh local cluster of three masters with a replica each.
fn cluster_store(cluster: &RedisCluster, runtime: &Runtime, wait_replicas: usize) -> RedisStore {
    let config = RedisStoreConfig {
        wait_replicas,
        ..RedisStoreConfig::default()
    };
    let store = RedisStore::connect_lazy(&cluster.url(), config)
        .expect("the harness's redis-cluster:// URL parses");
    runtime.block_on(store.ping()).expect("the cluster answers");
    store
}

/// The store operations on a Redis Cluster (three masters, a replica
/// each), without and with `WAIT 1` after create and attach: what the
/// replica acknowledgement costs.
fn redis_cluster_store(c: &mut Criterion) {
    let runtime = runtime();
    for (name, wait_replicas) in [
        ("redis cluster store", 0),
        ("redis cluster store, WAIT 1", 1),
    ] {
        let cluster = RedisCluster::start_with_replicas();
        let store = cluster_store(&cluster, &runtime, wait_replicas);
        let mut group = c.benchmark_group(name);
        bench_operations(&mut group, &runtime, &store);
        group.finish();
    }
}

/// One server's renewal round of 512 sessions (the batch bound): one
/// script on one Redis, one script per slot group on a cluster (at most 64,
/// sent concurrently, each to its group's master).
fn renew_many(c: &mut Criterion) {
    let runtime = runtime();
    let batch: Vec<NewSession> = (0..512).map(|n| session(5_000_000 + n)).collect();
    let renewals: Vec<_> = batch.iter().map(|s| (s.client_id, 1)).collect();
    let redis = RedisServer::start();
    let single = RedisStore::connect_lazy(&redis.url(), RedisStoreConfig::default())
        .expect("the harness's redis:// URL parses");
    let cluster = RedisCluster::start();
    let clustered = cluster_store(&cluster, &runtime, 0);
    let mut group = c.benchmark_group("renew_many of 512");
    for (name, store) in [("one redis", &single), ("cluster of 3 masters", &clustered)] {
        runtime.block_on(async {
            for session in &batch {
                store
                    .create(*session, LEASE)
                    .await
                    .expect("create a session to renew");
            }
        });
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| async {
                let results = store.renew_many(&renewals, LEASE).await;
                assert!(results.iter().all(Result::is_ok), "every renewal succeeds");
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    memory_store,
    redis_store,
    redis_cluster_store,
    renew_many
);
criterion_main!(benches);
