//! What a RESUME that lands on FINAL costs, end to end through an
//! in-process server on loopback: connect, RESUME, WELCOME, FINAL, ACK and
//! the close after completion. Measured for a session of one number
//! (FINAL at index 0) and for one of 65,535 (FINAL at index 65,534): FINAL
//! carries the checksum of the whole sequence, and the server must not
//! recompute it over 65,535 numbers per resume (issue 10, amplification).
//! The two should cost about the same; the difference is that pass.
//!
//! Each iteration first creates the session straight in the server's
//! in-memory store (about a microsecond, with the checksum computed once,
//! outside the timing), since the ACK completes and removes it.
//!
//! Run: `cargo bench -p numstream-bench --bench final_frame`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use numstream_harness::raw::RawClient;
use numstream_protocol::{ClientId, Frame, Resume, ResumeToken, SessionSeed};
use numstream_server::testing::{TestServer, fast_config};
use numstream_store::{InMemoryStore, NewSession, SessionStore};
use tokio::runtime::{Builder, Runtime};

const LEASE: Duration = Duration::from_secs(60);

/// current_thread, as in benches/store.rs: server and client run on the
/// bench thread, so the time is their work and loopback, not hand-offs
/// between workers competing for two cores.
fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime the bench runs on")
}

/// One resume at the session's last index, through to the close that
/// follows the ACK.
async fn resume_onto_final(server: &TestServer, store: &InMemoryStore, session: NewSession) {
    store
        .create(session, LEASE)
        .await
        .expect("create the session to resume");
    let mut client = RawClient::connect(server.addr).await;
    client
        .send(Frame::Resume(Resume {
            client_id: session.client_id,
            token: session.token,
            next_index: session.count - 1,
        }))
        .await;
    match client.frame().await {
        Frame::Welcome(_) => {}
        other => panic!("expected WELCOME, got {other:?}"),
    }
    let checksum = match client.frame().await {
        Frame::Final { checksum, .. } => checksum,
        other => panic!("expected FINAL, got {other:?}"),
    };
    assert_eq!(
        checksum, session.checksum,
        "FINAL carries the session's checksum"
    );
    client
        .send(Frame::Ack {
            client_checksum: checksum,
        })
        .await;
    // The server completes the session before it closes, so the next
    // iteration can create it again.
    client.expect_closed().await;
}

fn final_frame(c: &mut Criterion) {
    let runtime = runtime();
    let store = Arc::new(InMemoryStore::new(1_000));
    let server = runtime.block_on(TestServer::start_with_store(
        fast_config(),
        store.clone() as Arc<dyn SessionStore>,
    ));
    let mut group = c.benchmark_group("resume onto FINAL");
    for count in [1u16, u16::MAX] {
        let session = NewSession::new(
            ClientId::from_u128(u128::from(count)),
            SessionSeed([5; 32]),
            count,
            ResumeToken([6; 16]),
        );
        let name = format!("count {count}, FINAL at index {}", count - 1);
        group.bench_function(name, |b| {
            b.to_async(&runtime)
                .iter(|| resume_onto_final(&server, &store, session));
        });
    }
    group.finish();
    drop(server);
}

criterion_group!(benches, final_frame);
criterion_main!(benches);
