//! One client connection from first byte to close, as glue around the
//! sans-IO [`ServerSession`]: it reads and feeds bytes, writes what the
//! session encodes, arms the one timer it asks for, and carries out what it
//! decides (admission and the store for a hello, the local claim, lease
//! renewals, and the steps of the ending), with the logs and metrics of
//! each. Every protocol decision is the session's (see
//! `numstream_protocol::server`); what is left here is I/O, bounded in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use numstream_protocol::server::{
    AttachFailure, EndReason, Ending, Event, Grant, Hello, HelloFailure, ServerSession,
    SessionConfig, Step, StoreFailure,
};
use numstream_protocol::{
    ClientId, ErrorCode, ErrorFrame, Frame, Open, Resume, ResumeToken, SessionSeed, encode_frame,
};
use numstream_store::{NewSession, SessionStore, StoreError};

use crate::config::ServerConfig;
use crate::digest::LogDigest;
use crate::door::Early;
use crate::peers::{PeerKey, PeerTicket, Peers};
use crate::registry::{Claim, Registry};
use crate::telemetry::{AdmissionRefusal, GaugeGuard, HandshakeFailure, Telemetry};

/// Logs an event about one connection with what names it: its peer, and
/// its session's client id (from the hello on) and generation (once the
/// store attached it). Fields of each line rather than a span: a span
/// lives as long as the connection and cost each one about 290 bytes.
macro_rules! log {
    ($level:ident, $connection:expr, $($event:tt)+) => {{
        let connection = &$connection;
        tracing::$level!(
            client_id = connection.client_id.map(tracing::field::display),
            generation = connection.session.grant().map(|grant| grant.generation),
            peer = %connection.peer,
            $($event)+
        )
    }};
}

/// State shared by every connection of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    /// What every connection's [`ServerSession`] needs of `config`.
    pub(crate) session_config: Arc<SessionConfig>,
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

/// Time allowed to deliver a rejection before closing anyway.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes and time spent draining a rejected client's input before closing,
/// so the kernel sends FIN rather than RST and the error frame is not lost.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_millis(500);

/// Largest write buffer a connection keeps between single-number writes.
const KEPT_WRITE_BUFFER: usize = 2 * numstream_protocol::codec::NUMBER_FRAME_LEN;

/// Bytes read per wake-up: a hello is at most 41 bytes, and after it the
/// client may send only an ACK of 9.
const READ_CHUNK: usize = 64;

/// An admitted connection: what it holds until it ends, and when its
/// hello must be in.
pub(crate) struct Admission {
    held: Held,
    /// When the hello must be in: the handshake timeout counts from
    /// accept, so a TLS handshake before it spends the same allowance.
    pub(crate) handshake_deadline: Instant,
    /// What the accept loop already read of the connection (`door`).
    early: Early,
}

/// What an admitted connection holds until it ends: its place under the
/// connection limit, under its address's quotas, and its count in the
/// open-connections gauge.
struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _open: GaugeGuard,
    ticket: PeerTicket,
}

impl Admission {
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        open: GaugeGuard,
        ticket: PeerTicket,
        handshake_deadline: Instant,
        early: Early,
    ) -> Self {
        Self {
            held: Held {
                _permit: permit,
                _open: open,
                ticket,
            },
            handshake_deadline,
            early,
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

/// What the session machine needs of the server's configuration.
pub(crate) fn session_config(config: &ServerConfig, store_shared: bool) -> SessionConfig {
    SessionConfig {
        interval: config.interval,
        session_ttl: config.session_ttl,
        handshake_timeout: config.handshake_timeout,
        ack_wait: config.ack_wait(),
        lease_renewal_period: config.lease_renewal_period(),
        store_shared,
    }
}

/// Serves one accepted connection to the end, over any byte stream (plain
/// TCP, or TLS once `tls` has done its handshake; socket options are set
/// in the accept loop).
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
    let mut connection = Connection::new(stream, peer, shared, admission);
    async move { connection.run().await }
}

/// What a streaming connection holds on its session: the local claim,
/// its place in the attached-sessions gauge, and the lease renewal on its
/// way (on the heap with the rest: only a streaming session has one).
struct Streaming {
    claim: Claim,
    _attached: Option<GaugeGuard>,
    renewal: Option<BoxFuture<'static, Result<(), StoreError>>>,
}

struct Connection<S> {
    stream: S,
    session: ServerSession,
    peer: SocketAddr,
    /// The hello's, for the logs: kept when the hello is refused, which
    /// the session's grant is not.
    client_id: Option<ClientId>,
    /// Encoded, not yet written.
    out: BytesMut,
    shared: Arc<Shared>,
    admission: Held,
    /// Set once the session streams.
    streaming: Option<Box<Streaming>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection<S> {
    fn new(stream: S, peer: SocketAddr, shared: Arc<Shared>, admission: Admission) -> Self {
        // The session counts its handshake timeout from accept, as the
        // admission does: a TLS handshake already spent part of it.
        let accepted = admission
            .handshake_deadline
            .checked_sub(shared.config.handshake_timeout)
            .unwrap_or_else(Instant::now);
        let mut session = ServerSession::new(shared.session_config.clone(), accepted.into_std());
        if !admission.early.bytes().is_empty() {
            session.handle_bytes(now(), admission.early.bytes());
        }
        Self {
            stream,
            session,
            peer,
            client_id: None,
            out: BytesMut::new(),
            shared,
            admission: admission.held,
            streaming: None,
        }
    }

    /// Feeds the session until it ends: carry out its events, write one
    /// batch, then wait for the first of input, the timer, a stop, or the
    /// lease renewal.
    ///
    /// Not an `async fn`: one of those keeps its `&mut self` argument twice
    /// in its state, and this state is part of every connection's task.
    #[allow(clippy::manual_async_fn)]
    fn run(&mut self) -> impl Future<Output = ()> + '_ {
        async move {
            // One timer for the whole connection, re-armed to the session's
            // next deadline: smaller than a fresh sleep per wait.
            let wake = sleep_until(Instant::now());
            tokio::pin!(wake);
            // Until the session streams, the server's shutdown stops it: a
            // waiter made once (a fresh `cancelled()` per wait would register
            // one per wake-up), dropped once the claim's handover takes over.
            let mut shutdown = Some(Box::pin(self.shared.shutdown.clone().cancelled_owned()));
            // Whatever lives across an `.await` below is part of every
            // connection's task for its whole life, so the events, the
            // deadline and the lateness sample are out of scope by then.
            loop {
                // Not `while let`: its scrutinee would be kept across the
                // `.await`, in the task.
                #[allow(clippy::while_let_loop)]
                loop {
                    let Some(event) = self.next_event() else {
                        break;
                    };
                    // Boxed: admission, the claim and the ending come once a
                    // connection, and their futures should not size the task
                    // that streams for hours.
                    if Box::pin(self.carry_out(event)).await == Carried::Ended {
                        return;
                    }
                }
                let numbers = self.session.poll_transmit(now(), &mut self.out);
                if !self.out.is_empty() {
                    match self.flush().await {
                        Ok(()) => {
                            let written = Instant::now();
                            if numbers > 0 {
                                let due = self.session.batch_due().map(Instant::from_std);
                                self.shared.telemetry.sent(numbers, due, written);
                            }
                            self.session.handle_flushed(written.into_std());
                            // The WELCOME grew the buffer; a session that
                            // then writes one number at a time for hours
                            // keeps no more than two numbers' worth (burst
                            // mode, batch after batch, keeps its buffer).
                            if numbers <= 1 && self.out.capacity() > KEPT_WRITE_BUFFER {
                                self.out = BytesMut::new();
                            }
                        }
                        Err(Interrupted::Stopped) => self.stopped(),
                        Err(Interrupted::Failed(why)) => {
                            self.session.handle_write_failed(now(), why)
                        }
                    }
                }
                if self.session.is_ended() {
                    continue;
                }
                if self.streaming.is_some() {
                    shutdown = None;
                }
                // Built in a block: only the wait itself is kept across the
                // `.await`, not the deadline it was computed from.
                let wait = {
                    let timed = match self.session.poll_timeout() {
                        Some(at) => {
                            wake.as_mut().reset(Instant::from_std(at));
                            true
                        }
                        None => false,
                    };
                    let (this, shutdown, mut wake) = (&mut *self, &mut shutdown, wake.as_mut());
                    std::future::poll_fn(move |cx| {
                        this.poll_wait(cx, shutdown, wake.as_mut(), timed)
                    })
                };
                wait.await;
            }
        }
    }

    /// The session's next event that needs an `.await`; lease renewals
    /// are started here, to be polled with the rest of the wait.
    fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.session.poll_event()? {
                Event::Renew {
                    client_id,
                    generation,
                } => self.start_renewal(client_id, generation),
                event => return Some(event),
            }
        }
    }

    fn start_renewal(&mut self, client_id: ClientId, generation: u64) {
        let store = self.shared.store.clone();
        let lease = self.shared.config.lease();
        let renewal = Box::pin(async move { store.renew(client_id, generation, lease).await });
        match &mut self.streaming {
            Some(streaming) => streaming.renewal = Some(renewal),
            // The session asks for renewals only while it streams, which
            // starts with the claim: cannot happen, but must not leave the
            // renewal unanswered if it did.
            None => self.session.handle_renewal(
                now(),
                Err(StoreFailure::Unavailable("no claim to renew".to_owned())),
            ),
        }
    }

    /// Carries out an admission, a claim or the ending.
    async fn carry_out(&mut self, event: Event) -> Carried {
        match event {
            Event::Admit(hello) => {
                let result = self.admit(hello).await;
                self.session.handle_attach(now(), result);
                if self.shared.shutdown.is_cancelled() {
                    self.session.handle_shutdown(now());
                }
            }
            Event::Claim {
                client_id,
                generation,
            } => {
                let claim = self.shared.registry.claim(client_id, generation).await;
                self.session.handle_claim(now(), claim.is_some());
                if let Some(claim) = claim {
                    self.start_streaming(claim);
                }
            }
            Event::Renew {
                client_id,
                generation,
            } => self.start_renewal(client_id, generation),
            Event::Ended(ending) => {
                self.finish(ending).await;
                return Carried::Ended;
            }
        }
        Carried::Going
    }

    /// Waits for the first of a stop, the lease renewal's answer, input,
    /// and the timer, in that order, and feeds it to the session. One
    /// poll function rather than a `select!` of futures: nothing of the
    /// wait (the read buffer included) is kept in the task between polls.
    fn poll_wait(
        &mut self,
        cx: &mut Context<'_>,
        shutdown: &mut Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        wake: Pin<&mut Sleep>,
        timed: bool,
    ) -> Poll<()> {
        let stop = match (&self.streaming, shutdown) {
            (Some(streaming), _) => streaming.claim.poll_stop(cx),
            (None, Some(shutdown)) => shutdown.as_mut().poll(cx),
            (None, None) => Poll::Pending,
        };
        if stop.is_ready() {
            self.stopped();
            return Poll::Ready(());
        }
        if let Some(streaming) = &mut self.streaming
            && let Some(renewal) = &mut streaming.renewal
            && let Poll::Ready(result) = renewal.as_mut().poll(cx)
        {
            streaming.renewal = None;
            self.renewed(result);
            return Poll::Ready(());
        }
        let mut chunk = [0u8; READ_CHUNK];
        let mut read = ReadBuf::new(&mut chunk);
        if let Poll::Ready(result) = Pin::new(&mut self.stream).poll_read(cx, &mut read) {
            match result {
                Ok(()) if read.filled().is_empty() => self.session.handle_closed(now(), None),
                Ok(()) => self.session.handle_bytes(now(), read.filled()),
                Err(error) => self.session.handle_closed(now(), Some(error.to_string())),
            }
            return Poll::Ready(());
        }
        if timed && wake.poll(cx).is_ready() {
            self.session.handle_timeout(now());
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Whether the connection must stop now: its claim was taken over or
    /// the server is shutting down.
    fn must_stop(&self) -> bool {
        self.shared.shutdown.is_cancelled()
            || self
                .streaming
                .as_ref()
                .is_some_and(|streaming| streaming.claim.must_stop())
    }

    /// A stop came: the shutdown token says which (at shutdown the
    /// registry stops every claim too).
    fn stopped(&mut self) {
        if self.shared.shutdown.is_cancelled() {
            self.session.handle_shutdown(now());
        } else {
            self.session.handle_takeover(now());
        }
    }

    fn renewed(&mut self, result: Result<(), StoreError>) {
        let result = result.map_err(StoreFailure::from);
        if let Err(failure) = &result
            && !matches!(
                failure,
                StoreFailure::Superseded | StoreFailure::NotFound | StoreFailure::Expired
            )
        {
            log!(warn, self, error = %failure, "lease renewal failed; retrying");
        }
        self.session.handle_renewal(now(), result);
    }

    fn start_streaming(&mut self, claim: Claim) {
        let Some(grant) = self.session.grant() else {
            return;
        };
        if !self.session.is_streaming() {
            // Lost the claim after all, or the resume index is past the
            // end: the ending says so, and the claim goes with it.
            self.streaming = Some(Box::new(Streaming {
                claim,
                _attached: None,
                renewal: None,
            }));
            return;
        }
        let telemetry = &self.shared.telemetry;
        let start = self.session.written_up_to();
        if self.session.resumed() {
            log!(
                info,
                self,
                next_index = start,
                count = grant.count,
                "session resumed"
            );
            telemetry.session_resumed(grant.client_id, grant.generation, start);
        } else {
            log!(info, self, count = grant.count, "session opened");
        }
        self.streaming = Some(Box::new(Streaming {
            claim,
            _attached: Some(telemetry.session_attached()),
            renewal: None,
        }));
    }

    /// Admits a validated hello and asks the store: creates the session
    /// for OPEN, attaches it for RESUME.
    async fn admit(&mut self, hello: Hello) -> Result<Grant, AttachFailure> {
        // Whatever came, the connection no longer holds a handshake slot.
        self.handshake_done();
        // Every line about a session names it, from its first frame on.
        self.client_id = Some(hello.client_id());
        match hello {
            Hello::Open(open) => self.open(open).await,
            Hello::Resume(resume) => self.resume(resume).await,
        }
    }

    /// Gives the handshake slot back (once: later calls do nothing).
    fn handshake_done(&mut self) {
        self.admission.ticket.handshake_done();
    }

    async fn open(&mut self, open: Open) -> Result<Grant, AttachFailure> {
        // Before anything costs the store a write: the address's session
        // quota and its rate of new sessions, then whether the server has
        // room (where an OPEN may wait a moment, so an address over its
        // quota must not get that far). Resumes skip all of these:
        // sessions already admitted keep priority.
        let peer = self.admission.ticket.peer();
        let reservation = self.shared.peers.admit_session(peer).map_err(|refusal| {
            log!(
                debug,
                self,
                ?refusal,
                "OPEN refused: the address is over its quota"
            );
            self.shared.admission_refused(refusal.into(), peer);
            AttachFailure::Refused(refusal.error_frame(peer))
        })?;
        let telemetry = &self.shared.telemetry;
        let _opening = Box::pin(
            self.shared
                .overload
                .admit(|| telemetry.streaming_now(), crate::overload::OPEN_HOLD),
        )
        .await
        .map_err(|overloaded| {
            log!(debug, self, %overloaded, "OPEN refused: overloaded");
            self.shared
                .admission_refused(AdmissionRefusal::Overload, peer);
            AttachFailure::Refused(overloaded.refusal())
        })?;
        let config = &self.shared.config;
        let since_accept = self.session.client_waiting(now()).unwrap_or_default();
        if since_accept > crate::overload::LATEST_CREATE {
            log!(
                debug,
                self,
                ?since_accept,
                "OPEN refused: too late to be answered in time"
            );
            self.shared
                .admission_refused(AdmissionRefusal::Overload, peer);
            return Err(AttachFailure::Refused(ErrorFrame::new(
                ErrorCode::ServerBusy,
                format!(
                    "server is running {} s behind; try again shortly or on another instance",
                    since_accept.as_secs()
                ),
            )));
        }
        // One getrandom call for both the seed and the token.
        let random: [u8; 48] = random_bytes().map_err(|error| {
            log!(warn, self, %error, "the OS random number generator failed");
            AttachFailure::Refused(ErrorFrame::new(ErrorCode::Internal, "internal"))
        })?;
        let (mut random_seed, mut token) = ([0u8; 32], [0u8; 16]);
        random_seed.copy_from_slice(&random[..32]);
        token.copy_from_slice(&random[32..]);
        let seed = match config.seed {
            Some(master) => SessionSeed::derive(master, open.client_id),
            None => SessionSeed(random_seed),
        };
        // Computes the whole-sequence checksum now, once: FINAL carries it.
        let session = NewSession::new(open.client_id, seed, open.count, ResumeToken(token));
        match self.shared.store.create(session, config.lease()).await {
            Ok(attachment) => {
                reservation.commit(attachment.client_id);
                self.shared.telemetry.session_created();
                Ok(grant(attachment))
            }
            Err(error) => {
                if matches!(error, StoreError::Full { .. }) {
                    self.shared
                        .admission_refused(AdmissionRefusal::Sessions, peer);
                }
                Err(self.store_refusal(error))
            }
        }
    }

    async fn resume(&mut self, resume: Resume) -> Result<Grant, AttachFailure> {
        let attached = self
            .shared
            .store
            .attach(resume.client_id, &resume.token, self.shared.config.lease())
            .await;
        match attached {
            Ok(attachment) => {
                self.shared.peers.session_attached(attachment.client_id);
                Ok(grant(attachment))
            }
            Err(error) => {
                if error == StoreError::Expired {
                    log!(info, self, "session expired");
                    self.shared.telemetry.sessions_expired(1);
                }
                Err(self.store_refusal(error))
            }
        }
    }

    /// The detail of a store failure (Redis's own words, addresses,
    /// script names) is for the operator's log, not for unauthenticated
    /// peers: the session machine answers them generically.
    fn store_refusal(&self, error: StoreError) -> AttachFailure {
        match &error {
            StoreError::Unavailable(reason) => {
                log!(warn, self, %reason, "session store unavailable")
            }
            StoreError::Corrupt(reason) => log!(warn, self, %reason, "corrupt session record"),
            _ => {}
        }
        AttachFailure::Store(error.into())
    }

    /// Writes `out`: at once when the socket takes it (one NUMBER nearly
    /// always fits: no timer, no waiter), else waiting at most the write
    /// timeout, raced against a stop.
    async fn flush(&mut self) -> Result<(), Interrupted> {
        if self.must_stop() {
            return Err(Interrupted::Stopped);
        }
        match self.stream.write(&self.out).now_or_never() {
            Some(Ok(written)) if written == self.out.len() => {
                self.out.clear();
                // TLS holds written records until flushed; plain TCP's
                // flush is ready at once.
                match self.stream.flush().now_or_never() {
                    Some(Ok(())) => return Ok(()),
                    Some(Err(error)) => {
                        return Err(Interrupted::Failed(format!("write failed: {error}")));
                    }
                    None => {}
                }
            }
            Some(Ok(written)) => self.out.advance(written),
            Some(Err(error)) => return Err(Interrupted::Failed(format!("write failed: {error}"))),
            None => {}
        }
        // Boxed: the waiting flush is several times the size of the rest
        // of the state and needed only when the client reads slower than
        // we write (in burst mode, once per batch).
        Box::pin(self.flush_when_writable()).await
    }

    async fn flush_when_writable(&mut self) -> Result<(), Interrupted> {
        let write_timeout = self.shared.config.write_timeout;
        let shutdown = self.shared.shutdown.clone();
        let Self {
            stream,
            out,
            streaming,
            ..
        } = self;
        let stopped = async {
            match streaming {
                Some(streaming) => std::future::poll_fn(|cx| streaming.claim.poll_stop(cx)).await,
                None => shutdown.cancelled().await,
            }
        };
        tokio::select! {
            biased;
            () = stopped => Err(Interrupted::Stopped),
            written = timeout(write_timeout, write_out(stream, out)) => match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(Interrupted::Failed(format!("write failed: {error}"))),
                Err(_elapsed) => Err(Interrupted::Failed(format!(
                    "client read nothing for {}",
                    humantime::format_duration(write_timeout)
                ))),
            },
        }
    }

    /// Carries out the session's ending, step by step, with the logs and
    /// metrics of each outcome.
    async fn finish(&mut self, ending: Ending) {
        self.handshake_done();
        let Ending {
            reason,
            steps,
            session_over,
        } = ending;
        let grant = self.session.grant().cloned();
        // The attached gauge counts this connection until here; each
        // outcome is counted once the store knows of it, so a scrape never
        // sees a count ahead of the session gauges.
        let claim = self.streaming.take().map(|streaming| {
            let Streaming { claim, .. } = *streaming;
            claim
        });
        let mut claim = claim;
        if let Some(grant) = &grant {
            self.session_ended(grant, &reason, session_over);
        }
        self.log_ending(&reason);
        for step in steps {
            match step {
                Step::Detach => {
                    if let Some(grant) = &grant {
                        self.detach(grant).await;
                        if reason != EndReason::ResumeIndexOutOfRange {
                            self.shared.telemetry.session_detached();
                        }
                    }
                }
                Step::Complete => {
                    if let Some(grant) = &grant {
                        match self
                            .shared
                            .store
                            .complete(grant.client_id, grant.generation)
                            .await
                        {
                            Ok(()) => log!(info, self, "session completed"),
                            Err(error) => log!(
                                warn,
                                self,
                                %error,
                                "session completed, but the store did not remove it"
                            ),
                        }
                        self.shared.telemetry.session_completed(grant.client_id);
                    }
                }
                Step::Send(error) => {
                    log!(debug, self, code = %error.code, message = %error.message, "sending error");
                    self.shared.telemetry.rejected(error.code);
                    encode_frame(&Frame::Error(error), &mut self.out);
                    let _ = timeout(
                        REJECT_WRITE_TIMEOUT,
                        write_out(&mut self.stream, &mut self.out),
                    )
                    .await;
                }
                Step::ReleaseClaim => drop(claim.take()),
                Step::Linger => self.close().await,
            }
        }
    }

    /// Hands the session back to the store for a resume within the TTL; a
    /// stale generation (someone resumed already) is not an error. (`&mut`:
    /// a shared borrow held across an `.await` would need the connection
    /// to be `Sync`.)
    async fn detach(&mut self, session: &Grant) {
        let shared = &self.shared;
        let ttl = shared.config.session_ttl;
        match shared
            .store
            .detach(session.client_id, session.generation, ttl)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Superseded { current }) => log!(
                debug,
                self,
                current,
                "not detaching: a newer connection owns the session"
            ),
            Err(error) => log!(
                warn,
                self,
                %error,
                "could not detach session; it expires when its lease lapses"
            ),
        }
    }

    /// Bookkeeping as streaming stops, before any step: the registry
    /// entry, the address's quota, and how far this connection got (a
    /// local successor waits for the claim, then looks that up).
    fn session_ended(&self, grant: &Grant, reason: &EndReason, session_over: Option<bool>) {
        let shared = &self.shared;
        let ttl = shared.config.session_ttl;
        shared.registry.release(grant.client_id, grant.generation);
        if session_over == Some(true) {
            shared.peers.session_ended(grant.client_id);
        } else {
            shared.peers.session_detached(grant.client_id, ttl);
        }
        let detached = matches!(
            reason,
            EndReason::Disconnected(_)
                | EndReason::ClientViolation(_)
                | EndReason::Shutdown
                | EndReason::LeaseUnconfirmed(_)
        );
        if detached || matches!(reason, EndReason::TakenOver) {
            shared.telemetry.departed(
                grant.client_id,
                grant.generation,
                self.session.written_up_to(),
                detached,
                ttl,
            );
        }
    }

    fn log_ending(&self, reason: &EndReason) {
        let peer = self.admission.ticket.peer();
        match reason {
            // Debug, not info: any peer can cause these at will (the
            // periodic digest and the metrics count them).
            EndReason::HelloFailed(failure) => {
                log!(debug, self, ?failure, "handshake failed");
                self.shared
                    .handshake_failed(handshake_failure(*failure), peer);
            }
            EndReason::Refused => {}
            EndReason::ClaimLost => {
                log!(info, self, "session taken over before streaming started")
            }
            EndReason::ResumeIndexOutOfRange => {}
            EndReason::Completed {
                client_checksum,
                server_checksum,
            } => {
                if client_checksum != server_checksum {
                    log!(
                        warn,
                        self,
                        client_checksum = format_args!("{client_checksum:#010x}"),
                        server_checksum = format_args!("{server_checksum:#010x}"),
                        "client acknowledged with a different checksum"
                    );
                }
            }
            EndReason::Disconnected(reason) => log!(info, self, %reason, "session detached"),
            EndReason::ClientViolation(reason) => {
                log!(info, self, %reason, "session detached after a protocol violation")
            }
            EndReason::TakenOver => {
                self.shared.telemetry.session_taken_over();
                log!(info, self, "session taken over by a newer connection");
            }
            EndReason::Shutdown => log!(info, self, "session detached by server shutdown"),
            EndReason::Lost(error) => {
                log!(warn, self, %error, "session vanished from the store while streaming")
            }
            EndReason::LeaseUnconfirmed(why) => log!(
                warn,
                self,
                %why,
                "stopped streaming: the lease could not be renewed, so another \
                 instance may own the session"
            ),
        }
    }

    /// Half-closes, then drains what the client still sends for a moment:
    /// closing a socket with unread input makes the kernel send RST, which
    /// can destroy the last frame before the client reads it.
    async fn close(&mut self) {
        let _ = timeout(REJECT_WRITE_TIMEOUT, self.stream.shutdown()).await;
        // On the heap: a 4 KiB array here would be part of every
        // connection's task for its whole life, not just while closing.
        let mut scratch = vec![0u8; 4096];
        let mut drained = 0;
        let stream = &mut self.stream;
        let _ = timeout(LINGER_TIME, async {
            while drained < LINGER_BYTES {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }
}

/// Writes all of `out` and flushes it (TLS holds written records until
/// flushed). Cancel-safe: bytes already written are removed from `out`.
async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    stream.write_all_buf(out).await?;
    stream.flush().await
}

/// Whether the connection goes on after [`Connection::carry_out`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carried {
    Going,
    Ended,
}

/// Why a write did not finish.
enum Interrupted {
    /// The connection must stop (takeover or shutdown).
    Stopped,
    /// The client is gone or does not read.
    Failed(String),
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

fn grant(attachment: numstream_store::Attachment) -> Grant {
    Grant {
        client_id: attachment.client_id,
        generation: attachment.generation,
        count: attachment.count,
        seed: attachment.seed,
        token: attachment.token,
        checksum: attachment.checksum,
    }
}

fn handshake_failure(failure: HelloFailure) -> HandshakeFailure {
    match failure {
        HelloFailure::Timeout => HandshakeFailure::Timeout,
        HelloFailure::Closed => HandshakeFailure::Closed,
        HelloFailure::IoError => HandshakeFailure::IoError,
        HelloFailure::Malformed => HandshakeFailure::Malformed,
        HelloFailure::UnsupportedVersion => HandshakeFailure::UnsupportedVersion,
        HelloFailure::UnexpectedFrame => HandshakeFailure::UnexpectedFrame,
        HelloFailure::ShuttingDown => HandshakeFailure::ShuttingDown,
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// Largest acceptable connection task future, in bytes. Every
    /// connection's task is this future, held for the whole session, so
    /// growing it is memory per session (see BENCHMARKS.md). tokio
    /// allocates a task in steps of 128 bytes (its cell is 128-aligned),
    /// and 528 is the most that fits 640 with tokio's 112 bytes of header
    /// and trailer: one byte more costs 128 per connection. 880 bytes
    /// before the wait became one poll function and the events, the
    /// ending and the lease renewal left it (1,384 before the protocol
    /// state moved into `ServerSession`, 2,592 before that).
    const CONNECTION_TASK_BUDGET: usize = 528;

    /// What every connection shares, for a server with default config,
    /// no limits and `store`.
    pub(crate) fn test_shared(store: Arc<dyn SessionStore>) -> Arc<Shared> {
        let config = ServerConfig::default();
        Arc::new(Shared {
            session_config: Arc::new(session_config(&config, false)),
            store,
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
            config,
        })
    }

    /// What the accept loop gives a connection from `peer` accepted at
    /// `accepted`, with nothing of it read yet.
    fn test_admission(shared: &Shared, peer: std::net::SocketAddr, accepted: Instant) -> Admission {
        Admission::new(
            Arc::new(tokio::sync::Semaphore::new(1))
                .try_acquire_owned()
                .expect("a free permit"),
            shared.telemetry.connection_open(),
            shared
                .peers
                .admit_connection(PeerKey::from(peer.ip()))
                .expect("unlimited"),
            accepted + shared.config.handshake_timeout,
            Early::NOTHING,
        )
    }

    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let shared = test_shared(Arc::new(numstream_store::InMemoryStore::new(10)));
        let admission = test_admission(&shared, peer, Instant::now());
        let task = serve(stream, peer, shared, admission);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= CONNECTION_TASK_BUDGET,
            "the connection task grew to {size} bytes (budget {CONNECTION_TASK_BUDGET}): \
             box what a connection needs only once (see Connection::admit, finish)"
        );
        drop((task, client));
    }

    /// A connection accepted on a loopback socket whose client has already
    /// sent `hello`, served as if it had been accepted `accepted_ago`
    /// before its task first ran (a server running that late); returns
    /// the first frame the client reads, and the store.
    async fn served_late(hello: Frame, accepted_ago: Duration) -> (Frame, Arc<dyn SessionStore>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let mut bytes = BytesMut::new();
        numstream_protocol::encode_frame(&hello, &mut bytes);
        client.write_all(&bytes).await.expect("send the hello");
        let (stream, peer) = listener.accept().await.expect("accept");
        let store: Arc<dyn SessionStore> = Arc::new(numstream_store::InMemoryStore::new(10));
        let shared = test_shared(store.clone());
        let accepted = Instant::now() - accepted_ago;
        let admission = test_admission(&shared, peer, accepted);
        let task = tokio::spawn(serve(stream, peer, shared, admission));
        let mut received = BytesMut::new();
        let frame = loop {
            if let Some(frame) =
                numstream_protocol::decode_frame(&mut received).expect("a valid frame")
            {
                break frame;
            }
            let read = timeout(Duration::from_secs(10), client.read_buf(&mut received))
                .await
                .expect("the server answers")
                .expect("read");
            assert!(read > 0, "closed without a frame");
        };
        drop(client);
        let _ = timeout(Duration::from_secs(10), task).await;
        (frame, store)
    }

    #[tokio::test]
    async fn an_open_too_late_to_be_answered_in_time_is_refused_without_a_session() {
        let client_id = uuid::Uuid::new_v4();
        let open = Frame::Open(numstream_protocol::frame::Open {
            client_id,
            count: 5,
        });
        let late = crate::overload::LATEST_CREATE + Duration::from_millis(500);
        let (frame, store) = served_late(open.clone(), late).await;
        match frame {
            Frame::Error(error) => {
                assert_eq!(error.code, ErrorCode::ServerBusy, "{error:?}");
                assert_eq!(
                    error.disposition,
                    numstream_protocol::Disposition::Retry,
                    "{error:?}"
                );
            }
            other => panic!("expected ERROR server_busy, got {other:?}"),
        }
        // No orphan: the client id is free for the client's next OPEN.
        assert_eq!(store.lookup(client_id).await.expect("lookup"), None);
        // In time, the same OPEN is served.
        let (frame, _) = served_late(open, Duration::ZERO).await;
        assert!(matches!(frame, Frame::Welcome(_)), "{frame:?}");
    }
}
