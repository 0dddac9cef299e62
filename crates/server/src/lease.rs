//! The lease a streaming connection holds on its session, renewed in the
//! background of the streaming loop.
//!
//! Renewals run concurrently with streaming (a slow or unreachable store
//! never delays a number) every `lease / 3`. A failed renewal is retried
//! soon after; the connection keeps streaming only while the lease it last
//! confirmed has at least a third of its length left. Past that point it
//! can no longer tell whether another instance has taken the session over
//! (a partition hides both the takeover notice and `Superseded`), and the
//! store is about to forget the session, so it stops and tells its client
//! to resume, which leaves that client a third of the lease to do so
//! before the session expires.
//!
//! The deadline is measured from when the last successful renewal was
//! *sent*, so the store's own expiry can only come later than this
//! process believes (clock rates aside). Only a renewal that failed, or
//! that was sent before the deadline and is still unanswered at it, stops
//! the stream: a lease that aged without any attempt (its connection
//! waited for a local predecessor to stop) gets one renewal first.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use numstream_protocol::ClientId;
use numstream_store::{Attachment, SessionStore, StoreError};

use crate::config::ServerConfig;

/// Longest wait before retrying a failed renewal (each attempt is itself
/// bounded by the store's operation timeout).
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Why a connection may no longer stream its session.
#[derive(Debug)]
pub(crate) enum LeaseLoss {
    /// A newer generation owns the session.
    Superseded,
    /// The store no longer has the session (expired, or its data was lost).
    Gone(StoreError),
    /// No renewal succeeded in time; the last error says why.
    Unconfirmed(String),
}

pub(crate) struct Lease {
    store: Arc<dyn SessionStore>,
    client_id: ClientId,
    generation: u64,
    length: Duration,
    period: Duration,
    next_renewal: Instant,
    /// Streaming must stop here unless a renewal succeeds first.
    stop_at: Instant,
    /// The renewal on its way, with when it was sent.
    in_flight: Option<(Instant, BoxFuture<'static, Result<(), StoreError>>)>,
    /// Why the last renewal failed; `None` once one succeeds.
    last_error: Option<StoreError>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("generation", &self.generation)
            .field("next_renewal", &self.next_renewal)
            .field("stop_at", &self.stop_at)
            .field("renewing", &self.in_flight.is_some())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The lease `session` got from the create or attach sent at `granted`.
    pub(crate) fn new(
        store: Arc<dyn SessionStore>,
        session: &Attachment,
        config: &ServerConfig,
        granted: Instant,
    ) -> Self {
        let length = config.lease();
        let period = config.lease_renewal_period();
        Self {
            store,
            client_id: session.client_id,
            generation: session.generation,
            length,
            period,
            // Sessions opened in the same second would otherwise renew in
            // the same second for their whole lives: spread each one's
            // renewals over the last tenth of the period.
            next_renewal: granted + period - spread(period / 10, session.client_id),
            stop_at: stop_at(granted, length),
            in_flight: None,
            last_error: None,
        }
    }

    /// Whether [`Lease::lost`] has anything to do before `at` (a renewal to
    /// send or collect, a deadline to watch): when it has not, a caller may
    /// leave it unpolled until then, and save the timer it would arm.
    pub(crate) fn busy_before(&self, at: Instant) -> bool {
        self.in_flight.is_some() || self.last_error.is_some() || self.next_renewal <= at
    }

    /// Renews the lease for as long as it can and completes only once it
    /// is lost. Cancel-safe: a renewal in flight survives being raced in a
    /// `select!` and is picked up by the next call.
    pub(crate) async fn lost(&mut self) -> LeaseLoss {
        loop {
            let Some((sent, renewal)) = self.in_flight.as_mut() else {
                // One timer, not a race of two: this future sits in every
                // streaming connection's task, so its size is per session.
                let failing = self.last_error.is_some();
                let wake_at = if failing {
                    self.stop_at.min(self.next_renewal)
                } else {
                    self.next_renewal
                };
                sleep_until(wake_at).await;
                if failing && Instant::now() >= self.stop_at {
                    return self.unconfirmed();
                }
                let store = self.store.clone();
                let (client_id, generation, length) =
                    (self.client_id, self.generation, self.length);
                self.in_flight = Some((
                    Instant::now(),
                    Box::pin(async move { store.renew(client_id, generation, length).await }),
                ));
                continue;
            };
            let sent = *sent;
            // A renewal sent after the deadline is the first attempt for a
            // lease that aged unrenewed: its answer decides.
            let in_time = sent < self.stop_at;
            let outcome = tokio::select! {
                biased;
                outcome = renewal => outcome,
                _ = sleep_until(self.stop_at), if in_time => return self.unconfirmed(),
            };
            self.in_flight = None;
            match outcome {
                Ok(()) => {
                    if self.last_error.take().is_some() {
                        debug!("lease renewed again");
                    }
                    self.stop_at = stop_at(sent, self.length);
                    self.next_renewal = sent + self.period;
                }
                Err(StoreError::Superseded { .. }) => return LeaseLoss::Superseded,
                Err(error @ (StoreError::NotFound | StoreError::Expired)) => {
                    return LeaseLoss::Gone(error);
                }
                Err(error) => {
                    let left = self.stop_at.saturating_duration_since(Instant::now());
                    warn!(
                        %error,
                        stops_in = %humantime::format_duration(round_ms(left)),
                        "lease renewal failed; retrying"
                    );
                    self.last_error = Some(error);
                    // Jittered, so that the sessions one store outage failed
                    // together do not retry together.
                    let retry_after = RETRY_AFTER.min(self.period);
                    self.next_renewal =
                        Instant::now() + retry_after - spread(retry_after / 2, self.client_id);
                }
            }
        }
    }

    fn unconfirmed(&self) -> LeaseLoss {
        let why = match &self.last_error {
            Some(error) => error.to_string(),
            None => "the session store did not answer the lease renewal in time".to_owned(),
        };
        LeaseLoss::Unconfirmed(why)
    }
}

/// Stop a third of the lease before it lapses in the store.
/// A fraction of `range` that is the same for every call about one session
/// and spread evenly across sessions (client ids are random).
fn spread(range: Duration, client_id: ClientId) -> Duration {
    let (high, low) = client_id.as_u64_pair();
    let fraction = ((high ^ low) % 1024) as u32;
    range * fraction / 1024
}

fn stop_at(sent: Instant, length: Duration) -> Instant {
    sent + length - length / 3
}

fn round_ms(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_store::TestStore;
    use numstream_protocol::{ResumeToken, SessionSeed};
    use numstream_store::NewSession;
    use std::sync::atomic::Ordering;

    async fn setup() -> (Arc<TestStore>, Attachment, ServerConfig) {
        let store = Arc::new(TestStore::default());
        let config = ServerConfig {
            session_ttl: Duration::from_secs(3),
            ..ServerConfig::default()
        };
        let session = NewSession::new(
            ClientId::from_bytes([4; 16]),
            SessionSeed([1; 32]),
            10,
            ResumeToken([2; 16]),
        );
        let attachment = store.create(session, config.lease()).await.expect("create");
        (store, attachment, config)
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_the_lease_and_a_takeover_ends_it() {
        let (store, attachment, config) = setup().await;
        let mut lease = Lease::new(store.clone(), &attachment, &config, Instant::now());
        // Ten lease lengths pass without a loss.
        let quiet = tokio::time::timeout(Duration::from_secs(30), lease.lost()).await;
        assert!(quiet.is_err(), "lost the lease: {quiet:?}");
        store
            .attach(attachment.client_id, &attachment.token, config.lease())
            .await
            .expect("takeover");
        let loss = lease.lost().await;
        assert!(matches!(loss, LeaseLoss::Superseded), "{loss:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_store_stops_streaming_a_third_of_the_lease_early() {
        let (store, attachment, config) = setup().await;
        let granted = Instant::now();
        let mut lease = Lease::new(store.clone(), &attachment, &config, granted);
        store.down.store(true, Ordering::SeqCst);
        let loss = lease.lost().await;
        assert_eq!(granted.elapsed(), Duration::from_secs(2));
        match loss {
            LeaseLoss::Unconfirmed(why) => assert!(why.contains("down for the test"), "{why}"),
            other => panic!("expected Unconfirmed, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_outage_is_ridden_through() {
        let (store, attachment, config) = setup().await;
        let mut lease = Lease::new(store.clone(), &attachment, &config, Instant::now());
        store.down.store(true, Ordering::SeqCst);
        let during = tokio::time::timeout(Duration::from_millis(1_500), lease.lost()).await;
        assert!(during.is_err());
        store.down.store(false, Ordering::SeqCst);
        let after = tokio::time::timeout(Duration::from_secs(30), lease.lost()).await;
        assert!(after.is_err(), "lost the lease after the outage: {after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_aged_unrenewed_gets_one_renewal_before_it_stops() {
        let (store, attachment, config) = setup().await;
        // The connection waited most of the lease for its predecessor.
        tokio::time::sleep(config.lease() * 3 / 4).await;
        let granted = Instant::now() - config.lease() * 3 / 4;
        let mut lease = Lease::new(store.clone(), &attachment, &config, granted);
        let quiet = tokio::time::timeout(Duration::from_secs(30), lease.lost()).await;
        assert!(quiet.is_err(), "lost the lease: {quiet:?}");

        let mut stale = Lease::new(store.clone(), &attachment, &config, granted);
        store.down.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let loss = stale.lost().await;
        assert!(matches!(loss, LeaseLoss::Unconfirmed(_)), "{loss:?}");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "after one failed attempt"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_session_is_gone() {
        let (store, attachment, config) = setup().await;
        let mut lease = Lease::new(store.clone(), &attachment, &config, Instant::now());
        store
            .complete(attachment.client_id, attachment.generation)
            .await
            .expect("complete");
        let loss = lease.lost().await;
        assert!(
            matches!(loss, LeaseLoss::Gone(StoreError::NotFound)),
            "{loss:?}"
        );
    }

    #[test]
    fn renewals_of_sessions_opened_together_are_spread_out() {
        let range = Duration::from_secs(1);
        // Client ids are random v4 UUIDs.
        let offsets: std::collections::BTreeSet<Duration> = (0..200)
            .map(|_| spread(range, ClientId::new_v4()))
            .collect();
        assert!(offsets.iter().all(|offset| *offset < range));
        assert!(
            offsets.len() > 150,
            "only {} distinct offsets",
            offsets.len()
        );
        let id = ClientId::from_u128(42);
        assert_eq!(
            spread(range, id),
            spread(range, id),
            "the same for one session"
        );
    }
}
