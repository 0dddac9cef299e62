//! A server whose runtime has more work than CPU stops accepting
//! connections until its shared run queue drains (2 s at most at a time),
//! and an OPEN that waited in the listen backlog meanwhile for longer than
//! its client waits for a WELCOME is refused (`server_busy`), not made into
//! a session that nobody will take (issue 15).
//!
//! The server runs in-process on a one-worker multi-thread runtime, as the
//! binary's runtime is on one core. A flood of tasks that only yield keeps
//! that worker busy: its own queue holds 256 tasks, the rest overflow into
//! the runtime's shared queue, which is what tens of thousands of streams
//! do to a core (there, 6,000-13,000 tasks waited 3-5 s each), without
//! needing them. The store is in memory: nothing here is about the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use numstream_harness::raw::RawClient;
use numstream_harness::wait;
use numstream_protocol::{ErrorCode, Frame};
use numstream_server::{OverloadLimits, ServerConfig, Telemetry};
use numstream_store::InMemoryStore;

/// Tasks in the flood: far more than a worker's own queue (256) holds.
const FLOOD: usize = 4_000;
/// The run queue depth past which the server stops accepting.
const RUN_QUEUE: usize = 64;
/// Connections queued in the backlog ahead of the stale OPEN.
const FILLERS: usize = 200;
/// How long the flood lasts once the stale OPEN waits in the backlog:
/// two pauses of at most 2 s, so that it waits longer than an OPEN may
/// wait for its store write (3 s) and its client would have given up.
const FLOOD_AFTER_CONNECT: Duration = Duration::from_secs(5);
/// Upper bound on any wait here, so that a failure fails instead of
/// hanging; never what an assertion races.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_deep_run_queue_stops_accepting_and_a_stale_open_gets_server_busy() {
    let telemetry = Telemetry::disabled();
    let shutdown = CancellationToken::new();
    let flooding = Arc::new(AtomicBool::new(true));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (flood_tx, flood_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn({
        let (telemetry, shutdown, flooding) =
            (telemetry.clone(), shutdown.clone(), flooding.clone());
        move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("the server's runtime");
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                port_tx
                    .send(listener.local_addr().expect("address").port())
                    .expect("the test waits for the port");
                let config = ServerConfig {
                    overload: OverloadLimits {
                        run_queue: Some(RUN_QUEUE),
                        ..OverloadLimits::default()
                    },
                    ..ServerConfig::default()
                };
                let run = tokio::spawn(numstream_server::run_with_telemetry(
                    listener,
                    Arc::new(InMemoryStore::new(100)),
                    config,
                    shutdown,
                    telemetry,
                ));
                // Spawned from the worker, so that the flood fills the
                // worker's own queue first and overflows into the shared one.
                flood_rx.recv().expect("the test starts the flood");
                tokio::spawn(async move {
                    for _ in 0..FLOOD {
                        let flooding = flooding.clone();
                        tokio::spawn(async move {
                            while flooding.load(Ordering::Relaxed) {
                                tokio::task::yield_now().await;
                            }
                        });
                    }
                })
                .await
                .expect("the flood starts");
                run.await.expect("server task").expect("server run");
            });
        }
    });
    let port = port_rx.recv_timeout(PATIENCE).expect("the server listens");
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    flood_tx.send(()).expect("the server thread waits");

    // The accept loop looks at the queue before each accept, so each
    // connection here wakes it to look (and is accepted before it does).
    let wakers = Arc::new(std::sync::Mutex::new(Vec::new()));
    wait::until(PATIENCE, "the accept loop pauses for the run queue", || {
        let (paused, wakers) = (telemetry.accept_paused(), wakers.clone());
        async move {
            if paused == Some(RUN_QUEUE) {
                return true;
            }
            let waker = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            wakers.lock().expect("not poisoned").push(waker);
            false
        }
    })
    .await;

    // These wait in the listen backlog: more than the loop takes after a
    // pause (128) before it looks at the queue again, so the last one,
    // its OPEN sent at once, is still there after the first pause and
    // waits out a second.
    for _ in 0..FILLERS {
        let filler = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        wakers.lock().expect("not poisoned").push(filler);
    }
    let mut stale = RawClient::opened(address, 5).await;
    tokio::time::sleep(FLOOD_AFTER_CONNECT).await;
    flooding.store(false, Ordering::Relaxed);

    let message = stale.expect_error(ErrorCode::ServerBusy).await;
    assert!(
        message.contains("behind"),
        "an OPEN that waited {FLOOD_AFTER_CONNECT:?} in the backlog was refused for another reason: {message}"
    );
    wait::until(
        PATIENCE,
        "the accept loop resumes once the queue drained",
        || {
            let paused = telemetry.accept_paused();
            async move { paused.is_none() }
        },
    )
    .await;

    // Once drained, a fresh OPEN is served as usual.
    let mut fresh = RawClient::opened(address, 5).await;
    assert!(
        matches!(fresh.frame().await, Frame::Welcome(_)),
        "a fresh OPEN after the queue drained was not welcomed"
    );

    shutdown.cancel();
    tokio::task::spawn_blocking(move || server.join())
        .await
        .expect("join task")
        .expect("the server thread must not panic");
}
