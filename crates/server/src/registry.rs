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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use numstream_protocol::ClientId;
use tokio_util::sync::{CancellationToken, DropGuard};

#[derive(Debug)]
struct Live {
    generation: u64,
    /// Cancelled to tell the holder it has been taken over.
    superseded: CancellationToken,
    /// Cancelled by the holder once it has stopped streaming.
    stopped: CancellationToken,
}

/// What a connection holds while it streams a session.
#[derive(Debug)]
pub(crate) struct Claim {
    pub(crate) superseded: CancellationToken,
    /// Dropping it tells a waiting successor that this connection stopped.
    _stopped: DropGuard,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<ClientId, Live>,
    /// The newest generation announced by a takeover notice, per client id,
    /// for a while: a notice can overtake the attach it fences (the attach
    /// succeeded here, the newer one elsewhere, and the notice arrived
    /// before this connection claimed), so `claim` checks it too.
    announced: HashMap<ClientId, (u64, Instant)>,
    /// `announced` is pruned of old entries when it grows past this.
    prune_at: usize,
}

/// Longest a new connection waits for the one it replaces to stop: longer
/// than the 1 s the old one may spend flushing what it had buffered and its
/// `taken_over` error before it lets go.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// How long an announced generation is remembered. The race it covers lasts
/// from an attach's reply to the `claim` right after it: microseconds, or a
/// scheduling hiccup; anything slower is still fenced by lease renewal.
const ANNOUNCED_FOR: Duration = Duration::from_secs(10);
const MIN_PRUNE_AT: usize = 1024;

impl Inner {
    fn announce(&mut self, client_id: ClientId, generation: u64) {
        let now = Instant::now();
        let entry = self.announced.entry(client_id).or_insert((generation, now));
        if generation >= entry.0 {
            *entry = (generation, now);
        }
        if self.announced.len() >= self.prune_at {
            self.announced
                .retain(|_, (_, at)| now.duration_since(*at) < ANNOUNCED_FOR);
            self.prune_at = (self.announced.len() * 2).max(MIN_PRUNE_AT);
        }
    }

    /// Whether something newer than `generation` owns `client_id`.
    fn outdated(&self, client_id: ClientId, generation: u64) -> bool {
        self.live
            .get(&client_id)
            .is_some_and(|existing| existing.generation > generation)
            || self
                .announced
                .get(&client_id)
                .is_some_and(|(announced, at)| {
                    *announced > generation && at.elapsed() < ANNOUNCED_FOR
                })
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `generation` as the local streamer of `client_id`, stopping
    /// and awaiting any older local streamer. `None` means an even newer
    /// generation is already registered or announced: the caller lost a
    /// race and must not stream.
    pub(crate) async fn claim(&self, client_id: ClientId, generation: u64) -> Option<Claim> {
        let superseded = CancellationToken::new();
        let stopped = CancellationToken::new();
        let previous = {
            let mut inner = self.lock();
            if inner.outdated(client_id, generation) {
                return None;
            }
            inner.live.insert(
                client_id,
                Live {
                    generation,
                    superseded: superseded.clone(),
                    stopped: stopped.clone(),
                },
            )
        };
        if let Some(previous) = previous {
            previous.superseded.cancel();
            // If the old connection is wedged in a write, it stops at its
            // write timeout at the latest; the store generation has already
            // fenced it, so waiting longer would only delay the client.
            let _ = tokio::time::timeout(HANDOVER_WAIT, previous.stopped.cancelled()).await;
        }
        Some(Claim {
            superseded,
            _stopped: stopped.drop_guard(),
        })
    }

    /// Forgets the entry for `client_id` if it is still `generation`'s.
    pub(crate) fn release(&self, client_id: ClientId, generation: u64) {
        let mut inner = self.lock();
        if inner.live.get(&client_id).map(|l| l.generation) == Some(generation) {
            inner.live.remove(&client_id);
        }
    }

    /// Tells the local streamer of `client_id`, if older than `generation`,
    /// that it lost the session, and keeps `generation` in mind for a
    /// while so that an older connection still on its way to `claim` does
    /// not start (a takeover notice from the store). Returns whether a
    /// local streamer was stopped.
    pub(crate) fn supersede(&self, client_id: ClientId, generation: u64) -> bool {
        let mut inner = self.lock();
        inner.announce(client_id, generation);
        match inner.live.get(&client_id) {
            Some(entry) if entry.generation < generation => {
                entry.superseded.cancel();
                true
            }
            _ => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_claim_stops_and_awaits_the_older_one() {
        let registry = Registry::default();
        let id = ClientId::from_bytes([1; 16]);
        let old = registry.claim(id, 1).await.expect("first claim");
        let old_superseded = old.superseded.clone();
        let waiter = tokio::spawn(async move {
            old_superseded.cancelled().await;
            // Simulate the old connection finishing its current write.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(old);
        });
        let new = registry.claim(id, 2).await.expect("newer claim");
        assert!(
            waiter.is_finished(),
            "claim must wait for the old streamer to stop"
        );
        assert!(!new.superseded.is_cancelled());
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
        let registry = Registry::default();
        let id = ClientId::from_bytes([2; 16]);
        let claim = registry.claim(id, 3).await.expect("claim");
        assert!(!registry.supersede(id, 3), "its own generation");
        assert!(!registry.supersede(id, 2), "an older generation");
        assert!(!claim.superseded.is_cancelled());
        assert!(registry.supersede(id, 4), "a newer generation");
        assert!(claim.superseded.is_cancelled());
        assert!(!registry.supersede(ClientId::from_bytes([9; 16]), 1));
    }

    #[tokio::test]
    async fn a_notice_that_overtakes_an_attach_keeps_it_from_streaming() {
        let registry = Registry::default();
        let id = ClientId::from_bytes([3; 16]);
        // Generation 5 was attached elsewhere before generation 4 claimed here.
        registry.supersede(id, 5);
        assert!(registry.claim(id, 4).await.is_none());
        assert!(
            registry.claim(id, 5).await.is_some(),
            "the announced one may"
        );
    }

    #[test]
    fn announced_generations_are_pruned() {
        let registry = Registry::default();
        {
            let mut inner = registry.lock();
            let old = Instant::now() - ANNOUNCED_FOR;
            for n in 0..10u8 {
                inner
                    .announced
                    .insert(ClientId::from_bytes([n; 16]), (1, old));
            }
            inner.prune_at = 11;
        }
        registry.supersede(ClientId::from_bytes([100; 16]), 1);
        let inner = registry.lock();
        assert_eq!(inner.announced.len(), 1, "only the fresh entry stays");
        assert_eq!(inner.prune_at, MIN_PRUNE_AT);
    }
}
