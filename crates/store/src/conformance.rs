//! The conformance suite: the behaviour every [`SessionStore`] must show,
//! written once against the trait and run by each implementation's tests
//! (`InMemoryStore` under paused tokio time, networked stores in real time).
//!
//! Each check uses fresh random client ids, so the suite can run against a
//! store that already holds other sessions. Failures panic with a message
//! naming the broken rule.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use numstream_protocol::{ClientId, ResumeToken, SessionSeed};

use crate::{NewSession, Occupancy, SessionStore, StoreError, TakeoverNotice};

/// Disconnection TTL and lease used by timing checks: short enough for real
/// time, long enough that a networked store's round trips fit well inside.
pub const SHORT: Duration = Duration::from_millis(400);
/// A lease long enough never to lapse during a check.
pub const LONG: Duration = Duration::from_secs(60);
/// How long the bound checks wait for an expired session to free its slot:
/// a store may notice expiry late (the in-memory store at its next sweep),
/// and a loaded machine may be slow, so this is generous; the checks poll
/// and move on as soon as the slot is free.
pub const SLOT_FREED_WITHIN: Duration = Duration::from_secs(30);

/// A deterministic session for tests, distinguished by `byte`.
pub fn session(byte: u8) -> NewSession {
    NewSession::new(
        ClientId::from_bytes([byte; 16]),
        SessionSeed([byte; 32]),
        100 + u16::from(byte),
        ResumeToken([byte; 16]),
    )
}

/// A session with a random client id, seed and token (so its checksum is
/// its own too: a store that mixed records up would be caught).
pub fn random_session() -> NewSession {
    let random = || *ClientId::new_v4().as_bytes();
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(&random());
    seed[16..].copy_from_slice(&random());
    NewSession::new(
        ClientId::new_v4(),
        SessionSeed(seed),
        500,
        ResumeToken(random()),
    )
}

/// The next takeover notice of a store's subscription, which must come
/// within 2 s.
pub async fn next_notice(notices: &mut BoxStream<'static, TakeoverNotice>) -> TakeoverNotice {
    tokio::time::timeout(Duration::from_secs(2), notices.next())
        .await
        .expect("a notice within 2 s")
        .expect("the notice stream does not end")
}

/// Creates a session on `a` and attaches it on `b`: the attach
/// (generation 2) must be announced on both subscriptions, and nothing
/// before it (a create fences nobody and is not announced). `context`
/// names the case in a failure.
pub async fn assert_attach_announced_to_both(
    a: &dyn SessionStore,
    b: &dyn SessionStore,
    on_a: &mut BoxStream<'static, TakeoverNotice>,
    on_b: &mut BoxStream<'static, TakeoverNotice>,
    context: &str,
) {
    let session = random_session();
    a.create(session, LONG).await.expect("create");
    b.attach(session.client_id, &session.token, LONG)
        .await
        .expect("attach");
    let expected = TakeoverNotice {
        client_id: session.client_id,
        generation: 2,
    };
    assert_eq!(
        next_notice(on_a).await,
        expected,
        "{context}: on the creator"
    );
    assert_eq!(
        next_notice(on_b).await,
        expected,
        "{context}: on the attacher"
    );
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
    let taken = random_session();
    store.create(taken, LONG).await.expect("create");
    store
        .attach(taken.client_id, &taken.token, LONG)
        .await
        .expect("takeover attach");
    // Created last, just before the renewal: its short lease only has to
    // outlast one round trip, however slow the machine.
    let owned = random_session();
    store.create(owned, SHORT).await.expect("create");
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
    assert_eq!(attachment.checksum, new.checksum);
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
        newer.count, new.count,
        "attach must return the stored count"
    );
    assert_eq!(
        newer.checksum, new.checksum,
        "attach must return the checksum stored at create"
    );
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
    // Renew `kept` early in its lease, as a live owner does (for long: no
    // race with its own expiry however slow the check runs), and let
    // `orphan` lapse as if its server had died.
    tokio::time::sleep(SHORT / 4).await;
    store.renew(kept.client_id, 1, LONG).await.expect("renew");
    // Until the orphan is gone (a store may notice expiry late), bounded.
    let deadline = tokio::time::Instant::now() + SLOT_FREED_WITHIN;
    while store.lookup(orphan.client_id).await != Ok(None) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an attached session whose owner stopped renewing must expire"
        );
        tokio::time::sleep(SHORT / 4).await;
    }
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
    let again = NewSession::new(new.client_id, SessionSeed([9; 32]), new.count, new.token);
    let attachment = store.create(again, LONG).await.expect("reopen");
    assert_eq!(attachment.generation, 1);
    assert_eq!(attachment.seed, again.seed);
    let resumed = store
        .attach(again.client_id, &again.token, LONG)
        .await
        .expect("resume the reopened session");
    assert_eq!(
        (resumed.seed, resumed.checksum),
        (again.seed, again.checksum),
        "the new session replaces the expired one's seed and checksum"
    );
    assert_ne!(again.checksum, new.checksum);
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

/// Runs the checks of the session bound against `store`, which must hold
/// no other session and refuse new ones past `max` (small, since the
/// checks fill it; at least 2). Expired sessions must stop counting within
/// [`SLOT_FREED_WITHIN`] (the in-memory store needs its sweeper running).
pub async fn run_bound_checks(store: &dyn SessionStore, max: usize) {
    assert!(max >= 2, "the bound checks need a bound of at least 2");
    concurrent_creates_never_overshoot_the_bound(store, max).await;
    bound_counts_every_live_session_and_frees_slots(store, max).await;
}

async fn assert_occupancy(store: &dyn SessionStore, sessions: usize, max: usize, when: &str) {
    assert_eq!(
        store.occupancy().await,
        Ok(Some(Occupancy { sessions, max })),
        "occupancy {when}"
    );
}

pub async fn concurrent_creates_never_overshoot_the_bound(store: &dyn SessionStore, max: usize) {
    assert_occupancy(store, 0, max, "of an empty store").await;
    let candidates: Vec<NewSession> = (0..2 * max).map(|_| random_session()).collect();
    let outcomes = futures::future::join_all(
        candidates
            .iter()
            .map(|session| store.create(*session, LONG)),
    )
    .await;
    let mut created = Vec::new();
    for (session, outcome) in candidates.iter().zip(outcomes) {
        match outcome {
            Ok(_) => created.push(session.client_id),
            Err(StoreError::Full { max: reported }) => assert_eq!(reported, max),
            Err(other) => panic!("a create racing for the last slots failed with {other:?}"),
        }
    }
    assert_eq!(
        created.len(),
        max,
        "creates racing for the bound must fill it exactly"
    );
    assert_occupancy(store, max, max, "when full").await;
    for client_id in created {
        store.complete(client_id, 1).await.expect("complete");
    }
    assert_occupancy(store, 0, max, "after completing every session").await;
}

/// Polls until the store counts fewer than `max` sessions.
async fn wait_for_a_free_slot(store: &dyn SessionStore, max: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + SLOT_FREED_WITHIN;
    loop {
        let occupancy = store.occupancy().await.expect("occupancy");
        let occupancy = occupancy.expect("a bounded store reports its occupancy");
        if occupancy.sessions < max {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not free its slot within {SLOT_FREED_WITHIN:?}"
        );
        tokio::time::sleep(SHORT / 4).await;
    }
}

pub async fn bound_counts_every_live_session_and_frees_slots(store: &dyn SessionStore, max: usize) {
    let held: Vec<NewSession> = (0..max).map(|_| random_session()).collect();
    for session in &held {
        store.create(*session, LONG).await.expect("fill the store");
    }
    assert_occupancy(store, max, max, "when full").await;
    assert_eq!(
        store.create(random_session(), LONG).await,
        Err(StoreError::Full { max }),
        "a create past the bound must be refused"
    );
    assert_eq!(
        store.create(held[0], LONG).await,
        Err(StoreError::AlreadyExists),
        "a live duplicate is a duplicate even when the store is full"
    );

    store
        .complete(held[0].client_id, 1)
        .await
        .expect("complete");
    assert_occupancy(store, max - 1, max, "after a complete").await;
    let replacement = random_session();
    store
        .create(replacement, LONG)
        .await
        .expect("a completed session frees its slot at once");

    store
        .detach(held[1].client_id, 1, LONG)
        .await
        .expect("detach");
    assert_eq!(
        store.create(random_session(), LONG).await,
        Err(StoreError::Full { max }),
        "a session awaiting its resume keeps its slot"
    );

    store
        .detach(replacement.client_id, 1, SHORT)
        .await
        .expect("detach");
    wait_for_a_free_slot(store, max, "a detached session past its ttl").await;
    let unrenewed = random_session();
    store
        .create(unrenewed, SHORT)
        .await
        .expect("an expired session's slot is free once the store no longer counts it");

    wait_for_a_free_slot(store, max, "an attached session whose lease lapsed").await;
    store
        .create(random_session(), LONG)
        .await
        .expect("a lapsed lease's slot is free once the store no longer counts it");
    assert_occupancy(store, max, max, "at the end").await;
}
