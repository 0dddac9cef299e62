//! Lease renewals of one server gathered into batches for a shared store.
//!
//! Every streaming connection renews its lease every TTL/3; at 100,000
//! sessions that is 10,000 store round trips a second, and when the store
//! slows down (Redis on a starved core) the queue of renewals grows until
//! they time out, leases go unconfirmed, and streams stop. Here the
//! renewals of all connections go through one task that sends whatever has
//! gathered as one `renew_many`, one batch in flight at a time: a slower
//! store makes the next batch larger, not the queue longer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::isolated::LATENCY_SMOOTHING;
use crate::overload::{smooth, to_ns};
use numstream_protocol::{ClientId, ResumeToken};
use numstream_store::{
    Attachment, NewSession, Occupancy, SessionInfo, SessionStore, StoreError, TakeoverNotice,
};

/// Most renewals in one store call: bounds one script's run time in Redis
/// (which blocks every other client of that Redis meanwhile).
const MAX_BATCH: usize = 512;

/// Renewals waiting for the batching task; past this, callers wait to
/// enqueue (each streaming connection has at most one renewal pending).
const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

struct Renewal {
    /// When the connection asked: how long it waited is how far behind
    /// the store is (see [`SessionStore::renewal_lag`]).
    queued: Instant,
    client_id: ClientId,
    generation: u64,
    lease: Duration,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// `inner`, with `renew` batched; every other operation goes straight
/// through.
pub(crate) struct BatchedRenewals {
    inner: Arc<dyn SessionStore>,
    queue: mpsc::Sender<Renewal>,
}

impl std::fmt::Debug for BatchedRenewals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedRenewals")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl BatchedRenewals {
    /// Wraps `inner` and starts the batching task, which ends when the
    /// wrapper is dropped. Must run inside a tokio runtime.
    pub(crate) fn wrap(inner: Arc<dyn SessionStore>) -> Arc<dyn SessionStore> {
        Self::wrap_timed(inner, None)
    }

    /// [`BatchedRenewals::wrap`], measuring into `gauges` (see
    /// [`crate::isolated`]).
    pub(crate) fn wrap_timed(
        inner: Arc<dyn SessionStore>,
        gauges: Option<RenewalGauges>,
    ) -> Arc<dyn SessionStore> {
        let (queue, pending) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(send_batches(inner.clone(), pending, gauges));
        Arc::new(Self { inner, queue })
    }
}

/// What the batching task measures, in nanoseconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct RenewalGauges {
    /// Each batch's round trip, folded into the store's smoothed latency.
    pub(crate) latency: Arc<AtomicU64>,
    /// How long the oldest renewal of the last batch had waited when it
    /// was answered; zero once the queue is empty.
    pub(crate) lag: Arc<AtomicU64>,
}

async fn send_batches(
    store: Arc<dyn SessionStore>,
    mut pending: mpsc::Receiver<Renewal>,
    gauges: Option<RenewalGauges>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Every renewal asks for the server's one lease length; should
        // they ever differ, each length gets its own call.
        while !batch.is_empty() {
            let lease = batch[0].lease;
            let (same, rest): (Vec<Renewal>, Vec<Renewal>) =
                batch.drain(..).partition(|renewal| renewal.lease == lease);
            batch = rest;
            let keys: Vec<(ClientId, u64)> = same
                .iter()
                .map(|renewal| (renewal.client_id, renewal.generation))
                .collect();
            let started = Instant::now();
            let results = store.renew_many(&keys, lease).await;
            if let Some(gauges) = &gauges {
                smooth(&gauges.latency, started.elapsed(), LATENCY_SMOOTHING);
                let oldest = same.iter().map(|renewal| renewal.queued).min();
                let waited = oldest.map_or(Duration::ZERO, |queued| queued.elapsed());
                gauges.lag.store(to_ns(waited), Ordering::Relaxed);
            }
            for (renewal, result) in same.into_iter().zip(results) {
                // The connection may have ended meanwhile; nobody to tell.
                let _ = renewal.reply.send(result);
            }
        }
        if pending.is_empty()
            && let Some(gauges) = &gauges
        {
            gauges.lag.store(0, Ordering::Relaxed);
        }
    }
}

#[async_trait::async_trait]
impl SessionStore for BatchedRenewals {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
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
        let (reply, answer) = oneshot::channel();
        let renewal = Renewal {
            queued: Instant::now(),
            client_id,
            generation,
            lease,
            reply,
        };
        if self.queue.send(renewal).await.is_err() {
            // The batching task is gone (runtime shutting down): renew
            // directly rather than report a store failure that is not one.
            return self.inner.renew(client_id, generation, lease).await;
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => self.inner.renew(client_id, generation, lease).await,
        }
    }

    async fn renew_many(
        &self,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
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
        self.inner.lookup(client_id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        self.inner.occupancy().await
    }

    fn latency(&self) -> Option<Duration> {
        self.inner.latency()
    }

    fn renewal_lag(&self) -> Option<Duration> {
        self.inner.renewal_lag()
    }

    fn batches_renewals(&self) -> bool {
        true
    }

    fn takeover_notices(&self) -> Option<BoxStream<'static, TakeoverNotice>> {
        self.inner.takeover_notices()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_store::TestStore;
    use numstream_store::InMemoryStore;
    use numstream_store::conformance;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn concurrent_renewals_share_store_calls_and_keep_their_own_answers() {
        // Slow, like a loaded store: renewals arriving meanwhile gather.
        let counting = Arc::new(TestStore {
            renew_many_delay: Duration::from_millis(20),
            ..TestStore::default()
        });
        let store = BatchedRenewals::wrap(counting.clone());
        let lease = Duration::from_secs(60);
        let mut sessions = Vec::new();
        for _ in 0..200 {
            let session = conformance::random_session();
            store.create(session, lease).await.expect("create");
            sessions.push(session.client_id);
        }
        // Half renew their own generation, half a stale one.
        let renewals = sessions.iter().enumerate().map(|(i, &client_id)| {
            let store = store.clone();
            let generation = if i % 2 == 0 { 1 } else { 7 };
            async move { store.renew(client_id, generation, lease).await }
        });
        let results = futures::future::join_all(renewals).await;
        for (i, result) in results.iter().enumerate() {
            if i % 2 == 0 {
                assert_eq!(result, &Ok(()), "renewal {i}");
            } else {
                assert_eq!(
                    result,
                    &Err(StoreError::Superseded { current: 1 }),
                    "renewal {i}"
                );
            }
        }
        let calls = counting.renew_many_calls.load(Ordering::SeqCst);
        assert_eq!(counting.renewals_batched.load(Ordering::SeqCst), 200);
        assert!(
            calls < 20,
            "200 concurrent renewals took {calls} store calls"
        );
    }

    #[tokio::test]
    async fn batched_store_passes_the_store_conformance_suite() {
        conformance::run_all(&*BatchedRenewals::wrap(Arc::new(InMemoryStore::new(1_000)))).await;
    }

    #[tokio::test(start_paused = true)]
    async fn batched_store_reports_the_bound_of_the_store_it_wraps() {
        let memory = Arc::new(InMemoryStore::new(3));
        let sweeper = memory.spawn_sweeper(conformance::SHORT / 4, |_| {});
        conformance::run_bound_checks(&*BatchedRenewals::wrap(memory), 3).await;
        sweeper.abort();
    }
}
