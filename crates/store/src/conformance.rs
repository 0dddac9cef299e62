//! The conformance suite: the behaviour every [`SessionStore`] must show,
//! written once against the trait and run by each implementation's tests
//! (`InMemoryStore` under paused tokio time, networked stores in real time).
//!
//! Each check uses fresh random client ids, so the suite can run against a
//! store that already holds other sessions. Failures panic with a message
//! naming the broken rule.

use std::time::Duration;

use numstream_protocol::{ClientId, ResumeToken, SessionSeed};

use crate::{NewSession, SessionStore, StoreError};

/// Disconnection TTL and lease used by timing checks: short enough for real
/// time, long enough that a networked store's round trips fit well inside.
pub const SHORT: Duration = Duration::from_millis(400);
/// A lease long enough never to lapse during a check.
pub const LONG: Duration = Duration::from_secs(60);

/// A deterministic session for tests, distinguished by `byte`.
pub fn session(byte: u8) -> NewSession {
    NewSession {
        client_id: ClientId::from_bytes([byte; 16]),
        seed: SessionSeed([byte; 32]),
        count: 100 + u16::from(byte),
        token: ResumeToken([byte; 16]),
    }
}

/// A session with a random client id and token.
pub fn random_session() -> NewSession {
    let client_id = ClientId::new_v4();
    let mut token = [0u8; 16];
    token.copy_from_slice(ClientId::new_v4().as_bytes());
    NewSession {
        client_id,
        seed: SessionSeed([7; 32]),
        count: 500,
        token: ResumeToken(token),
    }
}

async fn wait_past(duration: Duration) {
    tokio::time::sleep(duration + duration / 2).await;
}

/// Runs every check against `store`.
pub async fn run_all(store: &dyn SessionStore) {
    create_attaches_with_generation_one(store).await;
    create_rejects_a_live_duplicate(store).await;
    attach_unknown_is_not_found(store).await;
    attach_with_bad_token_changes_nothing(store).await;
    attach_bumps_generation_and_fences_the_old_one(store).await;
    detach_then_resume_within_ttl(store).await;
    detached_session_expires_after_ttl(store).await;
    unrenewed_lease_expires_and_renewed_one_survives(store).await;
    complete_removes_and_rejects_stale_generations(store).await;
    expired_id_can_open_a_new_session(store).await;
    concurrent_attaches_get_distinct_generations(store).await;
    renew_many_answers_each_renewal_like_renew(store).await;
    ping_answers(store).await;
}

pub async fn renew_many_answers_each_renewal_like_renew(store: &dyn SessionStore) {
    let owned = random_session();
    store.create(owned, SHORT).await.expect("create");
    let taken = random_session();
    store.create(taken, LONG).await.expect("create");
    store
        .attach(taken.client_id, &taken.token, LONG)
        .await
        .expect("takeover attach");
    let unknown = random_session().client_id;
    let results = store
        .renew_many(
            &[
                (owned.client_id, 1),
                (taken.client_id, 1),
                (unknown, 1),
                (taken.client_id, 2),
            ],
            LONG,
        )
        .await;
    assert_eq!(
        results,
        vec![
            Ok(()),
            Err(StoreError::Superseded { current: 2 }),
            Err(StoreError::NotFound),
            Ok(()),
        ]
    );
    assert!(store.renew_many(&[], LONG).await.is_empty());
    // The renewal took: the session outlives its first, short lease.
    wait_past(SHORT).await;
    let info = store.lookup(owned.client_id).await.expect("lookup");
    assert!(info.is_some(), "renewed lease must outlive the first one");
}

pub async fn create_attaches_with_generation_one(store: &dyn SessionStore) {
    let new = random_session();
    let attachment = store.create(new, LONG).await.expect("create");
    assert_eq!(
        attachment.generation, 1,
        "a new session starts at generation 1"
    );
    assert_eq!(attachment.seed, new.seed, "create must keep the seed");
    assert_eq!(attachment.count, new.count);
    assert_eq!(attachment.token, new.token);
    let info = store
        .lookup(new.client_id)
        .await
        .expect("lookup")
        .expect("created session must be visible");
    assert!(
        info.attached,
        "a created session is attached to its creator"
    );
    assert_eq!(info.generation, 1);
    assert_eq!(info.count, new.count);
}

pub async fn create_rejects_a_live_duplicate(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    assert_eq!(
        store.create(new, LONG).await,
        Err(StoreError::AlreadyExists),
        "an attached session must not be replaced by a second OPEN"
    );
    store.detach(new.client_id, 1, LONG).await.expect("detach");
    assert_eq!(
        store.create(new, LONG).await,
        Err(StoreError::AlreadyExists),
        "a detached, unexpired session must not be replaced either"
    );
}

pub async fn attach_unknown_is_not_found(store: &dyn SessionStore) {
    let new = random_session();
    assert_eq!(
        store.attach(new.client_id, &new.token, LONG).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(store.lookup(new.client_id).await, Ok(None));
}

pub async fn attach_with_bad_token_changes_nothing(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    store.detach(new.client_id, 1, LONG).await.expect("detach");
    let mut forged = new.token;
    forged.0[15] ^= 1;
    assert_eq!(
        store.attach(new.client_id, &forged, LONG).await,
        Err(StoreError::BadToken)
    );
    let info = store.lookup(new.client_id).await.expect("lookup");
    let info = info.expect("a bad token must not remove the session");
    assert_eq!(
        info.generation, 1,
        "a bad token must not bump the generation"
    );
    assert!(!info.attached, "a bad token must not attach");
    let attachment = store
        .attach(new.client_id, &new.token, LONG)
        .await
        .expect("the right token still works");
    assert_eq!(attachment.generation, 2);
}

pub async fn attach_bumps_generation_and_fences_the_old_one(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    // Takeover while generation 1 still believes it is attached.
    let newer = store
        .attach(new.client_id, &new.token, LONG)
        .await
        .expect("takeover attach");
    assert_eq!(newer.generation, 2);
    assert_eq!(newer.seed, new.seed, "attach must return the stored seed");
    assert_eq!(
        store.renew(new.client_id, 1, LONG).await,
        Err(StoreError::Superseded { current: 2 }),
        "the superseded connection must learn it lost the session"
    );
    assert_eq!(
        store.detach(new.client_id, 1, SHORT).await,
        Err(StoreError::Superseded { current: 2 }),
        "a stale detach must not detach the new owner"
    );
    assert_eq!(
        store.complete(new.client_id, 1).await,
        Err(StoreError::Superseded { current: 2 }),
        "a stale complete must not remove the session"
    );
    let info = store.lookup(new.client_id).await.expect("lookup");
    assert!(info.expect("still there").attached);
    store
        .renew(new.client_id, 2, LONG)
        .await
        .expect("owner renews");
}

pub async fn detach_then_resume_within_ttl(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    store.detach(new.client_id, 1, LONG).await.expect("detach");
    let info = store.lookup(new.client_id).await.expect("lookup");
    let info = info.expect("detached session is kept");
    assert!(!info.attached);
    assert!(info.expires_in <= LONG && info.expires_in > LONG / 2);
    let attachment = store
        .attach(new.client_id, &new.token, LONG)
        .await
        .expect("resume within the ttl");
    assert_eq!(attachment.generation, 2);
    assert!(
        store
            .lookup(new.client_id)
            .await
            .expect("lookup")
            .expect("present")
            .attached
    );
}

pub async fn detached_session_expires_after_ttl(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    store.detach(new.client_id, 1, SHORT).await.expect("detach");
    wait_past(SHORT).await;
    let outcome = store.attach(new.client_id, &new.token, LONG).await;
    assert!(
        matches!(outcome, Err(StoreError::Expired | StoreError::NotFound)),
        "resume after the ttl must be rejected, got {outcome:?}"
    );
    assert_eq!(store.lookup(new.client_id).await, Ok(None));
    // Never silently restarted: asking again is still a rejection.
    assert!(store.attach(new.client_id, &new.token, LONG).await.is_err());
}

pub async fn unrenewed_lease_expires_and_renewed_one_survives(store: &dyn SessionStore) {
    let orphan = random_session();
    let kept = random_session();
    store.create(orphan, SHORT).await.expect("create orphan");
    store.create(kept, SHORT).await.expect("create kept");
    // Renew `kept` halfway, as a live owner does, and let `orphan` lapse as
    // if its server had died.
    tokio::time::sleep(SHORT / 2).await;
    store.renew(kept.client_id, 1, SHORT).await.expect("renew");
    tokio::time::sleep(SHORT / 2 + SHORT / 4).await;
    assert_eq!(
        store.lookup(orphan.client_id).await,
        Ok(None),
        "an attached session whose owner stopped renewing must expire"
    );
    assert!(
        store
            .lookup(kept.client_id)
            .await
            .expect("lookup")
            .is_some(),
        "a renewed lease must keep the session"
    );
    assert!(
        store
            .attach(orphan.client_id, &orphan.token, LONG)
            .await
            .is_err()
    );
}

pub async fn complete_removes_and_rejects_stale_generations(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    store
        .attach(new.client_id, &new.token, LONG)
        .await
        .expect("attach");
    store.complete(new.client_id, 2).await.expect("complete");
    assert_eq!(store.lookup(new.client_id).await, Ok(None));
    assert_eq!(
        store.attach(new.client_id, &new.token, LONG).await,
        Err(StoreError::NotFound),
        "a completed session is forgotten at once"
    );
    assert_eq!(
        store.complete(new.client_id, 2).await,
        Err(StoreError::NotFound)
    );
}

pub async fn expired_id_can_open_a_new_session(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    store.detach(new.client_id, 1, SHORT).await.expect("detach");
    wait_past(SHORT).await;
    let mut again = new;
    again.seed = SessionSeed([9; 32]);
    let attachment = store.create(again, LONG).await.expect("reopen");
    assert_eq!(attachment.generation, 1);
    assert_eq!(attachment.seed, again.seed);
}

pub async fn concurrent_attaches_get_distinct_generations(store: &dyn SessionStore) {
    let new = random_session();
    store.create(new, LONG).await.expect("create");
    let attempts = (0..16).map(|_| store.attach(new.client_id, &new.token, LONG));
    let mut generations: Vec<u64> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|result| result.expect("attach").generation)
        .collect();
    generations.sort_unstable();
    let expected: Vec<u64> = (2..18).collect();
    assert_eq!(
        generations, expected,
        "every attach must see and bump the generation atomically"
    );
}

pub async fn ping_answers(store: &dyn SessionStore) {
    store.ping().await.expect("ping");
}
