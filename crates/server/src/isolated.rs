//! A shared store's I/O on a thread and runtime of its own, so that the
//! server's own load cannot starve it.
//!
//! On the server's runtime, the Redis connection's driver task (which
//! reads Redis's replies off the socket) and every operation's timeout are
//! tasks among tens of thousands of streaming connections. When the CPU
//! runs short, that runtime polls each task later and later: a reply that
//! Redis sent in a millisecond is read seconds later, the 2 s operation
//! timeout fires first, a lease renewal counts as failed, the stream is
//! shed, and its resume times out the same way. The store was never slow;
//! we were slow to read it (issue 15's collapse).
//!
//! Here the inner store runs on a single-threaded runtime on its own OS
//! thread: the kernel schedules that thread beside the server's worker
//! threads, so the store gets its fair share of the CPU however many tasks
//! the server runs, and its timeouts measure Redis, not our run queue.
//! Each operation is spawned onto that runtime and its result awaited from
//! the caller's: a cross-thread wake-up per operation, a handful of
//! operations per session. An operation whose caller gives up still runs
//! to its end there, which is what a store operation already promises
//! (each is one atomic step whose outcome the caller may not learn).
//!
//! The round trip of every operation, as this runtime saw it, feeds a
//! smoothed store latency ([`SessionStore::latency`]) for admission control.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::Instant;

use numstream_protocol::{ClientId, ResumeToken};
use numstream_store::{
    Attachment, NewSession, Occupancy, SessionInfo, SessionStore, StoreError, TakeoverNotice,
};

use crate::overload::smooth;

/// Weight of one operation in the smoothed latency: about the last ten.
const LATENCY_SMOOTHING: f64 = 0.1;

/// Why the store's runtime could not be started.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("cannot start the session store's thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot build the session store's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// `inner`, run on a runtime of its own. See the module docs.
pub struct IsolatedStore {
    inner: Arc<dyn SessionStore>,
    runtime: Handle,
    latency_ns: Arc<AtomicU64>,
    /// Dropping it stops the store's runtime, once the last clone of this
    /// store is gone.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for IsolatedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolatedStore")
            .field("inner", &self.inner)
            .field("latency", &self.latency())
            .finish_non_exhaustive()
    }
}

impl IsolatedStore {
    /// Starts the store's thread (`numstream-store`) and runtime, and wraps
    /// `inner` so that all its I/O happens there. Build `inner` without
    /// doing I/O (e.g. `RedisStore::connect_lazy`), so that its connection
    /// and the tasks driving it are made on the store's runtime too.
    pub fn wrap(inner: Arc<dyn SessionStore>) -> Result<Arc<dyn SessionStore>, IsolationError> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("numstream-store".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        // Runs the store's tasks until the store is dropped.
                        runtime.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(error) => {
                        let _ = handle_tx.send(Err(error));
                    }
                }
            })
            .map_err(IsolationError::Thread)?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| {
                IsolationError::Runtime(std::io::Error::other("the store thread ended at once"))
            })?
            .map_err(IsolationError::Runtime)?;
        // A shared store's lease renewals are batched here, on the store's
        // runtime: the batching task sends one batch at a time, so on a
        // starved server runtime it sent them as late as that runtime ran
        // it, every renewal behind it waited, and leases lapsed with Redis
        // idle (issue 15, measured: renewals 1.6 s on average).
        let inner = if inner.is_shared() && !inner.batches_renewals() {
            let _on_the_store_runtime = runtime.enter();
            crate::renewals::BatchedRenewals::wrap(inner)
        } else {
            inner
        };
        Ok(Arc::new(Self {
            inner,
            runtime,
            latency_ns: Arc::new(AtomicU64::new(0)),
            _stop: stop,
        }))
    }

    /// Runs `operation` on the store's runtime, timing it there.
    async fn there<T: Send + 'static>(
        &self,
        operation: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let latency = self.latency_ns.clone();
        let task = self.runtime.spawn(async move {
            let started = Instant::now();
            let result = operation.await;
            smooth(&latency, started.elapsed(), LATENCY_SMOOTHING);
            result
        });
        task.await.map_err(|error| {
            StoreError::Unavailable(format!("the session store's task failed: {error}"))
        })
    }
}

#[async_trait::async_trait]
impl SessionStore for IsolatedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    async fn create(&self, session: NewSession, lease: Duration) -> Result<Attachment, StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.create(session, lease).await })
            .await?
    }

    async fn attach(
        &self,
        client_id: ClientId,
        token: &ResumeToken,
        lease: Duration,
    ) -> Result<Attachment, StoreError> {
        let (inner, token) = (self.inner.clone(), *token);
        self.there(async move { inner.attach(client_id, &token, lease).await })
            .await?
    }

    async fn renew(
        &self,
        client_id: ClientId,
        generation: u64,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.renew(client_id, generation, lease).await })
            .await?
    }

    async fn renew_many(
        &self,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
        let (inner, batch) = (self.inner.clone(), renewals.to_vec());
        match self
            .there(async move { inner.renew_many(&batch, lease).await })
            .await
        {
            Ok(results) => results,
            Err(error) => vec![Err(error); renewals.len()],
        }
    }

    async fn detach(
        &self,
        client_id: ClientId,
        generation: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.detach(client_id, generation, ttl).await })
            .await?
    }

    async fn complete(&self, client_id: ClientId, generation: u64) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.complete(client_id, generation).await })
            .await?
    }

    async fn lookup(&self, client_id: ClientId) -> Result<Option<SessionInfo>, StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.lookup(client_id).await })
            .await?
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.ping().await }).await?
    }

    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        let inner = self.inner.clone();
        self.there(async move { inner.occupancy().await }).await?
    }

    fn batches_renewals(&self) -> bool {
        self.inner.batches_renewals()
    }

    fn latency(&self) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.latency_ns.load(Ordering::Relaxed),
        ))
    }

    /// The subscription's tasks are spawned on the store's runtime too.
    fn takeover_notices(&self) -> Option<BoxStream<'static, TakeoverNotice>> {
        let _on_store_runtime = self.runtime.enter();
        self.inner.takeover_notices()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use numstream_store::InMemoryStore;

    /// The caller's runtime is blocked (its only thread sleeps without
    /// yielding), yet a store operation that needs a runtime to finish (a
    /// renewal batch with a 50 ms timer in it) completes meanwhile: it runs
    /// on the store's own thread. On the caller's runtime its timer could
    /// not fire until the blocking ended, and the lease would still be short.
    #[test]
    fn operations_finish_while_the_callers_runtime_is_blocked() {
        use futures::FutureExt;
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        caller.block_on(async {
            let slow = Arc::new(crate::test_store::TestStore {
                renew_many_delay: Duration::from_millis(50),
                ..Default::default()
            });
            let store = IsolatedStore::wrap(slow.clone()).expect("isolate");
            let session = numstream_store::conformance::session(1);
            store
                .create(session, Duration::from_secs(1))
                .await
                .expect("create");
            let renewal = tokio::spawn({
                let store = store.clone();
                async move {
                    store
                        .renew_many(&[(session.client_id, 1)], Duration::from_secs(60))
                        .await
                }
            });
            // Let the renewal start, then block this runtime's only thread.
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(300));
            // Still blocked (nothing has yielded): read the record directly.
            let info = slow
                .inner
                .lookup(session.client_id)
                .now_or_never()
                .expect("the in-memory store answers at once")
                .expect("lookup")
                .expect("the session");
            assert!(
                info.expires_in > Duration::from_secs(30),
                "the renewal did not run while the caller was blocked: {info:?}"
            );
            assert_eq!(renewal.await.expect("task"), vec![Ok(())]);
            let latency = store.latency().expect("measured");
            assert!(
                latency < Duration::from_millis(250),
                "latency {latency:?}: measured on the store's thread, not the caller's 300 ms"
            );
        });
    }

    /// Single renewals of a shared store are gathered into batches on the
    /// store's runtime, not the caller's. The batching sends one batch at
    /// a time; here the first takes 100 ms, and meanwhile the caller's
    /// only thread blocks for 300 ms. The renewals queued behind the first
    /// batch must still go out during the block: a batching task on the
    /// caller's runtime could not even see the first batch finish, and on
    /// a starved server leases lapsed that way with the store idle.
    #[test]
    fn renewals_are_batched_on_the_stores_runtime() {
        use std::sync::atomic::Ordering::Relaxed;
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        caller.block_on(async {
            let shared = Arc::new(crate::test_store::TestStore {
                renew_many_delay: Duration::from_millis(100),
                ..Default::default()
            });
            let store = IsolatedStore::wrap(shared.clone()).expect("isolate");
            // What the server does with a store that does not batch.
            let store = if store.batches_renewals() {
                store
            } else {
                crate::renewals::BatchedRenewals::wrap(store)
            };
            let sessions: Vec<_> = (1..=20)
                .map(numstream_store::conformance::session)
                .collect();
            for session in &sessions {
                store
                    .create(*session, Duration::from_secs(1))
                    .await
                    .expect("create");
            }
            let renew = |client_id| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.renew(client_id, 1, Duration::from_secs(60)).await },
                )
            };
            let first = renew(sessions[0].client_id);
            while shared.renew_many_calls.load(Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
            let rest: Vec<_> = sessions[1..]
                .iter()
                .map(|session| renew(session.client_id))
                .collect();
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            std::thread::sleep(Duration::from_millis(300));
            let batched = shared.renewals_batched.load(Relaxed);
            assert_eq!(
                batched, 20,
                "renewals sent while the caller was blocked: {batched} of 20"
            );
            let calls = shared.renew_many_calls.load(Relaxed);
            assert!(
                calls < 20,
                "{calls} store calls for 20 renewals: not batched"
            );
            assert_eq!(first.await.expect("task"), Ok(()));
            for renewal in rest {
                assert_eq!(renewal.await.expect("task"), Ok(()));
            }
        });
    }

    #[tokio::test]
    async fn the_isolated_store_passes_the_conformance_suite() {
        let store = IsolatedStore::wrap(Arc::new(InMemoryStore::new(10_000))).expect("isolate");
        numstream_store::conformance::run_all(&*store).await;
    }
}
