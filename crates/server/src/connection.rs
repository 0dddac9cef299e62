//! One client connection from first byte to close: the handshake (OPEN or
//! RESUME), streaming on schedule, the FINAL/ACK exchange, and what the
//! store is told when the connection ends.
//!
//! Every wait in here is raced against the three things that can end it
//! early: the client (EOF, errors, unexpected frames), a takeover by a newer
//! connection, and server shutdown. Every wait is also bounded in time, so a
//! silent or hostile peer cannot hold a task forever.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use numstream_protocol::codec::{CodecError, DecodeError, FrameCodec};
use numstream_protocol::prng::NumberGenerator;
use numstream_protocol::{
    Disposition, ErrorCode, ErrorFrame, Frame, MAX_COUNT, MAX_SERVER_SILENCE, MIN_COUNT, Open,
    Resume, ResumeToken, SessionSeed, Welcome, encode_frame,
};
use numstream_store::{Attachment, NewSession, SessionStore, StoreError};

use crate::config::ServerConfig;
use crate::digest::LogDigest;
use crate::lease::{Lease, LeaseLoss};
use crate::peers::{PeerKey, PeerTicket, Peers};
use crate::registry::{Claim, Registry};
use crate::telemetry::{AdmissionRefusal, GaugeGuard, HandshakeFailure, Telemetry};

/// State shared by every connection of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) registry: Registry,
    pub(crate) shutdown: CancellationToken,
    pub(crate) telemetry: Telemetry,
    /// What each source address holds, against its quotas.
    pub(crate) peers: Arc<Peers>,
    /// Tallies of failed handshakes and refusals, logged periodically.
    pub(crate) digest: Arc<LogDigest>,
    /// Whether new sessions are refused for lack of capacity.
    pub(crate) overload: Arc<crate::overload::Overload>,
    /// Options every connection's socket needs.
    pub(crate) socket_options: crate::socket::SocketOptions,
    /// Whether accepted sockets inherit them from the listener, where they
    /// were set once (then only connections the kernel had queued before
    /// that need them set).
    pub(crate) socket_options_inherited: bool,
}

/// Numbers encoded per write in burst mode (interval 0): large enough to
/// amortise the syscall, small enough to notice a takeover promptly.
const BURST_BATCH: u32 = 1024;

/// Time allowed to deliver a rejection before closing anyway.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes and time spent draining a rejected client's input before closing,
/// so the kernel sends FIN rather than RST and the error frame is not lost.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_millis(500);

/// Why streaming stopped.
#[derive(Debug)]
enum SessionEnd {
    /// FINAL was delivered and acknowledged.
    Completed {
        client_checksum: u32,
        server_checksum: u32,
    },
    /// The connection broke or went quiet; the session waits for a resume.
    Disconnected(String),
    /// The client sent something it must not send while streaming.
    ClientViolation(String),
    /// A newer connection owns the session now.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// The store no longer has this session (it expired under us, or the
    /// store lost its data).
    Lost(StoreError),
    /// The lease could not be renewed in time: another instance may own
    /// the session by now, so this one must stop.
    LeaseUnconfirmed(String),
}

impl From<LeaseLoss> for SessionEnd {
    fn from(loss: LeaseLoss) -> Self {
        match loss {
            LeaseLoss::Superseded => SessionEnd::TakenOver,
            LeaseLoss::Gone(error) => SessionEnd::Lost(error),
            LeaseLoss::Unconfirmed(why) => SessionEnd::LeaseUnconfirmed(why),
        }
    }
}

/// What an admitted connection holds until it ends: its place under the
/// connection limit, under its address's quotas, and its count in the
/// open-connections gauge.
pub(crate) struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _open: GaugeGuard,
    ticket: PeerTicket,
    /// When the hello must be in: the handshake timeout counts from
    /// accept, so a TLS handshake before it spends the same allowance.
    pub(crate) handshake_deadline: Instant,
}

impl Admission {
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        open: GaugeGuard,
        ticket: PeerTicket,
        handshake_deadline: Instant,
    ) -> Self {
        Self {
            _permit: permit,
            _open: open,
            ticket,
            handshake_deadline,
        }
    }
}

impl Shared {
    /// Counts a connection that never produced a valid hello, for the
    /// metrics and the periodic digest (each also gets a debug line).
    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure, peer: PeerKey) {
        self.telemetry.handshake_failed(reason);
        self.digest.handshake_failed(reason, peer);
    }

    /// Counts a connection or an OPEN turned away at admission.
    pub(crate) fn admission_refused(&self, reason: AdmissionRefusal, peer: PeerKey) {
        self.telemetry.admission_refused(reason);
        self.digest.refused(reason, peer);
    }
}

/// Serves one accepted connection to the end, over any byte stream (plain
/// TCP, or TLS once `transport` has done its handshake; socket options are
/// set there too).
///
/// Not an `async fn`: the connection is built here, so the returned future
/// captures it once. An async fn's arguments, and anything they are moved
/// into, would each keep their own slot for the task's whole life, and
/// this future is what every connection costs in memory.
pub(crate) fn serve<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admission: Admission,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let mut connection = Connection {
        // Handshake frames are tiny; a small initial buffer keeps idle
        // connections cheap.
        reader: FramedRead::with_capacity(read, FrameCodec, 64),
        writer: Writer {
            half: write,
            buf: BytesMut::with_capacity(64),
        },
        shared,
        sent_up_to: 0,
        admission,
    };
    async move {
        let span = info_span!(
            "conn",
            %peer,
            client_id = tracing::field::Empty,
            generation = tracing::field::Empty
        );
        connection.run().instrument(span).await;
    }
}

/// Writes that first accumulate encoded frames, then go out in one syscall.
struct Writer<S> {
    half: WriteHalf<S>,
    buf: BytesMut,
}

impl<S: AsyncWrite> Writer<S> {
    fn push(&mut self, frame: &Frame) {
        encode_frame(frame, &mut self.buf);
    }

    /// Writes what the stream takes without waiting; true once the buffer
    /// is empty and flushed (TLS holds written records until flushed).
    fn try_flush(&mut self) -> io::Result<bool> {
        use bytes::Buf;
        use std::task::{Context, Poll};
        // One poll with a waker that does nothing: the stream's
        // non-blocking write. A later `flush` registers the real waker.
        let mut context = Context::from_waker(std::task::Waker::noop());
        let mut half = std::pin::Pin::new(&mut self.half);
        while !self.buf.is_empty() {
            match half.as_mut().poll_write(&mut context, &self.buf) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(written)) => self.buf.advance(written),
                Poll::Ready(Err(error)) => return Err(error),
                Poll::Pending => return Ok(false),
            }
        }
        match half.poll_flush(&mut context) {
            Poll::Ready(result) => result.map(|()| true),
            Poll::Pending => Ok(false),
        }
    }

    /// Cancel-safe: bytes already written are removed from the buffer.
    async fn flush(&mut self) -> io::Result<()> {
        self.half.write_all_buf(&mut self.buf).await?;
        self.half.flush().await
    }
}

struct Connection<S> {
    reader: FramedRead<ReadHalf<S>, FrameCodec>,
    writer: Writer<S>,
    shared: Arc<Shared>,
    /// Index after the last number this connection wrote.
    sent_up_to: u16,
    admission: Admission,
}

/// A handshake the store accepted.
struct Accepted {
    attachment: Attachment,
    /// First index to send.
    start: u16,
    resumed: bool,
    /// When the store was asked: the lease counts from then.
    requested: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync> Connection<S> {
    async fn run(&mut self) {
        let Accepted {
            attachment,
            start,
            resumed,
            requested,
        } = match self.handshake().await {
            Ok(accepted) => accepted,
            Err(Some(error)) => return self.reject(error).await,
            Err(None) => return,
        };
        let span = tracing::Span::current();
        span.record("generation", attachment.generation);
        if !resumed {
            self.shared.telemetry.session_created();
        }

        let Some(claim) = Box::pin(
            self.shared
                .registry
                .claim(attachment.client_id, attachment.generation),
        )
        .await
        else {
            info!("session taken over before streaming started");
            self.shared
                .peers
                .session_detached(attachment.client_id, self.shared.config.session_ttl);
            return self.reject(taken_over()).await;
        };

        if start >= attachment.count {
            // The token was right, so this RESUME did take the session over;
            // hand it straight back to the store for a correct resume.
            self.detach(&attachment).await;
            drop(claim);
            self.shared
                .registry
                .release(attachment.client_id, attachment.generation);
            self.shared
                .peers
                .session_detached(attachment.client_id, self.shared.config.session_ttl);
            let error = ErrorFrame::new(
                ErrorCode::ResumeIndexOutOfRange,
                format!(
                    "resume index {start} is out of range: the session has {} numbers, indices 0..={}",
                    attachment.count,
                    attachment.count - 1
                ),
            );
            return self.reject(error).await;
        }

        let telemetry = self.shared.telemetry.clone();
        let attached = telemetry.session_attached();
        if resumed {
            info!(
                next_index = start,
                count = attachment.count,
                "session resumed"
            );
            telemetry.session_resumed(attachment.client_id, attachment.generation, start);
        } else {
            info!(count = attachment.count, "session opened");
        }

        let mut lease = Lease::new(
            self.shared.store.clone(),
            &attachment,
            &self.shared.config,
            requested,
        );
        let end = self
            .stream(&attachment, start, &claim.stop, &mut lease)
            .await;
        self.shared
            .registry
            .release(attachment.client_id, attachment.generation);
        // Boxed: the ending paths' futures are large and needed once, so
        // they should not size the task that streams for hours.
        Box::pin(self.finish(&attachment, end, claim, attached)).await;
    }

    /// Reads OPEN or RESUME and gets the session from the store. `Err`
    /// carries the error to send, or `None` when the client is gone.
    async fn handshake(&mut self) -> Result<Accepted, Option<ErrorFrame>> {
        let handshake_timeout = self.shared.config.handshake_timeout;
        let shutdown = self.shared.shutdown.clone();
        let deadline = self.admission.handshake_deadline;
        let hello = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            hello = timeout_at(deadline, self.reader.next()) => Some(hello),
        };
        // Whatever came, the connection no longer holds a handshake slot.
        self.admission.ticket.handshake_done();
        let Some(hello) = hello else {
            self.handshake_failed(HandshakeFailure::ShuttingDown);
            return Err(Some(shutting_down(&*self.shared.store, false)));
        };
        let hello = match hello {
            Err(_elapsed) => {
                debug!("handshake timed out");
                self.handshake_failed(HandshakeFailure::Timeout);
                return Err(Some(ErrorFrame::new(
                    ErrorCode::HandshakeTimeout,
                    format!(
                        "no complete OPEN or RESUME within {}",
                        humantime::format_duration(handshake_timeout)
                    ),
                )));
            }
            Ok(None) => {
                self.handshake_failed(HandshakeFailure::Closed);
                debug!("closed before the handshake");
                return Err(None);
            }
            Ok(Some(Err(CodecError::Io(error)))) => {
                self.handshake_failed(HandshakeFailure::IoError);
                debug!(%error, "read error before the handshake");
                return Err(None);
            }
            // Debug, not info: any peer can send these at will (the periodic
            // digest and the metrics count them).
            Ok(Some(Err(CodecError::Decode(DecodeError::UnsupportedVersion(version))))) => {
                debug!(version, "rejected unsupported protocol version");
                self.handshake_failed(HandshakeFailure::UnsupportedVersion);
                return Err(Some(ErrorFrame::unsupported_version(version)));
            }
            Ok(Some(Err(CodecError::Decode(error)))) => {
                debug!(%error, "rejected malformed handshake");
                self.handshake_failed(HandshakeFailure::Malformed);
                return Err(Some(ErrorFrame::new(
                    ErrorCode::Malformed,
                    format!("malformed handshake: {error}"),
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };

        // Every line about a session names it, from its first frame on.
        let span = tracing::Span::current();
        if let Frame::Open(Open { client_id, .. }) | Frame::Resume(Resume { client_id, .. }) =
            &hello
        {
            span.record("client_id", tracing::field::display(client_id));
        }
        // The lease counts from when the store was asked, not answered.
        let requested = Instant::now();
        let (attachment, start, resumed) = match hello {
            Frame::Open(open) => (self.open(open).await?, 0, false),
            Frame::Resume(resume) => (self.resume(resume).await?, resume.next_index, true),
            other => {
                self.handshake_failed(HandshakeFailure::UnexpectedFrame);
                return Err(Some(ErrorFrame::new(
                    ErrorCode::Malformed,
                    format!("expected OPEN or RESUME, got {}", other.name()),
                )));
            }
        };
        Ok(Accepted {
            attachment,
            start,
            resumed,
            requested,
        })
    }

    /// Why a claim's `stop` token was cancelled.
    fn stop_reason(&self) -> SessionEnd {
        if self.shared.shutdown.is_cancelled() {
            SessionEnd::Shutdown
        } else {
            SessionEnd::TakenOver
        }
    }

    fn handshake_failed(&self, reason: HandshakeFailure) {
        self.shared
            .handshake_failed(reason, self.admission.ticket.peer());
    }

    async fn open(&self, open: Open) -> Result<Attachment, ErrorFrame> {
        if !(MIN_COUNT..=MAX_COUNT).contains(&open.count) {
            return Err(ErrorFrame::new(
                ErrorCode::CountOutOfRange,
                format!(
                    "count must be between {MIN_COUNT} and {MAX_COUNT}, got {}",
                    open.count
                ),
            ));
        }
        check_client_id(open.client_id)?;
        // After the cheap checks, before anything costs the store a write:
        // the address's session quota and its rate of new sessions, then
        // whether the server has room (where an OPEN may wait a moment,
        // so an address over its quota must not get that far). Resumes
        // skip all of these: sessions already admitted keep priority.
        let peer = self.admission.ticket.peer();
        let reservation = self.shared.peers.admit_session(peer).map_err(|refusal| {
            debug!(%peer, ?refusal, "OPEN refused: the address is over its quota");
            self.shared.admission_refused(refusal.into(), peer);
            refusal.error_frame(peer)
        })?;
        let telemetry = &self.shared.telemetry;
        let _opening = Box::pin(
            self.shared
                .overload
                .admit(|| telemetry.streaming_now(), crate::overload::OPEN_HOLD),
        )
        .await
        .map_err(|overloaded| {
            debug!(%peer, %overloaded, "OPEN refused: overloaded");
            self.shared
                .admission_refused(AdmissionRefusal::Overload, peer);
            ErrorFrame::new(
                ErrorCode::ServerBusy,
                format!("server is {overloaded}; try again shortly or on another instance"),
            )
        })?;
        let config = &self.shared.config;
        // One getrandom call for both the seed and the token.
        let random: [u8; 48] = random_bytes()?;
        let (mut random_seed, mut token) = ([0u8; 32], [0u8; 16]);
        random_seed.copy_from_slice(&random[..32]);
        token.copy_from_slice(&random[32..]);
        let seed = match config.seed {
            Some(master) => SessionSeed::derive(master, open.client_id),
            None => SessionSeed(random_seed),
        };
        // Computes the whole-sequence checksum now, once: FINAL carries it.
        let session = NewSession::new(open.client_id, seed, open.count, ResumeToken(token));
        let created = self.shared.store.create(session, config.lease()).await;
        match created {
            Ok(attachment) => {
                reservation.commit(attachment.client_id);
                Ok(attachment)
            }
            Err(error) => {
                if matches!(error, StoreError::Full { .. }) {
                    self.shared
                        .admission_refused(AdmissionRefusal::Sessions, peer);
                }
                Err(self.store_error(error))
            }
        }
    }

    async fn resume(&self, resume: Resume) -> Result<Attachment, ErrorFrame> {
        check_client_id(resume.client_id)?;
        let attached = self
            .shared
            .store
            .attach(resume.client_id, &resume.token, self.shared.config.lease())
            .await;
        if let Ok(attachment) = &attached {
            self.shared.peers.session_attached(attachment.client_id);
        }
        attached.map_err(|error| {
            if error == StoreError::Expired {
                info!(client_id = %resume.client_id, "session expired");
                self.shared.telemetry.sessions_expired(1);
            }
            self.store_error(error)
        })
    }

    /// Streams numbers `start..count` on schedule, then awaits the ACK,
    /// renewing `lease` all along.
    async fn stream(
        &mut self,
        session: &Attachment,
        start: u16,
        stop: &CancellationToken,
        lease: &mut Lease,
    ) -> SessionEnd {
        let config = &self.shared.config;
        let interval = config.interval;
        let count = u32::from(session.count);
        let batch = if interval.is_zero() { BURST_BATCH } else { 1 };

        self.writer.push(&Frame::Welcome(Welcome {
            count: session.count,
            next_index: start,
            token: session.token,
            interval_us: u32::try_from(interval.as_micros()).unwrap_or(u32::MAX),
            session_ttl_ms: u32::try_from(config.session_ttl.as_millis()).unwrap_or(u32::MAX),
        }));

        let metrics = self.shared.telemetry.streaming();
        // Number `start + k` is due at `origin + k * interval`: an absolute
        // schedule, so one late tick does not delay all later ones.
        let origin = Instant::now();
        let mut due = origin;
        let mut next_index = u32::from(start);
        // Computed once, when FINAL is built, and kept for the ACK check.
        let mut server_checksum = 0;
        // Pinned once: a fresh `cancelled()` per tick would register (and
        // drop) a waiter every number.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        // One timer for the whole stream, re-armed for the next number (or
        // heartbeat): smaller than a fresh `sleep_until` per wait and per
        // kind of wake-up in every connection's task.
        let wake = sleep_until(due);
        tokio::pin!(wake);
        loop {
            let batch_end = (next_index + batch).min(count);
            if let Some(checksum) = self.encode_numbers(session, next_index, batch_end) {
                server_checksum = checksum;
            }
            let batch_size = batch_end - next_index;
            next_index = batch_end;
            if let Err(end) = self.flush(stop, lease).await {
                return end;
            }
            let mut last_write = Instant::now();
            // `next_index <= count <= 65535`.
            self.sent_up_to = next_index as u16;
            // Lateness means nothing in burst mode, where all is due at once.
            metrics.sent(batch_size, (!interval.is_zero()).then_some(due), last_write);
            if next_index == count {
                // Boxed: needed once per session, it should not size the
                // state every streaming connection carries.
                return Box::pin(self.await_ack(stop, lease, server_checksum)).await;
            }

            due = origin + interval * (next_index - u32::from(start));
            loop {
                let heartbeat_at = last_write + MAX_SERVER_SILENCE;
                let heartbeat_first = heartbeat_at < due;
                wake.as_mut()
                    .reset(if heartbeat_first { heartbeat_at } else { due });
                tokio::select! {
                    biased;
                    () = &mut stopped => return self.stop_reason(),
                    input = self.reader.next() => return unexpected_input(input),
                    loss = lease.lost(), if lease.busy_before(due) => return loss.into(),
                    () = &mut wake => {
                        if !heartbeat_first {
                            break;
                        }
                        self.writer.push(&Frame::Heartbeat);
                        if let Err(end) = self.flush(stop, lease).await {
                            return end;
                        }
                        last_write = Instant::now();
                    }
                }
            }
        }
    }

    /// Buffers numbers `from..to` (FINAL if `to` is the session's end,
    /// and then returns the session checksum it carries).
    fn encode_numbers(&mut self, session: &Attachment, from: u32, to: u32) -> Option<u32> {
        let count = u32::from(session.count);
        // Made per batch (an O(1) seek, ~0.2 µs) and never held across an
        // await: its 300-byte keystream buffer would otherwise sit in every
        // streaming connection between its once-a-second numbers.
        // Indices stay below `count <= 65535`, so they fit a u16.
        let mut numbers = NumberGenerator::starting_at(&session.seed, from as u16);
        let mut final_checksum = None;
        for index in from..to {
            let index = index as u16;
            let value = numbers.next_number();
            if u32::from(index) + 1 == count {
                // Kept with the session since OPEN: FINAL costs the same
                // at any index, whatever the count.
                let checksum = session.checksum;
                self.writer.push(&Frame::Final {
                    index,
                    value,
                    checksum,
                });
                final_checksum = Some(checksum);
            } else {
                self.writer.push(&Frame::Number { index, value });
            }
        }
        final_checksum
    }

    async fn await_ack(
        &mut self,
        stop: &CancellationToken,
        lease: &mut Lease,
        server_checksum: u32,
    ) -> SessionEnd {
        let ack_timeout = self.shared.config.ack_wait();
        tokio::select! {
            biased;
            () = stop.cancelled() => self.stop_reason(),
            loss = lease.lost() => loss.into(),
            input = timeout(ack_timeout, self.reader.next()) => match input {
                Ok(Some(Ok(Frame::Ack { client_checksum }))) => {
                    SessionEnd::Completed {
                        client_checksum,
                        server_checksum,
                    }
                }
                Ok(other) => unexpected_input(other),
                Err(_elapsed) => SessionEnd::Disconnected(format!(
                    "no ACK within {} of FINAL",
                    humantime::format_duration(ack_timeout)
                )),
            },
        }
    }

    async fn flush(
        &mut self,
        stop: &CancellationToken,
        lease: &mut Lease,
    ) -> Result<(), SessionEnd> {
        // Fast path: nothing to stop for and the socket takes it all (one
        // NUMBER nearly always fits): no timer, no waiter registrations.
        if stop.is_cancelled() {
            return Err(self.stop_reason());
        }
        match self.writer.try_flush() {
            Ok(true) => Ok(()),
            // Boxed: the waiting flush is several times the size of the
            // rest of the streaming state and needed only when the client
            // reads slower than we write (in burst mode, once per batch).
            Ok(false) => Box::pin(self.flush_when_writable(stop, lease)).await,
            Err(error) => Err(SessionEnd::Disconnected(format!("write failed: {error}"))),
        }
    }

    /// Waits until the socket takes the rest of the buffer, bounded by the
    /// write timeout and raced against everything that ends a session.
    async fn flush_when_writable(
        &mut self,
        stop: &CancellationToken,
        lease: &mut Lease,
    ) -> Result<(), SessionEnd> {
        let write_timeout = self.shared.config.write_timeout;
        tokio::select! {
            biased;
            () = stop.cancelled() => Err(self.stop_reason()),
            loss = lease.lost() => Err(loss.into()),
            written = timeout(write_timeout, self.writer.flush()) => match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(SessionEnd::Disconnected(format!("write failed: {error}"))),
                Err(_elapsed) => Err(SessionEnd::Disconnected(format!(
                    "client read nothing for {}",
                    humantime::format_duration(write_timeout)
                ))),
            },
        }
    }

    /// Tells the store and the client how the session ended. `claim` is
    /// held until this connection has written its last byte, so a successor
    /// waiting in `Registry::claim` never streams while numbers this
    /// connection had already buffered are still going out.
    ///
    /// `attached` counts this connection as streaming until it is dropped,
    /// first thing; each outcome is counted once the store knows of it, so
    /// a scrape never sees a count ahead of the session gauges.
    async fn finish(
        &mut self,
        session: &Attachment,
        end: SessionEnd,
        claim: Claim,
        attached: GaugeGuard,
    ) {
        drop(attached);
        let telemetry = self.shared.telemetry.clone();
        // Every end but these hands the session back to the store.
        let detached = !matches!(
            end,
            SessionEnd::Completed { .. } | SessionEnd::TakenOver | SessionEnd::Lost(_)
        );
        // Its address's quota counts the session until it is over, or
        // for as long as someone may still resume it.
        match end {
            SessionEnd::Completed { .. } | SessionEnd::Lost(_) => {
                self.shared.peers.session_ended(session.client_id)
            }
            _ => self
                .shared
                .peers
                .session_detached(session.client_id, self.shared.config.session_ttl),
        }
        // Before the claim goes: a local successor waits for it, then looks
        // up how far this connection got.
        if detached || matches!(end, SessionEnd::TakenOver) {
            telemetry.departed(
                session.client_id,
                session.generation,
                self.sent_up_to,
                detached,
                self.shared.config.session_ttl,
            );
        }
        match end {
            SessionEnd::Completed {
                client_checksum,
                server_checksum,
            } => {
                drop(claim);
                if client_checksum != server_checksum {
                    warn!(
                        client_checksum = format_args!("{client_checksum:#010x}"),
                        server_checksum = format_args!("{server_checksum:#010x}"),
                        "client acknowledged with a different checksum"
                    );
                }
                match self
                    .shared
                    .store
                    .complete(session.client_id, session.generation)
                    .await
                {
                    Ok(()) => info!("session completed"),
                    Err(error) => {
                        warn!(%error, "session completed, but the store did not remove it")
                    }
                }
                telemetry.session_completed(session.client_id);
                self.close().await;
            }
            SessionEnd::Disconnected(reason) => {
                drop(claim);
                self.detach(session).await;
                telemetry.session_detached();
                info!(%reason, "session detached");
            }
            SessionEnd::ClientViolation(reason) => {
                self.detach(session).await;
                telemetry.session_detached();
                info!(%reason, "session detached after a protocol violation");
                let error = ErrorFrame::new(ErrorCode::Malformed, reason);
                self.reject_releasing(error, Some(claim)).await;
            }
            SessionEnd::TakenOver => {
                telemetry.session_taken_over();
                info!("session taken over by a newer connection");
                self.reject_releasing(taken_over(), Some(claim)).await;
            }
            SessionEnd::Shutdown => {
                self.detach(session).await;
                telemetry.session_detached();
                info!("session detached by server shutdown");
                let error = shutting_down(&*self.shared.store, true);
                self.reject_releasing(error, Some(claim)).await;
            }
            SessionEnd::Lost(error) => {
                warn!(%error, "session vanished from the store while streaming");
                let error = match error {
                    StoreError::Expired => ErrorFrame::new(
                        ErrorCode::SessionExpired,
                        "the session expired in the session store while streaming",
                    ),
                    _ => ErrorFrame::new(
                        ErrorCode::SessionUnknown,
                        "the session store no longer has this session (it expired there, \
                         or the store lost its data); it cannot be resumed",
                    ),
                };
                self.reject_releasing(error, Some(claim)).await;
            }
            SessionEnd::LeaseUnconfirmed(why) => {
                warn!(
                    %why,
                    "stopped streaming: the lease could not be renewed, so another \
                     instance may own the session"
                );
                let ttl = humantime::format_duration(self.shared.config.session_ttl);
                let error = ErrorFrame::new(
                    ErrorCode::StoreUnavailable,
                    format!("store unavailable; resume within {ttl} to continue"),
                );
                // The client first: it can resume elsewhere while the
                // detach waits for the store.
                let shared = self.shared.clone();
                self.reject_releasing(error, Some(claim)).await;
                detach(&shared, session).await;
                telemetry.session_detached();
            }
        }
    }

    async fn detach(&self, session: &Attachment) {
        detach(&self.shared, session).await;
    }

    fn store_error(&self, error: StoreError) -> ErrorFrame {
        let ttl = humantime::format_duration(self.shared.config.session_ttl);
        match error {
            StoreError::AlreadyExists => ErrorFrame::new(
                ErrorCode::SessionExists,
                "a session for this client id is already open: resume it with its token, or use another client id",
            ),
            StoreError::NotFound => ErrorFrame::new(
                ErrorCode::SessionUnknown,
                format!(
                    "no such session: it expired after {ttl} without a connection, completed, or never existed"
                ),
            ),
            StoreError::Expired => ErrorFrame::new(
                ErrorCode::SessionExpired,
                format!("session expired: it was not resumed within {ttl} of its disconnection"),
            ),
            StoreError::BadToken => ErrorFrame::new(
                ErrorCode::BadResumeToken,
                "the resume token does not match this session",
            ),
            StoreError::Superseded { .. } => taken_over(),
            StoreError::Full { max } => ErrorFrame::new(
                ErrorCode::ServerBusy,
                format!("the session store is full ({max} sessions); try again later"),
            ),
            // The detail (Redis's own words, addresses, script names) is
            // for the operator's log, not for unauthenticated peers.
            StoreError::Unavailable(reason) => {
                warn!(%reason, "session store unavailable");
                ErrorFrame::new(ErrorCode::StoreUnavailable, "store unavailable")
            }
            StoreError::Corrupt(reason) => {
                warn!(%reason, "corrupt session record");
                ErrorFrame::new(ErrorCode::Internal, "internal")
            }
        }
    }

    /// Sends `error` (bounded in time) and closes. Boxed: every handshake
    /// path can end here, and unboxed this would size the whole task.
    fn reject(&mut self, error: ErrorFrame) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.reject_releasing(error, None))
    }

    /// Sends whatever is still buffered and then `error`, bounded in time;
    /// only then gives up `claim`, and closes.
    async fn reject_releasing(&mut self, error: ErrorFrame, claim: Option<Claim>) {
        debug!(code = %error.code, message = %error.message, "sending error");
        self.shared.telemetry.rejected(error.code);
        self.writer.push(&Frame::Error(error));
        let _ = timeout(REJECT_WRITE_TIMEOUT, self.writer.flush()).await;
        drop(claim);
        self.close().await;
    }

    /// Half-closes, then drains what the client still sends for a moment:
    /// closing a socket with unread input makes the kernel send RST, which
    /// can destroy the last frame before the client reads it.
    async fn close(&mut self) {
        let _ = timeout(REJECT_WRITE_TIMEOUT, self.writer.half.shutdown()).await;
        let read = self.reader.get_mut();
        // On the heap: a 4 KiB array here would be part of every
        // connection's task for its whole life, not just while closing.
        let mut scratch = vec![0u8; 4096];
        let mut drained = 0;
        let _ = timeout(LINGER_TIME, async {
            while drained < LINGER_BYTES {
                match read.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }
}

/// Hands the session back to the store for a resume within the TTL; a
/// stale generation (someone resumed already) is not an error.
async fn detach(shared: &Shared, session: &Attachment) {
    match shared
        .store
        .detach(
            session.client_id,
            session.generation,
            shared.config.session_ttl,
        )
        .await
    {
        Ok(()) => {}
        Err(StoreError::Superseded { current }) => {
            debug!(
                current,
                "not detaching: a newer connection owns the session"
            );
        }
        Err(error) => warn!(
            %error,
            "could not detach session; it expires when its lease lapses"
        ),
    }
}

fn unexpected_input(input: Option<Result<Frame, CodecError>>) -> SessionEnd {
    match input {
        None => SessionEnd::Disconnected("client closed the connection".into()),
        Some(Err(CodecError::Io(error))) => {
            SessionEnd::Disconnected(format!("read failed: {error}"))
        }
        Some(Err(CodecError::Decode(error))) => {
            SessionEnd::ClientViolation(format!("malformed frame: {error}"))
        }
        Some(Ok(frame)) => SessionEnd::ClientViolation(format!(
            "unexpected {} while streaming (only ACK after FINAL is allowed)",
            frame.name()
        )),
    }
}

fn check_client_id(client_id: uuid::Uuid) -> Result<(), ErrorFrame> {
    if client_id.is_nil() || client_id.is_max() {
        return Err(ErrorFrame::new(
            ErrorCode::Malformed,
            "client id must be a UUID other than the nil and max UUIDs",
        ));
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ErrorFrame> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|error| {
        warn!(%error, "the OS random number generator failed");
        ErrorFrame::new(ErrorCode::Internal, "internal")
    })?;
    Ok(bytes)
}

fn taken_over() -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::TakenOver,
        "a newer connection resumed this session; this one is closed",
    )
}

/// Whether a client should come back depends on whether its session
/// outlives this process, and a connection still before its hello
/// (`attached` false) has no session to lose: even with the in-memory
/// store its OPEN succeeds once a server is back, or on another one.
fn shutting_down(store: &dyn SessionStore, attached: bool) -> ErrorFrame {
    if store.is_shared() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// Largest acceptable connection task future, in bytes. Every
    /// connection's task is this future, held for the whole session, so
    /// growing it is memory per session (see BENCHMARKS.md); 1,384 bytes
    /// when this was written (it was 2,592 before the handshake, the
    /// waiting paths and the number generator stopped living in it).
    const CONNECTION_TASK_BUDGET: usize = 1536;

    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let shared = Arc::new(Shared {
            config: ServerConfig::default(),
            store: Arc::new(numstream_store::InMemoryStore::new(10)),
            registry: Registry::new(CancellationToken::new()),
            shutdown: CancellationToken::new(),
            telemetry: Telemetry::disabled(),
            socket_options: crate::socket::SocketOptions {
                dead_peer_timeout: Duration::from_secs(10),
                send_buffer: None,
            },
            socket_options_inherited: false,
            peers: Arc::new(Peers::new(crate::peers::PeerLimits::UNLIMITED)),
            overload: Arc::new(crate::overload::Overload::new(
                crate::overload::OverloadLimits::OFF,
            )),
            digest: Arc::new(LogDigest::new()),
        });
        let admission = Admission::new(
            Arc::new(tokio::sync::Semaphore::new(1))
                .try_acquire_owned()
                .expect("a free permit"),
            shared.telemetry.connection_open(),
            shared
                .peers
                .admit_connection(PeerKey::from(peer.ip()))
                .expect("unlimited"),
            Instant::now() + shared.config.handshake_timeout,
        );
        let task = serve(stream, peer, shared, admission);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= CONNECTION_TASK_BUDGET,
            "the connection task grew to {size} bytes (budget {CONNECTION_TASK_BUDGET}): \
             box what a connection needs only once (see Connection::reject, finish)"
        );
        drop((task, client));
    }
}
