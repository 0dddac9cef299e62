//! The server side of one connection as a pure state machine: which hello
//! is acceptable, what the store's answer means on the wire, when each
//! number, heartbeat and lease renewal is due, and how the connection ends.
//!
//! Shaped like quinn-proto's `Connection`: the caller feeds it what
//! happened (`handle_*`: bytes received, the store's answers, a timer, a
//! takeover, shutdown), then drains what it decided (`poll_transmit` for
//! bytes to write, `poll_event` for store operations and the ending,
//! `poll_timeout` for the one deadline to wake at). Time is always passed
//! in, so every decision is testable with plain values and simulated time.
//!
//! What stays with the caller: sockets, the store itself, admission quotas
//! and randomness for a new session (it answers [`Event::Admit`] with
//! [`ServerSession::handle_attach`]), the process-local claim on a session
//! ([`Event::Claim`]), telemetry and logs, and the write timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::checksum::SequenceChecksum;
use crate::codec::{DecodeError, decode_frame, encode_frame};
use crate::frame::{
    ClientId, Disposition, ErrorCode, ErrorFrame, Frame, Open, Resume, ResumeToken, Welcome,
};
use crate::prng::{NumberGenerator, SessionSeed};
use crate::{MAX_COUNT, MAX_SERVER_SILENCE, MIN_COUNT};

/// Numbers encoded per [`ServerSession::poll_transmit`] when several are
/// due at once (always, in burst mode): large enough to amortise a write,
/// small enough that a takeover or shutdown is noticed promptly.
pub const BURST_BATCH: u32 = 1024;

/// Longest wait before retrying a failed lease renewal.
pub const LEASE_RETRY_AFTER: Duration = Duration::from_millis(250);

/// What every connection of one server shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Gap between consecutive numbers; zero streams as fast as the
    /// connection drains.
    pub interval: Duration,
    /// How long a session survives a disconnection; also its lease.
    pub session_ttl: Duration,
    /// Time from accept to a complete hello.
    pub handshake_timeout: Duration,
    /// Time from writing FINAL to the ACK (the ACK timeout plus the
    /// dead-peer bound: writing FINAL only hands it to the kernel).
    pub ack_wait: Duration,
    /// How often the lease is renewed.
    pub lease_renewal_period: Duration,
    /// Whether sessions outlive this process (decides what a draining
    /// server tells its clients).
    pub store_shared: bool,
}

impl SessionConfig {
    fn interval_us(&self) -> u32 {
        u32::try_from(self.interval.as_micros()).unwrap_or(u32::MAX)
    }

    fn session_ttl_ms(&self) -> u32 {
        u32::try_from(self.session_ttl.as_millis()).unwrap_or(u32::MAX)
    }
}

/// A store refusal, as the session machine needs to tell them apart (the
/// store crate converts its own error into this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreFailure {
    #[error("a live session for this client id already exists")]
    AlreadyExists,
    #[error("no such session")]
    NotFound,
    #[error("the session expired")]
    Expired,
    #[error("the resume token does not match the session's")]
    BadToken,
    #[error("the connection's generation is stale")]
    Superseded,
    #[error("the session store is full ({max} sessions)")]
    Full { max: usize },
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
    #[error("the session record is corrupt: {0}")]
    Corrupt(String),
}

/// A session the store attached to this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub client_id: ClientId,
    pub generation: u64,
    pub count: u16,
    pub seed: SessionSeed,
    pub token: ResumeToken,
    /// The whole-sequence checksum FINAL carries.
    pub checksum: u32,
}

/// Why the caller could not attach the session for a validated hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachFailure {
    /// The store said no; the machine picks the error frame.
    Store(StoreFailure),
    /// The caller refused on its own (overload, quotas, no randomness)
    /// with this frame.
    Refused(ErrorFrame),
}

/// A hello that passed the checks the machine can make alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    Open(Open),
    Resume(Resume),
}

impl Hello {
    pub fn client_id(&self) -> ClientId {
        match self {
            Hello::Open(open) => open.client_id,
            Hello::Resume(resume) => resume.client_id,
        }
    }
}

/// Why a connection ended before it had a valid hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloFailure {
    /// No complete hello within the handshake timeout.
    Timeout,
    /// The peer closed before sending one.
    Closed,
    /// Reading failed.
    IoError,
    /// Bytes that are not a v1 frame (or an invalid client id or count).
    Malformed,
    /// A hello of another protocol version.
    UnsupportedVersion,
    /// A valid frame that is neither OPEN nor RESUME.
    UnexpectedFrame,
    /// The server was shutting down.
    ShuttingDown,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// No valid hello.
    HelloFailed(HelloFailure),
    /// The hello was valid, but it was refused (a bad count, the store,
    /// admission); the plan sends the error.
    Refused,
    /// A newer connection of this process claimed the session before this
    /// one started streaming.
    ClaimLost,
    /// RESUME with a correct token and an index past the end.
    ResumeIndexOutOfRange,
    /// FINAL was delivered and acknowledged.
    Completed {
        client_checksum: u32,
        server_checksum: u32,
    },
    /// The connection broke or went quiet; the session waits for a resume.
    Disconnected(String),
    /// The client sent something it must not send.
    ClientViolation(String),
    /// A newer connection owns the session now.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// The store no longer has the session.
    Lost(StoreFailure),
    /// The lease could not be renewed in time.
    LeaseUnconfirmed(String),
}

/// One step of an ending, carried out by the caller in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Hand the session back to the store for a resume within the TTL.
    Detach,
    /// Delete the session from the store.
    Complete,
    /// Write what is still pending and then this frame (bounded in time).
    Send(ErrorFrame),
    /// Give up the process-local claim: a waiting successor may stream.
    ReleaseClaim,
    /// Half-close and drain the client's input briefly before closing, so
    /// the kernel does not reset the connection under the last frame.
    Linger,
}

/// How a connection ends: why, and what to do about it, in order. After
/// the last step the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub reason: EndReason,
    pub steps: Vec<Step>,
    /// Whether the session is over for good (completed or gone), as
    /// opposed to kept for a resume; `None` when there was no session.
    pub session_over: Option<bool>,
}

/// What the caller must do next, besides writing and waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Admit this hello and ask the store (create for OPEN, attach for
    /// RESUME); answer with [`ServerSession::handle_attach`]. The lease
    /// counts from the moment this event was polled.
    Admit(Hello),
    /// Claim the attached session in this process (stopping an older
    /// local streamer); answer with [`ServerSession::handle_claim`].
    Claim {
        client_id: ClientId,
        generation: u64,
    },
    /// Renew the lease; answer with [`ServerSession::handle_renewal`].
    Renew {
        client_id: ClientId,
        generation: u64,
    },
    /// The connection is over; carry out the plan.
    Ended(Ending),
}

/// What the peer did while the machine could not judge it yet (between
/// the hello and the first written number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Deferred {
    #[default]
    Nothing,
    /// It sent bytes behind the hello.
    Bytes,
    /// It closed or its connection failed.
    Closed,
}

#[derive(Debug)]
enum Phase {
    AwaitHello {
        deadline: Instant,
    },
    /// The hello is valid; the caller admits it and asks the store.
    Admitting {
        hello: Option<Hello>,
        next_index: u16,
        /// How long the hello waited, from the connection's start until
        /// it was read, in milliseconds, saturating at 65 s (with
        /// `requested`: how long the client has been waiting; compared
        /// with a few seconds). Not an `Instant`: the bytes more here
        /// cost every connection's task 128.
        hello_waited_ms: u16,
    },
    /// The store attached the session; the caller claims it locally.
    Claiming {
        claim_asked: bool,
    },
    Streaming(Box<Stream>),
    Ended,
}

/// Streaming state: plain data, small, and on the heap only while a
/// session streams.
#[derive(Debug)]
struct Stream {
    /// The grant's count, at hand for every number; the rest of the grant
    /// is read from [`ServerSession::grant`], kept once per session.
    count: u16,
    /// First index of this connection; WELCOME's `next_index`.
    start: u16,
    welcomed: bool,
    /// Number `start + k` is due at `origin + k·interval`.
    origin: Instant,
    /// Next index to encode.
    next_index: u32,
    /// When the last write was handed to the caller.
    last_write: Instant,
    /// Set once FINAL was written: the ACK must come by then.
    ack_deadline: Option<Instant>,
    lease: LeaseClock,
}

/// The lease a streaming connection holds, renewed every period; it stops
/// streaming when two thirds of the lease pass without a confirmed renewal
/// (see `crates/server/src/lease.rs` history and PROTOCOL.md 6.6). Its
/// length and period are the config's `session_ttl` and
/// `lease_renewal_period`, passed in rather than kept per session.
#[derive(Debug, Clone)]
struct LeaseClock {
    next_renewal: Instant,
    stop_at: Instant,
    /// When the renewal on its way was sent.
    in_flight: Option<Instant>,
    /// Why the last renewal failed; `None` once one succeeds. Boxed: rare,
    /// and the clock lives as long as the session streams.
    last_error: Option<Box<StoreFailure>>,
    /// A renewal became due at this moment and is not yet handed to the
    /// caller (it counts as sent then).
    renew_pending: Option<Instant>,
}

/// A fraction of `range` that is the same for every call about one session
/// and spread evenly across sessions (client ids are random).
pub fn spread(range: Duration, client_id: ClientId) -> Duration {
    let (high, low) = client_id.as_u64_pair();
    let fraction = ((high ^ low) % 1024) as u32;
    range * fraction / 1024
}

fn lease_stop_at(sent: Instant, length: Duration) -> Instant {
    sent + length - length / 3
}

impl LeaseClock {
    fn new(granted: Instant, length: Duration, period: Duration, client_id: ClientId) -> Self {
        Self {
            // Sessions opened in the same second would otherwise renew in
            // the same second for their whole lives.
            next_renewal: granted + period - spread(period / 10, client_id),
            stop_at: lease_stop_at(granted, length),
            in_flight: None,
            last_error: None,
            renew_pending: None,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self.in_flight {
            // A renewal sent after the deadline is the first attempt for a
            // lease that aged unrenewed: its answer decides.
            Some(sent) => (sent < self.stop_at).then_some(self.stop_at),
            None if self.renew_pending.is_some() => None,
            None if self.last_error.is_some() => Some(self.stop_at.min(self.next_renewal)),
            None => Some(self.next_renewal),
        }
    }

    /// Advances to `now`; `Err` with a reason when the lease is lost.
    fn on_timeout(&mut self, now: Instant) -> Result<(), String> {
        match self.in_flight {
            Some(sent) => {
                if sent < self.stop_at && now >= self.stop_at {
                    return Err(self.unconfirmed());
                }
            }
            None if self.renew_pending.is_some() => {}
            None => {
                let failing = self.last_error.is_some();
                if failing && now >= self.stop_at {
                    return Err(self.unconfirmed());
                }
                if now >= self.next_renewal {
                    self.renew_pending = Some(now);
                }
            }
        }
        Ok(())
    }

    fn unconfirmed(&self) -> String {
        match &self.last_error {
            Some(error) => error.to_string(),
            None => "the session store did not answer the lease renewal in time".to_owned(),
        }
    }

    fn on_result(
        &mut self,
        now: Instant,
        client_id: ClientId,
        config: &SessionConfig,
        result: Result<(), StoreFailure>,
    ) -> Result<(), EndReason> {
        let (length, period) = (config.session_ttl, config.lease_renewal_period);
        let Some(sent) = self.in_flight.take() else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                self.last_error = None;
                self.stop_at = lease_stop_at(sent, length);
                self.next_renewal = sent + period;
                Ok(())
            }
            Err(StoreFailure::Superseded) => Err(EndReason::TakenOver),
            Err(error @ (StoreFailure::NotFound | StoreFailure::Expired)) => {
                Err(EndReason::Lost(error))
            }
            Err(error) => {
                self.last_error = Some(Box::new(error));
                // Jittered, so that the sessions one store outage failed
                // together do not retry together.
                let retry_after = LEASE_RETRY_AFTER.min(period);
                self.next_renewal = now + retry_after - spread(retry_after / 2, client_id);
                if now >= self.stop_at {
                    return Err(EndReason::LeaseUnconfirmed(self.unconfirmed()));
                }
                Ok(())
            }
        }
    }
}

/// One connection's protocol state, from accept to close.
#[derive(Debug)]
pub struct ServerSession {
    config: Arc<SessionConfig>,
    /// Received and not yet consumed.
    rx: BytesMut,
    phase: Phase,
    deferred: Deferred,
    shutdown: bool,
    /// When the store was asked: the lease counts from then.
    requested: Option<Instant>,
    grant: Option<Box<Grant>>,
    resumed: bool,
    /// Index after the last number the caller reported written.
    written_up_to: u16,
    /// Index after the last number encoded.
    encoded_up_to: u16,
    /// Boxed: set once, at the end, and the session lives long.
    ending: Option<Box<Ending>>,
}

impl ServerSession {
    /// A connection accepted at `now`.
    pub fn new(config: Arc<SessionConfig>, now: Instant) -> Self {
        let deadline = now + config.handshake_timeout;
        Self {
            config,
            rx: BytesMut::new(),
            phase: Phase::AwaitHello { deadline },
            deferred: Deferred::Nothing,
            shutdown: false,
            requested: None,
            grant: None,
            resumed: false,
            written_up_to: 0,
            encoded_up_to: 0,
            ending: None,
        }
    }

    /// The hello's client id, once a hello was decoded.
    pub fn client_id(&self) -> Option<ClientId> {
        self.grant
            .as_ref()
            .map(|grant| grant.client_id)
            .or(match &self.phase {
                Phase::Admitting {
                    hello: Some(hello), ..
                } => Some(hello.client_id()),
                _ => None,
            })
    }

    /// While its hello is being admitted, how long the client has been
    /// waiting for its answer at `now` (since the connection started, to
    /// the millisecond), for a caller that must not start work the client
    /// will not wait for.
    pub fn client_waiting(&self, now: Instant) -> Option<Duration> {
        match (&self.phase, self.requested) {
            (
                Phase::Admitting {
                    hello_waited_ms, ..
                },
                Some(requested),
            ) => Some(
                Duration::from_millis(u64::from(*hello_waited_ms))
                    + now.saturating_duration_since(requested),
            ),
            _ => None,
        }
    }

    /// The session attached to this connection, if any.
    pub fn grant(&self) -> Option<&Grant> {
        self.grant.as_deref()
    }

    /// Whether the session was resumed rather than opened.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Index after the last number this connection wrote.
    pub fn written_up_to(&self) -> u16 {
        self.written_up_to
    }

    /// Whether the connection is over (its [`Event::Ended`] may still be
    /// waiting in [`ServerSession::poll_event`]).
    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    /// Whether the session streams (from the first number to the ACK).
    pub fn is_streaming(&self) -> bool {
        matches!(self.phase, Phase::Streaming(_))
    }

    /// Bytes received from the client.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        if bytes.is_empty() || self.is_ended() {
            return;
        }
        self.rx.extend_from_slice(bytes);
        match &mut self.phase {
            Phase::AwaitHello { .. } => self.read_hello(now),
            Phase::Admitting { .. } | Phase::Claiming { .. } => self.deferred = Deferred::Bytes,
            Phase::Streaming(stream) => {
                if stream.next_index < u32::from(stream.count) {
                    // Nothing may come before FINAL: even the first byte of
                    // an ACK is early, and cannot become valid later.
                    let why = stray_input(&mut self.rx);
                    self.end_streaming(EndReason::ClientViolation(why));
                } else {
                    self.read_ack();
                }
            }
            Phase::Ended => {}
        }
    }

    /// The client closed its side (`None`) or reading failed (`Some`).
    pub fn handle_closed(&mut self, _now: Instant, error: Option<String>) {
        match &self.phase {
            Phase::AwaitHello { .. } => {
                let failure = if error.is_some() {
                    HelloFailure::IoError
                } else {
                    HelloFailure::Closed
                };
                self.end(EndReason::HelloFailed(failure), Vec::new(), None);
            }
            Phase::Admitting { .. } | Phase::Claiming { .. } => {
                if self.deferred == Deferred::Nothing {
                    self.deferred = Deferred::Closed;
                }
            }
            Phase::Streaming(_) => {
                let why = match error {
                    Some(error) => format!("read failed: {error}"),
                    None => "client closed the connection".to_owned(),
                };
                self.end_streaming(EndReason::Disconnected(why));
            }
            Phase::Ended => {}
        }
    }

    /// Writing failed or stalled past the write timeout.
    pub fn handle_write_failed(&mut self, now: Instant, why: String) {
        if self.is_streaming() {
            self.end_streaming(EndReason::Disconnected(why));
        } else {
            self.handle_closed(now, Some(why));
        }
    }

    /// The caller's answer to [`Event::Admit`].
    pub fn handle_attach(&mut self, _now: Instant, result: Result<Grant, AttachFailure>) {
        let Phase::Admitting { next_index, .. } = self.phase else {
            return;
        };
        match result {
            Ok(grant) => {
                self.grant = Some(Box::new(grant));
                self.encoded_up_to = next_index;
                self.written_up_to = next_index;
                self.phase = Phase::Claiming { claim_asked: false };
            }
            Err(AttachFailure::Refused(error)) => self.refuse(error),
            Err(AttachFailure::Store(failure)) => {
                let error = store_error(&failure, self.config.session_ttl);
                self.refuse(error);
            }
        }
    }

    /// The caller's answer to [`Event::Claim`]: `false` when a newer
    /// connection of this process already owns the session.
    pub fn handle_claim(&mut self, now: Instant, claimed: bool) {
        if !matches!(self.phase, Phase::Claiming { claim_asked: true }) {
            return;
        }
        let Some((count, client_id)) = self.grant.as_deref().map(|g| (g.count, g.client_id)) else {
            return;
        };
        if !claimed {
            self.end(
                EndReason::ClaimLost,
                vec![Step::Send(taken_over()), Step::Linger],
                Some(false),
            );
            return;
        }
        let start = self.encoded_up_to;
        if start >= count {
            // The token was right, so this RESUME did take the session
            // over; hand it straight back to the store for a correct resume.
            let error = ErrorFrame::new(
                ErrorCode::ResumeIndexOutOfRange,
                format!(
                    "resume index {start} is out of range: the session has {} numbers, indices 0..={}",
                    count,
                    count - 1
                ),
            );
            self.end(
                EndReason::ResumeIndexOutOfRange,
                vec![
                    Step::Detach,
                    Step::ReleaseClaim,
                    Step::Send(error),
                    Step::Linger,
                ],
                Some(false),
            );
            return;
        }
        let granted = self.requested.unwrap_or(now);
        let lease = LeaseClock::new(
            granted,
            self.config.session_ttl,
            self.config.lease_renewal_period,
            client_id,
        );
        self.phase = Phase::Streaming(Box::new(Stream {
            count,
            start,
            welcomed: false,
            origin: now,
            next_index: u32::from(start),
            last_write: now,
            ack_deadline: None,
            lease,
        }));
    }

    /// The caller's answer to [`Event::Renew`].
    pub fn handle_renewal(&mut self, now: Instant, result: Result<(), StoreFailure>) {
        let (Phase::Streaming(stream), Some(grant)) = (&mut self.phase, self.grant.as_deref())
        else {
            return;
        };
        let client_id = grant.client_id;
        if let Err(reason) = stream.lease.on_result(now, client_id, &self.config, result) {
            self.end_streaming(reason);
        }
    }

    /// A newer generation owns the session (a local successor's claim or a
    /// takeover notice from the store).
    pub fn handle_takeover(&mut self, _now: Instant) {
        if self.is_streaming() {
            self.end_streaming(EndReason::TakenOver);
        }
    }

    /// The server is shutting down.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        self.shutdown = true;
        match self.phase {
            Phase::AwaitHello { .. } => {
                let error = shutting_down(self.config.store_shared, false);
                self.end(
                    EndReason::HelloFailed(HelloFailure::ShuttingDown),
                    vec![Step::Send(error), Step::Linger],
                    None,
                );
            }
            Phase::Streaming(_) => self.end_streaming(EndReason::Shutdown),
            // Judged once the store has answered: the store call is not
            // interrupted, so whatever it did is handed back properly.
            Phase::Admitting { .. } | Phase::Claiming { .. } | Phase::Ended => {}
        }
    }

    /// Time has reached `now` (the deadline from [`Self::poll_timeout`],
    /// or later).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::AwaitHello { deadline } if now >= *deadline => {
                let error = ErrorFrame::new(
                    ErrorCode::HandshakeTimeout,
                    format!(
                        "no complete OPEN or RESUME within {}",
                        humantime::format_duration(self.config.handshake_timeout)
                    ),
                );
                self.end(
                    EndReason::HelloFailed(HelloFailure::Timeout),
                    vec![Step::Send(error), Step::Linger],
                    None,
                );
            }
            Phase::Streaming(stream) => {
                if let Some(deadline) = stream.ack_deadline
                    && now >= deadline
                {
                    let why = format!(
                        "no ACK within {} of FINAL",
                        humantime::format_duration(self.config.ack_wait)
                    );
                    self.end_streaming(EndReason::Disconnected(why));
                    return;
                }
                if let Err(why) = stream.lease.on_timeout(now) {
                    self.end_streaming(EndReason::LeaseUnconfirmed(why));
                }
            }
            _ => {}
        }
    }

    /// The caller wrote everything [`Self::poll_transmit`] gave it, at
    /// `now`. The ACK wait starts when FINAL is written.
    pub fn handle_flushed(&mut self, now: Instant) {
        if let Phase::Streaming(stream) = &mut self.phase {
            stream.last_write = now;
            self.written_up_to = self.encoded_up_to;
            if u32::from(self.encoded_up_to) == u32::from(stream.count)
                && stream.ack_deadline.is_none()
            {
                stream.ack_deadline = Some(now + self.config.ack_wait);
            }
        }
    }

    /// Appends the frames due by `now` to `out`; returns how many numbers
    /// (NUMBER or FINAL) it added: up to [`BURST_BATCH`] in burst mode, else
    /// the one due next (overdue numbers go out back to back, one per call).
    /// Write `out`, call [`Self::handle_flushed`], and call again.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut BytesMut) -> u32 {
        let (Phase::Streaming(stream), Some(grant)) = (&mut self.phase, self.grant.as_deref())
        else {
            return 0;
        };
        let count = u32::from(stream.count);
        if stream.next_index >= count {
            return 0;
        }
        let first_write = !stream.welcomed;
        if first_write {
            stream.welcomed = true;
            encode_frame(
                &Frame::Welcome(Welcome {
                    count: stream.count,
                    next_index: stream.start,
                    token: grant.token,
                    interval_us: self.config.interval_us(),
                    session_ttl_ms: self.config.session_ttl_ms(),
                }),
                out,
            );
        }
        let interval = self.config.interval;
        let due_count = if interval.is_zero() {
            BURST_BATCH
        } else {
            // Every number due by now: `start + k` is due at
            // `origin + k·interval`, an absolute schedule, so one late
            // write does not delay the later numbers.
            let elapsed = now.saturating_duration_since(stream.origin);
            let due_k = u32::try_from(elapsed.as_nanos() / interval.as_nanos()).unwrap_or(u32::MAX);
            // One per call: each gets its own write, as the schedule
            // meant it, and its own lateness.
            (u32::from(stream.start).saturating_add(due_k))
                .saturating_add(1)
                .saturating_sub(stream.next_index)
                .min(1)
        };
        let end = stream
            .next_index
            .saturating_add(due_count.min(BURST_BATCH))
            .min(count);
        let added = end - stream.next_index;
        if added > 0 {
            encode_numbers(grant, stream.next_index, end, out);
            stream.next_index = end;
            // `end <= count <= 65535`.
            self.encoded_up_to = end as u16;
            stream.last_write = now;
        } else if now >= stream.last_write + MAX_SERVER_SILENCE {
            encode_frame(&Frame::Heartbeat, out);
            stream.last_write = now;
        }
        // What the client did between its hello and the attach is judged
        // now that WELCOME and the first number are out (PROTOCOL.md 5.1).
        if first_write {
            self.judge_deferred();
        }
        added
    }

    /// When the first number of the last batch [`Self::poll_transmit`]
    /// encoded was due; `None` in burst mode, where all is due at once.
    pub fn batch_due(&self) -> Option<Instant> {
        match &self.phase {
            // Outside burst mode a batch is one number: the last encoded
            // (derived rather than kept: the stream state lives as long as
            // the session streams).
            Phase::Streaming(stream)
                if !self.config.interval.is_zero()
                    && stream.next_index > u32::from(stream.start) =>
            {
                let k = stream.next_index - 1 - u32::from(stream.start);
                Some(stream.origin + self.config.interval * k)
            }
            _ => None,
        }
    }

    /// The earliest moment something is due; `None` while the machine
    /// waits only for the peer or the caller.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AwaitHello { deadline } => Some(*deadline),
            Phase::Streaming(stream) => {
                let lease = stream.lease.deadline();
                let own = if stream.next_index >= u32::from(stream.count) {
                    stream.ack_deadline
                } else {
                    let heartbeat = stream.last_write + MAX_SERVER_SILENCE;
                    Some(self.due(stream).min(heartbeat))
                };
                match (own, lease) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => None,
        }
    }

    /// The next thing for the caller to do, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(ending) = self.ending.take() {
            return Some(Event::Ended(*ending));
        }
        match &mut self.phase {
            Phase::Admitting { hello, .. } => hello.take().map(|hello| {
                // The caller asks the store right away.
                Event::Admit(hello)
            }),
            Phase::Claiming { claim_asked } if !*claim_asked => {
                *claim_asked = true;
                let grant = self.grant.as_deref()?;
                Some(Event::Claim {
                    client_id: grant.client_id,
                    generation: grant.generation,
                })
            }
            Phase::Streaming(stream) if stream.lease.renew_pending.is_some() => {
                let grant = self.grant.as_deref()?;
                stream.lease.in_flight = stream.lease.renew_pending.take();
                Some(Event::Renew {
                    client_id: grant.client_id,
                    generation: grant.generation,
                })
            }
            _ => None,
        }
    }

    fn due(&self, stream: &Stream) -> Instant {
        let k = stream.next_index - u32::from(stream.start);
        stream.origin + self.config.interval * k
    }

    fn read_hello(&mut self, now: Instant) {
        let frame = match decode_frame(&mut self.rx) {
            Ok(None) => return,
            Ok(Some(frame)) => frame,
            Err(DecodeError::UnsupportedVersion(version)) => {
                return self.fail_hello(
                    HelloFailure::UnsupportedVersion,
                    ErrorFrame::unsupported_version(version),
                );
            }
            Err(error) => {
                return self.fail_hello(
                    HelloFailure::Malformed,
                    ErrorFrame::new(
                        ErrorCode::Malformed,
                        format!("malformed handshake: {error}"),
                    ),
                );
            }
        };
        let (hello, next_index) = match frame {
            Frame::Open(open) => (Hello::Open(open), 0),
            Frame::Resume(resume) => {
                let next_index = resume.next_index;
                (Hello::Resume(resume), next_index)
            }
            other => {
                return self.fail_hello(
                    HelloFailure::UnexpectedFrame,
                    ErrorFrame::new(
                        ErrorCode::Malformed,
                        format!("expected OPEN or RESUME, got {}", other.name()),
                    ),
                );
            }
        };
        if let Some(error) = invalid_hello(&hello) {
            return self.refuse(error);
        }
        self.resumed = matches!(hello, Hello::Resume(_));
        self.requested = Some(now);
        if self.rx.is_empty() {
            // Else the hello's buffer stays allocated for as long as the
            // session streams.
            self.rx = BytesMut::new();
        } else {
            self.deferred = Deferred::Bytes;
        }
        let started = match self.phase {
            Phase::AwaitHello { deadline } => deadline.checked_sub(self.config.handshake_timeout),
            _ => None,
        };
        let hello_waited = started.map_or(Duration::ZERO, |started| {
            now.saturating_duration_since(started)
        });
        self.phase = Phase::Admitting {
            hello: Some(hello),
            next_index,
            hello_waited_ms: u16::try_from(hello_waited.as_millis()).unwrap_or(u16::MAX),
        };
    }

    fn read_ack(&mut self) {
        match decode_frame(&mut self.rx) {
            Ok(None) => {}
            Ok(Some(Frame::Ack { client_checksum })) => {
                let server_checksum = match (&self.phase, self.grant.as_deref()) {
                    (Phase::Streaming(_), Some(grant)) => grant.checksum,
                    _ => return,
                };
                self.end_streaming(EndReason::Completed {
                    client_checksum,
                    server_checksum,
                });
            }
            Ok(Some(other)) => self.end_streaming(EndReason::ClientViolation(format!(
                "unexpected {} while streaming (only ACK after FINAL is allowed)",
                other.name()
            ))),
            Err(error) => self.end_streaming(EndReason::ClientViolation(format!(
                "malformed frame: {error}"
            ))),
        }
    }

    /// What happened between the hello and the first number, judged once
    /// the session streams: the same rules as for streaming.
    fn judge_deferred(&mut self) {
        if self.shutdown {
            return self.end_streaming(EndReason::Shutdown);
        }
        match self.deferred {
            Deferred::Nothing => {}
            Deferred::Bytes => {
                let why = stray_input(&mut self.rx);
                self.end_streaming(EndReason::ClientViolation(why));
            }
            Deferred::Closed => self.end_streaming(EndReason::Disconnected(
                "client closed the connection".to_owned(),
            )),
        }
    }

    fn fail_hello(&mut self, failure: HelloFailure, error: ErrorFrame) {
        self.end(
            EndReason::HelloFailed(failure),
            vec![Step::Send(error), Step::Linger],
            None,
        );
    }

    fn refuse(&mut self, error: ErrorFrame) {
        self.end(
            EndReason::Refused,
            vec![Step::Send(error), Step::Linger],
            None,
        );
    }

    /// Ends a connection that holds a claim on an attached session.
    fn end_streaming(&mut self, reason: EndReason) {
        use Step::*;
        let (steps, over) = match &reason {
            EndReason::Completed { .. } => (vec![ReleaseClaim, Complete, Linger], true),
            EndReason::Disconnected(_) => (vec![ReleaseClaim, Detach], false),
            EndReason::ClientViolation(why) => (
                vec![
                    Detach,
                    Send(ErrorFrame::new(ErrorCode::Malformed, why.clone())),
                    ReleaseClaim,
                    Linger,
                ],
                false,
            ),
            EndReason::TakenOver => (vec![Send(taken_over()), ReleaseClaim, Linger], false),
            EndReason::Shutdown => (
                vec![
                    Detach,
                    Send(shutting_down(self.config.store_shared, true)),
                    ReleaseClaim,
                    Linger,
                ],
                false,
            ),
            EndReason::Lost(failure) => {
                let error = match failure {
                    StoreFailure::Expired => ErrorFrame::new(
                        ErrorCode::SessionExpired,
                        "the session expired in the session store while streaming",
                    ),
                    _ => ErrorFrame::new(
                        ErrorCode::SessionUnknown,
                        "the session store no longer has this session (it expired there, \
                         or the store lost its data); it cannot be resumed",
                    ),
                };
                (vec![Send(error), ReleaseClaim, Linger], true)
            }
            EndReason::LeaseUnconfirmed(_) => {
                // Why the store failed is for the operator's log: the
                // peer is not authenticated.
                let ttl = humantime::format_duration(self.config.session_ttl);
                let error = ErrorFrame::new(
                    ErrorCode::StoreUnavailable,
                    format!("store unavailable; resume within {ttl} to continue"),
                );
                // The client first: it can resume elsewhere while the
                // detach waits for the store.
                (vec![Send(error), ReleaseClaim, Linger, Detach], false)
            }
            _ => (Vec::new(), false),
        };
        self.end(reason, steps, Some(over));
    }

    fn end(&mut self, reason: EndReason, steps: Vec<Step>, session_over: Option<bool>) {
        if self.is_ended() {
            return;
        }
        self.phase = Phase::Ended;
        self.rx = BytesMut::new();
        self.ending = Some(Box::new(Ending {
            reason,
            steps,
            session_over,
        }));
    }
}

/// Encodes numbers `from..to` (FINAL if `to` is the session's end).
fn encode_numbers(grant: &Grant, from: u32, to: u32, out: &mut BytesMut) {
    let count = u32::from(grant.count);
    // Indices stay below `count <= 65535`, so they fit a u16.
    let mut numbers = NumberGenerator::starting_at(&grant.seed, from as u16);
    for index in from..to {
        let value = numbers.next_number();
        let frame = if index + 1 == count {
            Frame::Final {
                index: index as u16,
                value,
                checksum: grant.checksum,
            }
        } else {
            Frame::Number {
                index: index as u16,
                value,
            }
        };
        encode_frame(&frame, out);
    }
}

/// Why a decoded hello is refused before anything is looked up, or
/// `None`: a count outside `MIN_COUNT..=MAX_COUNT`, or a nil or max client
/// id (PROTOCOL.md 4.2).
fn invalid_hello(hello: &Hello) -> Option<ErrorFrame> {
    if let Hello::Open(open) = hello
        && !(MIN_COUNT..=MAX_COUNT).contains(&open.count)
    {
        return Some(ErrorFrame::new(
            ErrorCode::CountOutOfRange,
            format!(
                "count must be between {MIN_COUNT} and {MAX_COUNT}, got {}",
                open.count
            ),
        ));
    }
    let client_id = hello.client_id();
    (client_id.is_nil() || client_id.is_max()).then(|| {
        ErrorFrame::new(
            ErrorCode::Malformed,
            "client id must be a UUID other than the nil and max UUIDs",
        )
    })
}

/// The OPEN that `bytes` are, exactly (one whole frame, nothing before or
/// after it), when a [`ServerSession`] would take it to admission; `None`
/// for anything else (a RESUME, part of a frame, more than one, anything
/// malformed or refused by the hello checks).
///
/// For the accept loop: while the server turns new sessions away, an OPEN
/// already waiting in a socket it accepts can be refused there and then
/// (`server_busy`), without a task, a session machine or a trip through a
/// runtime that is running late; anything this does not recognise takes
/// the ordinary path and gets the answer a session machine gives it.
pub fn open_at_door(bytes: &[u8]) -> Option<Open> {
    if bytes.len() != crate::codec::OPEN_FRAME_LEN {
        return None;
    }
    let mut frame = BytesMut::from(bytes);
    match decode_frame(&mut frame) {
        Ok(Some(Frame::Open(open)))
            if frame.is_empty() && invalid_hello(&Hello::Open(open)).is_none() =>
        {
            Some(open)
        }
        _ => None,
    }
}

/// Describes input that arrived while the client had to stay silent, and
/// discards it.
fn stray_input(rx: &mut BytesMut) -> String {
    let len = rx.len();
    let why = match decode_frame(rx) {
        Ok(Some(frame)) => format!(
            "unexpected {} while streaming (only ACK after FINAL is allowed)",
            frame.name()
        ),
        Err(error) => format!("malformed frame: {error}"),
        Ok(None) => format!(
            "{len} stray byte{} while streaming (the client may send nothing but ACK, \
             and only after FINAL)",
            if len == 1 { "" } else { "s" }
        ),
    };
    rx.clear();
    why
}

/// The error for a store refusal of a hello.
pub fn store_error(failure: &StoreFailure, session_ttl: Duration) -> ErrorFrame {
    let ttl = humantime::format_duration(session_ttl);
    match failure {
        StoreFailure::AlreadyExists => ErrorFrame::new(
            ErrorCode::SessionExists,
            "a session for this client id is already open: resume it with its token, or use another client id",
        ),
        StoreFailure::NotFound => ErrorFrame::new(
            ErrorCode::SessionUnknown,
            format!(
                "no such session: it expired after {ttl} without a connection, completed, or never existed"
            ),
        ),
        StoreFailure::Expired => ErrorFrame::new(
            ErrorCode::SessionExpired,
            format!("session expired: it was not resumed within {ttl} of its disconnection"),
        ),
        StoreFailure::BadToken => ErrorFrame::new(
            ErrorCode::BadResumeToken,
            "the resume token does not match this session",
        ),
        StoreFailure::Superseded => taken_over(),
        StoreFailure::Full { max } => ErrorFrame::new(
            ErrorCode::ServerBusy,
            format!("the session store is full ({max} sessions); try again later"),
        ),
        // The detail (the store's own words, addresses, script names) is
        // for the operator's log, not for unauthenticated peers.
        StoreFailure::Unavailable(_) => {
            ErrorFrame::new(ErrorCode::StoreUnavailable, "store unavailable")
        }
        StoreFailure::Corrupt(_) => ErrorFrame::new(ErrorCode::Internal, "internal"),
    }
}

/// The error for a connection that lost its session to a newer one.
pub fn taken_over() -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::TakenOver,
        "a newer connection resumed this session; this one is closed",
    )
}

/// Whether a client should come back depends on whether its session
/// outlives this process, and a connection still before its hello
/// (`attached` false) has no session to lose: even with the in-memory
/// store its OPEN succeeds once a server is back, or on another one.
pub fn shutting_down(store_shared: bool, attached: bool) -> ErrorFrame {
    if store_shared {
        ErrorFrame::new(
            ErrorCode::ShuttingDown,
            "server is draining: resume now on another instance",
        )
        .with_disposition(Disposition::RetryNow)
    } else if !attached {
        ErrorFrame::new(
            ErrorCode::ShuttingDown,
            "server is shutting down before this connection's handshake; retry later",
        )
        .with_disposition(Disposition::Retry)
    } else {
        ErrorFrame::new(
            ErrorCode::ShuttingDown,
            "server is shutting down and its in-memory sessions end with it",
        )
        .with_disposition(Disposition::Final)
    }
}

/// A session as the store creates it for OPEN: its whole-sequence checksum
/// is computed once, here.
pub fn new_grant(client_id: ClientId, count: u16, seed: SessionSeed, token: ResumeToken) -> Grant {
    let checksum = SequenceChecksum::of_session(&seed, count).checksum();
    Grant {
        client_id,
        generation: 1,
        count,
        seed,
        token,
        checksum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ResumeToken;

    const TTL: Duration = Duration::from_secs(30);

    fn config(interval: Duration) -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            interval,
            session_ttl: TTL,
            handshake_timeout: Duration::from_secs(5),
            ack_wait: Duration::from_secs(130),
            lease_renewal_period: TTL / 3,
            store_shared: false,
        })
    }

    fn client() -> ClientId {
        ClientId::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001)
    }

    fn bytes_of(frame: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(frame, &mut out);
        out.to_vec()
    }

    fn open(count: u16) -> Vec<u8> {
        bytes_of(&Frame::Open(Open {
            client_id: client(),
            count,
        }))
    }

    #[test]
    fn only_a_whole_valid_open_is_recognised_at_the_door() {
        assert_eq!(
            open_at_door(&open(40)),
            Some(Open {
                client_id: client(),
                count: 40
            })
        );
        let whole = open(40);
        // Anything a session machine would not take to admission as an
        // OPEN takes the ordinary path, and gets its ordinary answer.
        let resume = bytes_of(&Frame::Resume(Resume {
            client_id: client(),
            token: ResumeToken([1; 16]),
            next_index: 3,
        }));
        let nil = bytes_of(&Frame::Open(Open {
            client_id: ClientId::nil(),
            count: 40,
        }));
        let mut pipelined = whole.clone();
        pipelined.extend_from_slice(&whole);
        let mut version_2 = whole.clone();
        version_2[6] = 2;
        for (what, bytes) in [
            ("a RESUME", resume),
            ("part of an OPEN", whole[..whole.len() - 1].to_vec()),
            ("an OPEN with bytes behind it", pipelined),
            ("an OPEN of count 0", open(0)),
            ("an OPEN from the nil client id", nil),
            ("an OPEN of another version", version_2),
            ("nothing", Vec::new()),
        ] {
            assert_eq!(open_at_door(&bytes), None, "{what}");
        }
    }

    fn grant(count: u16) -> Grant {
        new_grant(
            client(),
            count,
            SessionSeed([7; 32]),
            ResumeToken([0xa0; 16]),
        )
    }

    fn frames(out: &mut BytesMut) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = decode_frame(out).expect("the machine encodes valid frames") {
            frames.push(frame);
        }
        assert!(out.is_empty(), "a partial frame was left over");
        frames
    }

    fn ending_of(session: &mut ServerSession) -> Ending {
        match session.poll_event() {
            Some(Event::Ended(ending)) => ending,
            other => panic!("expected the ending, got {other:?}"),
        }
    }

    fn sent_error(ending: &Ending) -> &ErrorFrame {
        ending
            .steps
            .iter()
            .find_map(|step| match step {
                Step::Send(error) => Some(error),
                _ => None,
            })
            .expect("the plan sends an error")
    }

    /// A connection accepted at `t0` that sent `hello`, was attached with
    /// `grant` and claimed; returns it with the time it started streaming.
    fn streaming(interval: Duration, hello: &[u8], grant: Grant, t0: Instant) -> ServerSession {
        streaming_with(config(interval), hello, grant, t0)
    }

    fn streaming_with(
        config: Arc<SessionConfig>,
        hello: &[u8],
        grant: Grant,
        t0: Instant,
    ) -> ServerSession {
        crate::testing::streaming_session(config, hello, grant, t0)
    }

    fn transmit(session: &mut ServerSession, now: Instant) -> Vec<Frame> {
        let mut out = BytesMut::new();
        while session.poll_transmit(now, &mut out) > 0 {}
        session.handle_flushed(now);
        frames(&mut out)
    }

    #[test]
    fn an_open_is_admitted_claimed_and_welcomed_with_its_first_number_in_one_write() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::from_secs(1)), t0);
        assert_eq!(session.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        // Split anywhere, the hello decodes the same.
        for byte in open(3) {
            session.handle_bytes(t0, &[byte]);
        }
        let Some(Event::Admit(Hello::Open(hello))) = session.poll_event() else {
            panic!("expected the OPEN to be admitted");
        };
        assert_eq!((hello.client_id, hello.count), (client(), 3));
        assert_eq!(
            session.poll_event(),
            None,
            "nothing until the store answers"
        );
        assert_eq!(
            session.poll_timeout(),
            None,
            "the store call has no timer here"
        );
        session.handle_attach(t0, Ok(grant(3)));
        assert_eq!(
            session.poll_event(),
            Some(Event::Claim {
                client_id: client(),
                generation: 1
            })
        );
        session.handle_claim(t0, true);
        let sent = transmit(&mut session, t0);
        let Frame::Welcome(welcome) = &sent[0] else {
            panic!("WELCOME first, got {sent:?}");
        };
        assert_eq!(
            (
                welcome.count,
                welcome.next_index,
                welcome.interval_us,
                welcome.session_ttl_ms
            ),
            (3, 0, 1_000_000, 30_000)
        );
        assert_eq!(
            sent[1],
            Frame::Number {
                index: 0,
                value: crate::number_at(&SessionSeed([7; 32]), 0)
            }
        );
        assert_eq!(sent.len(), 2);
        assert_eq!(session.written_up_to(), 1);
    }

    #[test]
    fn numbers_follow_an_absolute_schedule_and_overdue_ones_go_back_to_back() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut session = streaming(second, &open(5), grant(5), t0);
        assert_eq!(transmit(&mut session, t0).len(), 2);
        assert_eq!(session.poll_timeout(), Some(t0 + second));
        assert!(
            transmit(&mut session, t0 + second / 2).is_empty(),
            "not due yet"
        );
        // A wake-up 2.5 s late: numbers 1 and 2 are overdue and go at once;
        // number 3 stays due at t0 + 3 s, not 3 s after this write.
        let sent = transmit(&mut session, t0 + second * 2 + second / 2);
        assert!(matches!(
            sent[..],
            [
                Frame::Number { index: 1, .. },
                Frame::Number { index: 2, .. }
            ]
        ));
        assert_eq!(session.poll_timeout(), Some(t0 + second * 3));
        let sent = transmit(&mut session, t0 + second * 4);
        assert!(matches!(
            sent[..],
            [
                Frame::Number { index: 3, .. },
                Frame::Final { index: 4, .. }
            ]
        ));
    }

    #[test]
    fn burst_mode_sends_batches_until_final() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::ZERO, &open(3000), grant(3000), t0);
        let mut out = BytesMut::new();
        assert_eq!(session.poll_transmit(t0, &mut out), BURST_BATCH);
        assert_eq!(session.poll_transmit(t0, &mut out), BURST_BATCH);
        assert_eq!(session.poll_transmit(t0, &mut out), 3000 - 2 * BURST_BATCH);
        assert_eq!(session.poll_transmit(t0, &mut out), 0);
        let sent = frames(&mut out);
        assert_eq!(sent.len(), 3001);
        assert_eq!(
            sent[3000],
            Frame::Final {
                index: 2999,
                value: crate::number_at(&SessionSeed([7; 32]), 2999),
                checksum: grant(3000).checksum
            }
        );
    }

    #[test]
    fn a_long_interval_is_bridged_by_heartbeats_every_five_seconds() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(12);
        // A lease long enough that no renewal falls in between.
        let mut config = (*config(interval)).clone();
        config.session_ttl = Duration::from_secs(300);
        config.lease_renewal_period = Duration::from_secs(100);
        let mut session = streaming_with(Arc::new(config), &open(2), grant(2), t0);
        transmit(&mut session, t0);
        let five = MAX_SERVER_SILENCE;
        assert_eq!(session.poll_timeout(), Some(t0 + five));
        assert_eq!(transmit(&mut session, t0 + five), vec![Frame::Heartbeat]);
        assert_eq!(session.poll_timeout(), Some(t0 + five * 2));
        assert_eq!(
            transmit(&mut session, t0 + five * 2),
            vec![Frame::Heartbeat]
        );
        // The number is due before the next heartbeat would be.
        assert_eq!(session.poll_timeout(), Some(t0 + interval));
        let sent = transmit(&mut session, t0 + interval);
        assert!(matches!(sent[..], [Frame::Final { index: 1, .. }]));
    }

    #[test]
    fn no_heartbeat_is_needed_when_the_interval_is_at_most_five_seconds() {
        let t0 = Instant::now();
        let interval = MAX_SERVER_SILENCE;
        let mut session = streaming(interval, &open(3), grant(3), t0);
        transmit(&mut session, t0);
        let sent = transmit(&mut session, t0 + interval);
        assert!(matches!(sent[..], [Frame::Number { index: 1, .. }]));
    }

    #[test]
    fn an_ack_after_final_completes_even_when_split() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::ZERO, &open(3), grant(3), t0);
        let sent = transmit(&mut session, t0);
        let Some(Frame::Final { checksum, .. }) = sent.last() else {
            panic!("burst of 3 ends with FINAL");
        };
        let ack = bytes_of(&Frame::Ack {
            client_checksum: *checksum,
        });
        session.handle_bytes(t0, &ack[..5]);
        assert_eq!(session.poll_event(), None, "half an ACK after FINAL waits");
        session.handle_bytes(t0, &ack[5..]);
        let ending = ending_of(&mut session);
        assert_eq!(
            ending.reason,
            EndReason::Completed {
                client_checksum: *checksum,
                server_checksum: *checksum
            }
        );
        assert_eq!(
            ending.steps,
            vec![Step::ReleaseClaim, Step::Complete, Step::Linger]
        );
        assert_eq!(ending.session_over, Some(true));
    }

    #[test]
    fn any_byte_before_final_is_malformed_even_the_start_of_an_ack() {
        let t0 = Instant::now();
        let ack = bytes_of(&Frame::Ack { client_checksum: 1 });
        for stray in [&ack[..1], &ack[..3], &ack[..5], &ack[..8]] {
            let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
            transmit(&mut session, t0);
            session.handle_bytes(t0, stray);
            let ending = ending_of(&mut session);
            let EndReason::ClientViolation(why) = &ending.reason else {
                panic!("expected a violation, got {:?}", ending.reason);
            };
            assert!(why.contains("stray byte"), "{why}");
            assert_eq!(
                ending.steps,
                vec![
                    Step::Detach,
                    Step::Send(ErrorFrame::new(ErrorCode::Malformed, why.clone())),
                    Step::ReleaseClaim,
                    Step::Linger
                ]
            );
            // The rest of that ACK after FINAL changes nothing: it is over.
            assert!(transmit(&mut session, t0 + Duration::from_secs(9)).is_empty());
            session.handle_bytes(t0, &ack[stray.len()..]);
            assert_eq!(session.poll_event(), None);
        }
    }

    #[test]
    fn a_complete_ack_while_streaming_is_named_in_the_error() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
        transmit(&mut session, t0);
        session.handle_bytes(t0, &bytes_of(&Frame::Ack { client_checksum: 1 }));
        let ending = ending_of(&mut session);
        assert_eq!(
            sent_error(&ending).message,
            "unexpected ACK while streaming (only ACK after FINAL is allowed)"
        );
        let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
        transmit(&mut session, t0);
        session.handle_bytes(t0, &[0, 0, 0, 0]);
        assert_eq!(
            sent_error(&ending_of(&mut session)).message,
            "malformed frame: frame length 0: a frame carries at least its type byte"
        );
    }

    #[test]
    fn anything_but_ack_after_final_is_malformed() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::ZERO, &open(2), grant(2), t0);
        transmit(&mut session, t0);
        session.handle_bytes(t0, &open(2));
        let ending = ending_of(&mut session);
        assert_eq!(
            ending.reason,
            EndReason::ClientViolation(
                "unexpected OPEN while streaming (only ACK after FINAL is allowed)".into()
            )
        );
        assert_eq!(ending.steps[0], Step::Detach);
    }

    #[test]
    fn a_frame_pipelined_behind_the_hello_is_answered_after_the_first_number() {
        let t0 = Instant::now();
        let mut hello = open(3);
        hello.extend(bytes_of(&Frame::Ack { client_checksum: 9 }));
        let mut session = streaming(Duration::ZERO, &hello, grant(3), t0);
        // WELCOME and the first batch (here all of it, FINAL included) go
        // out as always; the pipelined bytes were received before FINAL.
        let sent = transmit(&mut session, t0);
        assert!(matches!(
            sent[..],
            [
                Frame::Welcome(_),
                Frame::Number { .. },
                Frame::Number { .. },
                Frame::Final { .. }
            ]
        ));
        let ending = ending_of(&mut session);
        assert_eq!(
            ending.reason,
            EndReason::ClientViolation(
                "unexpected ACK while streaming (only ACK after FINAL is allowed)".into()
            )
        );
        assert_eq!(ending.steps[0], Step::Detach, "the session stays resumable");
    }

    #[test]
    fn bytes_sent_while_the_store_is_asked_are_judged_after_the_first_number() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::from_secs(1)), t0);
        session.handle_bytes(t0, &open(3));
        assert!(matches!(session.poll_event(), Some(Event::Admit(_))));
        session.handle_bytes(t0, &[0x42]);
        session.handle_attach(t0, Ok(grant(3)));
        assert!(matches!(session.poll_event(), Some(Event::Claim { .. })));
        session.handle_claim(t0, true);
        assert_eq!(transmit(&mut session, t0).len(), 2);
        let EndReason::ClientViolation(why) = ending_of(&mut session).reason else {
            panic!("expected a violation");
        };
        assert!(why.starts_with("1 stray byte while streaming"), "{why}");
    }

    #[test]
    fn a_close_while_the_store_is_asked_detaches_after_the_first_number() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::from_secs(1)), t0);
        session.handle_bytes(t0, &open(3));
        session.poll_event();
        session.handle_closed(t0, None);
        session.handle_attach(t0, Ok(grant(3)));
        session.poll_event();
        session.handle_claim(t0, true);
        transmit(&mut session, t0);
        let ending = ending_of(&mut session);
        assert!(matches!(ending.reason, EndReason::Disconnected(_)));
        assert_eq!(ending.steps, vec![Step::ReleaseClaim, Step::Detach]);
    }

    #[test]
    fn no_hello_in_time_is_a_handshake_timeout() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::from_secs(1)), t0);
        session.handle_bytes(t0, &open(3)[..10]);
        session.handle_timeout(t0 + Duration::from_millis(4999));
        assert_eq!(session.poll_event(), None);
        session.handle_timeout(t0 + Duration::from_secs(5));
        let ending = ending_of(&mut session);
        assert_eq!(ending.reason, EndReason::HelloFailed(HelloFailure::Timeout));
        let error = sent_error(&ending);
        assert_eq!(error.code, ErrorCode::HandshakeTimeout);
        assert_eq!(error.disposition, Disposition::Retry);
        assert_eq!(error.message, "no complete OPEN or RESUME within 5s");
        assert_eq!(ending.session_over, None);
    }

    #[test]
    fn a_close_or_read_error_before_the_hello_ends_silently() {
        for (error, failure) in [
            (None, HelloFailure::Closed),
            (Some("reset".to_owned()), HelloFailure::IoError),
        ] {
            let t0 = Instant::now();
            let mut session = ServerSession::new(config(Duration::ZERO), t0);
            session.handle_closed(t0, error);
            let ending = ending_of(&mut session);
            assert_eq!(ending.reason, EndReason::HelloFailed(failure));
            assert!(ending.steps.is_empty(), "nothing is sent to a closed peer");
        }
    }

    #[test]
    fn bad_hellos_get_their_codes() {
        let nil = bytes_of(&Frame::Open(Open {
            client_id: ClientId::nil(),
            count: 3,
        }));
        let max_resume = bytes_of(&Frame::Resume(Resume {
            client_id: ClientId::max(),
            token: ResumeToken([1; 16]),
            next_index: 0,
        }));
        let cases: [(&[u8], EndReason, ErrorCode, &str); 6] = [
            (
                &[0, 0, 0, 0],
                EndReason::HelloFailed(HelloFailure::Malformed),
                ErrorCode::Malformed,
                "malformed handshake: frame length 0",
            ),
            (
                &[0, 0, 0, 3, 1, 0, 2],
                EndReason::HelloFailed(HelloFailure::UnsupportedVersion),
                ErrorCode::UnsupportedVersion,
                "protocol version 2 is not supported",
            ),
            (
                &[0, 0, 0, 5, 3, 0, 0, 0, 0],
                EndReason::HelloFailed(HelloFailure::UnexpectedFrame),
                ErrorCode::Malformed,
                "expected OPEN or RESUME, got ACK",
            ),
            (
                &open(0),
                EndReason::Refused,
                ErrorCode::CountOutOfRange,
                "count must be between 1 and 65535, got 0",
            ),
            (
                &nil,
                EndReason::Refused,
                ErrorCode::Malformed,
                "client id must be a UUID other than the nil and max UUIDs",
            ),
            (
                &max_resume,
                EndReason::Refused,
                ErrorCode::Malformed,
                "client id must be a UUID other than the nil and max UUIDs",
            ),
        ];
        for (input, reason, code, message) in cases {
            let t0 = Instant::now();
            let mut session = ServerSession::new(config(Duration::ZERO), t0);
            session.handle_bytes(t0, input);
            let ending = ending_of(&mut session);
            assert_eq!(ending.reason, reason, "{input:02x?}");
            let error = sent_error(&ending);
            assert_eq!(error.code, code);
            assert!(error.message.starts_with(message), "{}", error.message);
            assert_eq!(ending.steps.last(), Some(&Step::Linger));
        }
    }

    #[test]
    fn store_refusals_map_to_wire_errors() {
        let cases = [
            (
                StoreFailure::AlreadyExists,
                ErrorCode::SessionExists,
                Disposition::Final,
            ),
            (
                StoreFailure::NotFound,
                ErrorCode::SessionUnknown,
                Disposition::Final,
            ),
            (
                StoreFailure::Expired,
                ErrorCode::SessionExpired,
                Disposition::Final,
            ),
            (
                StoreFailure::BadToken,
                ErrorCode::BadResumeToken,
                Disposition::Final,
            ),
            (
                StoreFailure::Superseded,
                ErrorCode::TakenOver,
                Disposition::Final,
            ),
            (
                StoreFailure::Full { max: 7 },
                ErrorCode::ServerBusy,
                Disposition::Retry,
            ),
            (
                StoreFailure::Unavailable("redis at 10.1.2.3:6379 refused".into()),
                ErrorCode::StoreUnavailable,
                Disposition::Retry,
            ),
            (
                StoreFailure::Corrupt("field seed of ns:s:1 is not hex".into()),
                ErrorCode::Internal,
                Disposition::Retry,
            ),
        ];
        for (failure, code, disposition) in cases {
            let t0 = Instant::now();
            let mut session = ServerSession::new(config(Duration::ZERO), t0);
            session.handle_bytes(t0, &open(3));
            session.poll_event();
            session.handle_attach(t0, Err(AttachFailure::Store(failure.clone())));
            let ending = ending_of(&mut session);
            assert_eq!(ending.reason, EndReason::Refused);
            let error = sent_error(&ending);
            assert_eq!(
                (error.code, error.disposition),
                (code, disposition),
                "{failure:?}"
            );
            // The store's own words stay in the operator's log.
            if let StoreFailure::Unavailable(detail) | StoreFailure::Corrupt(detail) = &failure {
                assert!(
                    !error.message.contains(detail.as_str()),
                    "{}",
                    error.message
                );
                assert!(!error.message.contains("ns:s:") && !error.message.contains("10.1.2.3"));
            }
        }
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::ZERO), t0);
        session.handle_bytes(t0, &open(3));
        session.poll_event();
        let quota = ErrorFrame::new(ErrorCode::ServerBusy, "quota");
        session.handle_attach(t0, Err(AttachFailure::Refused(quota.clone())));
        assert_eq!(sent_error(&ending_of(&mut session)), &quota);
    }

    #[test]
    fn a_lost_claim_is_taken_over_before_streaming() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::ZERO), t0);
        session.handle_bytes(t0, &open(3));
        session.poll_event();
        session.handle_attach(t0, Ok(grant(3)));
        session.poll_event();
        session.handle_claim(t0, false);
        let ending = ending_of(&mut session);
        assert_eq!(ending.reason, EndReason::ClaimLost);
        assert_eq!(ending.steps, vec![Step::Send(taken_over()), Step::Linger]);
        assert!(transmit(&mut session, t0).is_empty());
    }

    #[test]
    fn a_resume_past_the_end_detaches_and_says_so() {
        let t0 = Instant::now();
        let resume = bytes_of(&Frame::Resume(Resume {
            client_id: client(),
            token: ResumeToken([0xa0; 16]),
            next_index: 3,
        }));
        let mut session = ServerSession::new(config(Duration::ZERO), t0);
        session.handle_bytes(t0, &resume);
        assert!(matches!(
            session.poll_event(),
            Some(Event::Admit(Hello::Resume(_)))
        ));
        assert!(session.resumed());
        let mut attached = grant(3);
        attached.generation = 2;
        session.handle_attach(t0, Ok(attached));
        session.poll_event();
        session.handle_claim(t0, true);
        let ending = ending_of(&mut session);
        assert_eq!(ending.reason, EndReason::ResumeIndexOutOfRange);
        let error = sent_error(&ending).clone();
        assert_eq!(
            error.message,
            "resume index 3 is out of range: the session has 3 numbers, indices 0..=2"
        );
        assert_eq!(
            ending.steps,
            vec![
                Step::Detach,
                Step::ReleaseClaim,
                Step::Send(error),
                Step::Linger
            ]
        );
    }

    #[test]
    fn a_resume_starts_at_its_index() {
        let t0 = Instant::now();
        let resume = bytes_of(&Frame::Resume(Resume {
            client_id: client(),
            token: ResumeToken([0xa0; 16]),
            next_index: 1,
        }));
        let mut session = streaming(Duration::from_secs(1), &resume, grant(3), t0);
        let sent = transmit(&mut session, t0);
        assert!(
            matches!(&sent[..], [Frame::Welcome(w), Frame::Number { index: 1, .. }] if w.next_index == 1)
        );
    }

    #[test]
    fn shutdown_before_the_hello_depends_on_the_store() {
        for (shared, disposition) in [(false, Disposition::Retry), (true, Disposition::RetryNow)] {
            let t0 = Instant::now();
            let mut config = (*config(Duration::ZERO)).clone();
            config.store_shared = shared;
            let mut session = ServerSession::new(Arc::new(config), t0);
            session.handle_shutdown(t0);
            let ending = ending_of(&mut session);
            assert_eq!(
                ending.reason,
                EndReason::HelloFailed(HelloFailure::ShuttingDown)
            );
            assert_eq!(sent_error(&ending).disposition, disposition);
        }
    }

    #[test]
    fn shutdown_while_streaming_detaches_and_is_final_with_an_in_memory_store() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
        transmit(&mut session, t0);
        session.handle_shutdown(t0);
        let ending = ending_of(&mut session);
        assert_eq!(ending.reason, EndReason::Shutdown);
        assert_eq!(
            ending.steps,
            vec![
                Step::Detach,
                Step::Send(shutting_down(false, true)),
                Step::ReleaseClaim,
                Step::Linger
            ]
        );
        assert_eq!(shutting_down(false, true).disposition, Disposition::Final);
    }

    #[test]
    fn shutdown_while_the_store_is_asked_lets_the_attach_finish_first() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::from_secs(1)), t0);
        session.handle_bytes(t0, &open(3));
        session.poll_event();
        session.handle_shutdown(t0);
        assert_eq!(session.poll_event(), None);
        session.handle_attach(t0, Ok(grant(3)));
        session.poll_event();
        session.handle_claim(t0, true);
        assert_eq!(transmit(&mut session, t0).len(), 2);
        assert_eq!(ending_of(&mut session).reason, EndReason::Shutdown);
    }

    #[test]
    fn a_takeover_while_streaming_sends_taken_over_without_detaching() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
        transmit(&mut session, t0);
        session.handle_takeover(t0);
        let ending = ending_of(&mut session);
        assert_eq!(ending.reason, EndReason::TakenOver);
        assert_eq!(
            ending.steps,
            vec![Step::Send(taken_over()), Step::ReleaseClaim, Step::Linger]
        );
    }

    #[test]
    fn a_close_while_streaming_detaches_without_a_frame() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
        transmit(&mut session, t0);
        session.handle_closed(t0, Some("reset".into()));
        let ending = ending_of(&mut session);
        assert_eq!(
            ending.reason,
            EndReason::Disconnected("read failed: reset".into())
        );
        assert_eq!(ending.steps, vec![Step::ReleaseClaim, Step::Detach]);
        assert_eq!(ending.session_over, Some(false));
    }

    #[test]
    fn no_ack_within_the_ack_wait_of_writing_final_detaches() {
        let t0 = Instant::now();
        // A lease long enough that no renewal falls in the wait.
        let mut config = (*config(Duration::ZERO)).clone();
        config.session_ttl = Duration::from_secs(3600);
        config.lease_renewal_period = Duration::from_secs(1200);
        let mut session = streaming_with(Arc::new(config), &open(2), grant(2), t0);
        let mut out = BytesMut::new();
        while session.poll_transmit(t0, &mut out) > 0 {}
        // The wait counts from the write, not from encoding.
        assert_eq!(session.poll_timeout(), lease_deadline(&session));
        let written = t0 + Duration::from_secs(3);
        session.handle_flushed(written);
        let ack_wait = Duration::from_secs(130);
        session.handle_timeout(written + ack_wait - Duration::from_millis(1));
        assert_eq!(session.poll_event(), None);
        session.handle_timeout(written + ack_wait);
        let ending = ending_of(&mut session);
        assert_eq!(
            ending.reason,
            EndReason::Disconnected("no ACK within 2m 10s of FINAL".into())
        );
        assert_eq!(ending.steps, vec![Step::ReleaseClaim, Step::Detach]);
    }

    /// Streams a long session and returns it with the instant its lease
    /// was granted and its first renewal's time.
    fn leased(t0: Instant) -> (ServerSession, Instant) {
        let mut session = streaming(Duration::from_secs(1), &open(1000), grant(1000), t0);
        transmit(&mut session, t0);
        let period = TTL / 3;
        let first = t0 + period - spread(period / 10, client());
        (session, first)
    }

    fn lease_deadline(session: &ServerSession) -> Option<Instant> {
        match &session.phase {
            Phase::Streaming(stream) => stream.lease.deadline(),
            _ => None,
        }
    }

    fn renew_at(session: &mut ServerSession, at: Instant) {
        session.handle_timeout(at);
        assert_eq!(
            session.poll_event(),
            Some(Event::Renew {
                client_id: client(),
                generation: 1
            })
        );
    }

    #[test]
    fn the_lease_is_renewed_every_period_from_the_last_renewal_sent() {
        let t0 = Instant::now();
        let (mut session, first) = leased(t0);
        session.handle_timeout(first - Duration::from_millis(1));
        assert_eq!(session.poll_event(), None);
        renew_at(&mut session, first);
        // Answered late: the next renewal still counts from when it was sent.
        session.handle_renewal(first + Duration::from_secs(2), Ok(()));
        renew_at(&mut session, first + TTL / 3);
    }

    #[test]
    fn a_renewal_told_of_a_newer_generation_is_a_takeover() {
        let t0 = Instant::now();
        let (mut session, first) = leased(t0);
        renew_at(&mut session, first);
        session.handle_renewal(first, Err(StoreFailure::Superseded));
        let ending = ending_of(&mut session);
        assert_eq!(ending.reason, EndReason::TakenOver);
        assert!(!ending.steps.contains(&Step::Detach));
    }

    #[test]
    fn a_renewal_that_finds_the_session_gone_ends_it_for_good() {
        for (failure, code) in [
            (StoreFailure::NotFound, ErrorCode::SessionUnknown),
            (StoreFailure::Expired, ErrorCode::SessionExpired),
        ] {
            let t0 = Instant::now();
            let (mut session, first) = leased(t0);
            renew_at(&mut session, first);
            session.handle_renewal(first, Err(failure.clone()));
            let ending = ending_of(&mut session);
            assert_eq!(ending.reason, EndReason::Lost(failure));
            assert_eq!(sent_error(&ending).code, code);
            assert_eq!(ending.session_over, Some(true));
            assert!(!ending.steps.contains(&Step::Detach));
        }
    }

    #[test]
    fn failed_renewals_are_retried_soon_and_stop_the_stream_at_two_thirds() {
        let t0 = Instant::now();
        let (mut session, first) = leased(t0);
        let down = || Err(StoreFailure::Unavailable("connection refused".into()));
        renew_at(&mut session, first);
        session.handle_renewal(first, down());
        let retry = lease_deadline(&session).expect("a retry is scheduled");
        assert!(
            retry > first && retry <= first + LEASE_RETRY_AFTER,
            "{retry:?}"
        );
        let stop_at = t0 + TTL - TTL / 3;
        let mut now = retry;
        while now < stop_at {
            renew_at(&mut session, now);
            session.handle_renewal(now, down());
            now = lease_deadline(&session).expect("a deadline");
        }
        assert_eq!(now, stop_at, "the stop deadline is never overshot");
        session.handle_timeout(now);
        let ending = ending_of(&mut session);
        assert_eq!(
            ending.reason,
            EndReason::LeaseUnconfirmed(
                "the session store is unavailable: connection refused".into()
            )
        );
        let error = sent_error(&ending).clone();
        assert_eq!(error.code, ErrorCode::StoreUnavailable);
        assert_eq!(
            ending.steps,
            vec![
                Step::Send(error),
                Step::ReleaseClaim,
                Step::Linger,
                Step::Detach
            ],
            "the client is told first; the detach may wait for the store"
        );
    }

    #[test]
    fn a_short_outage_is_ridden_through() {
        let t0 = Instant::now();
        let (mut session, first) = leased(t0);
        renew_at(&mut session, first);
        session.handle_renewal(first, Err(StoreFailure::Unavailable("blip".into())));
        let retry = lease_deadline(&session).expect("a retry is scheduled");
        renew_at(&mut session, retry);
        session.handle_renewal(retry, Ok(()));
        // Confirmed again: the next renewal is a period after this one and
        // the stop deadline two thirds of the lease after it.
        assert_eq!(lease_deadline(&session), Some(retry + TTL / 3));
        session.handle_timeout(t0 + TTL - TTL / 3);
        assert_eq!(session.poll_event(), None);
        assert!(session.is_streaming());
    }

    #[test]
    fn renewals_of_sessions_opened_together_are_spread_out() {
        let period = TTL / 3;
        let mut offsets: Vec<Duration> = (0u128..64)
            .map(|i| {
                spread(
                    period / 10,
                    ClientId::from_u128(i * 0x9e37_79b9_7f4a_7c15_u128),
                )
            })
            .collect();
        offsets.sort();
        offsets.dedup();
        assert!(
            offsets.len() > 48,
            "{} distinct offsets of 64",
            offsets.len()
        );
        assert!(offsets.iter().all(|offset| *offset < period / 10));
    }

    #[test]
    fn a_renewal_unanswered_at_the_deadline_stops_the_stream() {
        let t0 = Instant::now();
        let (mut session, first) = leased(t0);
        renew_at(&mut session, first);
        let stop_at = t0 + TTL - TTL / 3;
        assert_eq!(session.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        session.handle_timeout(stop_at);
        assert!(matches!(
            ending_of(&mut session).reason,
            EndReason::LeaseUnconfirmed(why) if why.contains("did not answer")
        ));
    }

    #[test]
    fn a_lease_that_aged_unrenewed_gets_one_renewal_whose_answer_decides() {
        let t0 = Instant::now();
        let mut session = ServerSession::new(config(Duration::from_secs(1)), t0);
        session.handle_bytes(t0, &open(1000));
        session.poll_event();
        session.handle_attach(t0, Ok(grant(1000)));
        session.poll_event();
        // The claim took longer than the lease's two thirds.
        let late = t0 + TTL;
        session.handle_claim(late, true);
        transmit(&mut session, late);
        renew_at(&mut session, late);
        session.handle_timeout(late + Duration::from_secs(1));
        assert_eq!(session.poll_event(), None, "the late renewal is awaited");
        session.handle_renewal(late + Duration::from_secs(1), Ok(()));
        assert_eq!(session.poll_event(), None);
        assert!(session.is_streaming());
    }

    #[test]
    fn the_ending_is_reported_once_and_later_input_is_ignored() {
        let t0 = Instant::now();
        let mut session = streaming(Duration::from_secs(1), &open(3), grant(3), t0);
        transmit(&mut session, t0);
        session.handle_takeover(t0);
        session.handle_shutdown(t0);
        session.handle_bytes(t0, b"junk");
        assert_eq!(ending_of(&mut session).reason, EndReason::TakenOver);
        assert_eq!(session.poll_event(), None);
        assert_eq!(session.poll_timeout(), None);
        assert!(session.is_ended());
    }
}
