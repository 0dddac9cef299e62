//! A store for the server's unit tests: the in-memory store, with single
//! renewals that can be made to fail and batched renewals that are counted
//! and can be made slow.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use numstream_protocol::{ClientId, ResumeToken};
use numstream_store::{
    Attachment, InMemoryStore, NewSession, Occupancy, SessionInfo, SessionStore, StoreError,
};

#[derive(Debug)]
pub(crate) struct TestStore {
    pub(crate) inner: InMemoryStore,
    /// Renewals fail with `Unavailable` while set.
    pub(crate) down: AtomicBool,
    pub(crate) renew_many_calls: AtomicUsize,
    pub(crate) renewals_batched: AtomicUsize,
    pub(crate) renew_many_delay: Duration,
    /// How long each `lookup` takes (a slow store).
    pub(crate) lookup_delay: Duration,
    /// What [`SessionStore::renewal_lag`] reports, in milliseconds.
    pub(crate) renewal_lag_ms: AtomicU64,
}

impl Default for TestStore {
    fn default() -> Self {
        Self {
            inner: InMemoryStore::new(1_000),
            down: AtomicBool::new(false),
            renew_many_calls: AtomicUsize::new(0),
            renewals_batched: AtomicUsize::new(0),
            renew_many_delay: Duration::ZERO,
            lookup_delay: Duration::ZERO,
            renewal_lag_ms: AtomicU64::new(0),
        }
    }
}

#[async_trait::async_trait]
impl SessionStore for TestStore {
    fn kind(&self) -> &'static str {
        "test"
    }
    fn is_shared(&self) -> bool {
        true
    }
    async fn create(&self, session: NewSession, lease: Duration) -> Result<Attachment, StoreError> {
        self.inner.create(session, lease).await
    }
    async fn attach(
        &self,
        client_id: ClientId,
        token: &ResumeToken,
        lease: Duration,
    ) -> Result<Attachment, StoreError> {
        self.inner.attach(client_id, token, lease).await
    }
    async fn renew(
        &self,
        client_id: ClientId,
        generation: u64,
        lease: Duration,
    ) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down for the test".into()));
        }
        self.inner.renew(client_id, generation, lease).await
    }
    async fn renew_many(
        &self,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
        self.renew_many_calls.fetch_add(1, Ordering::SeqCst);
        self.renewals_batched
            .fetch_add(renewals.len(), Ordering::SeqCst);
        tokio::time::sleep(self.renew_many_delay).await;
        self.inner.renew_many(renewals, lease).await
    }
    async fn detach(
        &self,
        client_id: ClientId,
        generation: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.detach(client_id, generation, ttl).await
    }
    async fn complete(&self, client_id: ClientId, generation: u64) -> Result<(), StoreError> {
        self.inner.complete(client_id, generation).await
    }
    async fn lookup(&self, client_id: ClientId) -> Result<Option<SessionInfo>, StoreError> {
        tokio::time::sleep(self.lookup_delay).await;
        self.inner.lookup(client_id).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        self.inner.occupancy().await
    }
    fn renewal_lag(&self) -> Option<Duration> {
        Some(Duration::from_millis(
            self.renewal_lag_ms.load(Ordering::Relaxed),
        ))
    }
}
