//! Shared by the hostile-input suites: a server config with short bounds,
//! hand-built (and deliberately broken) frames, a panic counter for server
//! tasks, and the *canary*: a well-behaved client on the same server whose
//! numbers must keep arriving on time while the attack runs.

// Each suite uses a different subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use numstream_harness::raw::RawClient;
use numstream_protocol::frame::tag;
use numstream_protocol::prng::NumberGenerator;
use numstream_protocol::{
    ClientId, ErrorCode, ErrorFrame, Frame, Open, PROTOCOL_VERSION, Resume, ResumeToken,
    SessionSeed, Welcome,
};
use numstream_server::ServerConfig;

/// The master seed the hostile servers run with.
pub(crate) const SEED: u64 = 42;
/// The canary's interval: long enough to tell a late number from a normal
/// one, short enough to see many numbers in a test.
pub(crate) const INTERVAL: Duration = Duration::from_millis(20);
/// Longest acceptable gap between two of the canary's frames (50 intervals).
/// Generous for a loaded 2-core CI machine running a debug build; a server
/// whose attackers block its runtime blows through it by seconds.
pub(crate) const CANARY_MAX_GAP: Duration = Duration::from_secs(1);
/// The short handshake bound the hostile servers run with.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Short bounds everywhere, so each attack resolves within seconds.
pub(crate) fn hostile_config() -> ServerConfig {
    ServerConfig {
        interval: INTERVAL,
        session_ttl: Duration::from_secs(5),
        seed: Some(SEED),
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ack_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        dead_peer_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

pub(crate) fn open(client_id: ClientId, count: u16) -> Frame {
    Frame::Open(Open { client_id, count })
}

pub(crate) fn resume(client_id: ClientId, token: ResumeToken, next_index: u16) -> Frame {
    Frame::Resume(Resume {
        client_id,
        token,
        next_index,
    })
}

/// A frame with whatever type byte and body the test wants, and a correct
/// length prefix for them.
pub(crate) fn raw_frame(frame_type: u8, body: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u32(1 + body.len() as u32);
    buf.put_u8(frame_type);
    buf.put_slice(body);
    buf.to_vec()
}

/// The body of an OPEN with any version and any count bytes (so a count
/// that does not fit the u16 field can be written too).
pub(crate) fn open_body(version: u16, client_id: ClientId, count: &[u8]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(client_id.as_bytes());
    body.extend_from_slice(count);
    body
}

/// The body of a RESUME with any version and any token bytes.
pub(crate) fn resume_body(
    version: u16,
    client_id: ClientId,
    token: &[u8],
    next_index: u16,
) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(client_id.as_bytes());
    body.extend_from_slice(token);
    body.extend_from_slice(&next_index.to_be_bytes());
    body
}

pub(crate) const OPEN_TYPE: u8 = tag::OPEN;
pub(crate) const RESUME_TYPE: u8 = tag::RESUME;
pub(crate) const ACK_TYPE: u8 = tag::ACK;

pub(crate) fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    numstream_protocol::encode_frame(frame, &mut buf);
    buf.to_vec()
}

pub(crate) fn current_version() -> u16 {
    PROTOCOL_VERSION
}

pub(crate) async fn welcome(client: &mut RawClient) -> Welcome {
    match client.frame().await {
        Frame::Welcome(welcome) => welcome,
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// Skips NUMBERs (in flight before the server noticed) until an ERROR,
/// which must have one of `codes`; then the server must close.
pub(crate) async fn expect_error_after_numbers(
    client: &mut RawClient,
    codes: &[ErrorCode],
) -> ErrorFrame {
    loop {
        match client.frame().await {
            Frame::Number { .. } | Frame::Heartbeat => continue,
            Frame::Error(error) => {
                assert!(codes.contains(&error.code), "unexpected error {error}");
                client.expect_closed().await;
                return error;
            }
            other => panic!("expected ERROR {codes:?}, got {other:?}"),
        }
    }
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Counts panics on tokio worker threads, where the server's connection
/// tasks run: such a panic kills one connection silently, so a test could
/// otherwise pass over it. Tests must use the multi-thread runtime.
pub(crate) fn watch_server_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|name| name.starts_with("tokio-runtime-worker"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Asserts no server task (or other spawned task) has panicked so far.
pub(crate) fn assert_no_server_panics() {
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a task on a runtime worker panicked (see the output above)"
    );
}

/// What the canary saw.
#[derive(Debug)]
pub(crate) struct CanaryReport {
    pub(crate) received: u32,
    pub(crate) max_gap: Duration,
    pub(crate) elapsed: Duration,
}

/// A well-behaved client streaming a long session at [`INTERVAL`] from the
/// server under attack, checking every number against the seed and timing
/// the gap between frames.
#[derive(Debug)]
pub(crate) struct Canary {
    stop: CancellationToken,
    task: JoinHandle<Result<CanaryReport, String>>,
}

impl Canary {
    pub(crate) async fn start(addr: SocketAddr) -> Self {
        let client_id = ClientId::new_v4();
        let mut client = RawClient::connect(addr).await;
        client.send(open(client_id, u16::MAX)).await;
        let hello = welcome(&mut client).await;
        assert_eq!(hello.interval_us, INTERVAL.as_micros() as u32);
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(client, client_id, stop.clone()));
        Self { stop, task }
    }

    /// Stops watching and asserts the canary was served on time throughout:
    /// every number correct and in order, no gap over [`CANARY_MAX_GAP`],
    /// and (the schedule being absolute) about one number per interval.
    pub(crate) async fn assert_healthy(self) -> CanaryReport {
        self.stop.cancel();
        let report = self
            .task
            .await
            .expect("canary task")
            .unwrap_or_else(|why| panic!("the well-behaved client was disturbed: {why}"));
        assert!(
            report.max_gap <= CANARY_MAX_GAP,
            "the well-behaved client waited {:?} for a number: {report:?}",
            report.max_gap
        );
        let due = report.elapsed.as_secs_f64() / INTERVAL.as_secs_f64();
        assert!(
            f64::from(report.received) >= due * 0.7 - 10.0,
            "the well-behaved client fell behind its schedule: {report:?}, {due:.0} due"
        );
        report
    }
}

async fn watch(
    mut client: RawClient,
    client_id: ClientId,
    stop: CancellationToken,
) -> Result<CanaryReport, String> {
    let seed = SessionSeed::derive(SEED, client_id);
    let mut numbers = NumberGenerator::starting_at(&seed, 0);
    let started = Instant::now();
    let mut last = started;
    let mut max_gap = Duration::ZERO;
    let mut received: u32 = 0;
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            frame = tokio::time::timeout(Duration::from_secs(5), client_frame(&mut client)) => frame,
        };
        let now = Instant::now();
        max_gap = max_gap.max(now - last);
        last = now;
        match frame {
            Err(_) => return Err(format!("no frame for 5 s after {received} numbers")),
            Ok(Some(Frame::Number { index, value })) => {
                if u32::from(index) != received {
                    return Err(format!("expected number {received}, got {index}"));
                }
                if value != numbers.next_number() {
                    return Err(format!("number {index} has the wrong value"));
                }
                received += 1;
            }
            Ok(other) => return Err(format!("unexpected {other:?} after {received} numbers")),
        }
    }
    // The gap still open when the test stopped counts too.
    max_gap = max_gap.max(Instant::now() - last);
    Ok(CanaryReport {
        received,
        max_gap,
        elapsed: started.elapsed(),
    })
}

/// The next decoded frame, `None` on close or a decode error.
async fn client_frame(client: &mut RawClient) -> Option<Frame> {
    match client.recv().await {
        Some(Ok(frame)) => Some(frame),
        _ => None,
    }
}

/// Resident set size of this process, from /proc (Linux).
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit on open files, from /proc (Linux).
pub(crate) fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
