//! The real client library against the real server over real TCP, with a
//! proxy that cuts connections: whatever happens to the connections, the
//! client ends with exactly the sequence of an undisturbed run.

use std::net::SocketAddr;
use std::time::Duration;

use rand::{RngExt, SeedableRng};

use numstream_client::{ClientConfig, Report};
use numstream_harness::fault::{ConnectionPlan, Direction};
use numstream_harness::proxy::FaultProxy;
use numstream_harness::raw::closed_port;
use numstream_harness::wait;
use numstream_protocol::{ClientId, SequenceChecksum, SessionSeed, codec};
use numstream_server::ServerConfig;
use numstream_server::testing::{TestServer, fast_config};

/// Encoded sizes, for byte-exact cuts.
const WELCOME_LEN: usize = codec::WELCOME_FRAME_LEN;
const NUMBER_LEN: usize = codec::NUMBER_FRAME_LEN;

/// Bound on any single client run, so a hang fails instead of blocking CI.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn client(port: u16, count: u16, client_id: ClientId) -> ClientConfig {
    ClientConfig {
        ports: vec![port],
        count,
        client_id,
        ..ClientConfig::default()
    }
}

async fn run(config: ClientConfig) -> Report {
    tokio::time::timeout(RUN_LIMIT, numstream_client::run(config, &mut ()))
        .await
        .expect("client run must finish")
}

/// What an undisturbed run must print for this client id and count on a
/// server started with `--seed 42`.
fn reference(client_id: ClientId, count: u16) -> SequenceChecksum {
    SequenceChecksum::of_session(&SessionSeed::derive(42, client_id), count)
}

fn assert_matches_reference(report: &Report, count: u16) {
    assert!(report.ok, "{}", report.render_human());
    let expected = reference(report.client_id, count);
    assert_eq!(report.received, count);
    assert_eq!(report.sum, expected.sum());
    assert_eq!(report.client_checksum, expected.checksum());
    assert_eq!(report.server_checksum, Some(expected.checksum()));
    assert_eq!(report.exit_code(), 0);
}

#[tokio::test]
async fn a_full_sequence_verifies() {
    let server = TestServer::start(fast_config()).await;
    let report = run(client(server.port(), 20, ClientId::new_v4())).await;
    assert_matches_reference(&report, 20);
    assert_eq!(report.reconnects, 0);
}

#[tokio::test]
async fn count_one_and_burst_mode_work() {
    let config = ServerConfig {
        interval: Duration::ZERO,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    assert_matches_reference(&run(client(server.port(), 1, ClientId::new_v4())).await, 1);
    assert_matches_reference(
        &run(client(server.port(), u16::MAX, ClientId::new_v4())).await,
        u16::MAX,
    );
}

#[tokio::test]
async fn random_cuts_give_exactly_the_undisturbed_result() {
    let server = TestServer::start(fast_config()).await;
    let count = 300;
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let client_id = ClientId::new_v4();

        // The undisturbed run.
        let undisturbed = run(client(server.port(), count, client_id)).await;
        assert_matches_reference(&undisturbed, count);

        // The same client id again, with every connection but the last cut
        // at a random byte of the downstream stream (mid-frame included).
        let proxy = FaultProxy::start_queue(server.addr).await.expect("proxy");
        let cuts = rng.random_range(3..8);
        proxy.planner().push(
            (0..cuts).map(|_| close_downstream(rng.random_range(1..WELCOME_LEN + 80 * NUMBER_LEN))),
        );
        let disturbed = run(client(proxy.port(), count, client_id)).await;
        assert_matches_reference(&disturbed, count);
        assert_eq!(
            (
                disturbed.sum,
                disturbed.client_checksum,
                disturbed.server_checksum
            ),
            (
                undisturbed.sum,
                undisturbed.client_checksum,
                undisturbed.server_checksum
            ),
            "seed {seed}: cuts must not change the result"
        );
        assert!(
            disturbed.reconnects >= 1,
            "seed {seed}: the cuts must have forced resumes"
        );
        assert!(proxy.accepted() > cuts / 2, "seed {seed}");
    }
}

#[tokio::test]
async fn final_lost_in_flight_is_recovered_by_resuming() {
    let server = TestServer::start(fast_config()).await;
    let count = 10;
    let proxy = FaultProxy::start_queue(server.addr).await.expect("proxy");
    // Deliver WELCOME and every NUMBER, then cut before FINAL arrives.
    proxy.planner().push([close_downstream(
        WELCOME_LEN + (count as usize - 1) * NUMBER_LEN,
    )]);
    let report = run(client(proxy.port(), count, ClientId::new_v4())).await;
    assert_matches_reference(&report, count);
    assert_eq!(report.reconnects, 1);
}

#[tokio::test]
async fn drop_right_after_final_still_verifies() {
    let server = TestServer::start(fast_config()).await;
    let count = 10;
    let proxy = FaultProxy::start_queue(server.addr).await.expect("proxy");
    let everything = WELCOME_LEN + (count as usize - 1) * NUMBER_LEN + codec::FINAL_FRAME_LEN;
    proxy.planner().push([close_downstream(everything)]);
    let report = run(client(proxy.port(), count, ClientId::new_v4())).await;
    assert_matches_reference(&report, count);
}

#[tokio::test]
async fn repeated_cuts_of_many_clients_change_nothing() {
    let config = ServerConfig {
        interval: Duration::from_millis(5),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let proxy = FaultProxy::start_queue(server.addr).await.expect("proxy");
    let count = 150;
    let runs: Vec<_> = (0..20)
        .map(|_| tokio::spawn(run(client(proxy.port(), count, ClientId::new_v4()))))
        .collect();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(120)).await; // the fault schedule: cuts spread over the runs
        proxy.cut_all();
    }
    let mut resumed = 0;
    for handle in runs {
        let report = handle.await.expect("client task");
        assert_matches_reference(&report, count);
        resumed += report.reconnects;
    }
    assert!(
        resumed >= 20,
        "every client must have been cut at least once"
    );
}

#[tokio::test]
async fn a_client_away_longer_than_the_ttl_fails_with_session_expired() {
    let config = ServerConfig {
        interval: Duration::from_millis(5),
        session_ttl: Duration::from_millis(400),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let proxy = FaultProxy::start_queue(server.addr).await.expect("proxy");
    // Cut a second into the session (200 numbers at 5 ms): the test must
    // have pointed the proxy at the dead end before the client's first
    // reconnect, and a cut after 3 numbers left it 15 ms to do so (a
    // loaded machine missed it and the client resumed on the server).
    proxy
        .planner()
        .push([close_downstream(WELCOME_LEN + 200 * NUMBER_LEN)]);
    // After the cut, the path to the server is down for longer than the TTL.
    let dead_end = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let id = ClientId::new_v4();
    let mut config = client(proxy.port(), 1000, id);
    config.backoff.max = Duration::from_millis(100);
    let running = tokio::spawn(run(config));
    // Once the first connection is through, every later one hits the dead
    // end: the client's quick first retry cannot sneak back to the server.
    wait::until_sync(RUN_LIMIT, "the first connection", || proxy.accepted() >= 1).await;
    proxy.set_upstream(dead_end).expect("a loopback upstream");
    // Open again once the session is no longer live (detached, then past
    // its TTL).
    let store = server.store.clone();
    wait::until(RUN_LIMIT, "the cut-off session to expire", || {
        let store = store.clone();
        async move { store.lookup(id).await.expect("lookup").is_none() }
    })
    .await;
    proxy
        .set_upstream(server.addr)
        .expect("a loopback upstream");
    let report = running.await.expect("client task");
    assert!(!report.ok);
    assert_ne!(report.exit_code(), 0);
    let error = report.error.map(|error| error.to_string());
    assert!(
        error
            .as_deref()
            .is_some_and(|text| text.contains("expired")),
        "error must say the session expired: {error:?}"
    );
}

#[tokio::test]
async fn five_hundred_concurrent_clients_all_verify() {
    let config = ServerConfig {
        interval: Duration::from_millis(10),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let count = 30;
    let runs: Vec<_> = (0..500)
        .map(|_| tokio::spawn(run(client(server.port(), count, ClientId::new_v4()))))
        .collect();
    for handle in runs {
        assert_matches_reference(&handle.await.expect("client task"), count);
    }
}

#[tokio::test]
async fn client_fails_over_to_its_next_port_when_the_first_is_down() {
    let server = TestServer::start(fast_config()).await;
    let closed = closed_port();
    let mut config = client(closed, 20, ClientId::new_v4());
    config.ports.push(server.port());
    assert_matches_reference(&run(config).await, 20);
}

/// Closes the connection once `bytes` came down from the server.
fn close_downstream(bytes: usize) -> ConnectionPlan {
    ConnectionPlan::close_after(Direction::Downstream, bytes as u64)
}
