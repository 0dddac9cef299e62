//! `RedisStore` against real `redis-server` processes started by the
//! harness: the shared conformance suite, the key layout other tools rely
//! on, the per-deployment bound, outages, and two store instances sharing
//! one Redis as two servers do.

use std::time::{Duration, Instant};

use numstream_harness::redis::RedisServer;
use numstream_harness::wait;
use numstream_protocol::{ClientId, SequenceChecksum};
use numstream_store::conformance::{self, LONG, random_session};
use numstream_store::{NewSession, Occupancy, SessionStore, StoreError};
use numstream_store_redis::{DEFAULT_PREFIX, RedisStore, RedisStoreConfig};
use redis::aio::MultiplexedConnection;

/// What a test allows an operation against a dead Redis to take. The store
/// promises its operation timeout (2 s by default); the rest is slack for a
/// loaded CI machine.
const OUTAGE_BOUND: Duration = Duration::from_secs(4);

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url(), DEFAULT_PREFIX)
        .await
        .expect("connect to the test redis-server")
}

async fn raw(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn pttl(connection: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(connection)
        .await
        .expect("PTTL")
}

fn assert_close(actual_ms: i64, expected: Duration) {
    let expected = i64::try_from(expected.as_millis()).expect("small");
    assert!(
        actual_ms <= expected && actual_ms > expected - 2_000,
        "PTTL {actual_ms} ms is not close to {expected} ms"
    );
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite() {
    let server = RedisServer::start();
    let store = store(&server).await;
    assert_eq!(store.kind(), "redis");
    assert!(store.is_shared());
    let started = Instant::now();
    conformance::run_all(&store).await;
    eprintln!("conformance suite took {:?}", started.elapsed());
}

/// A store of its own deployment (`prefix`) bounded to `max_sessions`.
async fn bounded_store(server: &RedisServer, prefix: &str, max_sessions: usize) -> RedisStore {
    let config = RedisStoreConfig {
        prefix: prefix.to_owned(),
        max_sessions,
        ..RedisStoreConfig::default()
    };
    RedisStore::connect_with(&server.url(), config)
        .await
        .expect("connect to the test redis-server")
}

#[tokio::test]
async fn redis_store_passes_the_bound_checks() {
    let server = RedisServer::start();
    let store = bounded_store(&server, "bound-checks:", 4).await;
    assert_eq!(store.index_key(), "bound-checks:sessions");
    // Expired sessions free their slots by Redis's own expiry: nothing in
    // the store sweeps.
    conformance::run_bound_checks(&store, 4).await;
}

/// The absolute expiry of `key` (Unix ms), as Redis will apply it.
async fn pexpiretime(connection: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(connection)
        .await
        .expect("PEXPIRETIME")
}

async fn index_score(
    connection: &mut MultiplexedConnection,
    store: &RedisStore,
    client_id: ClientId,
) -> Option<i64> {
    redis::cmd("ZSCORE")
        .arg(store.index_key())
        .arg(client_id.to_string())
        .query_async(connection)
        .await
        .expect("ZSCORE")
}

/// How many session keys Redis holds under `prefix`, counted with SCAN.
async fn session_keys(connection: &mut MultiplexedConnection, prefix: &str) -> usize {
    let pattern = format!("{prefix}session:*");
    let mut cursor = 0u64;
    let mut keys = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(connection)
            .await
            .expect("SCAN");
        keys += batch.len();
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Runs one raw command that answers OK or a count, as a test tampering
/// with a record does.
async fn tamper(connection: &mut MultiplexedConnection, command: &str, args: &[&str]) {
    let _: redis::Value = redis::cmd(command)
        .arg(args)
        .query_async(connection)
        .await
        .unwrap_or_else(|error| panic!("{command}: {error}"));
}

async fn occupancy(store: &RedisStore) -> Occupancy {
    store
        .occupancy()
        .await
        .expect("occupancy")
        .expect("a Redis store is bounded")
}

#[tokio::test]
async fn two_instances_with_one_prefix_share_the_bound() {
    let server = RedisServer::start();
    let a = bounded_store(&server, "shared:", 3).await;
    let b = bounded_store(&server, "shared:", 3).await;
    let first = random_session();
    a.create(first, LONG).await.expect("create via A");
    a.create(random_session(), LONG)
        .await
        .expect("create via A");
    b.create(random_session(), LONG)
        .await
        .expect("create via B");
    for (name, store) in [("A", &a), ("B", &b)] {
        assert_eq!(
            store.create(random_session(), LONG).await,
            Err(StoreError::Full { max: 3 }),
            "{name} must count the sessions created through the other instance"
        );
        assert_eq!(
            occupancy(store).await,
            Occupancy {
                sessions: 3,
                max: 3
            }
        );
    }
    // A slot freed through one instance is free for the other.
    a.complete(first.client_id, 1)
        .await
        .expect("complete via A");
    b.create(random_session(), LONG)
        .await
        .expect("B takes the slot A freed");
}

#[tokio::test]
async fn a_full_deployment_leaves_another_prefix_unaffected() {
    let server = RedisServer::start();
    let flooded = bounded_store(&server, "flooded:", 5).await;
    let neighbour = bounded_store(&server, "neighbour:", 5).await;
    for _ in 0..5 {
        flooded
            .create(random_session(), LONG)
            .await
            .expect("fill the flooded deployment");
    }
    assert_eq!(
        flooded.create(random_session(), LONG).await,
        Err(StoreError::Full { max: 5 })
    );
    for _ in 0..5 {
        neighbour
            .create(random_session(), LONG)
            .await
            .expect("the other deployment has its own bound");
    }
    assert_eq!(occupancy(&neighbour).await.sessions, 5);
    assert_eq!(occupancy(&flooded).await.sessions, 5);
    let mut redis = raw(&server).await;
    assert_eq!(session_keys(&mut redis, "flooded:").await, 5);
    assert_eq!(session_keys(&mut redis, "neighbour:").await, 5);
}

#[tokio::test]
async fn open_and_drop_past_the_bound_leaves_at_most_the_bound_in_redis() {
    const MAX: usize = 1_000;
    const ATTEMPTS: usize = 1_500;
    let server = RedisServer::start();
    let store = bounded_store(&server, "flood:", MAX).await;
    let (mut created, mut refused) = (0, 0);
    // What a flood of open-and-drop does to the store: create, then the
    // connection ends and the session waits for a resume that never comes.
    for _ in 0..ATTEMPTS {
        let session = random_session();
        match store.create(session, LONG).await {
            Ok(_) => {
                created += 1;
                store
                    .detach(session.client_id, 1, LONG)
                    .await
                    .expect("detach");
            }
            Err(StoreError::Full { max }) => {
                assert_eq!(max, MAX);
                refused += 1;
            }
            Err(other) => panic!("create failed with {other:?}"),
        }
    }
    assert_eq!((created, refused), (MAX, ATTEMPTS - MAX));
    let mut redis = raw(&server).await;
    let keys = session_keys(&mut redis, "flood:").await;
    assert!(keys <= MAX, "{keys} session keys in Redis, bound {MAX}");
    assert_eq!(
        keys, MAX,
        "every created session is still awaiting a resume"
    );
    let indexed: usize = redis::cmd("ZCARD")
        .arg(store.index_key())
        .query_async(&mut redis)
        .await
        .expect("ZCARD");
    assert_eq!(indexed, MAX, "the index holds one entry per session key");
}

#[tokio::test]
async fn the_index_score_is_the_key_expiry_and_complete_removes_it() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut redis = raw(&server).await;
    let session = random_session();
    let id = session.client_id;
    let key = store.session_key(id);
    assert_eq!(store.index_key(), "numstream:sessions");

    store.create(session, LONG).await.expect("create");
    assert_eq!(
        index_score(&mut redis, &store, id).await,
        Some(pexpiretime(&mut redis, &key).await)
    );
    store.detach(id, 1, LONG / 2).await.expect("detach");
    assert_eq!(
        index_score(&mut redis, &store, id).await,
        Some(pexpiretime(&mut redis, &key).await)
    );
    store
        .attach(id, &session.token, LONG)
        .await
        .expect("attach");
    assert_eq!(
        index_score(&mut redis, &store, id).await,
        Some(pexpiretime(&mut redis, &key).await)
    );
    let renewed = store.renew_many(&[(id, 2)], LONG * 2).await;
    assert_eq!(renewed, vec![Ok(())]);
    let expiry = pexpiretime(&mut redis, &key).await;
    assert_eq!(index_score(&mut redis, &store, id).await, Some(expiry));
    store.complete(id, 2).await.expect("complete");
    assert_eq!(index_score(&mut redis, &store, id).await, None);
}

#[tokio::test]
async fn records_from_before_the_checksum_and_the_index_still_resume_and_count() {
    let server = RedisServer::start();
    let store = bounded_store(&server, "upgraded:", 10).await;
    let mut redis = raw(&server).await;
    let session = random_session();
    let id = session.client_id;
    store.create(session, LONG).await.expect("create");
    // Make the record look like one an older version wrote: no checksum
    // field, no index entry.
    let key = store.session_key(id);
    tamper(&mut redis, "HDEL", &[&key, "checksum"]).await;
    tamper(&mut redis, "ZREM", &[store.index_key(), &id.to_string()]).await;
    assert_eq!(occupancy(&store).await.sessions, 0);

    let attachment = store
        .attach(id, &session.token, LONG)
        .await
        .expect("an old record resumes");
    assert_eq!(
        attachment.checksum,
        SequenceChecksum::of_session(&session.seed, session.count).checksum(),
        "a missing checksum is computed from the seed and count"
    );
    assert_eq!(
        occupancy(&store).await.sessions,
        1,
        "a resumed old session is counted again"
    );

    // The stored field, when there, is what a resume returns.
    tamper(&mut redis, "HSET", &[&key, "checksum", "12345"]).await;
    let attachment = store
        .attach(id, &session.token, LONG)
        .await
        .expect("attach");
    assert_eq!(attachment.checksum, 12_345);
    tamper(&mut redis, "HSET", &[&key, "checksum", "not a number"]).await;
    assert!(matches!(
        store.attach(id, &session.token, LONG).await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn one_hash_per_session_whose_expiry_is_the_lease_then_the_ttl() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut redis = raw(&server).await;
    let session = random_session();
    let key = format!("numstream:session:{{{}}}", session.client_id);
    assert_eq!(store.session_key(session.client_id), key);

    let lease = Duration::from_secs(30);
    store.create(session, lease).await.expect("create");
    let kind: String = redis::cmd("TYPE")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("TYPE");
    assert_eq!(kind, "hash");
    assert_close(pttl(&mut redis, &key).await, lease);

    // The token itself is never stored, only its digest.
    let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("HGETALL");
    let mut names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "attached",
            "checksum",
            "count",
            "generation",
            "seed",
            "token_sha256"
        ]
    );
    let checksum = fields
        .iter()
        .find(|(name, _)| name == "checksum")
        .map(|(_, value)| value.clone());
    assert_eq!(
        checksum,
        Some(session.checksum.to_string().into_bytes()),
        "the checksum is kept as decimal"
    );
    for (name, value) in &fields {
        assert!(
            !value.windows(16).any(|window| window == session.token.0),
            "field {name} holds the raw resume token"
        );
    }

    let ttl = Duration::from_secs(90);
    store
        .detach(session.client_id, 1, ttl)
        .await
        .expect("detach");
    assert_close(pttl(&mut redis, &key).await, ttl);

    let attachment = store
        .attach(session.client_id, &session.token, lease)
        .await
        .expect("attach");
    assert_close(pttl(&mut redis, &key).await, lease);

    store
        .complete(session.client_id, attachment.generation)
        .await
        .expect("complete");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "a completed session's key is deleted");
}

#[tokio::test]
async fn a_custom_prefix_is_honoured() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "tenant-a:")
        .await
        .expect("connect");
    let mut redis = raw(&server).await;
    let session = random_session();
    store.create(session, LONG).await.expect("create");
    let custom = format!("tenant-a:session:{{{}}}", session.client_id);
    assert_eq!(store.session_key(session.client_id), custom);
    assert_close(pttl(&mut redis, &custom).await, LONG);
    let default = format!("numstream:session:{{{}}}", session.client_id);
    assert_eq!(
        pttl(&mut redis, &default).await,
        -2,
        "no key under the default prefix"
    );

    // Stores with different prefixes do not see each other's sessions.
    let other = store_with_default_prefix(&server).await;
    assert_eq!(other.lookup(session.client_id).await, Ok(None));
}

async fn store_with_default_prefix(server: &RedisServer) -> RedisStore {
    store(server).await
}

#[tokio::test]
async fn two_instances_share_sessions_and_fence_each_other() {
    let server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    let session = random_session();
    a.create(session, LONG).await.expect("create via A");
    let on_b = b
        .attach(session.client_id, &session.token, LONG)
        .await
        .expect("resume via B");
    assert_eq!(on_b.generation, 2);
    assert_eq!(on_b.seed, session.seed);
    assert_eq!(on_b.count, session.count);
    assert_eq!(
        a.renew(session.client_id, 1, LONG).await,
        Err(StoreError::Superseded { current: 2 }),
        "A must learn that B took the session over"
    );
    let seen_by_a = a
        .lookup(session.client_id)
        .await
        .expect("lookup")
        .expect("present");
    assert_eq!(seen_by_a.generation, 2);
    b.renew(session.client_id, 2, LONG).await.expect("B renews");
}

/// Runs `operation`, asserting it finishes within `OUTAGE_BOUND` with
/// `Unavailable`.
async fn assert_unavailable<T: std::fmt::Debug>(
    name: &str,
    operation: impl std::future::Future<Output = Result<T, StoreError>>,
) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(OUTAGE_BOUND, operation)
        .await
        .unwrap_or_else(|_| panic!("{name} hung for {OUTAGE_BOUND:?} while Redis was down"));
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{name} during the outage returned {outcome:?}"
    );
    eprintln!("{name}: Unavailable after {:?}", started.elapsed());
}

#[tokio::test]
async fn outage_is_unavailable_then_the_same_store_recovers_with_data_lost() {
    let mut server = RedisServer::start();
    let store = store(&server).await;
    let before = random_session();
    store.create(before, LONG).await.expect("create");

    server.stop();
    let other = random_session();
    let id = before.client_id;
    assert_unavailable("ping", store.ping()).await;
    assert_unavailable("create", store.create(other, LONG)).await;
    assert_unavailable("attach", store.attach(id, &before.token, LONG)).await;
    assert_unavailable("renew", store.renew(id, 1, LONG)).await;
    assert_unavailable("detach", store.detach(id, 1, LONG)).await;
    assert_unavailable("complete", store.complete(id, 1)).await;
    assert_unavailable("lookup", store.lookup(id)).await;

    server.restart();
    // The first call after the restart is a non-idempotent one on purpose:
    // it must not fail just because the old connection died.
    let started = Instant::now();
    assert_eq!(
        store.attach(id, &before.token, LONG).await,
        Err(StoreError::NotFound),
        "a session lost with Redis's data must be unknown, never another session"
    );
    eprintln!("first attach after restart took {:?}", started.elapsed());
    assert_eq!(store.lookup(id).await, Ok(None));
    store.ping().await.expect("ping after restart");
    let after = store
        .create(other, LONG)
        .await
        .expect("create after restart");
    assert_eq!(after.generation, 1);
    store
        .renew(other.client_id, 1, LONG)
        .await
        .expect("renew after restart");
}

#[tokio::test]
async fn idle_through_an_outage_then_create_succeeds_first_time() {
    let mut server = RedisServer::start();
    let store = store(&server).await;
    store.ping().await.expect("ping");
    // No traffic while Redis is down: the store must not hand its next
    // caller the dead connection.
    server.stop();
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the outage: Redis stays down this long while the store is idle
    server.restart();
    let session = random_session();
    let attachment = store
        .create(session, LONG)
        .await
        .expect("create after restart");
    assert_eq!(attachment.generation, 1);
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_quickly() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let started = Instant::now();
    let outcome = tokio::time::timeout(OUTAGE_BOUND, RedisStore::connect(&url, DEFAULT_PREFIX))
        .await
        .expect("connect must give up on its own");
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "got {outcome:?}"
    );
    eprintln!(
        "connect to a dead port failed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_unreachable_host_is_unavailable_within_the_operation_timeout() {
    // 10.255.255.1 is normally unroutable, so the connect hangs rather than
    // being refused: only the store's own timeouts can end it.
    let config = RedisStoreConfig {
        operation_timeout: Duration::from_millis(800),
        ..RedisStoreConfig::default()
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        OUTAGE_BOUND,
        RedisStore::connect_with("redis://10.255.255.1:6379/", config),
    )
    .await
    .expect("connect must give up on its own");
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "got {outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A new session whose record then has `field` overwritten with `value`.
async fn damaged(
    store: &RedisStore,
    redis: &mut MultiplexedConnection,
    field: &str,
    value: &str,
) -> NewSession {
    let session = random_session();
    store.create(session, LONG).await.expect("create");
    let _: () = redis::cmd("HSET")
        .arg(store.session_key(session.client_id))
        .arg(field)
        .arg(value)
        .query_async(redis)
        .await
        .expect("HSET");
    session
}

#[tokio::test]
async fn damaged_records_are_corrupt_not_panics() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut redis = raw(&server).await;

    let wrong_type = ClientId::new_v4();
    let _: () = redis::cmd("SET")
        .arg(store.session_key(wrong_type))
        .arg("not a hash")
        .query_async(&mut redis)
        .await
        .expect("SET");
    assert!(matches!(
        store.renew(wrong_type, 1, LONG).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.lookup(wrong_type).await,
        Err(StoreError::Corrupt(_))
    ));

    let bad_fields = damaged(&store, &mut redis, "generation", "two").await;
    assert!(matches!(
        store
            .attach(bad_fields.client_id, &bad_fields.token, LONG)
            .await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.detach(bad_fields.client_id, 1, LONG).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.lookup(bad_fields.client_id).await,
        Err(StoreError::Corrupt(_))
    ));

    let short_seed = damaged(&store, &mut redis, "seed", "short").await;
    assert!(matches!(
        store
            .attach(short_seed.client_id, &short_seed.token, LONG)
            .await,
        Err(StoreError::Corrupt(_))
    ));

    // A count of 0 would have no last index: the server computes
    // `count - 1` for a resume past the end.
    let no_numbers = damaged(&store, &mut redis, "count", "0").await;
    assert!(matches!(
        store
            .attach(no_numbers.client_id, &no_numbers.token, LONG)
            .await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.lookup(no_numbers.client_id).await,
        Err(StoreError::Corrupt(_))
    ));

    let immortal = random_session();
    store.create(immortal, LONG).await.expect("create");
    let _: () = redis::cmd("PERSIST")
        .arg(store.session_key(immortal.client_id))
        .query_async(&mut redis)
        .await
        .expect("PERSIST");
    assert!(matches!(
        store.lookup(immortal.client_id).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// Waits until `expected` connections subscribe to `channel`.
async fn await_subscribers(server: &RedisServer, channel: &str, expected: usize) {
    let what = format!("{expected} subscribers to {channel}");
    wait::until_value(
        Duration::from_secs(10),
        &what,
        || std::future::ready(server.subscribers(channel)),
        |&count| count == expected,
    )
    .await;
}

#[tokio::test]
async fn every_attach_is_announced_to_every_instance_even_after_a_restart() {
    let mut server = RedisServer::start();
    let a = store(&server).await;
    let b = store(&server).await;
    let channel = a.takeover_channel().to_owned();
    assert_eq!(channel, "numstream:takeovers");
    let mut on_a = a
        .takeover_notices()
        .expect("a shared store announces takeovers");
    let mut on_b = b
        .takeover_notices()
        .expect("a shared store announces takeovers");
    await_subscribers(&server, &channel, 2).await;

    for round in 0..2 {
        let context = format!("round {round}");
        conformance::assert_attach_announced_to_both(&a, &b, &mut on_a, &mut on_b, &context).await;
        if round == 0 {
            // The subscriptions come back by themselves.
            server.restart();
            await_subscribers(&server, &channel, 2).await;
        }
    }

    // Dropping the stream ends its subscription.
    drop(on_a);
    await_subscribers(&server, &channel, 1).await;
}

#[tokio::test]
async fn a_lazy_store_starts_without_redis_and_serves_once_it_answers() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let store = RedisStore::connect_lazy(&url, RedisStoreConfig::default())
        .expect("a lazy store needs only a valid URL");
    let session = random_session();
    assert_unavailable("ping", store.ping()).await;
    assert_unavailable("create", store.create(session, LONG)).await;
    server.restart();
    store.ping().await.expect("ping once Redis is up");
    let attachment = store.create(session, LONG).await.expect("create");
    assert_eq!(attachment.generation, 1);
    assert!(
        RedisStore::connect_lazy("http://example.invalid", RedisStoreConfig::default()).is_err(),
        "an unusable URL is refused at once"
    );
}

/// Lease renewals go over a connection of their own, so that a batch is
/// not answered after everything the server sent Redis before it. Here
/// every create ends with a `WAIT` for a replica this Redis does not
/// have, which holds the shared connection's answers for 3 s (Redis
/// answers a connection's commands in order): a renewal sent meanwhile
/// must still come back long before that.
#[tokio::test]
async fn renewals_are_not_answered_behind_the_shared_connections_queue() {
    let server = RedisServer::start();
    let config = RedisStoreConfig {
        wait_replicas: 1,
        replica_wait: Duration::from_secs(3),
        // Room for the WAIT within one operation.
        response_timeout: Duration::from_secs(5),
        operation_timeout: Duration::from_secs(5),
        ..RedisStoreConfig::default()
    };
    let store = RedisStore::connect_with(&server.url(), config)
        .await
        .expect("connect to the test redis-server");
    let renewed = random_session();
    store.create(renewed, LONG).await.expect("create");
    let blocking = tokio::spawn({
        let store = store.clone();
        async move { store.create(random_session(), LONG).await }
    });
    let mut redis = raw(&server).await;
    wait::until(
        Duration::from_secs(5),
        "a WAIT blocking the shared connection",
        || {
            let mut redis = redis.clone();
            async move {
                let clients: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut redis)
                    .await
                    .expect("CLIENT LIST");
                clients.contains("cmd=wait")
            }
        },
    )
    .await;
    let started = Instant::now();
    let results = store.renew_many(&[(renewed.client_id, 1)], LONG).await;
    let took = started.elapsed();
    assert_eq!(results, vec![Ok(())]);
    assert!(
        took < Duration::from_millis(2_500),
        "the renewal took {took:?}: it waited behind the WAIT"
    );
    assert!(!blocking.is_finished(), "the WAIT ended first");
    blocking.await.expect("task").expect("create");
    let _: () = redis::cmd("PING")
        .query_async(&mut redis)
        .await
        .expect("PING");
}

/// A renewal of a live session costs Redis no `EXISTS` (the batch runs the
/// generation check for each session in it; a missing session is still
/// told from a damaged one: the conformance suite and `damaged`), and the
/// batch moves the index with one `ZADD` per 500 sessions, each member
/// scored with its own key's new expiry.
#[tokio::test]
async fn renewing_live_sessions_runs_no_exists_and_one_zadd_per_500() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut redis = raw(&server).await;
    // More than one of the script's ZADD chunks (500 members), so that a
    // member paired with the wrong score, or one left out, shows below.
    const SESSIONS: usize = 1_100;
    let mut renewals = Vec::new();
    for _ in 0..SESSIONS {
        let session = random_session();
        store.create(session, LONG).await.expect("create");
        renewals.push((session.client_id, 1));
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await
        .expect("CONFIG RESETSTAT");
    // A longer lease than the creates', so that every deadline moves.
    let results = store.renew_many(&renewals, LONG * 2).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .expect("INFO commandstats");
    for expected in [
        "cmdstat_hget:calls=1100,",
        "cmdstat_pexpireat:calls=1100,",
        // One ZADD per 500 renewed sessions, not one per session.
        "cmdstat_zadd:calls=3,",
    ] {
        assert!(
            stats.contains(expected),
            "the renewals did not run as expected ({expected}): {stats}"
        );
    }
    assert!(!stats.contains("cmdstat_exists:"), "{stats}");
    // Every session's index score is its key's new expiry.
    for &(client_id, _) in &renewals {
        let expiry = pexpiretime(&mut redis, &store.session_key(client_id)).await;
        assert_eq!(
            index_score(&mut redis, &store, client_id).await,
            Some(expiry),
            "index score of {client_id}"
        );
    }
}
