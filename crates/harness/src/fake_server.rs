//! A scripted fake numstream server, for the client's tests: the other end
//! of a conversation written out step by step (expect a frame, send a
//! frame, send raw bytes, cut the connection), in the style of h2's mock
//! handle. Frames go through the protocol crate's codec; correct frames
//! for a session come from [`numstream_protocol::testing::ServedSession`].
//!
//! Two levels: [`Script`] runs a whole connection from a builder, and
//! [`FakeServer`] serves one script per accepted connection; the free
//! functions ([`accept`], [`recv`], [`send`], ...) are the steps, for
//! conversations a script cannot express (e.g. a reply that depends on
//! what the client sent).

use std::ops::Range;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use numstream_protocol::codec::FrameCodec;
use numstream_protocol::testing::ServedSession;
use numstream_protocol::{Frame, Resume, ResumeToken, SequenceChecksum, SessionSeed};

/// Bound on anything the fake server waits for, so a client bug shows up as
/// a failure, not a hang.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// One connection as the fake server sees it.
pub type Conn<S = TcpStream> = Framed<S, FrameCodec>;

/// What the fake server talks over: TCP or an in-memory pipe.
pub trait Wire: AsyncRead + AsyncWrite + Unpin {}
impl<S: AsyncRead + AsyncWrite + Unpin> Wire for S {}

/// The key of the fake server's sessions.
pub const SEED: SessionSeed = SessionSeed([7; 32]);
/// The resume token of the fake server's sessions.
pub const TOKEN: ResumeToken = ResumeToken([0x5a; 16]);

/// The fake server's `count`-number session: keyed by [`SEED`], resumed
/// with [`TOKEN`], announced with no pacing and a 30 s TTL.
pub fn session(count: u16) -> ServedSession {
    ServedSession::new(SEED, TOKEN, count)
}

/// [`session`]`(count)`'s WELCOME at `next_index`.
pub fn welcome(count: u16, next_index: u16) -> Frame {
    session(count).welcome(next_index)
}

/// A WELCOME for [`session`]`(count)` announcing another interval and TTL.
pub fn welcome_with(count: u16, next_index: u16, interval_us: u32, session_ttl_ms: u32) -> Frame {
    ServedSession {
        interval_us,
        session_ttl_ms,
        ..session(count)
    }
    .welcome(next_index)
}

/// The correct frame for `index` of [`session`]`(count)`.
pub fn number(count: u16, index: u16) -> Frame {
    session(count).number(index)
}

/// What a client that received all of [`session`]`(count)` computed.
pub fn expected(count: u16) -> SequenceChecksum {
    session(count).expected()
}

/// A listener on 127.0.0.1, on a port the kernel picked.
pub async fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

/// The next connection. Panics if none comes within [`PATIENCE`].
pub async fn accept(listener: &TcpListener) -> Conn {
    try_accept(listener)
        .await
        .expect("the client never connected")
}

/// The next connection, or `None` if none comes within [`PATIENCE`] (for
/// servers that accept for as long as the client keeps coming back).
pub async fn try_accept(listener: &TcpListener) -> Option<Conn> {
    let (stream, _) = tokio::time::timeout(PATIENCE, listener.accept())
        .await
        .ok()?
        .ok()?;
    Some(Framed::new(stream, FrameCodec))
}

/// The next frame from the client. Panics if it sends nothing, closes, or
/// sends something undecodable.
pub async fn recv<S: Wire>(conn: &mut Conn<S>) -> Frame {
    tokio::time::timeout(PATIENCE, conn.next())
        .await
        .expect("the client sent nothing")
        .expect("the client closed the connection")
        .expect("the client sent an undecodable frame")
}

/// The client's hello (or any next frame), or `None` if it went away.
pub async fn hello<S: Wire>(conn: &mut Conn<S>) -> Option<Frame> {
    tokio::time::timeout(PATIENCE, conn.next())
        .await
        .ok()
        .flatten()
        .and_then(Result::ok)
}

/// Waits until the client closes its side (EOF or reset). Panics if it
/// does not within [`PATIENCE`].
pub async fn closed_by_client<S: Wire>(conn: &mut Conn<S>) {
    tokio::time::timeout(PATIENCE, drain(conn))
        .await
        .expect("the client never closed the connection");
}

/// Keeps the connection open, reading and dropping what the client sends,
/// until it goes away or [`PATIENCE`] has passed.
pub async fn linger<S: Wire>(conn: &mut Conn<S>) {
    let _ = tokio::time::timeout(PATIENCE, drain(conn)).await;
}

async fn drain<S: Wire>(conn: &mut Conn<S>) {
    while let Some(Ok(_)) = conn.next().await {}
}

/// Sends `frame`. A client that already hung up is not an error: what the
/// test asserts is the client's report.
pub async fn send<S: Wire>(conn: &mut Conn<S>, frame: Frame) {
    let _ = conn.send(frame).await;
}

/// Writes `bytes` as they are, past the encoder.
pub async fn send_raw<S: Wire>(conn: &mut Conn<S>, bytes: &[u8]) {
    let _ = conn.get_mut().write_all(bytes).await;
}

/// Sends [`session`]`(count)`'s frames for `indices`.
pub async fn send_numbers<S: Wire>(conn: &mut Conn<S>, count: u16, indices: Range<u16>) {
    for index in indices {
        send(conn, number(count, index)).await;
    }
}

/// Streams [`session`]`(count)` from `from` to its end and returns the
/// checksum the client's ACK carried.
pub async fn finish<S: Wire>(conn: &mut Conn<S>, count: u16, from: u16) -> u32 {
    send_numbers(conn, count, from..count).await;
    match recv(conn).await {
        Frame::Ack { client_checksum } => client_checksum,
        other => panic!("expected ACK, got {other:?}"),
    }
}

/// The checksum of the ACK that ends what the client sent on one
/// connection (a [`Script::run`]'s frames). Panics if it did not end with
/// an ACK.
pub fn acked(received: &[Frame]) -> u32 {
    match received.last() {
        Some(Frame::Ack { client_checksum }) => *client_checksum,
        other => panic!("expected the client to end with ACK, got {other:?}"),
    }
}

/// Waits (bounded by [`PATIENCE`]) for a spawned fake-server task, and
/// fails the test with its panic if it panicked.
pub async fn join<T>(server: JoinHandle<T>) -> T {
    join_within(server, PATIENCE).await
}

/// [`join`] with another bound (paused-time tests run minutes of virtual
/// time).
pub async fn join_within<T>(server: JoinHandle<T>, limit: Duration) -> T {
    match tokio::time::timeout(limit, server).await {
        Ok(Ok(value)) => value,
        Ok(Err(error)) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Ok(Err(error)) => panic!("the fake server was cancelled: {error}"),
        Err(_) => panic!("the fake server hung"),
    }
}

/// Fails the test with a script's panic, if it panicked.
fn resume_panic(ended: Result<Vec<Frame>, tokio::task::JoinError>) {
    if let Err(error) = ended
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// What the client must send at an [`Script::expect`] step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Any frame (or, for a hello, whichever the client chose).
    Any,
    Open,
    /// A RESUME at this index.
    Resume {
        next_index: u16,
    },
    Ack,
}

impl Expect {
    fn check(self, frame: &Frame) {
        let matches = match (self, frame) {
            (Self::Any, _) | (Self::Open, Frame::Open(_)) | (Self::Ack, Frame::Ack { .. }) => true,
            (
                Self::Resume { next_index },
                Frame::Resume(Resume {
                    next_index: got, ..
                }),
            ) => *got == next_index,
            _ => false,
        };
        assert!(matches, "expected {self:?} from the client, got {frame:?}");
    }
}

#[derive(Debug, Clone)]
enum Step {
    Expect(Expect),
    Hello,
    Send(Frame),
    SendRaw(Vec<u8>),
    Pause(Duration),
    Cut,
    Linger,
    ClosedByClient,
}

/// One connection's conversation, built step by step and run with
/// [`Script::run`]. Unless it ends with [`Script::cut`], the fake server
/// keeps the connection open until the client closes it.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Script {
    steps: Vec<Step>,
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for the client's next frame, which must match `expect`.
    pub fn expect(mut self, expect: Expect) -> Self {
        self.steps.push(Step::Expect(expect));
        self
    }

    /// Waits for the client's first frame, whichever it is; if the client
    /// goes away instead, the script ends there. For servers a client may
    /// abandon at any moment (one it keeps reconnecting to).
    pub fn hello(mut self) -> Self {
        self.steps.push(Step::Hello);
        self
    }

    pub fn send(mut self, frame: Frame) -> Self {
        self.steps.push(Step::Send(frame));
        self
    }

    /// Bytes as they are, past the encoder (malformed frames, torn ones).
    pub fn send_raw(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.steps.push(Step::SendRaw(bytes.into()));
        self
    }

    /// The session's correct frames for `indices` (FINAL for its last).
    pub fn send_numbers(mut self, session: &ServedSession, indices: Range<u16>) -> Self {
        self.steps
            .extend(indices.map(|index| Step::Send(session.number(index))));
        self
    }

    /// The session's numbers from `from` to its end, then the client's
    /// ACK: the rest of a session that goes well.
    pub fn finish(self, session: &ServedSession, from: u16) -> Self {
        self.send_numbers(session, from..session.count)
            .expect(Expect::Ack)
    }

    /// `bytes` one byte per write, waiting `pause` after each: a slow or
    /// fragmenting server whose frames arrive in many reads.
    pub fn send_trickled(mut self, bytes: &[u8], pause: Duration) -> Self {
        for &byte in bytes {
            self.steps.push(Step::SendRaw(vec![byte]));
            self.steps.push(Step::Pause(pause));
        }
        self
    }

    /// `steps`' steps, `times` times over (a server that heartbeats on a
    /// schedule).
    pub fn repeat(mut self, times: usize, steps: &Script) -> Self {
        for _ in 0..times {
            self.steps.extend(steps.steps.iter().cloned());
        }
        self
    }

    /// Waits `time` (paused or real, as the test's clock runs).
    pub fn pause(mut self, time: Duration) -> Self {
        self.steps.push(Step::Pause(time));
        self
    }

    /// Drops the connection here (the client sees EOF).
    pub fn cut(mut self) -> Self {
        self.steps.push(Step::Cut);
        self
    }

    /// Waits until the client closes the connection; it must, within
    /// [`PATIENCE`].
    pub fn expect_closed(mut self) -> Self {
        self.steps.push(Step::ClosedByClient);
        self
    }

    /// Runs the steps on `conn`; returns every frame the client sent at an
    /// expect or hello step, in order.
    pub async fn run<S: Wire>(self, mut conn: Conn<S>) -> Vec<Frame> {
        let mut received = Vec::new();
        let mut steps = self.steps;
        if !matches!(
            steps.last(),
            Some(Step::Cut | Step::Linger | Step::ClosedByClient)
        ) {
            steps.push(Step::Linger);
        }
        for step in steps {
            match step {
                Step::Expect(expect) => {
                    let frame = recv(&mut conn).await;
                    expect.check(&frame);
                    received.push(frame);
                }
                Step::Hello => match hello(&mut conn).await {
                    Some(frame) => received.push(frame),
                    None => return received,
                },
                Step::Send(frame) => send(&mut conn, frame).await,
                Step::SendRaw(bytes) => send_raw(&mut conn, &bytes).await,
                Step::Pause(time) => tokio::time::sleep(time).await,
                Step::Cut => return received,
                Step::Linger => linger(&mut conn).await,
                Step::ClosedByClient => closed_by_client(&mut conn).await,
            }
        }
        received
    }
}

/// A fake server on 127.0.0.1 that runs one [`Script`] per connection, in
/// the order the connections come. With [`FakeServer::start`] it stops
/// listening when the last script ends (later connects are refused).
#[derive(Debug)]
pub struct FakeServer {
    port: u16,
    task: Option<JoinHandle<Vec<Vec<Frame>>>>,
    /// Ends a [`FakeServer::start_concurrent`] server.
    stop: Option<CancellationToken>,
}

impl FakeServer {
    /// One script per connection, one connection at a time.
    pub async fn start(scripts: Vec<Script>) -> Self {
        let (listener, port) = listen().await;
        let task = tokio::spawn(async move {
            let mut received = Vec::new();
            for script in scripts {
                received.push(script.run(accept(&listener).await).await);
            }
            received
        });
        Self {
            port,
            task: Some(task),
            stop: None,
        }
    }

    /// `first` for the first connections, then `rest` for every later
    /// one, each connection served in a task of its own as it comes (a
    /// client that gives up on a connection is served again at once, while
    /// the old one's script goes on). Runs until [`FakeServer::stop`];
    /// a script that fails fails the test there.
    pub async fn start_concurrent(first: Vec<Script>, rest: Script) -> Self {
        let (listener, port) = listen().await;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut first = first.into_iter();
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    () = stopped.cancelled() => {
                        // Scripts that ended have their say; the rest are
                        // cut off with the set.
                        while let Some(ended) = connections.try_join_next() {
                            resume_panic(ended);
                        }
                        return Vec::new();
                    }
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let script = first.next().unwrap_or_else(|| rest.clone());
                        connections.spawn(script.run(Framed::new(stream, FrameCodec)));
                    }
                    Some(ended) = connections.join_next() => resume_panic(ended),
                }
            }
        });
        Self {
            port,
            task: Some(task),
            stop: Some(stop),
        }
    }

    /// Ends a [`FakeServer::start_concurrent`] server and every script
    /// still running; fails the test if one of them failed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
        let task = self.task.take().expect("stopped once");
        join_within(task, PATIENCE).await;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits (bounded) for every script to end; what the client sent on
    /// each connection. A script's failed expectation fails the test here.
    pub async fn finish(mut self) -> Vec<Vec<Frame>> {
        let task = self.task.take().expect("finished once");
        join_within(task, PATIENCE * 2).await
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
