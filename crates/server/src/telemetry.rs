//! What the server tells operators about itself: Prometheus metrics (the
//! handles, registered once, and their names) and the readiness flag that
//! `/readyz` reports. `docs/operations.md` describes every metric; a test
//! (`tests/operations.rs`) checks that it describes exactly what `/metrics`
//! exports, and that the names follow Prometheus's conventions.
//!
//! Handles are registered once per server, with every label value known in
//! advance (error codes, handshake failure reasons, store operations), so
//! the streaming path only bumps atomics: no lock and no label lookup per
//! number (a histogram sample is a lock-free push; the exporter allocates
//! one block per 64 samples and frees it at the next scrape or upkeep). A disabled [`Telemetry`] holds no-op handles and
//! skips its bookkeeping, so a server without `--metrics-addr` pays nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString};
use numstream_protocol::{ClientId, ErrorCode};
use numstream_store::StoreError;
use tokio::time::Instant;

/// Metric names, shared with the docs and the tests.
pub mod names {
    pub const BUILD_INFO: &str = "numstream_build_info";
    pub const READY: &str = "numstream_ready";
    pub const CONNECTIONS: &str = "numstream_connections";
    pub const CONNECTIONS_ACCEPTED: &str = "numstream_connections_accepted_total";
    pub const CONNECTIONS_OVER_LIMIT: &str = "numstream_connections_over_limit_total";
    pub const ADMISSION_REFUSALS: &str = "numstream_admission_refusals_total";
    pub const SCHEDULING_LAG: &str = "numstream_scheduling_lag_seconds";
    pub const STORE_LATENCY: &str = "numstream_store_latency_seconds";
    pub const RENEWAL_LAG: &str = "numstream_store_renewal_lag_seconds";
    pub const OVERLOADED: &str = "numstream_overloaded";
    pub const STREAM_LIMIT: &str = "numstream_stream_limit";
    pub const RUN_QUEUE_DEPTH: &str = "numstream_run_queue_depth";
    pub const ACCEPT_PAUSES: &str = "numstream_accept_pauses_total";
    pub const HANDSHAKE_FAILURES: &str = "numstream_handshake_failures_total";
    pub const REJECTIONS: &str = "numstream_rejections_total";
    pub const SESSIONS_OPEN: &str = "numstream_sessions_open";
    pub const SESSIONS_ATTACHED: &str = "numstream_sessions_attached";
    pub const SESSIONS_AWAITING_RESUME: &str = "numstream_sessions_awaiting_resume";
    pub const SESSIONS_CREATED: &str = "numstream_sessions_created_total";
    pub const SESSIONS_RESUMED: &str = "numstream_sessions_resumed_total";
    pub const SESSIONS_COMPLETED: &str = "numstream_sessions_completed_total";
    pub const SESSIONS_EXPIRED: &str = "numstream_sessions_expired_total";
    pub const SESSIONS_TAKEN_OVER: &str = "numstream_sessions_taken_over_total";
    pub const SESSIONS_DETACHED: &str = "numstream_sessions_detached_total";
    pub const NUMBERS_SENT: &str = "numstream_numbers_sent_total";
    pub const NUMBERS_REPLAYED: &str = "numstream_numbers_replayed_total";
    pub const TIME_TO_RESUME: &str = "numstream_time_to_resume_seconds";
    pub const SEND_LATENESS: &str = "numstream_send_lateness_seconds";
    pub const STORE_OPERATION_DURATION: &str = "numstream_store_operation_duration_seconds";
    pub const STORE_ERRORS: &str = "numstream_store_errors_total";
}

/// Histogram bucket upper bounds (seconds), by metric.
pub mod buckets {
    /// A number's write against its due time: sub-millisecond normally,
    /// seconds for a client that stopped reading.
    pub const SEND_LATENESS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    /// Detach to the next WELCOME: a backoff step (about 100 ms) after a
    /// clean drop, up to the session TTL (30 s by default).
    pub const TIME_TO_RESUME: &[f64] = &[
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    ];
    /// One store round trip: microseconds in memory, a millisecond or so
    /// on Redis, 2 s at Redis's operation timeout.
    pub const STORE_OPERATION: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
}

/// Why a connection never got past its handshake (label `reason` of
/// `numstream_handshake_failures_total`). Sessions refused after a valid
/// OPEN or RESUME are counted by `numstream_rejections_total` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    /// No complete OPEN or RESUME within `--handshake-timeout`.
    Timeout,
    /// The peer closed before sending one, or sent it and closed before
    /// the connection was accepted (it gave up waiting in the backlog).
    Closed,
    /// Reading failed (reset, ...).
    IoError,
    /// Bytes that are not a v1 frame.
    Malformed,
    /// A frame of another protocol version.
    UnsupportedVersion,
    /// A valid frame that is neither OPEN nor RESUME.
    UnexpectedFrame,
    /// The server was shutting down.
    ShuttingDown,
    /// The TLS handshake failed: no TLS within the handshake timeout, an
    /// unacceptable or missing client certificate, no common protocol or
    /// ALPN `numstream/1`.
    Tls,
    /// Plaintext on a port that requires TLS (answered with a plaintext
    /// `malformed` that says so).
    NotTls,
}

impl HandshakeFailure {
    pub(crate) const ALL: [HandshakeFailure; 9] = [
        Self::Timeout,
        Self::Closed,
        Self::IoError,
        Self::Malformed,
        Self::UnsupportedVersion,
        Self::UnexpectedFrame,
        Self::ShuttingDown,
        Self::Tls,
        Self::NotTls,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::IoError => "io_error",
            Self::Malformed => "malformed",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnexpectedFrame => "unexpected_frame",
            Self::ShuttingDown => "shutting_down",
            Self::Tls => "tls",
            Self::NotTls => "not_tls",
        }
    }
}

/// Why a connection or an OPEN was turned away at admission, before any
/// session work (label `reason` of `numstream_admission_refusals_total`).
/// Each is answered `server_busy` (retry) when the server can afford to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmissionRefusal {
    /// `--max-connections` connections were open.
    Connections,
    /// The session store is full (`--max-sessions`).
    Sessions,
    /// The peer's address held its share of connections.
    ConnectionsPerAddress,
    /// The peer's address held its share of connections still in their
    /// handshake.
    HandshakesPerAddress,
    /// The peer's address held its share of sessions.
    SessionsPerAddress,
    /// The peer's address opened sessions faster than its rate.
    SessionRatePerAddress,
    /// The server is overloaded (scheduling lag or store latency).
    Overload,
}

impl AdmissionRefusal {
    pub(crate) const ALL: [AdmissionRefusal; 7] = [
        Self::Connections,
        Self::Sessions,
        Self::ConnectionsPerAddress,
        Self::HandshakesPerAddress,
        Self::SessionsPerAddress,
        Self::SessionRatePerAddress,
        Self::Overload,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Sessions => "sessions",
            Self::ConnectionsPerAddress => "connections_per_address",
            Self::HandshakesPerAddress => "handshakes_per_address",
            Self::SessionsPerAddress => "sessions_per_address",
            Self::SessionRatePerAddress => "new_session_rate_per_address",
            Self::Overload => "overload",
        }
    }
}

impl From<crate::peers::Refusal> for AdmissionRefusal {
    fn from(refusal: crate::peers::Refusal) -> Self {
        use crate::peers::Refusal;
        match refusal {
            Refusal::Connections(_) => Self::ConnectionsPerAddress,
            Refusal::Handshakes(_) => Self::HandshakesPerAddress,
            Refusal::Sessions(_) => Self::SessionsPerAddress,
            Refusal::SessionRate(_) => Self::SessionRatePerAddress,
        }
    }
}

/// A session store operation (label `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Create,
    Attach,
    Renew,
    Detach,
    Complete,
    Lookup,
    Ping,
}

impl StoreOp {
    const ALL: [StoreOp; 7] = [
        Self::Create,
        Self::Attach,
        Self::Renew,
        Self::Detach,
        Self::Complete,
        Self::Lookup,
        Self::Ping,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Attach => "attach",
            Self::Renew => "renew",
            Self::Detach => "detach",
            Self::Complete => "complete",
            Self::Lookup => "lookup",
            Self::Ping => "ping",
        }
    }
}

/// Metrics and readiness of one server. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("enabled", &self.inner.enabled)
            .field("accepting", &self.is_accepting())
            .field("store", &self.inner.store_kind)
            .finish_non_exhaustive()
    }
}

struct Inner {
    enabled: bool,
    store_kind: &'static str,
    accepting: AtomicBool,
    attached_now: AtomicUsize,
    /// Client connections open now and the most allowed, for `/readyz`.
    connections_now: AtomicUsize,
    connection_limit: AtomicUsize,
    /// The server's overload state, once `run` has made it.
    overload: std::sync::OnceLock<Arc<crate::overload::Overload>>,
    overload_gauges: Option<OverloadGauges>,
    /// The store's session count, sampled at scrape time, when the store
    /// can count its sessions (the in-memory store).
    session_gauges: Option<SessionGauges>,
    departures: Mutex<Departures>,

    ready: Gauge,
    connections: Gauge,
    connections_accepted: Counter,
    accept_pauses: Counter,
    connections_over_limit: Counter,
    admission_refusals: [Counter; AdmissionRefusal::ALL.len()],
    handshake_failures: [Counter; HandshakeFailure::ALL.len()],
    rejections: Vec<(ErrorCode, Counter)>,
    sessions_attached: Gauge,
    sessions_created: Counter,
    sessions_resumed: Counter,
    sessions_completed: Counter,
    sessions_expired: Counter,
    sessions_taken_over: Counter,
    sessions_detached: Counter,
    numbers_sent: Counter,
    numbers_replayed: Counter,
    time_to_resume: Histogram,
    send_lateness: Histogram,
    store_durations: [Histogram; StoreOp::ALL.len()],
    store_errors: [Counter; StoreOp::ALL.len()],
}

/// Counts the sessions a store holds, cheaply (called at every scrape).
pub type SessionCounter = Box<dyn Fn() -> usize + Send + Sync>;

/// The overload signals, sampled at scrape time.
struct OverloadGauges {
    scheduling_lag: Gauge,
    store_latency: Gauge,
    renewal_lag: Gauge,
    overloaded: Gauge,
    stream_limit: Gauge,
    run_queue_depth: Gauge,
}

/// `numstream_sessions_open` and `_awaiting_resume`, sampled from a counter.
struct SessionGauges {
    count: SessionCounter,
    open: Gauge,
    awaiting_resume: Gauge,
}

impl Telemetry {
    /// Registers every metric of a server whose sessions live in a store of
    /// kind `store_kind` (the `store` label) with `recorder`.
    /// `numstream_sessions_open` and `numstream_sessions_awaiting_resume` exist
    /// only with a `session_count` (the in-memory store's `len`): a shared
    /// store's sessions belong to no instance.
    pub fn new(
        recorder: &dyn Recorder,
        store_kind: &'static str,
        session_count: Option<SessionCounter>,
    ) -> Self {
        Self::build(Some(recorder), store_kind, session_count)
    }

    /// No metrics and no per-session bookkeeping; always "accepting" once
    /// `run` starts. It still counts open connections and streaming
    /// sessions: admission control needs those counts with or without
    /// metrics.
    pub fn disabled() -> Self {
        Self::build(None, "", None)
    }

    fn build(
        recorder: Option<&dyn Recorder>,
        store_kind: &'static str,
        session_count: Option<SessionCounter>,
    ) -> Self {
        let registrar = Registrar { recorder };
        let r = &registrar;
        let store = || Label::new("store", store_kind);
        if let Some(build_info) = r.gauge(
            names::BUILD_INFO,
            vec![Label::new("version", env!("CARGO_PKG_VERSION")), store()],
            "Always 1; its labels tell the server version and the session store kind.",
        ) {
            build_info.set(1.0);
        }
        let inner = Inner {
            enabled: recorder.is_some(),
            store_kind,
            accepting: AtomicBool::new(false),
            attached_now: AtomicUsize::new(0),
            connections_now: AtomicUsize::new(0),
            connection_limit: AtomicUsize::new(usize::MAX),
            overload: std::sync::OnceLock::new(),
            overload_gauges: recorder.is_some().then(|| OverloadGauges {
                scheduling_lag: r.gauge_or_noop(
                    names::SCHEDULING_LAG,
                    vec![],
                    "How late the server's runtime runs a timer's task, smoothed over about a second: how late every task runs.",
                ),
                store_latency: r.gauge_or_noop(
                    names::STORE_LATENCY,
                    vec![store()],
                    "Session store round trip, smoothed over about ten operations.",
                ),
                renewal_lag: r.gauge_or_noop(
                    names::RENEWAL_LAG,
                    vec![store()],
                    "How long the lease renewals answered last had waited for the shared store, from asking to answer; past 2 s it cuts the stream limit as the scheduling lag does. 0 while none wait.",
                ),
                overloaded: r.gauge_or_noop(
                    names::OVERLOADED,
                    vec![],
                    "1 while new sessions are refused because the server is overloaded, else 0.",
                ),
                stream_limit: r.gauge_or_noop(
                    names::STREAM_LIMIT,
                    vec![],
                    "Sessions this server streams at most before it refuses new ones, learned from its scheduling lag and how long lease renewals wait for the store; +Inf until it first runs short.",
                ),
                run_queue_depth: r.gauge_or_noop(
                    names::RUN_QUEUE_DEPTH,
                    vec![],
                    "Tasks waiting in the runtime's shared run queue (spawned on a full worker queue, or woken from another thread): a handful on a healthy server; past --overload-queue the server stops accepting connections until it drains (at most 2 s at a time).",
                ),
            }),
            session_gauges: session_count.and_then(|count| {
                Some(SessionGauges {
                    count,
                    open: r.gauge(
                        names::SESSIONS_OPEN,
                        vec![store()],
                        "Sessions held by the store, attached or awaiting a resume (in-memory store only).",
                    )?,
                    awaiting_resume: r.gauge(
                        names::SESSIONS_AWAITING_RESUME,
                        vec![store()],
                        "Sessions awaiting a resume: open minus attached (in-memory store only).",
                    )?,
                })
            }),
            departures: Mutex::new(Departures::default()),
            ready: r.gauge_or_noop(
                names::READY,
                vec![],
                "1 when /readyz would answer 200 at this scrape, else 0: a scraper's view of readiness.",
            ),
            connections: r.gauge_or_noop(
                names::CONNECTIONS,
                vec![],
                "Client connections open on this instance, in any state.",
            ),
            connections_accepted: r.counter(
                names::CONNECTIONS_ACCEPTED,
                vec![],
                "Client connections accepted, including those then turned away.",
            ),
            accept_pauses: r.counter(
                names::ACCEPT_PAUSES,
                vec![],
                "Times the accept loop stopped taking connections until the runtime's shared run queue drained below --overload-queue.",
            ),
            connections_over_limit: r.counter(
                names::CONNECTIONS_OVER_LIMIT,
                vec![],
                "Connections turned away because --max-connections were open (answered server_busy when possible).",
            ),
            admission_refusals: AdmissionRefusal::ALL.map(|reason| {
                r.counter(
                    names::ADMISSION_REFUSALS,
                    vec![Label::new("reason", reason.as_str())],
                    "Connections and OPENs turned away at admission, by the limit they hit: global (connections, sessions) or the peer address's own share.",
                )
            }),
            handshake_failures: HandshakeFailure::ALL.map(|reason| {
                r.counter(
                    names::HANDSHAKE_FAILURES,
                    vec![Label::new("reason", reason.as_str())],
                    "Connections that ended without a valid OPEN or RESUME, by reason.",
                )
            }),
            rejections: ErrorCode::ALL
                .iter()
                .map(|&code| {
                    let counter = r.counter(
                        names::REJECTIONS,
                        vec![Label::new("code", code.as_str())],
                        "ERROR frames sent to clients, by error code: refused handshakes and streams the server ended.",
                    );
                    (code, counter)
                })
                .collect(),
            sessions_attached: r.gauge_or_noop(
                names::SESSIONS_ATTACHED,
                vec![store()],
                "Sessions this instance is streaming right now.",
            ),
            sessions_created: r.counter(
                names::SESSIONS_CREATED,
                vec![store()],
                "Sessions created by an OPEN on this instance.",
            ),
            sessions_resumed: r.counter(
                names::SESSIONS_RESUMED,
                vec![store()],
                "Sessions resumed by a RESUME on this instance (streaming continued).",
            ),
            sessions_completed: r.counter(
                names::SESSIONS_COMPLETED,
                vec![store()],
                "Sessions whose FINAL was acknowledged on this instance.",
            ),
            sessions_expired: r.counter(
                names::SESSIONS_EXPIRED,
                vec![store()],
                "Sessions that expired unresumed, as the in-memory store sweeps them or a resume finds them (Redis expires sessions by itself, unseen: stays 0).",
            ),
            sessions_taken_over: r.counter(
                names::SESSIONS_TAKEN_OVER,
                vec![store()],
                "Streams on this instance stopped because a newer connection (here or on another instance) resumed their session.",
            ),
            sessions_detached: r.counter(
                names::SESSIONS_DETACHED,
                vec![store()],
                "Streams on this instance that ended without completion and handed their session back for a resume.",
            ),
            numbers_sent: r.counter(
                names::NUMBERS_SENT,
                vec![],
                "Numbers written to clients (FINAL included).",
            ),
            numbers_replayed: r.counter(
                names::NUMBERS_REPLAYED,
                vec![],
                "Numbers sent again on a resumed connection that this instance had already written on an earlier connection of the same session.",
            ),
            time_to_resume: r.histogram(
                names::TIME_TO_RESUME,
                vec![],
                "From the detach of a session's previous connection on this instance to the WELCOME of its resume.",
            ),
            send_lateness: r.histogram(
                names::SEND_LATENESS,
                vec![],
                "How long after its scheduled time each number was written (sessions with a non-zero interval).",
            ),
            store_durations: StoreOp::ALL.map(|op| {
                r.histogram(
                    names::STORE_OPERATION_DURATION,
                    vec![store(), Label::new("op", op.as_str())],
                    "Session store operations as the server waited for them, by store kind and operation.",
                )
            }),
            store_errors: StoreOp::ALL.map(|op| {
                r.counter(
                    names::STORE_ERRORS,
                    vec![store(), Label::new("op", op.as_str())],
                    "Session store operations that failed because the store was unavailable or returned corrupt data.",
                )
            }),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Whether the accept loop is running (not starting, not draining).
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::Relaxed)
    }

    pub(crate) fn set_accepting(&self, accepting: bool) {
        self.inner.accepting.store(accepting, Ordering::Relaxed);
    }

    /// Records what `/readyz` answers now, for the scrape about to render.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.inner.ready.set(if ready { 1.0 } else { 0.0 });
    }

    /// Brings the gauges that are sampled rather than tracked up to date;
    /// call before rendering a scrape.
    pub fn refresh(&self) {
        if let (Some(gauges), Some(overload)) =
            (&self.inner.overload_gauges, self.inner.overload.get())
        {
            gauges
                .scheduling_lag
                .set(overload.scheduling_lag().as_secs_f64());
            gauges
                .store_latency
                .set(overload.store_latency().as_secs_f64());
            gauges.renewal_lag.set(overload.renewal_lag().as_secs_f64());
            gauges.overloaded.set(if overload.overloaded().is_some() {
                1.0
            } else {
                0.0
            });
            gauges.stream_limit.set(
                overload
                    .stream_limit()
                    .map_or(f64::INFINITY, |limit| limit as f64),
            );
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                gauges
                    .run_queue_depth
                    .set(runtime.metrics().global_queue_depth() as f64);
            }
        }
        if let Some(gauges) = &self.inner.session_gauges {
            let open = (gauges.count)();
            let attached = self.inner.attached_now.load(Ordering::Relaxed);
            gauges.open.set(open as f64);
            gauges
                .awaiting_resume
                .set(open.saturating_sub(attached) as f64);
        }
    }

    /// The accept loop waited for the run queue to drain.
    pub(crate) fn accept_pause_ended(&self) {
        self.inner.accept_pauses.increment(1);
    }

    pub(crate) fn connection_accepted(&self) {
        self.inner.connections_accepted.increment(1);
    }

    pub(crate) fn connection_over_limit(&self) {
        self.inner.connections_over_limit.increment(1);
    }

    /// Counts an open connection until the guard is dropped.
    pub(crate) fn connection_open(&self) -> GaugeGuard {
        GaugeGuard::new(
            self.inner.connections.clone(),
            (self.inner.clone(), Tally::Connections),
        )
    }

    /// Counts a streaming session until the guard is dropped.
    pub(crate) fn session_attached(&self) -> GaugeGuard {
        GaugeGuard::new(
            self.inner.sessions_attached.clone(),
            (self.inner.clone(), Tally::Attached),
        )
    }

    /// Sessions this process streams right now (what admission control
    /// limits).
    pub fn streaming_now(&self) -> usize {
        self.inner.attached_now.load(Ordering::Relaxed)
    }

    /// The overload state `/readyz` and the scrapes report.
    pub(crate) fn set_overload(&self, overload: Arc<crate::overload::Overload>) {
        let _ = self.inner.overload.set(overload);
    }

    /// `Some(limit)` while the accept loop waits for the run queue to
    /// drain below `limit` tasks.
    pub fn accept_paused(&self) -> Option<usize> {
        self.inner.overload.get()?.accept_paused()
    }

    /// `Some` while the server refuses new sessions because it is
    /// overloaded.
    pub fn overloaded(&self) -> Option<crate::overload::Overloaded> {
        self.inner.overload.get()?.overloaded()
    }

    /// The connection limit `/readyz` compares open connections with.
    pub(crate) fn set_connection_limit(&self, limit: usize) {
        self.inner.connection_limit.store(limit, Ordering::Relaxed);
    }

    /// `Some(limit)` while every connection slot is taken, so new clients
    /// are turned away and should be sent elsewhere.
    pub fn connections_saturated(&self) -> Option<usize> {
        let limit = self.inner.connection_limit.load(Ordering::Relaxed);
        (self.inner.connections_now.load(Ordering::Relaxed) >= limit).then_some(limit)
    }

    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure) {
        self.inner.handshake_failures[reason.index()].increment(1);
    }

    pub(crate) fn admission_refused(&self, reason: AdmissionRefusal) {
        self.inner.admission_refusals[reason.index()].increment(1);
    }

    pub(crate) fn rejected(&self, code: ErrorCode) {
        if let Some((_, counter)) = self.inner.rejections.iter().find(|(c, _)| *c == code) {
            counter.increment(1);
        }
    }

    pub(crate) fn session_created(&self) {
        self.inner.sessions_created.increment(1);
    }

    pub(crate) fn session_completed(&self, client_id: ClientId) {
        self.inner.sessions_completed.increment(1);
        if self.inner.enabled {
            lock(&self.inner.departures).map.remove(&client_id);
        }
    }

    /// Counts sessions that expired unresumed (the in-memory store's
    /// sweeper reports them; resumes that find one expired count here too).
    pub fn sessions_expired(&self, sessions: u64) {
        self.inner.sessions_expired.increment(sessions);
    }

    pub(crate) fn session_taken_over(&self) {
        self.inner.sessions_taken_over.increment(1);
    }

    pub(crate) fn session_detached(&self) {
        self.inner.sessions_detached.increment(1);
    }

    /// `numbers` were written at `written`; the first was due at `due`.
    /// Per number: atomics only.
    pub(crate) fn sent(&self, numbers: u32, due: Option<Instant>, written: Instant) {
        self.inner.numbers_sent.increment(u64::from(numbers));
        if let Some(due) = due {
            self.inner
                .send_lateness
                .record(written.saturating_duration_since(due).as_secs_f64());
        }
    }

    /// Remembers, for a later resume on this instance, how far a session's
    /// connection got and whether it ended by a detach (`detached`) or
    /// because a newer connection took over. Entries older than `keep_for`
    /// (the session TTL: their session is gone) are dropped in passing.
    pub(crate) fn departed(
        &self,
        client_id: ClientId,
        generation: u64,
        sent_up_to: u16,
        detached: bool,
        keep_for: Duration,
    ) {
        if !self.inner.enabled {
            return;
        }
        let now = Instant::now();
        let departure = Departure {
            generation,
            sent_up_to,
            detached_at: detached.then_some(now),
            at: now,
        };
        lock(&self.inner.departures).insert(client_id, departure, now, keep_for);
    }

    /// Counts a resume from `next_index` at `generation`, and, when this
    /// instance streamed the session's previous connection, the numbers it
    /// is about to send again and how long the session waited since it was
    /// detached here.
    pub(crate) fn session_resumed(&self, client_id: ClientId, generation: u64, next_index: u16) {
        let previous = match self.inner.enabled {
            true => lock(&self.inner.departures).map.remove(&client_id),
            false => None,
        };
        if let Some(previous) = previous.filter(|p| p.generation < generation) {
            let replayed = previous.sent_up_to.saturating_sub(next_index);
            if replayed > 0 {
                self.inner.numbers_replayed.increment(u64::from(replayed));
            }
            if let Some(detached_at) = previous.detached_at {
                self.inner
                    .time_to_resume
                    .record(detached_at.elapsed().as_secs_f64());
            }
        }
        // Last, so a scrape that sees the resume sees all of it.
        self.inner.sessions_resumed.increment(1);
    }

    /// Records one store operation's latency, and its failure if the store
    /// itself failed (not a session outcome such as `NotFound`).
    pub(crate) fn store_operation(&self, op: StoreOp, took: Duration, error: Option<&StoreError>) {
        let Some(index) = StoreOp::ALL.iter().position(|o| *o == op) else {
            return;
        };
        self.inner.store_durations[index].record(took.as_secs_f64());
        if matches!(
            error,
            Some(StoreError::Unavailable(_) | StoreError::Corrupt(_))
        ) {
            self.inner.store_errors[index].increment(1);
        }
    }
}

/// Which of the server's own tallies a [`GaugeGuard`] also keeps (gauges
/// cannot be read back, and scrapes and `/readyz` need these values).
#[derive(Debug, Clone, Copy)]
enum Tally {
    Attached,
    Connections,
}

impl Inner {
    fn tally(&self, tally: Tally) -> &AtomicUsize {
        match tally {
            Tally::Attached => &self.attached_now,
            Tally::Connections => &self.connections_now,
        }
    }
}

/// Increments a gauge now and decrements it when dropped.
#[derive(Debug)]
pub(crate) struct GaugeGuard {
    gauge: Gauge,
    tally: (Arc<Inner>, Tally),
}

impl GaugeGuard {
    fn new(gauge: Gauge, tally: (Arc<Inner>, Tally)) -> Self {
        gauge.increment(1.0);
        tally.0.tally(tally.1).fetch_add(1, Ordering::Relaxed);
        Self { gauge, tally }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        let (inner, which) = &self.tally;
        inner.tally(*which).fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

/// How a session's last connection on this instance ended.
#[derive(Debug, Clone, Copy)]
struct Departure {
    generation: u64,
    /// Index after the last number written.
    sent_up_to: u16,
    /// When it was detached; `None` when it was taken over.
    detached_at: Option<Instant>,
    at: Instant,
}

/// Departures awaiting a resume, pruned of stale ones in amortised O(1):
/// a full pass only when the map has doubled since the last one.
#[derive(Debug, Default)]
struct Departures {
    map: HashMap<ClientId, Departure>,
    prune_at: usize,
}

const MIN_PRUNE_AT: usize = 1024;

impl Departures {
    fn insert(
        &mut self,
        client_id: ClientId,
        departure: Departure,
        now: Instant,
        keep_for: Duration,
    ) {
        self.map.insert(client_id, departure);
        if self.map.len() >= self.prune_at.max(MIN_PRUNE_AT) {
            self.map
                .retain(|_, d| now.saturating_duration_since(d.at) < keep_for);
            self.prune_at = self.map.len() * 2;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers handles with a recorder, or hands out no-ops without one.
struct Registrar<'a> {
    recorder: Option<&'a dyn Recorder>,
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Registrar<'_> {
    fn counter(&self, name: &'static str, labels: Vec<Label>, help: &'static str) -> Counter {
        let Some(recorder) = self.recorder else {
            return Counter::noop();
        };
        recorder.describe_counter(name.into(), None, SharedString::const_str(help));
        recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>, help: &'static str) -> Option<Gauge> {
        let recorder = self.recorder?;
        recorder.describe_gauge(name.into(), None, SharedString::const_str(help));
        Some(recorder.register_gauge(&Key::from_parts(name, labels), &METADATA))
    }

    fn gauge_or_noop(&self, name: &'static str, labels: Vec<Label>, help: &'static str) -> Gauge {
        self.gauge(name, labels, help).unwrap_or_else(Gauge::noop)
    }

    fn histogram(&self, name: &'static str, labels: Vec<Label>, help: &'static str) -> Histogram {
        let Some(recorder) = self.recorder else {
            return Histogram::noop();
        };
        recorder.describe_histogram(name.into(), None, SharedString::const_str(help));
        recorder.register_histogram(&Key::from_parts(name, labels), &METADATA)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departures_are_pruned_once_stale() {
        let mut departures = Departures::default();
        let now = Instant::now();
        let departure = Departure {
            generation: 1,
            sent_up_to: 0,
            detached_at: None,
            at: now,
        };
        for n in 0..MIN_PRUNE_AT as u128 {
            departures.insert(
                ClientId::from_u128(n + 1),
                departure,
                now + Duration::from_secs(60),
                Duration::from_secs(30),
            );
        }
        assert_eq!(departures.map.len(), 0, "every departure was stale");
        departures.insert(
            ClientId::from_u128(1),
            departure,
            now,
            Duration::from_secs(30),
        );
        assert_eq!(departures.map.len(), 1);
    }

    /// Counters are indexed by `index()`: it must be the position in `ALL`.
    #[test]
    fn label_indices_follow_the_all_arrays() {
        for (position, reason) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(reason.index(), position, "{}", reason.as_str());
        }
        for (position, reason) in AdmissionRefusal::ALL.iter().enumerate() {
            assert_eq!(reason.index(), position, "{}", reason.as_str());
        }
    }

    #[test]
    fn disabled_telemetry_keeps_no_per_session_state_but_counts_streams() {
        let telemetry = Telemetry::disabled();
        telemetry.departed(ClientId::from_u128(1), 1, 10, true, Duration::from_secs(30));
        assert!(lock(&telemetry.inner.departures).map.is_empty());
        let attached = telemetry.session_attached();
        assert_eq!(telemetry.streaming_now(), 1);
        drop(attached);
        assert_eq!(telemetry.streaming_now(), 0);
    }
}
