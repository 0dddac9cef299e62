//! Several server instances sharing one real Redis: failover after kill -9,
//! drain on SIGTERM, takeover across instances, orphaned sessions, and
//! Redis itself failing (restart with data loss, a hung Redis).
//!
//! Instances that must die for real are `numstream-server` processes; the
//! others run in-process, each with its own `RedisStore` (its own
//! connections and takeover subscription), which is what a separate
//! process would have. Clients are the real client library.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use numstream_client::Event;
use numstream_harness::process::{ServerCommand, ServerProcess, Signal};
use numstream_harness::raw::RawClient;
use numstream_harness::redis::RedisServer;
use numstream_harness::wait;
use numstream_protocol::prng::NumberGenerator;
use numstream_protocol::{
    ClientId, Disposition, ErrorCode, Frame, Open, Resume, ResumeToken, SessionSeed,
};
use numstream_server::ServerConfig;
use numstream_server::testing::TestServer;
use numstream_store_redis::{DEFAULT_PREFIX, RedisStore};

mod common;

use common::{
    BIN, SEED, assert_undisturbed_result, drain, first_welcome_after, rotated, spawn_client,
    spawn_client_as, until_welcomed,
};

fn session_key(client_id: ClientId) -> String {
    format!("{DEFAULT_PREFIX}session:{{{client_id}}}")
}

async fn raw_redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

async fn exists(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    let count: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(redis)
        .await
        .expect("EXISTS");
    count == 1
}

/// Waits until `expected` servers listen for takeover notices, so a test
/// does not race a subscription still being set up.
async fn await_subscribers(server: &RedisServer, expected: usize) {
    let channel = format!("{DEFAULT_PREFIX}takeovers");
    let what = format!("{expected} servers subscribed to {channel}");
    wait::until_value(
        Duration::from_secs(10),
        &what,
        || std::future::ready(server.subscribers(&channel)),
        |&count| count >= expected,
    )
    .await;
}

fn process_args(redis: &RedisServer, interval: &str, ttl: &str) -> Vec<String> {
    [
        "--store",
        &redis.url(),
        "--interval",
        interval,
        "--session-ttl",
        ttl,
        "--seed",
        &SEED.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn start_processes(n: usize, args: &[String]) -> Vec<ServerProcess> {
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        let server = ServerCommand::new(BIN).args(args).start().await;
        servers.push(server.expect("start numstream-server"));
    }
    servers
}

fn config(interval: Duration, session_ttl: Duration) -> ServerConfig {
    ServerConfig {
        interval,
        session_ttl,
        seed: Some(SEED),
        handshake_timeout: Duration::from_secs(2),
        ack_timeout: Duration::from_secs(2),
        dead_peer_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(3),
        ..ServerConfig::default()
    }
}

/// An in-process instance with its own connection to `redis`.
async fn instance(redis: &RedisServer, config: ServerConfig) -> TestServer {
    let store = RedisStore::connect(&redis.url(), DEFAULT_PREFIX)
        .await
        .expect("connect to the test redis-server");
    TestServer::start_with_store(config, Arc::new(store)).await
}

/// OPENs `count` numbers on `addr` and reads the WELCOME: the session's
/// token, and the connection.
async fn open(addr: SocketAddr, client_id: ClientId, count: u16) -> (RawClient, ResumeToken) {
    let mut client = RawClient::connect(addr).await;
    client.send(Frame::Open(Open { client_id, count })).await;
    match client.frame().await {
        Frame::Welcome(welcome) => (client, welcome.token),
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// An OPEN on `addr` must get the retryable `store_unavailable`.
async fn open_refused_as_store_unavailable(addr: SocketAddr) {
    let mut client = RawClient::opened(addr, 5).await;
    match client.frame().await {
        Frame::Error(error) => {
            assert_eq!(error.code, ErrorCode::StoreUnavailable, "{error}");
            assert_eq!(error.disposition, Disposition::Retry);
        }
        other => panic!("expected store_unavailable, got {other:?}"),
    }
}

/// Reads numbers from `client`, checking each against the reference, until
/// `until` numbers have arrived. Returns the next index.
async fn read_numbers(client: &mut RawClient, client_id: ClientId, from: u16, until: u16) -> u16 {
    let mut expected = NumberGenerator::starting_at(&SessionSeed::derive(SEED, client_id), from);
    for index in from..until {
        match client.frame().await {
            Frame::Number { index: got, value } => {
                assert_eq!(got, index);
                assert_eq!(value, expected.next_number(), "number {index}");
            }
            Frame::Heartbeat => {}
            other => panic!("expected NUMBER {index}, got {other:?}"),
        }
    }
    until
}

// ---------------------------------------------------------------------------
// Server processes: kill -9, SIGTERM, orphaned sessions, starting without Redis
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_every_client_finishes_with_the_undisturbed_result() {
    let redis = RedisServer::start();
    let servers = start_processes(3, &process_args(&redis, "50ms", "10s")).await;
    let mut servers = servers.into_iter();
    let mut victim = servers.next().expect("three servers");
    let survivors: Vec<ServerProcess> = servers.collect();
    let ports: Vec<u16> = std::iter::once(victim.port())
        .chain(survivors.iter().map(ServerProcess::port))
        .collect();

    // Six clients of 40 numbers (2 s undisturbed), two starting on each
    // instance; every one is given all three ports.
    let count = 40;
    let mut clients: Vec<_> = (0..6)
        .map(|i| spawn_client(rotated(&ports, i), count))
        .collect();
    let welcomed = until_welcomed(&mut clients).await;
    let killed_at = Instant::now();
    victim.kill().await;

    let mut failed_over = Vec::new();
    for (i, ((run, mut events), mut seen)) in clients.into_iter().zip(welcomed).enumerate() {
        let report = run.await.expect("client task");
        assert_undisturbed_result(&report);
        seen.extend(drain(&mut events));
        let events = seen;
        if i % 3 == 0 {
            failed_over.push(report.client_id);
            assert!(
                report.reconnects >= 1,
                "client {i} was on the killed server"
            );
            let resumed = first_welcome_after(&events, killed_at)
                .expect("a WELCOME from another instance after the kill");
            let failover = resumed - killed_at;
            eprintln!("client {i}: resumed on another instance {failover:?} after kill -9");
            assert!(
                failover < Duration::from_secs(2),
                "failover took {failover:?}"
            );
        } else {
            assert_eq!(
                report.reconnects, 0,
                "client {i} was not on the killed server"
            );
        }
    }

    // A finished session is gone at once: the same client ids start new
    // sessions (generation 1 again, after a takeover announced 2) and get
    // the same sequences. "At once" is once the server has read the ACK,
    // which a client sends best effort and does not wait on: wait for the
    // record to go (a bound, not a measure) so that a new OPEN cannot race
    // the server's delete.
    let redis_connection = raw_redis(&redis).await;
    for client_id in &failed_over {
        let key = session_key(*client_id);
        // The ACK is best effort too: a session whose ACK was lost waits
        // out its 10 s TTL instead, so bound the wait past that.
        let deadline = Instant::now() + Duration::from_secs(20);
        wait::until(
            deadline.saturating_duration_since(Instant::now()),
            "a finished session to leave Redis (completed or expired)",
            || {
                let (mut redis, key) = (redis_connection.clone(), key.clone());
                async move { !exists(&mut redis, &key).await }
            },
        )
        .await;
    }
    let survivor_ports: Vec<u16> = survivors.iter().map(ServerProcess::port).collect();
    let reruns: Vec<_> = failed_over
        .into_iter()
        .enumerate()
        .map(|(i, client_id)| spawn_client_as(client_id, rotated(&survivor_ports, i), count))
        .collect();
    for (run, _events) in reruns {
        let report = run.await.expect("client task");
        assert_undisturbed_result(&report);
        assert_eq!(report.reconnects, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_onto_the_others_well_before_the_ttl() {
    let ttl = Duration::from_secs(10);
    let redis = RedisServer::start();
    let mut servers = start_processes(2, &process_args(&redis, "50ms", "10s")).await;
    let ports: Vec<u16> = servers.iter().map(ServerProcess::port).collect();

    // Four clients start on the instance that will drain.
    let count = 40;
    let mut clients: Vec<_> = (0..4).map(|_| spawn_client(ports.clone(), count)).collect();
    let welcomed = until_welcomed(&mut clients).await;
    let signalled_at = Instant::now();
    servers[0].signal(Signal::TERM).expect("SIGTERM the server");

    for (i, ((run, mut events), mut seen)) in clients.into_iter().zip(welcomed).enumerate() {
        let report = run.await.expect("client task");
        assert_undisturbed_result(&report);
        assert_eq!(report.reconnects, 1, "client {i}: exactly one resume");
        seen.extend(drain(&mut events));
        let events = seen;
        let asked = events.iter().find_map(|(_, event)| match event {
            Event::Reconnecting { cause, delay, .. } => Some((cause.clone(), *delay)),
            _ => None,
        });
        let (cause, delay) = asked.expect("a reconnect");
        assert!(cause.contains("shutting_down"), "client {i}: {cause}");
        assert_eq!(delay, Duration::ZERO, "RetryNow skips the backoff");
        let resumed = first_welcome_after(&events, signalled_at).expect("a WELCOME after SIGTERM");
        eprintln!(
            "client {i}: resumed on the other instance {:?} after SIGTERM",
            resumed - signalled_at
        );
    }
    let finished = signalled_at.elapsed();
    assert!(
        finished < ttl / 2,
        "clients finished {finished:?} after SIGTERM: drained sessions must not wait for the TTL"
    );
    let status = servers[0]
        .wait_exit(Duration::from_secs(6))
        .await
        .expect("the drained server exits within its grace period");
    assert!(status.success(), "graceful drain exits 0, got {status}");
    let log = servers[0].log();
    assert!(log.contains("session detached by server shutdown"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_session_disappears_about_one_ttl_after_its_owner_is_killed() {
    let ttl = Duration::from_secs(1);
    let redis = RedisServer::start();
    let mut servers = start_processes(1, &process_args(&redis, "50ms", "1s")).await;
    let mut redis_connection = raw_redis(&redis).await;
    let id = ClientId::new_v4();
    let addr = SocketAddr::from(([127, 0, 0, 1], servers[0].port()));
    let (mut client, _token) = open(addr, id, 1000).await;
    // Long enough for a few lease renewals (every ttl/3).
    read_numbers(&mut client, id, 0, 15).await;

    servers[0].kill().await;
    let killed_at = Instant::now();
    drop(client); // and the client stays away
    let key = session_key(id);
    assert!(
        exists(&mut redis_connection, &key).await,
        "the session outlives its owner for a while (its client could resume elsewhere)"
    );
    let limit = ttl + Duration::from_secs(1);
    wait::until(
        limit.saturating_sub(killed_at.elapsed()),
        "the orphaned session to expire from Redis after its owner died",
        || {
            let (mut redis, key) = (redis_connection.clone(), key.clone());
            async move { !exists(&mut redis, &key).await }
        },
    )
    .await;
    let gone_after = killed_at.elapsed();
    eprintln!("orphaned session expired {gone_after:?} after kill -9 (TTL {ttl:?})");
    assert!(
        gone_after >= ttl / 3,
        "expired after {gone_after:?}: the lease was shorter than promised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_bounds_the_deployment_across_instances() {
    let redis = RedisServer::start();
    let mut args = process_args(&redis, "1s", "30s");
    args.extend(["--max-sessions", "3"].map(str::to_owned));
    let servers = start_processes(2, &args).await;
    let [a, b] = [&servers[0], &servers[1]].map(|s| SocketAddr::from(([127, 0, 0, 1], s.port())));
    // Held open: each connection keeps its session attached.
    let mut held = Vec::new();
    for addr in [a, a, b] {
        held.push(open(addr, ClientId::new_v4(), 100).await);
    }
    for addr in [a, b] {
        let message = RawClient::opened(addr, 5)
            .await
            .expect_error(ErrorCode::ServerBusy)
            .await;
        assert!(message.contains("full (3 sessions)"), "{message}");
    }
    assert!(
        !servers[0].log().contains("does not apply"),
        "--max-sessions applies to Redis now"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_redis_is_down_serves_once_redis_is_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let args = process_args(&redis, "10ms", "5s");
    let server = &start_processes(1, &args).await[0];
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port()));

    open_refused_as_store_unavailable(addr).await;
    assert!(server.log().contains("Redis is not answering"));

    redis.restart();
    let (run, _events) = spawn_client(vec![server.port()], 3);
    let report = run.await.expect("client task");
    assert_undisturbed_result(&report);
}

// ---------------------------------------------------------------------------
// In-process instances: takeover notices, Redis restart, Redis hung
// ---------------------------------------------------------------------------

/// Opens a session on `a`, resumes it on `b` while `a` still streams, and
/// checks that `a` stops within a few intervals and that `b` carries on
/// with the right numbers. Returns how long after `b`'s WELCOME `a`'s
/// `taken_over` arrived.
async fn take_over_across_instances(a: SocketAddr, b: SocketAddr, interval: Duration) -> Duration {
    let id = ClientId::new_v4();
    let (mut on_a, token) = open(a, id, 1000).await;
    let next = read_numbers(&mut on_a, id, 0, 3).await;

    // Record everything A sends from now on, with arrival times.
    let reader = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            match on_a.recv().await {
                Some(Ok(frame)) => {
                    let error = matches!(frame, Frame::Error(_));
                    frames.push((Instant::now(), frame));
                    if error {
                        return frames;
                    }
                }
                _ => return frames,
            }
        }
    });

    let mut on_b = RawClient::connect(b).await;
    on_b.send(Frame::Resume(Resume {
        client_id: id,
        token,
        next_index: next,
    }))
    .await;
    // A keeps streaming until it hears of the takeover; the client has not
    // received those numbers, and B starts where the client says.
    let welcomed_at = match on_b.frame().await {
        Frame::Welcome(welcome) => {
            assert_eq!(welcome.next_index, next);
            Instant::now()
        }
        other => panic!("expected WELCOME from B, got {other:?}"),
    };
    read_numbers(&mut on_b, id, next, next + 2).await;

    let frames = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("A must stop")
        .expect("reader task");
    let (stopped_at, last) = frames.last().expect("A sent something");
    match last {
        Frame::Error(error) => assert_eq!(error.code, ErrorCode::TakenOver, "{error}"),
        other => panic!("A's last frame must be taken_over, got {other:?}"),
    }
    let after_welcome: Vec<_> = frames
        .iter()
        .filter(|(at, frame)| *at > welcomed_at && matches!(frame, Frame::Number { .. }))
        .collect();
    let latency = stopped_at.saturating_duration_since(welcomed_at);
    assert!(
        latency < 3 * interval + Duration::from_millis(200),
        "A stopped {latency:?} after B's WELCOME"
    );
    // Across processes the overlap is the notice latency: at most the
    // numbers falling due within it (at most one when it is short).
    let due_meanwhile = latency.as_micros() / interval.as_micros().max(1) + 1;
    assert!(
        after_welcome.len() as u128 <= due_meanwhile,
        "A sent {} numbers in the {latency:?} after B's WELCOME",
        after_welcome.len()
    );
    latency
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_on_another_instance_stops_the_old_stream_within_an_interval() {
    // Lease renewal comes only every 10 s / 3, so a prompt stop can only be
    // the takeover notice.
    let interval = Duration::from_millis(200);
    let redis = RedisServer::start();
    let a = instance(&redis, config(interval, Duration::from_secs(10))).await;
    let b = instance(&redis, config(interval, Duration::from_secs(10))).await;
    await_subscribers(&redis, 2).await;
    for round in 0..3 {
        let latency = take_over_across_instances(a.addr, b.addr, interval).await;
        eprintln!("round {round}: A sent taken_over {latency:?} after B's WELCOME");
    }
    // And the other way round.
    let latency = take_over_across_instances(b.addr, a.addr, interval).await;
    eprintln!("B to A: taken_over {latency:?} after A's WELCOME");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_sessions_clearly_and_service_comes_back() {
    let interval = Duration::from_millis(50);
    let ttl = Duration::from_secs(3);
    let mut redis = RedisServer::start();
    let a = instance(&redis, config(interval, ttl)).await;
    let b = instance(&redis, config(interval, ttl)).await;
    await_subscribers(&redis, 2).await;

    let id = ClientId::new_v4();
    let (mut on_a, token) = open(a.addr, id, 1000).await;
    let mut next = read_numbers(&mut on_a, id, 0, 5).await;
    redis.restart();
    let restarted_at = Instant::now();

    // The streaming connection learns at its next lease renewal that the
    // session is gone; until then every number is still the right one.
    let mut expected = NumberGenerator::starting_at(&SessionSeed::derive(SEED, id), next);
    let error = loop {
        match on_a.frame().await {
            Frame::Number { index, value } => {
                assert_eq!(index, next);
                assert_eq!(value, expected.next_number());
                next += 1;
            }
            Frame::Heartbeat => {}
            Frame::Error(error) => break error,
            other => panic!("unexpected {other:?}"),
        }
    };
    eprintln!(
        "streaming connection told {} {:?} after the restart",
        error.code,
        restarted_at.elapsed()
    );
    assert_eq!(error.code, ErrorCode::SessionUnknown, "{error}");
    assert_eq!(error.disposition, Disposition::Final);
    assert!(restarted_at.elapsed() < ttl, "within one renewal period");

    // A resume anywhere is refused: never a different sequence.
    for addr in [a.addr, b.addr] {
        let mut resuming = RawClient::connect(addr).await;
        resuming
            .send(Frame::Resume(Resume {
                client_id: id,
                token,
                next_index: next,
            }))
            .await;
        resuming.expect_error(ErrorCode::SessionUnknown).await;
    }

    // New sessions work, the same client id included.
    let (run, _events) = spawn_client(vec![a.port(), b.port()], 20);
    assert_undisturbed_result(&run.await.expect("client task"));
    let (mut again, _) = open(b.addr, id, 10).await;
    read_numbers(&mut again, id, 0, 3).await;
    drop(again);

    // Both instances subscribed again: takeovers are prompt again.
    await_subscribers(&redis, 2).await;
    let latency = take_over_across_instances(a.addr, b.addr, interval).await;
    eprintln!("takeover notice after the Redis restart: {latency:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_ridden_out_briefly_then_reported_retryable() {
    // Lease 4.5 s, renewed every 1.5 s; a connection stops streaming once
    // its lease has gone unconfirmed for 3 s.
    let interval = Duration::from_millis(50);
    let ttl = Duration::from_millis(4_500);
    let redis = RedisServer::start();
    let a = instance(&redis, config(interval, ttl)).await;
    let b = instance(&redis, config(interval, ttl)).await;

    let count = 120; // 6 s undisturbed
    let mut client = [spawn_client(vec![a.port(), b.port()], count)];
    until_welcomed(&mut client).await;
    let [(run, mut events)] = client;
    tokio::time::sleep(Duration::from_millis(600)).await; // so the hang below covers the renewal due 1.5 s after the WELCOME

    // A short hang (1.2 s, over the renewal due at 1.5 s) is ridden through
    // without the client noticing.
    redis.pause();
    tokio::time::sleep(Duration::from_millis(1_200)).await; // the fault: Redis hangs this long (under the 1.5 s renewal)
    redis.resume();
    tokio::time::sleep(Duration::from_millis(500)).await; // time to recover before the next fault

    // A long one: new sessions get a retryable store_unavailable within
    // the store's operation timeout, and streaming stops once the lease
    // can no longer be confirmed, with a retryable error as well.
    redis.pause();
    let paused_at = Instant::now();
    open_refused_as_store_unavailable(b.addr).await;
    eprintln!(
        "OPEN during the hang: store_unavailable after {:?}",
        paused_at.elapsed()
    );
    let stopped_at = loop {
        let (at, event) = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the stream must stop while the lease cannot be renewed")
            .expect("client events");
        match event {
            Event::Reconnecting { cause, .. } => {
                assert!(
                    at > paused_at,
                    "the short hang interrupted the stream: {cause}"
                );
                assert!(cause.contains("store_unavailable"), "{cause}");
                break at;
            }
            Event::Number { .. } | Event::Heartbeat => {}
            Event::Connected { .. } | Event::Welcomed { .. } if at < paused_at => {}
            other => panic!("unexpected {other:?} before the lease lapsed"),
        }
    };
    let stopped_after = stopped_at - paused_at;
    eprintln!("streaming stopped {stopped_after:?} into the hang");
    assert!(
        stopped_after <= ttl * 2 / 3 + Duration::from_millis(500),
        "stopped {stopped_after:?} into the hang"
    );
    // Redis answers again before the session's key expires: the client
    // resumes and gets exactly the undisturbed sequence.
    redis.resume();
    let report = run.await.expect("client task");
    assert_undisturbed_result(&report);
    assert_eq!(
        report.reconnects, 1,
        "only the long hang interrupted the stream"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_append_only_file_a_redis_restart_keeps_sessions_streaming_and_resumable() {
    // appendonly yes, appendfsync everysec: what the operations guide
    // recommends.
    let mut redis = RedisServer::start_persistent();
    let mut servers = start_processes(2, &process_args(&redis, "50ms", "10s")).await;
    let ports: Vec<u16> = servers.iter().map(ServerProcess::port).collect();

    // Four clients of 60 numbers (3 s undisturbed), two on each server.
    let mut clients: Vec<_> = (0..4)
        .map(|i| spawn_client(rotated(&ports, i), 60))
        .collect();
    until_welcomed(&mut clients).await;
    // Their sessions are in the file: on a busy disk Redis may hold
    // acknowledged writes back for up to 2 s (docs/operations.md).
    wait::until(
        Duration::from_secs(10),
        "Redis's AOF buffer written",
        || {
            let written = redis.aof_written();
            async move { written }
        },
    )
    .await;
    // Redis crashes and comes back with its append-only file...
    redis.restart();
    // ...and then one server dies too, so half the clients must resume,
    // which needs their sessions from the reloaded file.
    servers[0].kill().await;
    for (i, (run, _events)) in clients.into_iter().enumerate() {
        let report = run.await.expect("client task");
        assert_undisturbed_result(&report);
        if i % 2 == 0 {
            assert!(report.reconnects >= 1, "client {i} resumed elsewhere");
        }
    }
}
