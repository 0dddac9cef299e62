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
    /// The holder's [`Claim::stop`].
    stop: CancellationToken,
    /// Cancelled by the holder once it has stopped streaming.
    stopped: CancellationToken,
}

/// What a connection holds while it streams a session.
#[derive(Debug)]
pub(crate) struct Claim {
    /// Cancelled when the holder must stop streaming: a newer connection
    /// took the session over, or the server is shutting down (it is a
    /// child of the shutdown token, so one waiter covers both; the
    /// shutdown token says which).
    pub(crate) stop: CancellationToken,
    /// Dropping it tells a waiting successor that this connection stopped.
    _stopped: DropGuard,
}

#[derive(Debug)]
pub(crate) struct Registry {
    live: Mutex<HashMap<ClientId, Live>>,
    /// The server's shutdown token, parent of every claim's `stop`.
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
        let stop = self.shutdown.child_token();
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
                    stop: stop.clone(),
                    stopped: stopped.clone(),
                },
            )
        };
        if let Some(previous) = previous {
            previous.stop.cancel();
            // If the old connection is wedged in a write, it stops at its
            // write timeout at the latest; the store generation has already
            // fenced it, so waiting longer would only delay the client.
            let _ = tokio::time::timeout(HANDOVER_WAIT, previous.stopped.cancelled()).await;
        }
        Some(Claim {
            stop,
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
                entry.stop.cancel();
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
        let registry = Registry::new(CancellationToken::new());
        let id = ClientId::from_bytes([1; 16]);
        let old = registry.claim(id, 1).await.expect("first claim");
        let old_stop = old.stop.clone();
        let waiter = tokio::spawn(async move {
            old_stop.cancelled().await;
            // Simulate the old connection finishing its current write.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(old);
        });
        let new = registry.claim(id, 2).await.expect("newer claim");
        assert!(
            waiter.is_finished(),
            "claim must wait for the old streamer to stop"
        );
        assert!(!new.stop.is_cancelled());
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
        assert!(!claim.stop.is_cancelled());
        assert!(registry.supersede(id, 4), "a newer generation");
        assert!(claim.stop.is_cancelled());
        assert!(!registry.supersede(ClientId::from_bytes([9; 16]), 1));
    }

    #[tokio::test]
    async fn shutdown_stops_every_claim() {
        let shutdown = CancellationToken::new();
        let registry = Registry::new(shutdown.clone());
        let first = registry.claim(ClientId::from_bytes([3; 16]), 1).await;
        let second = registry.claim(ClientId::from_bytes([4; 16]), 1).await;
        let (first, second) = (first.expect("claim"), second.expect("claim"));
        assert!(!first.stop.is_cancelled() && !second.stop.is_cancelled());
        shutdown.cancel();
        assert!(first.stop.is_cancelled() && second.stop.is_cancelled());
    }
}
