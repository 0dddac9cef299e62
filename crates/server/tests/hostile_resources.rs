//! Resource exhaustion against a running server: clients that stop reading
//! (so the server's send buffer fills) and thousands of connections that
//! never speak. Each must be cut off by its documented bound (the write
//! timeout, the handshake timeout) with bounded memory, while a
//! well-behaved client on the same server is served normally.
//!
//! These tests measure this process's memory, so they live in their own
//! test binary and run one at a time.

mod hostile_support;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use numstream_client::ClientConfig;
use numstream_protocol::{
    ClientId, ErrorCode, Frame, SequenceChecksum, SessionSeed, codec, decode_frame,
};
use numstream_server::testing::TestServer;
use numstream_server::{PeerLimits, ServerConfig};
use numstream_store::{InMemoryStore, SessionStore};
use tokio_util::sync::CancellationToken;

use hostile_support::*;
use numstream_harness::wait;

/// One test at a time: they measure the whole process's memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1024 * 1024;

/// Encoded size of a whole 65535-number session (WELCOME, NUMBERs, FINAL).
const FULL_SESSION_BYTES: usize =
    codec::WELCOME_FRAME_LEN + 65_534 * codec::NUMBER_FRAME_LEN + codec::FINAL_FRAME_LEN;

/// Resets this process's peak resident set size to its current size
/// (Linux: `5` to `/proc/self/clear_refs`), so a peak read afterwards is
/// this test's, not that of whichever test ran before it in this binary.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("reset the peak RSS (/proc/self/clear_refs)");
}

/// Peak resident set size of this process since the last
/// [`reset_peak_rss`] (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A connection whose receive buffer is small, so a server writing to it
/// fills it (and then its own send buffer) quickly.
async fn small_buffer_connection(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// A server like [`TestServer`], but on a listener whose accepted sockets
/// get a small, fixed send buffer (Linux copies it from the listener): a
/// constrained path, where a client that stops reading blocks the server's
/// writes. (In burst mode the server caps its send buffers itself; this
/// constrains them in streaming mode too, and smaller.)
struct ConstrainedServer {
    addr: std::net::SocketAddr,
    store: Arc<dyn SessionStore>,
    shutdown: CancellationToken,
}

impl ConstrainedServer {
    async fn start(config: ServerConfig, send_buffer: u32) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(send_buffer).expect("SO_SNDBUF");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let store: Arc<dyn SessionStore> = Arc::new(InMemoryStore::new(100_000));
        let shutdown = CancellationToken::new();
        tokio::spawn(numstream_server::run(
            listener,
            store.clone(),
            config,
            shutdown.clone(),
        ));
        Self {
            addr,
            store,
            shutdown,
        }
    }
}

impl Drop for ConstrainedServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Opens `n` sessions of the largest burst that never read a byte.
async fn stuck_clients(addr: std::net::SocketAddr, n: usize) -> Vec<(ClientId, TcpStream)> {
    let mut stuck = Vec::new();
    for _ in 0..n {
        let id = ClientId::new_v4();
        let mut stream = small_buffer_connection(addr).await;
        stream
            .write_all(&encoded(&open(id, u16::MAX)))
            .await
            .expect("send OPEN");
        stuck.push((id, stream));
    }
    stuck
}

/// A well-behaved client on the same server gets its whole burst, first
/// time, while the stuck ones are stuck.
async fn assert_burst_client_unaffected(port: u16) {
    let started = Instant::now();
    let client = ClientConfig {
        ports: vec![port],
        count: u16::MAX,
        ..ClientConfig::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        numstream_client::run(client, &mut ()),
    )
    .await
    .expect("the well-behaved client must finish");
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 0, "{}", report.render_human());
    let expected =
        SequenceChecksum::of_session(&SessionSeed::derive(SEED, report.client_id), u16::MAX);
    assert_eq!(report.sum, expected.sum());
    eprintln!(
        "well-behaved client: 65535 numbers in {:?} beside the stuck clients",
        started.elapsed()
    );
}

/// Waits until the server has ended every stuck connection: the session
/// is detached, kept for a resume.
async fn assert_all_detached(
    store: &Arc<dyn SessionStore>,
    stuck: &[(ClientId, TcpStream)],
    deadline: Instant,
    started: Instant,
) {
    for &(id, _) in stuck {
        let what = format!(
            "a client that stopped reading to lose its session (waiting since {:?} \
             after the start)",
            started.elapsed()
        );
        wait::until(
            deadline.saturating_duration_since(Instant::now()),
            &what,
            || async move {
                let info = store.lookup(id).await.expect("lookup");
                !info.expect("the session is kept for a resume").attached
            },
        )
        .await;
    }
}

/// Opens `n` stuck clients, checks that a well-behaved client beside them
/// gets its whole burst, then waits until the server has ended every stuck
/// connection (its write timeout, with room for a busy machine); returns
/// the stuck clients, to see what they can still read.
async fn stuck_beside_a_burst(
    addr: std::net::SocketAddr,
    store: &Arc<dyn SessionStore>,
    n: usize,
    write_timeout: Duration,
) -> Vec<(ClientId, TcpStream)> {
    let stuck = stuck_clients(addr, n).await;
    let blocked_at = Instant::now();
    assert_burst_client_unaffected(addr.port()).await;
    assert_all_detached(
        store,
        &stuck,
        blocked_at + write_timeout + Duration::from_secs(8),
        blocked_at,
    )
    .await;
    stuck
}

/// Reads what each stuck client can still get, up to the end of its
/// connection; returns the most any one got.
async fn drain(stuck: Vec<(ClientId, TcpStream)>) -> usize {
    let mut most = 0;
    for (_, mut stream) in stuck {
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the server must have ended the connection")
            {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        most = most.max(total);
    }
    most
}

/// Burst mode (every number at once) with `write_timeout`, and a session
/// TTL long enough that a detached session is still there to look at.
fn burst_config(write_timeout: Duration) -> ServerConfig {
    ServerConfig {
        interval: Duration::ZERO,
        write_timeout,
        session_ttl: Duration::from_secs(120),
        ..hostile_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_cut_off_by_the_write_timeout() {
    let _serial = SERIAL.lock().await;
    watch_server_panics();
    let write_timeout = Duration::from_secs(1);
    let server = ConstrainedServer::start(burst_config(write_timeout), 16 * 1024).await;
    reset_peak_rss();
    let baseline = rss_bytes().expect("/proc/self/status");
    let stuck = stuck_beside_a_burst(server.addr, &server.store, 64, write_timeout).await;
    let peak = peak_rss_bytes().expect("/proc/self/status");
    // The server stopped producing when the socket stopped draining: what a
    // stuck client can still read is what the kernel buffered, far short of
    // the whole session, and then the connection ends.
    let most = drain(stuck).await;
    eprintln!("most bytes a stuck client could still read: {most}");
    assert!(
        most < FULL_SESSION_BYTES / 2,
        "a client that never read got {most} bytes: the server did not stop writing"
    );
    // Buffering every stuck session in full would take 64 × 720 KB ≈ 46 MiB.
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "peak memory growth with 64 stuck clients: {} KiB",
        growth / 1024
    );
    assert!(
        growth < 24 * MIB,
        "memory grew by {} MiB with 64 stuck clients",
        growth / MIB
    );
    assert_no_server_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_burst_mode_the_default_send_buffer_lets_the_write_timeout_end_stuck_clients() {
    let _serial = SERIAL.lock().await;
    watch_server_panics();
    // The server's own default options, no constrained listener: in burst
    // mode it caps each connection's send buffer, so the kernel no longer
    // autotunes it to megabytes (a whole session) for a client that does
    // not read. The writes block, and the write timeout (not the far
    // longer ACK timeout) ends the connection.
    let write_timeout = Duration::from_secs(1);
    let config = ServerConfig {
        ack_timeout: Duration::from_secs(600),
        ..burst_config(write_timeout)
    };
    assert!(
        config.burst_send_buffer.is_some(),
        "the cap is on by default"
    );
    let server = TestServer::start(config).await;
    let stuck = stuck_beside_a_burst(server.addr, &server.store, 16, write_timeout).await;
    // What the kernel held for each stuck client: its send queue (about
    // twice the cap asked for) and the client's small receive buffer; far
    // from the whole session it held without the cap.
    let most = drain(stuck).await;
    eprintln!("a stuck client could still read {most} bytes");
    assert!(
        most <= 200 * 1024,
        "{most} bytes were queued for one stuck client"
    );
    assert_no_server_panics();
}

/// The one frame a rejected connection gets, then its end: reads to EOF
/// (bounded) with a small buffer, decodes what came.
async fn read_rejection(mut stream: TcpStream) -> Option<Frame> {
    let mut bytes = BytesMut::new();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the server must close a silent connection")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    let frame = decode_frame(&mut bytes).ok().flatten();
    assert!(bytes.is_empty(), "nothing may follow the rejection");
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_silent_connections_are_closed_by_the_handshake_timeout() {
    let _serial = SERIAL.lock().await;
    watch_server_panics();
    // The global bound and the handshake timeout are under test here, not
    // the per-address quotas (`abuse.rs`): all of this comes from one
    // address, as the canary does.
    let config = ServerConfig {
        per_address: PeerLimits::UNLIMITED,
        ..hostile_config()
    };
    let server = TestServer::start(config).await;
    let canary = Canary::start(server.addr).await;
    // Each connection costs two descriptors here (client and server side).
    let limit = open_file_limit().unwrap_or(1024);
    let silent = 2000.min(limit.saturating_sub(300) / 2) as usize;
    assert!(
        silent >= 500,
        "open-file limit {limit} is too low for this test"
    );
    let baseline = rss_bytes().expect("/proc/self/status");

    // Plain sockets on this side, so the memory measured is the server's.
    let mut silent_streams = Vec::with_capacity(silent);
    for _ in 0..silent {
        let stream = TcpStream::connect(server.addr).await.expect("connect");
        silent_streams.push((Instant::now(), stream));
    }
    let opened = rss_bytes().expect("/proc/self/status");
    let waiting: Vec<_> = silent_streams
        .into_iter()
        .map(|(connected, stream)| {
            tokio::spawn(async move { (read_rejection(stream).await, connected.elapsed()) })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for task in waiting {
        let (rejection, elapsed) = task.await.expect("silent connection");
        match rejection {
            Some(Frame::Error(error)) => {
                assert_eq!(error.code, ErrorCode::HandshakeTimeout, "{error}");
            }
            other => panic!("expected handshake_timeout, got {other:?}"),
        }
        slowest = slowest.max(elapsed);
    }
    assert!(
        slowest <= HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "a silent connection stayed open for {slowest:?}"
    );
    // Thousands of idle connections must stay cheap: a task, a socket and a
    // handshake buffer of a few dozen bytes each.
    let growth = opened.saturating_sub(baseline);
    eprintln!(
        "{silent} silent connections: {} KiB more memory, slowest closed after {slowest:?}",
        growth / 1024
    );
    assert!(
        growth < 24 * MIB,
        "{silent} silent connections cost {} MiB",
        growth / MIB
    );
    canary.assert_healthy().await;
    assert_no_server_panics();
}
