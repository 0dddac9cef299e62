//! The abusive client of the chaos run against real servers (in-process,
//! on loopback): what it plans from the seed, where it connects from, and
//! that it really holds connections, opens sessions and stalls handshakes,
//! as it reports.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::BytesMut;
use numstream_chaos::attack::{
    AttackConfig, AttackKind, AttackPlan, AttackReport, Attacker, SlowHello,
};
use numstream_harness::raw::RawClient;
use numstream_harness::wait;
use numstream_protocol::{ErrorCode, Frame, ResumeToken, Welcome, encode_frame};
use numstream_server::testing::{TestServer, fast_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;

/// Bound on every wait for the attacker to get somewhere.
const PATIENCE: Duration = Duration::from_secs(20);

fn config(kinds: &[AttackKind], max_connections: usize) -> AttackConfig {
    AttackConfig {
        kinds: kinds.to_vec(),
        max_connections,
        retry_pause: Duration::from_millis(100),
        ..AttackConfig::default()
    }
}

/// Polls the attacker's report until `reached` holds; panics with the last
/// report after `PATIENCE`.
async fn wait_for(attacker: &Attacker, what: &str, reached: impl Fn(&AttackReport) -> bool) {
    let what = format!("the attacker to get to {what}");
    wait::until_value(
        PATIENCE,
        &what,
        || std::future::ready(attacker.report()),
        reached,
    )
    .await;
}

async fn stop(attacker: Attacker) -> AttackReport {
    timeout(PATIENCE, attacker.stop())
        .await
        .expect("the attacker stops promptly")
}

#[test]
fn the_attack_plan_derives_from_the_seed() {
    let all = config(&AttackKind::ALL, 1000);
    let plan = AttackPlan::new(&all, 7, 3);
    assert_eq!(plan, AttackPlan::new(&all, 7, 3), "same seed, same plan");

    // Bounded: at most the budget, spread evenly over the servers.
    assert!(plan.max_connections() <= 1000);
    assert!(plan.max_connections() >= 990, "{}", plan.max_connections());
    for server in 0..3 {
        let on = |kind| {
            plan.units()
                .iter()
                .filter(|u| u.server == server && u.kind == kind)
                .count()
        };
        assert_eq!(on(AttackKind::Churn), 2);
        assert_eq!(on(AttackKind::Hog), 220);
        assert_eq!(on(AttackKind::Slowloris), 111);
    }

    // Its own addresses, in 127.66.0.0/24, the configured number of them.
    let sources = plan.sources();
    assert_eq!(sources.len(), all.addresses);
    assert!(
        sources
            .iter()
            .all(|s| s.octets()[..3] == [127, 66, 0] && s.octets()[3] != 0),
        "{sources:?}"
    );

    // Every client id and partial hello comes from the seed: the same
    // again for the same seed, others for another seed.
    let other = AttackPlan::new(&all, 8, 3);
    let units = plan.units();
    let ids = |plan: &AttackPlan| -> Vec<_> {
        units
            .iter()
            .flat_map(|u| (0..3).map(move |attempt| (u, attempt)))
            .map(|(u, attempt)| plan.client_id(u, attempt))
            .collect()
    };
    assert_eq!(ids(&plan), ids(&AttackPlan::new(&all, 7, 3)));
    let distinct: BTreeSet<_> = ids(&plan).into_iter().collect();
    assert_eq!(distinct.len(), units.len() * 3, "a fresh id every OPEN");
    assert!(ids(&other).iter().all(|id| !distinct.contains(id)));
    let hellos: Vec<SlowHello> = (0..200).map(|a| plan.slow_hello(&units[0], a)).collect();
    assert!(hellos.contains(&SlowHello::Silent));
    assert!(
        hellos
            .iter()
            .all(|h| matches!(h, SlowHello::Silent | SlowHello::Partial(1..=24)))
    );
    assert_ne!(
        hellos,
        (0..200)
            .map(|a| other.slow_hello(&units[0], a))
            .collect::<Vec<_>>()
    );

    // Kinds left out get nothing; `none` is no attack at all.
    let hog_only = AttackPlan::new(&config(&[AttackKind::Hog], 100), 7, 2);
    assert!(hog_only.units().iter().all(|u| u.kind == AttackKind::Hog));
    assert_eq!(hog_only.max_connections(), 100);
    assert!(AttackPlan::new(&config(&[], 1000), 7, 3).is_empty());
    assert!(AttackPlan::new(&all, 7, 0).is_empty());
}

#[tokio::test]
async fn the_attacker_connects_from_its_own_addresses() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let attack = AttackConfig {
        addresses: 3,
        ..config(&[AttackKind::Hog], 6)
    };
    let plan = AttackPlan::new(&attack, 1, 1);
    let expected: BTreeSet<IpAddr> = plan.sources().into_iter().map(IpAddr::V4).collect();
    let attacker = Attacker::start(plan, vec![addr]);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let (_stream, peer) = timeout(PATIENCE, listener.accept())
            .await
            .expect("the attacker connects")
            .expect("accept");
        assert!(expected.contains(&peer.ip()), "{peer} not in {expected:?}");
        seen.insert(peer.ip());
    }
    assert_eq!(seen, expected, "every planned address is used");
    // The listener never answers: each slot stays on its first connection.
    wait_for(&attacker, "count its 6 connections", |r| {
        r.kind(AttackKind::Hog).connections == 6
    })
    .await;
    let report = stop(attacker).await;
    let hog = report.kind(AttackKind::Hog);
    assert_eq!((hog.connections, hog.sessions), (6, 0), "{hog:?}");
}

#[tokio::test]
async fn the_hog_takes_every_connection_the_server_allows() {
    let server = TestServer::start(numstream_server::ServerConfig {
        max_connections: 10,
        ..fast_config()
    })
    .await;
    let plan = AttackPlan::new(&config(&[AttackKind::Hog], 16), 3, 1);
    let attacker = Attacker::start(plan.clone(), vec![server.addr]);
    wait_for(&attacker, "hold 10 sessions and be refused", |r| {
        let hog = r.kind(AttackKind::Hog);
        hog.held == 10 && hog.errors.get("server_busy").is_some_and(|&n| n > 0)
    })
    .await;

    // A client from another address is turned away meanwhile: the hog has
    // every connection the server allows (nothing here limits one address).
    let mut honest = RawClient::connect(server.addr).await;
    honest.expect_error(ErrorCode::ServerBusy).await;

    // What it reports is what the server holds: a session for each.
    let mut held_by_server = 0;
    for unit in plan.units() {
        for attempt in 0..3 {
            let id = plan.client_id(unit, attempt);
            if server.store.lookup(id).await.expect("lookup").is_some() {
                held_by_server += 1;
            }
        }
    }
    assert!(held_by_server >= 10, "the store holds {held_by_server}");

    let report = stop(attacker).await;
    let hog = report.kind(AttackKind::Hog);
    assert_eq!(hog.units, 16);
    assert!(hog.sessions >= 10 && hog.held_peak >= 10, "{hog:?}");
    assert!(hog.connections >= hog.sessions, "{hog:?}");
    assert_eq!(hog.held, 0, "stopping closes everything");
}

/// The hog notices, without reading, that the server closed a connection
/// (here a scripted server that sends a WELCOME and some numbers, then
/// closes), and takes another.
#[tokio::test]
async fn the_hog_opens_again_what_the_server_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let scripted = tokio::spawn(async move {
        let welcome = Frame::Welcome(Welcome {
            count: u16::MAX,
            next_index: 0,
            token: ResumeToken([7; 16]),
            interval_us: 1000,
            session_ttl_ms: 30_000,
        });
        let mut reply = BytesMut::new();
        encode_frame(&welcome, &mut reply);
        for index in 0..50 {
            encode_frame(&Frame::Number { index, value: 9 }, &mut reply);
        }
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut open = [0u8; 25];
                stream.read_exact(&mut open).await?;
                stream.write_all(&reply).await?;
                tokio::time::sleep(Duration::from_millis(200)).await; // the fake server holds the connection a moment, then closes it (its behaviour)
                stream.shutdown().await
            });
        }
    });
    let plan = AttackPlan::new(&config(&[AttackKind::Hog], 3), 6, 1);
    let attacker = Attacker::start(plan, vec![addr]);
    wait_for(&attacker, "open 3 sessions on each of its 3 slots", |r| {
        r.kind(AttackKind::Hog).sessions >= 9
    })
    .await;
    let report = stop(attacker).await;
    scripted.abort();
    let hog = report.kind(AttackKind::Hog);
    assert!(hog.held_peak <= 3, "one connection per slot: {hog:?}");
    assert!(hog.errors.is_empty(), "{hog:?}");
}

/// A server that gives up on a hog connection it cannot write to closes
/// it with numbers unsent, so no FIN reaches the hog; its keepalive finds
/// out, and it takes another.
#[tokio::test]
async fn the_hog_notices_a_server_that_gave_up_on_it() {
    let server = TestServer::start(numstream_server::ServerConfig {
        interval: Duration::from_millis(1),
        write_timeout: Duration::from_millis(500),
        dead_peer_timeout: Duration::from_millis(500),
        ..fast_config()
    })
    .await;
    let plan = AttackPlan::new(&config(&[AttackKind::Hog], 2), 8, 1);
    let attacker = Attacker::start(plan, vec![server.addr]);
    wait_for(&attacker, "open 3 sessions on each of its 2 slots", |r| {
        r.kind(AttackKind::Hog).sessions >= 6
    })
    .await;
    let report = stop(attacker).await;
    let hog = report.kind(AttackKind::Hog);
    assert!(hog.held_peak <= 2, "one connection per slot: {hog:?}");
}

#[tokio::test]
async fn churn_opens_and_drops_sessions_at_its_pace() {
    let server = TestServer::start(fast_config()).await;
    let attack = AttackConfig {
        churn_tasks: 2,
        churn_rate: 50,
        ..config(&[AttackKind::Churn], 2)
    };
    let plan = AttackPlan::new(&attack, 4, 1);
    assert_eq!(plan.units().len(), 2);
    let attacker = Attacker::start(plan.clone(), vec![server.addr]);
    wait_for(&attacker, "open 40 sessions", |r| {
        r.kind(AttackKind::Churn).sessions >= 40
    })
    .await;
    let report = stop(attacker).await;
    let churn = report.kind(AttackKind::Churn);
    assert!(churn.connections >= churn.sessions, "{churn:?}");
    assert!(churn.errors.is_empty(), "{churn:?}");

    // Dropped, not closed: the server keeps each session for its TTL.
    for unit in plan.units() {
        for attempt in 0..10 {
            let id = plan.client_id(unit, attempt);
            let held = server.store.lookup(id).await.expect("lookup");
            assert!(
                held.is_some(),
                "churned session {attempt} of {unit:?} is gone"
            );
        }
    }
}

#[tokio::test]
async fn slowloris_holds_handshakes_until_they_time_out_and_comes_back() {
    let server = TestServer::start(numstream_server::ServerConfig {
        handshake_timeout: Duration::from_millis(500),
        ..fast_config()
    })
    .await;
    let plan = AttackPlan::new(&config(&[AttackKind::Slowloris], 4), 5, 1);
    let attacker = Attacker::start(plan, vec![server.addr]);
    wait_for(
        &attacker,
        "hold 4 handshakes, time out and reconnect",
        |r| {
            let slow = r.kind(AttackKind::Slowloris);
            slow.held_peak == 4
                && slow.connections >= 12
                && slow
                    .errors
                    .get("handshake_timeout")
                    .is_some_and(|&n| n >= 8)
        },
    )
    .await;
    let report = stop(attacker).await;
    let slow = report.kind(AttackKind::Slowloris);
    assert_eq!(slow.sessions, 0, "{slow:?}");
    assert_eq!(slow.held, 0, "{slow:?}");
    assert!(slow.held_peak <= 4, "one connection per slot: {slow:?}");
}

#[test]
fn attacker_addresses_are_not_the_honest_ones() {
    let attacker: BTreeSet<Ipv4Addr> = (0..254)
        .map(numstream_chaos::attack::attacker_source)
        .collect();
    assert_eq!(attacker.len(), 254);
    for k in 0..5000 {
        let honest = numstream_chaos::run::honest_source(k);
        assert!(honest.is_loopback() && !attacker.contains(&honest));
    }
}
