//! A scriptable fake numstream server for the client's tests: real TCP on
//! 127.0.0.1 or in-memory pipes (`memory`), frames via the protocol
//! crate's codec, and every step of the conversation written out in the
//! test itself.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub(crate) mod memory;

use std::ops::Range;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use numstream_client::{Backoff, ClientConfig, Event, Observer, Report};
use numstream_protocol::codec::FrameCodec;
use numstream_protocol::{Frame, ResumeToken, SequenceChecksum, SessionSeed, Welcome, number_at};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

pub(crate) type Conn = Framed<TcpStream, FrameCodec>;

/// What the fake server's helpers work on: TCP or an in-memory pipe.
pub(crate) trait Wire: AsyncRead + AsyncWrite + Unpin {}
impl<S: AsyncRead + AsyncWrite + Unpin> Wire for S {}

pub(crate) const SEED: SessionSeed = SessionSeed([7; 32]);
pub(crate) const TOKEN: ResumeToken = ResumeToken([0x5a; 16]);

/// Bound on anything a test waits for, so a bug shows up as a failure, not
/// a hang.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

pub(crate) async fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

/// A port on which nothing listens: bound, then released.
pub(crate) async fn closed_port() -> u16 {
    let (listener, port) = listen().await;
    drop(listener);
    port
}

pub(crate) async fn accept(listener: &TcpListener) -> Conn {
    let (stream, _) = tokio::time::timeout(PATIENCE, listener.accept())
        .await
        .expect("client never connected")
        .expect("accept");
    Framed::new(stream, FrameCodec)
}

/// The next frame from the client.
pub(crate) async fn recv<S: Wire>(conn: &mut Framed<S, FrameCodec>) -> Frame {
    tokio::time::timeout(PATIENCE, conn.next())
        .await
        .expect("client sent nothing")
        .expect("client closed the connection")
        .expect("client sent an undecodable frame")
}

/// Waits until the client closes its side (EOF or reset).
pub(crate) async fn closed_by_client<S: Wire>(conn: &mut Framed<S, FrameCodec>) {
    loop {
        match tokio::time::timeout(PATIENCE, conn.next())
            .await
            .expect("client never closed the connection")
        {
            None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

pub(crate) async fn send<S: Wire>(conn: &mut Framed<S, FrameCodec>, frame: Frame) {
    conn.send(frame).await.expect("send to client");
}

pub(crate) async fn send_raw<S: Wire>(conn: &mut Framed<S, FrameCodec>, bytes: &[u8]) {
    conn.get_mut().write_all(bytes).await.expect("raw write");
}

pub(crate) fn welcome_with(
    count: u16,
    next_index: u16,
    interval_us: u32,
    session_ttl_ms: u32,
) -> Frame {
    Frame::Welcome(Welcome {
        count,
        next_index,
        token: TOKEN,
        interval_us,
        session_ttl_ms,
    })
}

pub(crate) fn welcome(count: u16, next_index: u16) -> Frame {
    welcome_with(count, next_index, 0, 30_000)
}

pub(crate) fn expected(count: u16) -> SequenceChecksum {
    SequenceChecksum::of_session(&SEED, count)
}

/// The correct frame for `index` of a `count`-number session.
pub(crate) fn number(count: u16, index: u16) -> Frame {
    let value = number_at(&SEED, index);
    if index == count - 1 {
        Frame::Final {
            index,
            value,
            checksum: expected(count).checksum(),
        }
    } else {
        Frame::Number { index, value }
    }
}

pub(crate) async fn send_numbers<S: Wire>(
    conn: &mut Framed<S, FrameCodec>,
    count: u16,
    indices: Range<u16>,
) {
    for index in indices {
        send(conn, number(count, index)).await;
    }
}

/// Streams `from..count` and returns the checksum the client's ACK carried.
pub(crate) async fn finish<S: Wire>(
    conn: &mut Framed<S, FrameCodec>,
    count: u16,
    from: u16,
) -> u32 {
    send_numbers(conn, count, from..count).await;
    match recv(conn).await {
        Frame::Ack { client_checksum } => client_checksum,
        other => panic!("expected ACK, got {other:?}"),
    }
}

/// A config with fast retries, so tests that reconnect stay quick.
pub(crate) fn config(ports: Vec<u16>, count: u16) -> ClientConfig {
    ClientConfig {
        ports,
        count,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
            multiplier: 2.0,
        },
        // Scaled down like `backoff`, but distinct, so a test sees which
        // one a refusal used.
        busy_backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// Runs the client to the end, failing the test if it does not finish
/// within [`PATIENCE`].
pub(crate) async fn run_client(config: ClientConfig) -> (Report, Vec<Event>) {
    run_client_within(config, PATIENCE).await
}

/// [`run_client`] with another bound: paused-time tests run minutes of
/// virtual time, and a hang still fails once the bound has passed.
pub(crate) async fn run_client_within(
    config: ClientConfig,
    limit: Duration,
) -> (Report, Vec<Event>) {
    let mut events: Vec<Event> = Vec::new();
    let report = tokio::time::timeout(limit, numstream_client::run(config, &mut events))
        .await
        .expect("client hung");
    (report, events)
}

/// [`run_client`] over in-memory connections to `net`'s ports.
pub(crate) async fn run_client_in(
    net: &memory::MemoryNet,
    config: ClientConfig,
) -> (Report, Vec<Event>) {
    let mut events: Vec<Event> = Vec::new();
    let run = numstream_client::run_with(config, net, &mut events);
    let report = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("client hung");
    (report, events)
}

pub(crate) fn reconnect_events(events: &[Event]) -> Vec<(String, Duration)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Reconnecting { cause, delay, .. } => Some((cause.clone(), *delay)),
            _ => None,
        })
        .collect()
}

/// Waits for a spawned fake-server script and surfaces its panics.
pub(crate) async fn join<T>(server: tokio::task::JoinHandle<T>) -> T {
    join_within(server, PATIENCE).await
}

/// [`join`] with another bound (see [`run_client_within`]).
pub(crate) async fn join_within<T>(server: tokio::task::JoinHandle<T>, limit: Duration) -> T {
    tokio::time::timeout(limit, server)
        .await
        .expect("fake server hung")
        .expect("fake server script failed")
}

/// An observer that is usable from another crate's point of view: only the
/// public trait and enum.
#[derive(Debug, Default)]
pub(crate) struct Counting {
    pub(crate) numbers: u32,
}

impl Observer for Counting {
    fn event(&mut self, event: &Event) {
        if let Event::Number { .. } = event {
            self.numbers += 1;
        }
    }
}
