//! One abusive address against a real `numstream-server` process, with
//! default flags unless a test says otherwise, while honest clients from
//! other addresses must still be served: at least 95% of their OPENs
//! succeed, and a whole `numstream-client` run completes.
//!
//! Any 127.x.y.z is a distinct source address on loopback, so the attacker
//! binds [`ATTACKER`] and the honest clients bind addresses of their own
//! before connecting. Every attack is bounded in count and time and stops
//! with its test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use numstream_client::{ClientConfig, NoopObserver};
use numstream_harness::http::try_get_from;
use numstream_harness::process::ServerCommand;
use numstream_harness::raw::connect_from;
use numstream_harness::wait;
use numstream_protocol::codec::FrameCodec;
use numstream_protocol::{ClientId, ErrorCode, Frame, Open};

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 66, 1));
/// Bound on one honest exchange: generous for a loaded 2-core machine, far
/// below what being starved out would take (forever).
const HONEST_PATIENCE: Duration = Duration::from_secs(10);
/// Honest OPENs per test, and the share that must succeed.
const HONEST_OPENS: usize = 100;
const MUST_SUCCEED: f64 = 0.95;

fn honest(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 77, n))
}

/// One whole honest session of `count` numbers from `source`: OPEN,
/// WELCOME, the numbers, FINAL, ACK. `Err` says what went wrong instead.
async fn honest_session(source: IpAddr, server: SocketAddr, count: u16) -> Result<(), String> {
    let session = async {
        let stream = connect_from(source, server)
            .await
            .map_err(|error| format!("connect: {error}"))?;
        let mut framed = Framed::new(stream, FrameCodec);
        framed
            .send(Frame::Open(Open {
                client_id: ClientId::new_v4(),
                count,
            }))
            .await
            .map_err(|error| format!("send OPEN: {error}"))?;
        loop {
            match framed.next().await {
                Some(Ok(Frame::Welcome(_) | Frame::Number { .. } | Frame::Heartbeat)) => {}
                Some(Ok(Frame::Final { checksum, .. })) => {
                    framed
                        .send(Frame::Ack {
                            client_checksum: checksum,
                        })
                        .await
                        .map_err(|error| format!("send ACK: {error}"))?;
                    return Ok(());
                }
                Some(Ok(Frame::Error(error))) => return Err(format!("refused: {error}")),
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    };
    tokio::time::timeout(HONEST_PATIENCE, session)
        .await
        .unwrap_or_else(|_| Err(format!("no whole session within {HONEST_PATIENCE:?}")))
}

/// [`HONEST_OPENS`] sessions from `source`, ten at a time (one address's
/// fair share of handshakes is far above ten); panics unless at least 95%
/// of them succeed.
async fn assert_honest_clients_served(source: IpAddr, server: SocketAddr) {
    let mut failures = Vec::new();
    let mut batch = Vec::new();
    for n in 0..HONEST_OPENS {
        batch.push(tokio::spawn(honest_session(source, server, 3)));
        if batch.len() == 10 || n + 1 == HONEST_OPENS {
            for session in batch.drain(..) {
                if let Err(why) = session.await.expect("honest session task") {
                    failures.push(why);
                }
            }
        }
    }
    let succeeded = HONEST_OPENS - failures.len();
    assert!(
        succeeded as f64 >= MUST_SUCCEED * HONEST_OPENS as f64,
        "only {succeeded} of {HONEST_OPENS} honest OPENs succeeded: {failures:#?}"
    );
}

/// A whole `numstream-client` run (the library the binary runs) from
/// `source` must end OK.
async fn assert_client_run_completes(source: IpAddr, server: SocketAddr) {
    let config = ClientConfig {
        ports: vec![server.port()],
        count: 20,
        local_addr: Some(source),
        ..ClientConfig::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        numstream_client::run(config, &mut NoopObserver),
    )
    .await
    .expect("the client run must end");
    assert_eq!(report.exit_code(), 0, "{}", report.render_human());
}

/// Whether the server still holds an attacker's silent connection: reading
/// would block (nothing sent, nothing closed), where a closed one reads 0
/// bytes or an error.
fn still_held(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

/// What an attacking task saw of the server.
#[derive(Debug, Default)]
struct Seen {
    /// Connections that got a WELCOME (a session opened).
    welcomed: AtomicUsize,
    /// Connections told server_busy.
    busy: AtomicUsize,
}

/// Opens `count` connections from [`ATTACKER`], each sending a valid OPEN
/// of 65,535 numbers and then never reading: they hold whatever the
/// server gives them (kept in the returned vector until dropped).
async fn hog_connections(server: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(mut stream) = connect_from(ATTACKER, server).await else {
            continue;
        };
        let mut hello = bytes::BytesMut::new();
        numstream_protocol::encode_frame(
            &Frame::Open(Open {
                client_id: ClientId::new_v4(),
                count: u16::MAX,
            }),
            &mut hello,
        );
        // A refused connection may already be closed: that is the point.
        let _ = stream.write_all(&hello).await;
        held.push(stream);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_hog_under_a_1024_file_limit_leaves_other_addresses_served() {
    let server = ServerCommand::new(BIN)
        .args(["--interval", "10ms"])
        .open_files(1024)
        .start()
        .await
        .expect("start numstream-server");
    let log = server.log();
    assert!(
        log.contains("max_connections=640"),
        "the default connection cap under 1024 descriptors: {log}"
    );
    // The shares docs/operations.md quotes for this case.
    assert!(
        log.contains("per_address=connections 64, handshakes 16,"),
        "the default per-address shares under 1024 descriptors: {log}"
    );
    let addr = server.addr();
    let hog = hog_connections(addr, 1000).await;
    assert!(
        hog.len() >= 900,
        "the attacker could open only {}",
        hog.len()
    );

    assert_honest_clients_served(honest(1), addr).await;
    assert_client_run_completes(honest(2), addr).await;
    let log = server.log();
    assert!(
        !log.contains("accept failed"),
        "the server ran out of descriptors: {log}"
    );
    drop(hog);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_drop_loops_cannot_fill_the_session_table() {
    let server = ServerCommand::new(BIN)
        .args(["--interval", "10ms", "--max-sessions", "3000"])
        .start()
        .await
        .expect("start numstream-server");
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let started = Instant::now();
    // Four tasks, as fast as the server answers: connect, OPEN, read the
    // answer, reset.
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, seen) = (stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut attempts = 0u32;
                while !stop.load(Ordering::Relaxed) && attempts < 20_000 {
                    attempts += 1;
                    let Ok(stream) = connect_from(ATTACKER, addr).await else {
                        continue;
                    };
                    let mut framed = Framed::new(stream, FrameCodec);
                    let open = Frame::Open(Open {
                        client_id: ClientId::new_v4(),
                        count: u16::MAX,
                    });
                    if framed.send(open).await.is_err() {
                        continue;
                    }
                    let answer = tokio::time::timeout(Duration::from_secs(5), framed.next()).await;
                    match answer {
                        Ok(Some(Ok(Frame::Welcome(_)))) => {
                            seen.welcomed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Some(Ok(Frame::Error(error))))
                            if error.code == ErrorCode::ServerBusy =>
                        {
                            seen.busy.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    // Reset, as an abrupt client would.
                    // (Deprecated in tokio only because it blocks on drop; zero
                    // linger does not block.)
                    #[allow(deprecated)]
                    let _ = framed.get_ref().set_linger(Some(Duration::ZERO));
                }
            })
        })
        .collect();
    // The honest clients come once the attack has reached the attacker's
    // quota (its share of sessions, or its rate), however slowly this
    // machine lets it get there: unprotected, it would have filled the
    // table by then (about 5,000 sessions a second from one thread).
    wait::until_value(
        Duration::from_secs(60),
        "the attack to reach a quota (busy refusals, sessions opened)",
        || {
            std::future::ready((
                seen.busy.load(Ordering::Relaxed),
                seen.welcomed.load(Ordering::Relaxed),
            ))
        },
        |&(busy, _)| busy > 0,
    )
    .await;
    assert_honest_clients_served(honest(1), addr).await;
    assert_client_run_completes(honest(2), addr).await;
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.await.expect("attacker task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Refusals are debug lines (and a periodic digest): what the attacker
    // can make the server log is bounded by the sessions it may open,
    // about three lines each (opened, detached, expired).
    let lines = server.log().lines().count();
    let (welcomed, busy) = (
        seen.welcomed.load(Ordering::Relaxed),
        seen.busy.load(Ordering::Relaxed),
    );
    // The attacker got at most its burst plus its rate, and was told why.
    assert!(
        welcomed as f64 <= 100.0 + 50.0 * elapsed + 10.0,
        "the attacker opened {welcomed} sessions in {elapsed:.1} s"
    );
    assert!(
        lines <= 3 * welcomed + 200,
        "{lines} log lines for {welcomed} sessions and {busy} refusals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_hellos_costs_no_log_lines() {
    let server = ServerCommand::new(BIN)
        .args(["--interval", "10ms"])
        .start()
        .await
        .expect("start numstream-server");
    let addr = server.addr();
    let before = server.log().lines().count();
    let mut answered = 0;
    for n in 0..500u32 {
        let Ok(mut stream) = connect_from(ATTACKER, addr).await else {
            continue;
        };
        // Not numstream at all, an empty frame, an unknown frame type.
        let hello: &[u8] = match n % 3 {
            0 => b"GET / HTTP/1.1\r\n\r\n",
            1 => &[0, 0, 0, 0],
            _ => &[0, 0, 0, 1, 0xEE],
        };
        if stream.write_all(hello).await.is_ok() {
            let mut framed = Framed::new(stream, FrameCodec);
            if let Ok(Some(Ok(Frame::Error(_)))) =
                tokio::time::timeout(Duration::from_secs(5), framed.next()).await
            {
                answered += 1;
            }
        }
    }
    assert!(answered >= 400, "only {answered} of 500 got their ERROR");
    let lines = server.log().lines().count() - before;
    assert!(
        lines <= 20,
        "{lines} log lines for 500 malformed hellos:\n{}",
        server.log()
    );
    assert_honest_clients_served(honest(1), addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_slowloris_leaves_other_addresses_served() {
    // 1,000 silent connections against the 640 a 1024-descriptor server
    // serves: without quotas they would hold every slot.
    let server = ServerCommand::new(BIN)
        .args(["--interval", "10ms", "--handshake-timeout", "5s"])
        .open_files(1024)
        .start()
        .await
        .expect("start numstream-server");
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    // Silent connections, reopened as soon as the server lets go of one.
    let slowloris = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut silent = Vec::new();
            while !stop.load(Ordering::Relaxed) && silent.len() < 1000 {
                if let Ok(stream) = connect_from(ATTACKER, addr).await {
                    silent.push(stream);
                }
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await; // the attack re-opens what the server closed, at this pace
                silent.retain(still_held);
                while silent.len() < 1000 {
                    match connect_from(ATTACKER, addr).await {
                        Ok(stream) => silent.push(stream),
                        Err(_) => break,
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await; // the attack in its steady state before the honest clients come
    assert_honest_clients_served(honest(1), addr).await;
    assert_client_run_completes(honest(2), addr).await;
    stop.store(true, Ordering::Relaxed);
    slowloris.await.expect("slowloris task");
    let log = server.log();
    assert!(!log.contains("accept failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_status_connections_from_one_address_do_not_starve_probes() {
    let server = ServerCommand::new(BIN)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .start()
        .await
        .expect("start numstream-server");
    let status = server
        .status_address()
        .expect("started with --metrics-addr");
    // 200 idle connections from one address, reopened as they are closed.
    let stop = Arc::new(AtomicBool::new(false));
    let idle = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain(still_held);
                while held.len() < 200 {
                    match connect_from(ATTACKER, status).await {
                        Ok(stream) => held.push(stream),
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await; // the attack re-opens what the server closed, at this pace
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // the idle connections pile up before the probes
    let mut answered = 0;
    let mut failures = Vec::new();
    for probe in 0..40 {
        let path = if probe % 2 == 0 {
            "/healthz"
        } else {
            "/readyz"
        };
        match try_get_from(honest(1), status, path).await {
            Ok((200, _)) => answered += 1,
            other => failures.push(format!("{path}: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // probes spread over the attack, at this pace
    }
    stop.store(true, Ordering::Relaxed);
    idle.await.expect("idle task");
    assert!(
        answered >= 38,
        "only {answered} of 40 probes answered 200: {failures:#?}"
    );
}
