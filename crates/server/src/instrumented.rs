//! A [`SessionStore`] wrapper that times every operation for
//! `numstream_store_operation_duration_seconds` and counts store failures
//! in `numstream_store_errors_total`, so neither the stores nor the call
//! sites need to know about metrics.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::time::Instant;

use numstream_protocol::{ClientId, ResumeToken};
use numstream_store::{
    Attachment, NewSession, Occupancy, SessionInfo, SessionStore, StoreError, TakeoverNotice,
};

use crate::telemetry::{StoreOp, Telemetry};

/// `inner`, with every operation measured by `telemetry`.
#[derive(Debug)]
pub struct InstrumentedStore {
    inner: Arc<dyn SessionStore>,
    telemetry: Telemetry,
}

impl InstrumentedStore {
    /// Wraps `inner`; a disabled `telemetry` gets `inner` back unwrapped.
    pub fn wrap(inner: Arc<dyn SessionStore>, telemetry: &Telemetry) -> Arc<dyn SessionStore> {
        if !telemetry.is_enabled() {
            return inner;
        }
        Arc::new(Self {
            inner,
            telemetry: telemetry.clone(),
        })
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = operation.await;
        self.telemetry
            .store_operation(op, started.elapsed(), result.as_ref().err());
        result
    }
}

#[async_trait::async_trait]
impl SessionStore for InstrumentedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    async fn create(&self, session: NewSession, lease: Duration) -> Result<Attachment, StoreError> {
        self.timed(StoreOp::Create, self.inner.create(session, lease))
            .await
    }

    async fn attach(
        &self,
        client_id: ClientId,
        token: &ResumeToken,
        lease: Duration,
    ) -> Result<Attachment, StoreError> {
        self.timed(StoreOp::Attach, self.inner.attach(client_id, token, lease))
            .await
    }

    async fn renew(
        &self,
        client_id: ClientId,
        generation: u64,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.timed(
            StoreOp::Renew,
            self.inner.renew(client_id, generation, lease),
        )
        .await
    }

    /// Each renewal is one `renew` observation: the batch's duration is
    /// how long each of its callers waited.
    async fn renew_many(
        &self,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
        let started = Instant::now();
        let results = self.inner.renew_many(renewals, lease).await;
        let took = started.elapsed();
        for result in &results {
            self.telemetry
                .store_operation(StoreOp::Renew, took, result.as_ref().err());
        }
        results
    }

    async fn detach(
        &self,
        client_id: ClientId,
        generation: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.timed(
            StoreOp::Detach,
            self.inner.detach(client_id, generation, ttl),
        )
        .await
    }

    async fn complete(&self, client_id: ClientId, generation: u64) -> Result<(), StoreError> {
        self.timed(
            StoreOp::Complete,
            self.inner.complete(client_id, generation),
        )
        .await
    }

    async fn lookup(&self, client_id: ClientId) -> Result<Option<SessionInfo>, StoreError> {
        self.timed(StoreOp::Lookup, self.inner.lookup(client_id))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Ping, self.inner.ping()).await
    }

    /// Not timed: a scrape or probe reads it, no session waits for it.
    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        self.inner.occupancy().await
    }

    fn batches_renewals(&self) -> bool {
        self.inner.batches_renewals()
    }

    fn latency(&self) -> Option<Duration> {
        self.inner.latency()
    }

    fn renewal_lag(&self) -> Option<Duration> {
        self.inner.renewal_lag()
    }

    fn takeover_notices(&self) -> Option<BoxStream<'static, TakeoverNotice>> {
        self.inner.takeover_notices()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use numstream_store::InMemoryStore;
    use numstream_store::conformance::{LONG, random_session};

    #[tokio::test]
    async fn occupancy_is_forwarded_to_the_wrapped_store() {
        let recorder = crate::prometheus_recorder();
        let telemetry = Telemetry::new(&recorder, "memory", None);
        let store = InstrumentedStore::wrap(Arc::new(InMemoryStore::new(5)), &telemetry);
        store.create(random_session(), LONG).await.expect("create");
        assert_eq!(
            store.occupancy().await,
            Ok(Some(Occupancy {
                sessions: 1,
                max: 5
            }))
        );
    }
}
