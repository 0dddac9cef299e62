//! Failures the chaos run found, replayed deterministically: fixed proxy
//! plans in front of an in-process server, and the real client library.

use std::time::Duration;

use numstream_chaos::plan::{
    ConnectionPlan, Direction, Fault, NUMBER_LEN, Schedule, Side, Trigger, WELCOME_LEN,
};
use numstream_chaos::proxy::FaultProxy;
use numstream_client::ClientConfig;
use numstream_protocol::{ClientId, SequenceChecksum, SessionSeed};
use numstream_server::testing::{TestServer, fast_config};

/// Runs one client through `proxy` to its end (bounded) and checks that it
/// printed OK with exactly the reference sequence of the test server
/// (`fast_config`'s seed 42).
async fn run_and_verify(proxy: &FaultProxy<Schedule>, count: u16, handshake_timeout: Duration) {
    let client_id = ClientId::new_v4();
    let client = ClientConfig {
        ports: vec![proxy.port()],
        count,
        client_id,
        handshake_timeout,
        ..ClientConfig::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        numstream_client::run(client, &mut ()),
    )
    .await
    .expect("client must finish");
    assert!(report.ok, "{}", report.render_human());
    let reference = SequenceChecksum::of_session(&SessionSeed::derive(42, client_id), count);
    assert_eq!(report.sum, reference.sum());
}

/// Long profile, seed 2026, clients 373 and 378: the client abandons a
/// connection whose RESUME is still on its way (here: the proxy half-closes
/// the client's side after 8 bytes of it and delays the rest), resumes on a
/// new connection, and then the stale RESUME reaches the server and takes
/// the session over from the live connection. The live connection gets
/// `taken_over`, which is final, so the client fails although nobody but
/// itself ever held its token.
#[tokio::test]

async fn a_stale_resume_from_an_abandoned_connection_does_not_kill_the_session() {
    let mut config = fast_config();
    config.interval = Duration::from_millis(5);
    let server = TestServer::start(config).await;
    let count = 400;
    let plans = vec![
        // The first connection is cut after 50 numbers, so the next one
        // resumes.
        ConnectionPlan {
            fault: Some(Fault::Close(Trigger::Bytes {
                direction: Direction::Downstream,
                after: WELCOME_LEN + 50 * NUMBER_LEN,
            })),
            ..ConnectionPlan::PASS
        },
        // Its RESUME is slow (300 ms on the way) and the client's side is
        // closed after 8 bytes of it: the client moves on, but the rest of
        // the RESUME still reaches the server, after the next connection's.
        ConnectionPlan {
            latency: Some(Duration::from_millis(300)),
            fault: Some(Fault::HalfClose {
                at: Trigger::Bytes {
                    direction: Direction::Upstream,
                    after: 8,
                },
                side: Side::Client,
                hold: Duration::from_secs(5),
            }),
            ..ConnectionPlan::PASS
        },
    ];
    let proxy = FaultProxy::start_local(server.addr, Schedule::fixed(plans))
        .await
        .expect("proxy");
    run_and_verify(&proxy, count, ClientConfig::default().handshake_timeout).await;
    assert!(proxy.records().len() >= 3, "{:?}", proxy.records());
}

/// Long profile, seed 2026, 25 clients: the server's ACK timeout counts from
/// writing FINAL into the kernel, not from its delivery. Behind a slow link
/// (here 3 s of latency) the server has written everything, waits out its
/// ACK timeout, detaches, and the session expires one TTL later while the
/// client is still receiving it. The connection then drops before FINAL
/// arrives, and the client's immediate resume is refused although the
/// client was never away.
#[tokio::test]

async fn a_slow_reader_keeps_its_session_until_it_has_received_it() {
    let mut config = fast_config();
    config.interval = Duration::ZERO;
    config.ack_timeout = Duration::from_secs(1);
    config.session_ttl = Duration::from_secs(1);
    config.handshake_timeout = Duration::from_secs(10);
    let server = TestServer::start(config).await;
    let count = 20;
    let plans = vec![ConnectionPlan {
        latency: Some(Duration::from_secs(3)),
        fault: Some(Fault::Close(Trigger::Bytes {
            direction: Direction::Downstream,
            after: WELCOME_LEN + 10 * NUMBER_LEN,
        })),
        ..ConnectionPlan::PASS
    }];
    let proxy = FaultProxy::start_local(server.addr, Schedule::fixed(plans))
        .await
        .expect("proxy");
    // The latency applies both ways: OPEN and WELCOME take 6 s.
    run_and_verify(&proxy, count, Duration::from_secs(10)).await;
}
