//! `InMemoryStore` operations, each against a store already holding 10,000
//! sessions (a loaded server's hash maps, not empty ones). Every operation
//! completes without awaiting, so a trivial executor drives it.
//! Run: `cargo bench -p numstream-store`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::executor::block_on;
use numstream_protocol::{ResumeToken, SessionSeed};
use numstream_store::{InMemoryStore, NewSession, SessionStore};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);
const TOKEN: ResumeToken = ResumeToken([9; 16]);

fn session(n: u128) -> NewSession {
    NewSession {
        client_id: Uuid::from_u128(n + 1),
        seed: SessionSeed([3; 32]),
        count: 100,
        token: TOKEN,
    }
}

fn loaded_store() -> InMemoryStore {
    let store = InMemoryStore::new(1_000_000);
    for n in 0..10_000 {
        block_on(store.create(session(n), LEASE)).expect("create");
    }
    store
}

fn memory_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory store");
    let store = loaded_store();
    let mut next = 1_000_000u128;
    group.bench_function("create + complete", |b| {
        b.iter(|| {
            next += 1;
            let attached = block_on(store.create(session(next), LEASE)).expect("create");
            block_on(store.complete(attached.client_id, attached.generation)).expect("complete");
        });
    });
    let resumed = session(42).client_id;
    group.bench_function("attach + detach (a resume)", |b| {
        b.iter(|| {
            let attached = block_on(store.attach(resumed, &TOKEN, LEASE)).expect("attach");
            block_on(store.detach(resumed, attached.generation, LEASE)).expect("detach");
        });
    });
    let renewed = session(43).client_id;
    let generation = block_on(store.attach(renewed, &TOKEN, LEASE))
        .expect("attach")
        .generation;
    group.bench_function("renew", |b| {
        b.iter(|| block_on(store.renew(renewed, generation, LEASE)).expect("renew"));
    });
    group.bench_function("lookup", |b| {
        b.iter(|| black_box(block_on(store.lookup(renewed)).expect("lookup")));
    });
    group.finish();
}

criterion_group!(benches, memory_store);
criterion_main!(benches);
