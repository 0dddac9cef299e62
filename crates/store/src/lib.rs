//! The interface between a numstream server and wherever session state
//! lives, plus the embedded in-memory implementation.
//!
//! The trait is shaped for a store *shared by many server instances*: every
//! operation is a single atomic step on one session (so it maps onto one Lua
//! script or one compare-and-set in a networked store), and none is called
//! per number streamed: a session costs a handful of store operations over
//! its whole life (create, attach per resume, a lease renewal every few
//! seconds, detach per disconnection, complete).
//!
//! ## Session life cycle
//!
//! ```text
//!            create                 detach(gen)
//!   (none) ─────────▶ Attached ─────────────────▶ Detached
//!                     │  ▲  lease renewed by       │  expires ttl after detach
//!                     │  │  its owner              │
//!                     │  └──── attach(token) ──────┘  (generation + 1)
//!                     │  attach(token) while attached = takeover (generation + 1)
//!                     └─ complete(gen) ─▶ (none)
//! ```
//!
//! The *generation* fences connections: each successful attach increments
//! it, and detach/renew/complete only act when the caller's generation is
//! still current. A server whose connection holds a stale generation has
//! been superseded and must stop streaming.
//!
//! An attached session also has a deadline, its *lease*, which the owning
//! server renews while it streams. If the owner dies without detaching, the
//! lease lapses and the session expires as if it had been detached.
//!
//! ## Takeover notices
//!
//! A store shared by several processes may also push *takeover notices*
//! ([`SessionStore::takeover_notices`]): "client id X is now at generation
//! N". A server that still streams X at an older generation stops at once
//! instead of at its next lease renewal. Notices are a latency
//! optimisation, never the fence itself: a lost notice only delays the
//! stop until the renewal reports `Superseded`.

use std::fmt::Debug;
use std::time::Duration;

use futures::stream::BoxStream;
use numstream_protocol::{ClientId, ResumeToken, SequenceChecksum, SessionSeed};

pub mod memory;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use memory::InMemoryStore;

/// Everything needed to create a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSession {
    pub client_id: ClientId,
    pub seed: SessionSeed,
    pub count: u16,
    pub token: ResumeToken,
    /// The CRC-32C of the whole sequence, which FINAL carries. Computed
    /// once when the session is made ([`NewSession::new`]) and kept with
    /// it, so that sending FINAL costs the same at any index instead of a
    /// pass over up to 65,535 numbers per resume.
    pub checksum: u32,
}

impl NewSession {
    /// A session whose checksum is computed here from `seed` and `count`.
    pub fn new(client_id: ClientId, seed: SessionSeed, count: u16, token: ResumeToken) -> Self {
        Self {
            client_id,
            seed,
            count,
            token,
            checksum: SequenceChecksum::of_session(&seed, count).checksum(),
        }
    }
}

/// A session attached to the caller's connection: what the server needs to
/// stream it, and the generation that fences this attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    pub client_id: ClientId,
    pub seed: SessionSeed,
    pub count: u16,
    pub token: ResumeToken,
    /// The session's whole-sequence checksum, as given at create.
    pub checksum: u32,
    /// Incremented by every create/attach; 1 for a fresh session.
    pub generation: u64,
}

/// How full a bounded store is, for readiness and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Sessions counted against the bound: a create is refused with
    /// [`StoreError::Full`] while `sessions >= max`.
    pub sessions: usize,
    /// The bound.
    pub max: usize,
}

/// What [`SessionStore::lookup`] reports about a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub count: u16,
    pub generation: u64,
    /// True while a connection holds the session (its lease has not lapsed).
    pub attached: bool,
    /// Time until the session expires if nothing renews or attaches it.
    pub expires_in: Duration,
}

/// Pushed by a shared store after every successful attach: `client_id` now
/// belongs to `generation`, so any connection holding an older generation
/// has been taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakeoverNotice {
    pub client_id: ClientId,
    pub generation: u64,
}

/// Why a store operation did not happen. Every variant except
/// `Unavailable` and `Corrupt` describes the session, not the store, and
/// left the store unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("a live session for this client id already exists")]
    AlreadyExists,
    #[error("no such session (it expired and was forgotten, completed, or never existed)")]
    NotFound,
    #[error("the session expired")]
    Expired,
    #[error("the resume token does not match the session's")]
    BadToken,
    #[error("the connection's generation is stale: the session is now at generation {current}")]
    Superseded { current: u64 },
    #[error("the session store is full ({max} sessions)")]
    Full { max: usize },
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
    #[error("the session record is corrupt: {0}")]
    Corrupt(String),
}

impl From<StoreError> for numstream_protocol::server::StoreFailure {
    fn from(error: StoreError) -> Self {
        use numstream_protocol::server::StoreFailure;
        match error {
            StoreError::AlreadyExists => StoreFailure::AlreadyExists,
            StoreError::NotFound => StoreFailure::NotFound,
            StoreError::Expired => StoreFailure::Expired,
            StoreError::BadToken => StoreFailure::BadToken,
            StoreError::Superseded { .. } => StoreFailure::Superseded,
            StoreError::Full { max } => StoreFailure::Full { max },
            StoreError::Unavailable(reason) => StoreFailure::Unavailable(reason),
            StoreError::Corrupt(reason) => StoreFailure::Corrupt(reason),
        }
    }
}

/// The session store interface. See the crate docs for the life cycle.
///
/// Implementations must make each method atomic with respect to every other
/// call on the same client id, from any process sharing the store.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + Debug + 'static {
    /// Short name for logs and metrics labels (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Whether sessions outlive this process, so that another server
    /// instance can resume them (decides what a draining server tells its
    /// clients).
    fn is_shared(&self) -> bool;

    /// Creates a session, attached to the caller with generation 1 and a
    /// lease of `lease`. Fails with `AlreadyExists` while another session
    /// for the client id is alive (an expired one is replaced), and with
    /// `Full` while the store holds as many sessions as its bound allows
    /// (attached or awaiting a resume; an expired session stops counting
    /// once the store notices, see [`occupancy`](Self::occupancy)).
    async fn create(&self, session: NewSession, lease: Duration) -> Result<Attachment, StoreError>;

    /// Attaches an existing session to the caller: checks expiry, then the
    /// token (in constant time), then increments the generation, marks the
    /// session attached and sets its lease. Attaching a session that is
    /// still attached elsewhere is a takeover and succeeds.
    async fn attach(
        &self,
        client_id: ClientId,
        token: &ResumeToken,
        lease: Duration,
    ) -> Result<Attachment, StoreError>;

    /// Extends the lease of the caller's attachment. `Superseded` means a
    /// newer connection took the session over.
    async fn renew(
        &self,
        client_id: ClientId,
        generation: u64,
        lease: Duration,
    ) -> Result<(), StoreError>;

    /// [`renew`](Self::renew) for many attachments at once: one result per
    /// entry, in order. The default renews them one by one; a store with
    /// round trips does them in one, which is what keeps a shared store's
    /// renewal load proportional to servers rather than to sessions.
    async fn renew_many(
        &self,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::with_capacity(renewals.len());
        for &(client_id, generation) in renewals {
            results.push(self.renew(client_id, generation, lease).await);
        }
        results
    }

    /// Marks the session disconnected; it expires `ttl` from now unless
    /// resumed. No-op error `Superseded` if the generation is stale.
    async fn detach(
        &self,
        client_id: ClientId,
        generation: u64,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Removes a finished session, if the caller's generation is current.
    async fn complete(&self, client_id: ClientId, generation: u64) -> Result<(), StoreError>;

    /// Reads a live session without changing it.
    async fn lookup(&self, client_id: ClientId) -> Result<Option<SessionInfo>, StoreError>;

    /// Checks that the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// How many sessions count against the store's bound, and the bound;
    /// `None` for a store without one. One query, cheap enough for every
    /// readiness probe and metrics scrape, never per session.
    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        Ok(None)
    }

    /// The store's own round trip, smoothed over its last operations and
    /// measured where its I/O runs (so not inflated by a busy caller), if
    /// something measures it; the server refuses new sessions while it is
    /// high. `None` by default: an in-process store answers in
    /// microseconds.
    fn latency(&self) -> Option<Duration> {
        None
    }

    /// How long the lease renewals answered last had waited, from when
    /// their connections asked to when the store answered: how far behind
    /// the store is with the leases of the sessions this server streams.
    /// Zero while none wait. `None` where nobody measures it (a store that
    /// is not shared renews in microseconds).
    fn renewal_lag(&self) -> Option<Duration> {
        None
    }

    /// Whether [`SessionStore::renew`] already gathers concurrent calls
    /// into [`SessionStore::renew_many`] batches, so that a caller must not
    /// batch them again. `false` by default.
    fn batches_renewals(&self) -> bool {
        false
    }

    /// A stream of takeover notices from every process sharing the store,
    /// this one included, or `None` when every takeover is local (the
    /// in-memory store) and the server's own registry already fences it.
    ///
    /// Best effort and at most once: notices published while the stream
    /// is reconnecting are lost, and lease renewal (`Superseded`) remains
    /// the fence of last resort. Each call starts an independent
    /// subscription that ends when the stream is dropped; implementations
    /// may spawn tokio tasks, so call it inside a runtime.
    fn takeover_notices(&self) -> Option<BoxStream<'static, TakeoverNotice>> {
        None
    }
}
