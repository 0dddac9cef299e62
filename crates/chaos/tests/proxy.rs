//! What each fault of the chaos proxy does on the wire, over real loopback
//! TCP, with a plain socket on either side.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use numstream_chaos::plan::{
    ConnectionPlan, Direction, Fault, FaultProfile, Schedule, Side, StallDirections, Trigger,
};
use numstream_chaos::proxy::{FaultProxy, ProxyError};
use numstream_harness::wait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// Bound on every wait, so a broken proxy fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(5);

fn down(after: u64) -> Trigger {
    Trigger::Bytes {
        direction: Direction::Downstream,
        after,
    }
}

fn up(after: u64) -> Trigger {
    Trigger::Bytes {
        direction: Direction::Upstream,
        after,
    }
}

fn fault(fault: Fault) -> ConnectionPlan {
    ConnectionPlan {
        fault: Some(fault),
        ..ConnectionPlan::PASS
    }
}

/// A proxy with `plan` for its first connection, a client connected through
/// it, and the server end of that connection.
async fn connect(plan: ConnectionPlan) -> (FaultProxy<Schedule>, TcpStream, TcpStream) {
    connect_with(Schedule::fixed(vec![plan])).await
}

async fn connect_with(schedule: Schedule) -> (FaultProxy<Schedule>, TcpStream, TcpStream) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = FaultProxy::start_local(upstream.local_addr().expect("addr"), schedule)
        .await
        .expect("proxy");
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (server, _) = timeout(PATIENCE, upstream.accept())
        .await
        .expect("proxy connects upstream")
        .expect("accept");
    (proxy, client, server)
}

/// Reads until EOF or an error; returns the bytes and how it ended.
async fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, Result<(), ErrorKind>) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the connection must end in time")
        {
            Ok(0) => return (bytes, Ok(())),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(error) => return (bytes, Err(error.kind())),
        }
    }
}

/// Asserts nothing arrives for `quiet`, and the connection is not closed.
async fn assert_silent(stream: &mut TcpStream, quiet: Duration) {
    let mut buf = [0u8; 64];
    match timeout(quiet, stream.read(&mut buf)).await {
        Err(_elapsed) => {}
        Ok(result) => panic!("expected silence, got {result:?}"),
    }
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn refuses_anything_but_loopback() {
    let loopback: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let remote: SocketAddr = "192.0.2.1:7000".parse().expect("addr");
    let any: SocketAddr = "0.0.0.0:0".parse().expect("addr");
    for (listen, upstream) in [(loopback, remote), (any, loopback)] {
        match FaultProxy::start(listen, upstream, Schedule::pass()).await {
            Err(error @ ProxyError::NotLoopback { .. }) => {
                assert!(
                    error.to_string().contains("not a loopback address"),
                    "{error}"
                );
            }
            other => panic!("{listen} -> {upstream} must be refused, got {other:?}"),
        }
    }
    let proxy = FaultProxy::start_local(loopback, Schedule::pass())
        .await
        .expect("loopback is fine");
    assert!(proxy.set_upstream(remote).is_err());
    let v6: SocketAddr = "[::1]:7000".parse().expect("addr");
    assert!(proxy.set_upstream(v6).is_ok());
}

#[tokio::test]
async fn connects_upstream_from_the_assigned_source_address() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    let source: IpAddr = "127.1.2.3".parse().expect("addr");
    let sourced = FaultProxy::start_local_from(upstream_addr, source, Schedule::pass())
        .await
        .expect("proxy");
    assert_eq!(sourced.source(), Some(source));
    // Without a source, the kernel picks (127.0.0.1 towards 127.0.0.1).
    let plain = FaultProxy::start_local(upstream_addr, Schedule::pass())
        .await
        .expect("proxy");
    let loopback = IpAddr::from([127, 0, 0, 1]);
    for (proxy, expected) in [(&sourced, source), (&sourced, source), (&plain, loopback)] {
        let _client = TcpStream::connect(proxy.addr()).await.expect("connect");
        let (_server, peer) = timeout(PATIENCE, upstream.accept())
            .await
            .expect("proxy connects upstream")
            .expect("accept");
        assert_eq!(peer.ip(), expected, "the address the server sees");
    }
}

#[tokio::test]
async fn refuses_a_source_it_cannot_use() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let remote: IpAddr = "192.0.2.1".parse().expect("addr");
    let v6: IpAddr = "::1".parse().expect("addr");
    match FaultProxy::start_local_from(upstream, remote, Schedule::pass()).await {
        Err(error @ ProxyError::NotLoopback { .. }) => {
            assert!(error.to_string().contains("source address"), "{error}");
        }
        other => panic!("a remote source must be refused, got {other:?}"),
    }
    match FaultProxy::start_local_from(upstream, v6, Schedule::pass()).await {
        Err(error @ ProxyError::FamilyMismatch { .. }) => {
            assert!(error.to_string().contains("address families"), "{error}");
        }
        other => panic!("an IPv6 source towards IPv4 must be refused, got {other:?}"),
    }
    let proxy = FaultProxy::start_local_from(
        upstream,
        "127.1.0.1".parse().expect("addr"),
        Schedule::pass(),
    )
    .await
    .expect("loopback source");
    let v6_upstream: SocketAddr = "[::1]:7000".parse().expect("addr");
    assert!(matches!(
        proxy.set_upstream(v6_upstream),
        Err(ProxyError::FamilyMismatch { .. })
    ));
}

#[tokio::test]
async fn pass_forwards_both_ways_and_passes_half_closes_on() {
    let (_proxy, mut client, mut server) = connect(ConnectionPlan::PASS).await;
    client.write_all(&payload(10_000)).await.expect("write");
    client.shutdown().await.expect("client half-close");
    let (got, end) = read_to_end(&mut server).await;
    assert_eq!((got, end), (payload(10_000), Ok(())));
    // The other direction still works after the client's FIN.
    server.write_all(b"still here").await.expect("write");
    server.shutdown().await.expect("server half-close");
    let (got, end) = read_to_end(&mut client).await;
    assert_eq!((got.as_slice(), end), (&b"still here"[..], Ok(())));
}

#[tokio::test]
async fn close_delivers_exactly_the_trigger_bytes_then_fin_to_both() {
    let (proxy, mut client, mut server) = connect(fault(Fault::Close(down(37)))).await;
    server.write_all(&payload(500)).await.expect("write");
    let (got, end) = read_to_end(&mut client).await;
    assert_eq!(got, payload(37), "exactly the bytes before the trigger");
    assert_eq!(end, Ok(()), "a FIN, not a reset");
    let (_, end) = read_to_end(&mut server).await;
    assert_eq!(end, Ok(()), "the server sees FIN too");
    assert!(proxy.records()[0].fired);
}

#[tokio::test]
async fn reset_delivers_the_trigger_bytes_then_rst() {
    let (proxy, mut client, mut server) = connect(fault(Fault::Reset(down(11)))).await;
    server.write_all(&payload(100)).await.expect("write");
    let (got, end) = read_to_end(&mut client).await;
    assert!(got.len() <= 11 && payload(11).starts_with(&got), "{got:?}");
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
    // The server learns by a reset as well (on read or on its next write).
    let mut reset = false;
    for _ in 0..50 {
        let mut buf = [0u8; 16];
        match timeout(PATIENCE, server.read(&mut buf))
            .await
            .expect("read")
        {
            Err(error) if error.kind() == ErrorKind::ConnectionReset => {
                reset = true;
                break;
            }
            Ok(0) => break,
            _ => {}
        }
    }
    assert!(reset, "the server must see a reset, not a FIN");
    assert_eq!(proxy.stats().total_faults(), 1);
}

#[tokio::test]
async fn upstream_trigger_cuts_inside_the_clients_bytes() {
    let (_proxy, mut client, mut server) = connect(fault(Fault::Close(up(5)))).await;
    client.write_all(&payload(25)).await.expect("write");
    let (got, end) = read_to_end(&mut server).await;
    assert_eq!((got, end), (payload(5), Ok(())));
}

#[tokio::test]
async fn time_trigger_strikes_on_an_idle_connection() {
    let started = Instant::now();
    let (_proxy, mut client, _server) = connect(fault(Fault::Close(Trigger::After(
        Duration::from_millis(300),
    ))))
    .await;
    let (got, end) = read_to_end(&mut client).await;
    assert_eq!((got.len(), end), (0, Ok(())));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn downstream_stall_freezes_one_direction_then_closes_after_the_hold() {
    let hold = Duration::from_millis(1200);
    let (_proxy, mut client, mut server) = connect(fault(Fault::Stall {
        at: down(20),
        directions: StallDirections::Downstream,
        hold,
    }))
    .await;
    server.write_all(&payload(200)).await.expect("write");
    let mut first = vec![0u8; 20];
    timeout(PATIENCE, client.read_exact(&mut first))
        .await
        .expect("the bytes before the stall")
        .expect("read");
    assert_eq!(first, payload(20));
    assert_silent(&mut client, Duration::from_millis(400)).await;
    // Upstream still flows during a downstream stall.
    client.write_all(b"ping").await.expect("write");
    let mut ping = [0u8; 4];
    timeout(PATIENCE, server.read_exact(&mut ping))
        .await
        .expect("upstream flows")
        .expect("read");
    assert_eq!(&ping, b"ping");
    // Nothing more ever arrives; the proxy gives up after the hold.
    let (rest, _) = read_to_end(&mut client).await;
    assert!(rest.is_empty(), "no byte after the stall: {rest:?}");
}

#[tokio::test]
async fn stall_of_both_directions_is_silent_both_ways() {
    let (proxy, mut client, mut server) = connect(fault(Fault::Stall {
        at: Trigger::After(Duration::from_millis(50)),
        directions: StallDirections::Both,
        hold: Duration::from_millis(1500),
    }))
    .await;
    wait::until_sync(Duration::from_secs(10), "the stall to strike", || {
        proxy.records().first().is_some_and(|record| record.fired)
    })
    .await;
    client.write_all(b"lost").await.expect("write");
    server.write_all(b"lost").await.expect("write");
    assert_silent(&mut client, Duration::from_millis(400)).await;
    assert_silent(&mut server, Duration::from_millis(400)).await;
    let (rest, _) = read_to_end(&mut client).await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn half_close_to_the_client_ends_downstream_only() {
    let (_proxy, mut client, mut server) = connect(fault(Fault::HalfClose {
        at: down(8),
        side: Side::Client,
        hold: Duration::from_secs(3),
    }))
    .await;
    server.write_all(&payload(50)).await.expect("write");
    let (got, end) = read_to_end(&mut client).await;
    assert_eq!((got, end), (payload(8), Ok(())), "FIN after 8 bytes");
    client
        .write_all(b"after")
        .await
        .expect("client may still send");
    let mut after = [0u8; 5];
    timeout(PATIENCE, server.read_exact(&mut after))
        .await
        .expect("upstream still flows")
        .expect("read");
    assert_eq!(&after, b"after");
}

#[tokio::test]
async fn half_close_to_the_server_ends_upstream_only() {
    let (_proxy, mut client, mut server) = connect(fault(Fault::HalfClose {
        at: up(3),
        side: Side::Server,
        hold: Duration::from_secs(3),
    }))
    .await;
    client.write_all(b"abcdef").await.expect("write");
    let (got, end) = read_to_end(&mut server).await;
    assert_eq!((got.as_slice(), end), (&b"abc"[..], Ok(())));
    server
        .write_all(b"reply")
        .await
        .expect("server may still send");
    server.shutdown().await.expect("shutdown");
    let (got, _) = read_to_end(&mut client).await;
    assert_eq!(got, b"reply");
}

#[tokio::test]
async fn latency_delays_every_chunk_in_order() {
    let plan = ConnectionPlan {
        latency: Some(Duration::from_millis(150)),
        ..ConnectionPlan::PASS
    };
    let (_proxy, mut client, mut server) = connect(plan).await;
    let started = Instant::now();
    for i in 0..5u8 {
        server.write_all(&[i; 100]).await.expect("write");
    }
    server.shutdown().await.expect("shutdown");
    let (got, _) = read_to_end(&mut client).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    let expected: Vec<u8> = (0..5u8).flat_map(|i| [i; 100]).collect();
    assert_eq!(got, expected, "order and content preserved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_writes_deliver_intact_bytes_in_small_pieces() {
    let plan = ConnectionPlan {
        split: Some(Direction::Downstream),
        ..ConnectionPlan::PASS
    };
    let (_proxy, mut client, mut server) = connect(plan).await;
    let reader = tokio::spawn(async move {
        let mut reads = 0;
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match timeout(PATIENCE, client.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (bytes, reads),
                Ok(Ok(n)) => {
                    reads += 1;
                    bytes.extend_from_slice(&buf[..n]);
                }
            }
        }
    });
    server.write_all(&payload(300)).await.expect("write");
    server.shutdown().await.expect("shutdown");
    let (bytes, reads) = reader.await.expect("reader");
    assert_eq!(bytes, payload(300));
    assert!(
        reads > 1,
        "300 bytes in 1-byte writes arrived in {reads} read(s)"
    );
}

#[tokio::test]
async fn welcome_protection_holds_a_fault_until_the_welcome_is_through() {
    let plan = fault(Fault::Close(down(3)));
    let schedule = Schedule::fixed(vec![plan]).with_welcome_protection(true);
    let (_proxy, mut client, mut server) = connect_with(schedule).await;
    // An OPEN-shaped hello: type 0x01 at offset 4, 25 bytes.
    let mut open = vec![0, 0, 0, 21, 0x01];
    open.resize(25, 7);
    client.write_all(&open).await.expect("write");
    let mut hello = [0u8; 25];
    timeout(PATIENCE, server.read_exact(&mut hello))
        .await
        .expect("hello")
        .expect("read");
    server.write_all(&payload(100)).await.expect("write");
    let (got, end) = read_to_end(&mut client).await;
    assert!(
        got.len() >= 35,
        "the 35-byte WELCOME gets through, got {}",
        got.len()
    );
    assert!(payload(100).starts_with(&got));
    assert_eq!(end, Ok(()), "then the postponed close strikes");
}

#[tokio::test]
async fn the_same_seed_replays_the_same_plans() {
    let profile = FaultProfile {
        fault_probability: 0.9,
        max_faults: 100,
        ..FaultProfile::default()
    };
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    let mut records = Vec::new();
    for _ in 0..2 {
        let proxy = FaultProxy::start_local(addr, Schedule::new(99, 5, profile.clone()))
            .await
            .expect("proxy");
        for _ in 0..6 {
            let client = TcpStream::connect(proxy.addr()).await.expect("connect");
            let (server, _) = upstream.accept().await.expect("accept");
            drop((client, server));
        }
        // Each connection's plan is recorded when it is accepted, before
        // the proxy connects upstream: all six are there.
        let plans: Vec<_> = proxy.records().into_iter().map(|r| r.plan).collect();
        records.push(plans);
    }
    assert_eq!(records[0].len(), 6);
    assert_eq!(records[0], records[1]);
    assert!(records[0].iter().any(|p| p.fault.is_some()));
}
