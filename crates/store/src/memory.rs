//! `InMemoryStore`: the embedded session store for a single server process.
//!
//! Sessions live in a fixed number of shards, each a `HashMap` behind a std
//! `Mutex` held only for the few instructions of one operation (never across
//! an `.await`), so concurrent sessions rarely contend. Expiry is decided on
//! every access from the session's deadline; the periodic sweep only frees
//! memory, and with it the expired sessions' slots under `max_sessions`
//! (so an expired session holds its slot until the next sweep). Time is
//! `tokio::time::Instant`, so tests can pause and advance it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use numstream_protocol::{ClientId, ResumeToken};

use crate::{Attachment, NewSession, Occupancy, SessionInfo, SessionStore, StoreError};

const SHARDS: usize = 64;

#[derive(Debug)]
struct Entry {
    session: NewSession,
    generation: u64,
    attached: bool,
    /// Lease end while attached; expiry while detached.
    deadline: Instant,
}

impl Entry {
    fn is_expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    fn attachment(&self) -> Attachment {
        Attachment {
            client_id: self.session.client_id,
            seed: self.session.seed,
            count: self.session.count,
            token: self.session.token,
            checksum: self.session.checksum,
            generation: self.generation,
        }
    }

    /// The current entry, if the caller's generation still owns it.
    fn owned_by(&mut self, generation: u64, now: Instant) -> Result<&mut Self, StoreError> {
        if self.generation != generation {
            return Err(StoreError::Superseded {
                current: self.generation,
            });
        }
        if self.is_expired(now) {
            return Err(StoreError::Expired);
        }
        Ok(self)
    }
}

type Shard = HashMap<ClientId, Entry>;

/// In-process session store, bounded to `max_sessions` sessions.
#[derive(Debug)]
pub struct InMemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Entries across all shards, expired-but-unswept ones included.
    len: AtomicUsize,
    max_sessions: usize,
}

impl InMemoryStore {
    pub fn new(max_sessions: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
            max_sessions,
        }
    }

    /// Number of entries held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, client_id: &ClientId) -> MutexGuard<'_, Shard> {
        let hash = client_id.as_u64_pair();
        let index = ((hash.0 ^ hash.1) % SHARDS as u64) as usize;
        // A poisoned shard only means another thread panicked mid-operation;
        // every operation leaves entries consistent before it can panic, so
        // the data is still valid.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remove(&self, shard: &mut Shard, client_id: &ClientId) {
        if shard.remove(client_id).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Frees every expired entry; returns the client ids it dropped.
    pub fn sweep_expired(&self) -> Vec<ClientId> {
        let now = Instant::now();
        let mut expired = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|client_id, entry| {
                let keep = !entry.is_expired(now);
                if !keep {
                    expired.push(*client_id);
                }
                keep
            });
        }
        self.len.fetch_sub(expired.len(), Ordering::Relaxed);
        expired
    }

    /// Sweeps every `period` until the store is dropped, logging each
    /// session it forgets and telling `on_sweep` how many it forgot (for
    /// metrics; called after every sweep, with 0 too).
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        period: Duration,
        on_sweep: impl Fn(usize) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let store: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else { return };
                let expired = store.sweep_expired();
                for client_id in &expired {
                    tracing::info!(%client_id, "session expired");
                }
                on_sweep(expired.len());
            }
        })
    }
}

#[async_trait::async_trait]
impl SessionStore for InMemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn create(&self, session: NewSession, lease: Duration) -> Result<Attachment, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(&session.client_id);
        let replaces_expired = match shard.get(&session.client_id) {
            Some(existing) if !existing.is_expired(now) => return Err(StoreError::AlreadyExists),
            Some(_) => true,
            None => false,
        };
        if !replaces_expired {
            // Reserve a slot before inserting so concurrent creates on other
            // shards cannot overshoot the bound together.
            let reserved = self
                .len
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |len| {
                    (len < self.max_sessions).then_some(len + 1)
                });
            if reserved.is_err() {
                return Err(StoreError::Full {
                    max: self.max_sessions,
                });
            }
        }
        let entry = Entry {
            session,
            generation: 1,
            attached: true,
            deadline: now + lease,
        };
        let attachment = entry.attachment();
        shard.insert(session.client_id, entry);
        Ok(attachment)
    }

    async fn attach(
        &self,
        client_id: ClientId,
        token: &ResumeToken,
        lease: Duration,
    ) -> Result<Attachment, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(&client_id);
        let Some(entry) = shard.get_mut(&client_id) else {
            return Err(StoreError::NotFound);
        };
        if entry.is_expired(now) {
            self.remove(&mut shard, &client_id);
            return Err(StoreError::Expired);
        }
        if !entry.session.token.ct_eq(token) {
            return Err(StoreError::BadToken);
        }
        entry.generation += 1;
        entry.attached = true;
        entry.deadline = now + lease;
        Ok(entry.attachment())
    }

    async fn renew(
        &self,
        client_id: ClientId,
        generation: u64,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(&client_id);
        let entry = shard.get_mut(&client_id).ok_or(StoreError::NotFound)?;
        let entry = entry.owned_by(generation, now)?;
        entry.deadline = now + lease;
        Ok(())
    }

    async fn detach(
        &self,
        client_id: ClientId,
        generation: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(&client_id);
        let entry = shard.get_mut(&client_id).ok_or(StoreError::NotFound)?;
        let entry = entry.owned_by(generation, now)?;
        entry.attached = false;
        entry.deadline = now + ttl;
        Ok(())
    }

    async fn complete(&self, client_id: ClientId, generation: u64) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(&client_id);
        let entry = shard.get_mut(&client_id).ok_or(StoreError::NotFound)?;
        // A session whose lease lapsed is still this caller's to finish if
        // nobody took it over: the client has everything it needs.
        match entry.owned_by(generation, now) {
            Ok(_) | Err(StoreError::Expired) => {
                self.remove(&mut shard, &client_id);
                Ok(())
            }
            Err(other) => Err(other),
        }
    }

    async fn lookup(&self, client_id: ClientId) -> Result<Option<SessionInfo>, StoreError> {
        let now = Instant::now();
        let shard = self.shard(&client_id);
        Ok(shard
            .get(&client_id)
            .filter(|entry| !entry.is_expired(now))
            .map(|entry| SessionInfo {
                count: entry.session.count,
                generation: entry.generation,
                attached: entry.attached,
                expires_in: entry.deadline - now,
            }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Counts what the bound counts: entries held, so an expired session
    /// frees its slot when the sweeper forgets it (or its id is reopened).
    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        Ok(Some(Occupancy {
            sessions: self.len(),
            max: self.max_sessions,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sweep_frees_only_expired_entries() {
        let store = InMemoryStore::new(10);
        let lease = Duration::from_secs(30);
        for byte in 1..=3u8 {
            store
                .create(crate::conformance::session(byte), lease)
                .await
                .expect("create");
        }
        let first = crate::conformance::session(1).client_id;
        store
            .detach(first, 1, Duration::from_secs(1))
            .await
            .expect("detach");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.sweep_expired(), vec![first]);
        assert_eq!(store.len(), 2);
        assert!(store.sweep_expired().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bound_counts_live_sessions_and_reuses_expired_slots() {
        let store = InMemoryStore::new(2);
        let lease = Duration::from_secs(5);
        store
            .create(crate::conformance::session(1), lease)
            .await
            .expect("first");
        store
            .create(crate::conformance::session(2), lease)
            .await
            .expect("second");
        assert_eq!(
            store.create(crate::conformance::session(3), lease).await,
            Err(StoreError::Full { max: 2 })
        );
        // An expired session's id can be reopened without a new slot.
        tokio::time::advance(Duration::from_secs(6)).await;
        store
            .create(crate::conformance::session(1), lease)
            .await
            .expect("reopen expired id");
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_store_passes_the_conformance_suite() {
        crate::conformance::run_all(&InMemoryStore::new(10_000)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn memory_store_passes_the_bound_checks_with_its_sweeper() {
        let store = Arc::new(InMemoryStore::new(4));
        // As the server runs it: expired sessions free their slots when
        // the sweeper forgets them.
        let sweeper = store.spawn_sweeper(crate::conformance::SHORT / 4, |_| {});
        crate::conformance::run_bound_checks(store.as_ref(), 4).await;
        sweeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_sweep_an_expired_session_keeps_its_slot() {
        let store = InMemoryStore::new(1);
        let lease = Duration::from_secs(5);
        store
            .create(crate::conformance::session(1), lease)
            .await
            .expect("create");
        tokio::time::advance(Duration::from_secs(6)).await;
        let full = Some(Occupancy {
            sessions: 1,
            max: 1,
        });
        assert_eq!(store.occupancy().await, Ok(full));
        assert_eq!(
            store.create(crate::conformance::session(2), lease).await,
            Err(StoreError::Full { max: 1 })
        );
        store.sweep_expired();
        assert_eq!(
            store.occupancy().await,
            Ok(Some(Occupancy {
                sessions: 0,
                max: 1
            }))
        );
        store
            .create(crate::conformance::session(2), lease)
            .await
            .expect("the sweep freed the slot");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_resume_reports_expired_not_unknown() {
        let store = InMemoryStore::new(10);
        let session = crate::conformance::session(1);
        store
            .create(session, Duration::from_secs(30))
            .await
            .expect("create");
        store
            .detach(session.client_id, 1, Duration::from_secs(30))
            .await
            .expect("detach");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(
            store
                .attach(session.client_id, &session.token, Duration::from_secs(30))
                .await,
            Err(StoreError::Expired)
        );
        // Expired sessions are never silently restarted: after the expired
        // answer the id is simply unknown.
        assert_eq!(
            store
                .attach(session.client_id, &session.token, Duration::from_secs(30))
                .await,
            Err(StoreError::NotFound)
        );
    }
}
