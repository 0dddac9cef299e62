//! The connections of *this* process that currently stream a session, keyed
//! by client id, so a newer attach can stop an older one before it starts.
//!
//! The store's generation decides who owns a session; this registry only
//! makes the hand-over prompt and strict inside one process: the new
//! connection signals the old one and waits until it has stopped writing,
//! so two local connections never stream one session at the same moment.
//! Across processes, a shared store's takeover notices reach
//! [`Registry::supersede`], which stops the local streamer of an older
//! generation within the notice latency (and lease renewal reporting
//! `Superseded` is the fallback when a notice is lost).
//!
//! Touched once per attach, once per connection end and once per takeover
//! notice, never per number.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use numstream_protocol::ClientId;
use tokio_util::sync::CancellationToken;

/// What a streaming connection and the registry share: the signal to stop
/// (a takeover, or shutdown) one way, and that it has stopped the other.
///
/// One small allocation per streaming session, where cancellation tokens
/// (a tree node each for "stop" and "stopped", and a boxed waiter) took
/// about 300 bytes: every connection holds this for hours.
#[derive(Debug, Default)]
struct Handover {
    stop: AtomicBool,
    /// The holder, waiting for [`Handover::stop`].
    holder: AtomicWaker,
    stopped: AtomicBool,
    /// A successor, waiting for [`Handover::stopped`].
    successor: AtomicWaker,
}

impl Handover {
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.holder.wake();
    }

    fn poll_flag(flag: &AtomicBool, waker: &AtomicWaker, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the check, so a signal between the two wakes
        // this task rather than being missed.
        waker.register(cx.waker());
        if flag.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    async fn stopped(&self) {
        std::future::poll_fn(|cx| Self::poll_flag(&self.stopped, &self.successor, cx)).await;
    }
}

#[derive(Debug)]
struct Live {
    generation: u64,
    handover: Arc<Handover>,
}

/// What a connection holds while it streams a session. Dropping it tells
/// a waiting successor that this connection stopped.
#[derive(Debug)]
pub(crate) struct Claim {
    handover: Arc<Handover>,
}

impl Claim {
    /// Ready once the holder must stop streaming: a newer connection took
    /// the session over, or the server is shutting down (the shutdown
    /// token says which). Registers the task to be woken then.
    pub(crate) fn poll_stop(&self, cx: &mut Context<'_>) -> Poll<()> {
        Handover::poll_flag(&self.handover.stop, &self.handover.holder, cx)
    }

    pub(crate) fn must_stop(&self) -> bool {
        self.handover.stop.load(Ordering::Acquire)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.handover.stopped.store(true, Ordering::Release);
        self.handover.successor.wake();
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    live: Mutex<HashMap<ClientId, Live>>,
    /// The server's shutdown token: a claim made after it was cancelled
    /// is stopped at once (see [`Registry::stop_all`] for those before).
    shutdown: CancellationToken,
}

/// Longest a new connection waits for the one it replaces to stop: longer
/// than the 1 s the old one may spend flushing what it had buffered and its
/// `taken_over` error before it lets go.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

impl Registry {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self {
            live: Mutex::default(),
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `generation` as the local streamer of `client_id`, stopping
    /// and awaiting any older local streamer. `None` means an even newer
    /// generation is already registered: the caller lost a race and must
    /// not stream.
    pub(crate) async fn claim(&self, client_id: ClientId, generation: u64) -> Option<Claim> {
        let handover = Arc::new(Handover::default());
        let previous = {
            let mut live = self.lock();
            if live
                .get(&client_id)
                .is_some_and(|existing| existing.generation > generation)
            {
                return None;
            }
            live.insert(
                client_id,
                Live {
                    generation,
                    handover: handover.clone(),
                },
            )
        };
        // After the insert: `stop_all` runs after the cancellation, so
        // either it saw this entry or this sees the cancellation.
        if self.shutdown.is_cancelled() {
            handover.stop();
        }
        if let Some(previous) = previous {
            previous.handover.stop();
            // If the old connection is wedged in a write, it stops at its
            // write timeout at the latest; the store generation has already
            // fenced it, so waiting longer would only delay the client.
            let _ = tokio::time::timeout(HANDOVER_WAIT, previous.handover.stopped()).await;
        }
        Some(Claim { handover })
    }

    /// Forgets the entry for `client_id` if it is still `generation`'s.
    pub(crate) fn release(&self, client_id: ClientId, generation: u64) {
        let mut live = self.lock();
        if live.get(&client_id).map(|l| l.generation) == Some(generation) {
            live.remove(&client_id);
        }
    }

    /// Tells the local streamer of `client_id`, if older than `generation`,
    /// that it lost the session (a takeover notice from the store). Returns
    /// whether a local streamer was stopped.
    ///
    /// Only live streamers are told: a notice is not remembered for a
    /// connection still between its attach and its `claim` (a window of a
    /// few instructions), because generations restart at 1 with every new
    /// session for a client id, so a remembered generation could wrongly
    /// fence a later session. Lease renewal covers that window.
    pub(crate) fn supersede(&self, client_id: ClientId, generation: u64) -> bool {
        match self.lock().get(&client_id) {
            Some(entry) if entry.generation < generation => {
                entry.handover.stop();
                true
            }
            _ => false,
        }
    }

    /// Stops every local streamer: the server is shutting down (call it
    /// after cancelling the shutdown token).
    pub(crate) fn stop_all(&self) {
        for entry in self.lock().values() {
            entry.handover.stop();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_claim_stops_and_awaits_the_older_one() {
        let registry = Registry::new(CancellationToken::new());
        let id = ClientId::from_bytes([1; 16]);
        let old = registry.claim(id, 1).await.expect("first claim");
        let waiter = tokio::spawn(async move {
            std::future::poll_fn(|cx| old.poll_stop(cx)).await;
            // Simulate the old connection finishing its current write.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(old);
        });
        let new = registry.claim(id, 2).await.expect("newer claim");
        assert!(
            waiter.is_finished(),
            "claim must wait for the old streamer to stop"
        );
        assert!(!new.must_stop());
        assert!(
            registry.claim(id, 1).await.is_none(),
            "stale generation must lose"
        );
        registry.release(id, 1);
        assert_eq!(
            registry.len(),
            1,
            "a stale release must not remove the newer entry"
        );
        registry.release(id, 2);
        assert_eq!(registry.len(), 0);
    }

    #[tokio::test]
    async fn a_notice_stops_older_streamers_only() {
        let registry = Registry::new(CancellationToken::new());
        let id = ClientId::from_bytes([2; 16]);
        let claim = registry.claim(id, 3).await.expect("claim");
        assert!(!registry.supersede(id, 3), "its own generation");
        assert!(!registry.supersede(id, 2), "an older generation");
        assert!(!claim.must_stop());
        assert!(registry.supersede(id, 4), "a newer generation");
        assert!(claim.must_stop());
        assert!(!registry.supersede(ClientId::from_bytes([9; 16]), 1));
    }

    #[tokio::test]
    async fn shutdown_stops_every_claim() {
        let shutdown = CancellationToken::new();
        let registry = Registry::new(shutdown.clone());
        let first = registry.claim(ClientId::from_bytes([3; 16]), 1).await;
        let second = registry.claim(ClientId::from_bytes([4; 16]), 1).await;
        let (first, second) = (first.expect("claim"), second.expect("claim"));
        assert!(!first.must_stop() && !second.must_stop());
        let waiting = tokio::spawn(async move {
            std::future::poll_fn(|cx| first.poll_stop(cx)).await;
        });
        shutdown.cancel();
        registry.stop_all();
        assert!(second.must_stop());
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("a waiting holder is woken")
            .expect("the waiter ran");
        let late = registry.claim(ClientId::from_bytes([5; 16]), 1).await;
        assert!(
            late.expect("claim").must_stop(),
            "a claim made after shutdown must stop at once"
        );
    }
}
