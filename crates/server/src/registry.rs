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
use std::time::Duration;

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
    live: Mutex<HashMap<ClientId, Live>>,
}

/// Longest a new connection waits for the one it replaces to stop: longer
/// than the 1 s the old one may spend flushing what it had buffered and its
/// `taken_over` error before it lets go.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `generation` as the local streamer of `client_id`, stopping
    /// and awaiting any older local streamer. `None` means an even newer
    /// generation is already registered: the caller lost a race and must
    /// not stream.
    pub(crate) async fn claim(&self, client_id: ClientId, generation: u64) -> Option<Claim> {
        let superseded = CancellationToken::new();
        let stopped = CancellationToken::new();
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
                entry.superseded.cancel();
                true
            }
            _ => false,
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
}
