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
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

use numstream_protocol::{ClientId, ResumeToken};
use numstream_store::{
    Attachment, NewSession, Occupancy, SessionInfo, SessionStore, StoreError, TakeoverNotice,
};

use crate::overload::smooth;

/// Most operations of one server in flight in the store at once; past it,
/// an operation fails at once (`Unavailable`, which clients retry) instead
/// of queueing. A store slower than its load (Redis short of CPU) answers
/// an operation queued behind thousands of others after its caller's
/// timeout, yet still runs it: the caller retries, and the store's queue
/// fills with work nobody waits for. A resume whose attach timed out that
/// way even took its session over (a new generation) for nothing, and the
/// next resume had to take it over again. Measured in the 100,000-session
/// Redis run of issue 15: 117,101 attaches and creates timed out while
/// Redis ran each script in 235 µs instead of 65 µs. At a healthy store's
/// millisecond this bound allows 256,000 operations a second, so it only
/// ever binds on a store that cannot keep up. Lease renewals do not count:
/// they go out one batch at a time (see [`crate::renewals`]).
const MOST_IN_FLIGHT: usize = 256;
/// Weight of one operation in the smoothed latency: about the last ten.
pub(crate) const LATENCY_SMOOTHING: f64 = 0.1;

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
    /// [`SessionStore::renewal_lag`], `Some` when `inner` is our batching
    /// of the renewals on the store's runtime: a renewal is then queued
    /// from the caller's thread, not spawned.
    renewal_lag_ns: Option<Arc<AtomicU64>>,
    /// Places for operations in flight ([`MOST_IN_FLIGHT`]).
    in_flight: Arc<Semaphore>,
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
        Ok(Arc::new(Self::start(inner)?))
    }

    fn start(inner: Arc<dyn SessionStore>) -> Result<Self, IsolationError> {
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
        //
        // Each renewal is queued for that task straight from the caller's
        // thread rather than spawned there as its own operation: the
        // queue wakes the store's thread once per batch, not once per
        // renewal (3,500 renewals a second at 35,000 streams, most of the
        // store thread's operations; issue 15's profile put the store
        // threads at 17% of the servers' core).
        let latency_ns = Arc::new(AtomicU64::new(0));
        let mut renewal_lag_ns = None;
        let inner = if inner.is_shared() && !inner.batches_renewals() {
            let _on_the_store_runtime = runtime.enter();
            let gauges = crate::renewals::RenewalGauges {
                latency: latency_ns.clone(),
                ..Default::default()
            };
            renewal_lag_ns = Some(gauges.lag.clone());
            crate::renewals::BatchedRenewals::wrap_timed(inner, Some(gauges))
        } else {
            inner
        };
        Ok(Self {
            inner,
            runtime,
            latency_ns,
            renewal_lag_ns,
            in_flight: Arc::new(Semaphore::new(MOST_IN_FLIGHT)),
            _stop: stop,
        })
    }

    /// Runs `operation` on the store's runtime, timing it there.
    async fn there<T: Send + 'static>(
        &self,
        operation: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Ok(place) = self.in_flight.clone().try_acquire_owned() else {
            return Err(StoreError::Unavailable(format!(
                "the session store is behind: {MOST_IN_FLIGHT} operations of this server \
                 are still in flight"
            )));
        };
        let latency = self.latency_ns.clone();
        // The place is held until the operation ends in the store, not
        // until its caller stops waiting: that is when the store is done
        // with it.
        let task = self.runtime.spawn(async move {
            let started = Instant::now();
            let result = operation.await;
            smooth(&latency, started.elapsed(), LATENCY_SMOOTHING);
            drop(place);
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
        if self.renewal_lag_ns.is_some() {
            return self.inner.renew(client_id, generation, lease).await;
        }
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

    fn renewal_lag(&self) -> Option<Duration> {
        match &self.renewal_lag_ns {
            Some(lag) => Some(Duration::from_nanos(lag.load(Ordering::Relaxed))),
            None => self.inner.renewal_lag(),
        }
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
    use numstream_store::{InMemoryStore, NewSession};

    /// Sessions 1 to `count`, created in `store`.
    async fn created(store: &dyn SessionStore, count: u8) -> Vec<NewSession> {
        let sessions: Vec<_> = (1..=count)
            .map(numstream_store::conformance::session)
            .collect();
        for session in &sessions {
            store
                .create(*session, Duration::from_secs(1))
                .await
                .expect("create");
        }
        sessions
    }

    /// A renewal of generation 1 of `client_id`, on a task of its own.
    fn renewal<S: SessionStore + ?Sized + 'static>(
        store: Arc<S>,
        client_id: ClientId,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        tokio::spawn(async move { store.renew(client_id, 1, Duration::from_secs(60)).await })
    }

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
            let sessions = created(&*store, 20).await;
            let renew = |client_id| renewal(store.clone(), client_id);
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

    /// A renewal is queued for the batching task from the caller's thread,
    /// not spawned onto the store's runtime as an operation of its own: 50
    /// renewals waiting behind a slow batch leave the store's runtime with
    /// its batching task and little else, where a task each would be 50
    /// more (each a wake-up and a poll of the store's thread; issue 15).
    #[tokio::test]
    async fn renewals_are_queued_not_spawned_on_the_stores_runtime() {
        use std::sync::atomic::Ordering::Relaxed;
        let shared = Arc::new(crate::test_store::TestStore {
            renew_many_delay: Duration::from_millis(300),
            ..Default::default()
        });
        let store = Arc::new(IsolatedStore::start(shared.clone()).expect("isolate"));
        let idle_tasks = store.runtime.metrics().num_alive_tasks();
        let sessions = created(&*store, 50).await;
        let renew = |client_id| renewal(store.clone(), client_id);
        // One renewal first, so that the rest queue behind its batch.
        let mut renewals = vec![renew(sessions[0].client_id)];
        numstream_harness::wait::until_sync(
            Duration::from_secs(5),
            "a renewal batch in flight",
            || shared.renew_many_calls.load(Relaxed) > 0,
        )
        .await;
        renewals.extend(sessions[1..].iter().map(|session| renew(session.client_id)));
        // Let them all ask (the batch in flight takes 300 ms).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let busy_tasks = store.runtime.metrics().num_alive_tasks();
        assert!(
            busy_tasks <= idle_tasks + 2,
            "{busy_tasks} tasks on the store's runtime with renewals queued, {idle_tasks} idle"
        );
        // The renewals queued behind the first batch had waited its
        // 300 ms when it ended; the second batch is in flight.
        numstream_harness::wait::until_sync(Duration::from_secs(5), "a second batch", || {
            shared.renew_many_calls.load(Relaxed) >= 2
        })
        .await;
        let lag = store.renewal_lag().expect("measured");
        assert!(lag >= Duration::from_millis(300), "renewal lag {lag:?}");
        for renewal in renewals {
            assert_eq!(renewal.await.expect("task"), Ok(()));
        }
        assert!(
            shared.renew_many_calls.load(Relaxed) < 50,
            "one store call per renewal: not batched"
        );
        // Nothing waits any more: no lag.
        numstream_harness::wait::until_sync(Duration::from_secs(5), "no renewal lag", || {
            store.renewal_lag() == Some(Duration::ZERO)
        })
        .await;
    }

    /// Operations past [`MOST_IN_FLIGHT`] fail at once instead of
    /// queueing behind a store that cannot keep up; the places come back
    /// as the operations end, and renewals are never refused for it.
    #[tokio::test]
    async fn operations_past_the_in_flight_bound_fail_at_once() {
        let slow = Arc::new(crate::test_store::TestStore {
            lookup_delay: Duration::from_millis(500),
            ..Default::default()
        });
        let store = Arc::new(IsolatedStore::start(slow).expect("isolate"));
        let session = numstream_store::conformance::session(1);
        store
            .create(session, Duration::from_secs(60))
            .await
            .expect("create");
        let lookups: Vec<_> = (0..MOST_IN_FLIGHT)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.lookup(session.client_id).await })
            })
            .collect();
        numstream_harness::wait::until_sync(Duration::from_secs(5), "every place taken", || {
            store.in_flight.available_permits() == 0
        })
        .await;
        let started = std::time::Instant::now();
        let refused = store.lookup(session.client_id).await;
        assert!(
            matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("in flight")),
            "{refused:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "refused after {:?}: it queued",
            started.elapsed()
        );
        assert_eq!(
            store
                .renew(session.client_id, 1, Duration::from_secs(60))
                .await,
            Ok(()),
            "a renewal is not an operation in flight"
        );
        for lookup in lookups {
            assert!(lookup.await.expect("task").expect("lookup").is_some());
        }
        assert!(
            store.lookup(session.client_id).await.is_ok(),
            "the places came back"
        );
    }

    #[tokio::test]
    async fn the_isolated_store_passes_the_conformance_suite() {
        let store = IsolatedStore::wrap(Arc::new(InMemoryStore::new(10_000))).expect("isolate");
        numstream_store::conformance::run_all(&*store).await;
    }
}
