//! The client against a scripted fake server: every reconnect, retry and
//! failure path of `numstream_client::run`, over real TCP.

mod support;

use std::time::Duration;

use numstream_client::{Backoff, ClientConfig, ClientError, Event};
use numstream_protocol::testing::encoded;
use numstream_protocol::{Disposition, ErrorCode, ErrorFrame, Frame, Open, Resume};
use support::memory::MemoryNet;
use support::*;

fn assert_open(frame: &Frame, config: &ClientConfig) {
    assert_eq!(
        frame,
        &Frame::Open(Open {
            client_id: config.client_id,
            count: config.count,
        })
    );
}

fn assert_resume(frame: &Frame, config: &ClientConfig, next_index: u16) {
    match frame {
        Frame::Resume(Resume {
            client_id,
            token,
            next_index: got,
        }) => {
            assert_eq!(*client_id, config.client_id);
            assert!(
                token.ct_eq(&TOKEN),
                "RESUME must carry the first WELCOME's token"
            );
            assert_eq!(*got, next_index);
        }
        other => panic!("expected RESUME, got {other:?}"),
    }
}

fn error(code: ErrorCode, message: &str) -> Frame {
    Frame::Error(ErrorFrame::new(code, message))
}

/// A connection whose OPEN is answered with `refusal`, then closed.
fn refuses_open(refusal: Frame) -> Script {
    Script::new().expect(Expect::Open).send(refusal).cut()
}

/// A connection that opens and gets the whole `count`-number session.
fn whole_session(count: u16) -> Script {
    Script::new()
        .expect(Expect::Open)
        .send(welcome(count, 0))
        .finish(&session(count), 0)
}

#[tokio::test]
async fn happy_path_verifies_and_acks() {
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(5, 0))
            .send_numbers(&session(5), 0..5)
            .expect(Expect::Ack)
            .expect_closed(),
    ])
    .await;
    let port = server.port();
    let config = config(vec![port], 5);
    let (report, events) = run_client(config.clone()).await;
    let received = server.finish().await;
    let [open, ack] = &received[0][..] else {
        panic!("expected OPEN and ACK, got {received:?}");
    };
    assert_open(open, &config);
    let Frame::Ack {
        client_checksum: ack,
    } = *ack
    else {
        panic!("expected ACK, got {ack:?}");
    };

    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.exit_code(), 0);
    assert_eq!(report.error, None);
    assert_eq!(report.client_id, config.client_id);
    assert_eq!(report.count, 5);
    assert_eq!(report.received, 5);
    assert_eq!(report.sum, expected(5).sum());
    assert_eq!(report.server_checksum, Some(expected(5).checksum()));
    assert_eq!(report.client_checksum, expected(5).checksum());
    assert_eq!(report.reconnects, 0);
    assert_eq!(
        ack,
        expected(5).checksum(),
        "ACK carries the client checksum"
    );

    let numbers: Vec<u16> = events
        .iter()
        .filter_map(|event| match event {
            Event::Number { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4], "every number, FINAL's included");
    assert!(matches!(events.first(), Some(Event::Connected { addr }) if addr.port() == port));
    assert!(events.contains(&Event::Welcomed {
        next_index: 0,
        count: 5
    }));
    assert_eq!(events.last(), Some(&Event::Completed));
}

#[tokio::test]
async fn single_number_session_and_max_count_welcome() {
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(1, 0))
            .finish(&session(1), 0),
    ])
    .await;
    let (report, _) = run_client(config(vec![server.port()], 1)).await;
    assert_eq!(acked(&server.finish().await[0]), expected(1).checksum());
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.received, 1);
    assert_eq!(report.sum, expected(1).sum());
}

#[tokio::test]
async fn heartbeats_are_accepted_between_numbers() {
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(3, 0))
            .send(Frame::Heartbeat)
            .send_numbers(&session(3), 0..1)
            .send(Frame::Heartbeat)
            .send_numbers(&session(3), 1..3)
            .expect(Expect::Ack),
    ])
    .await;
    let port = server.port();
    let (report, events) = run_client(config(vec![port], 3)).await;
    server.finish().await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(events.iter().filter(|e| **e == Event::Heartbeat).count(), 2);
}

#[tokio::test]
async fn dropped_connection_is_resumed_at_the_first_missing_index() {
    let server = FakeServer::start(vec![
        streamed_then_cut(5, 2),
        Script::new()
            .expect(Expect::Any)
            .send(welcome(5, 2))
            .finish(&session(5), 2),
    ])
    .await;
    let config = config(vec![server.port()], 5);
    let (report, events) = run_client(config.clone()).await;
    let received = server.finish().await;
    assert_open(&received[0][0], &config);
    assert_resume(&received[1][0], &config, 2);
    let ack = acked(&received[1]);

    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 1);
    assert_eq!(report.received, 5);
    assert_eq!(report.sum, expected(5).sum());
    assert_eq!(ack, expected(5).checksum());
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 1);
    assert!(
        reconnects[0].0.contains("closed the connection"),
        "{reconnects:?}"
    );
    assert!(events.contains(&Event::Welcomed {
        next_index: 2,
        count: 5
    }));
}

#[tokio::test]
async fn wrong_checksum_fails_with_exit_code_1() {
    let right = expected(3).checksum();
    let Frame::Final { index, value, .. } = number(3, 2) else {
        panic!("index 2 of 3 is FINAL");
    };
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Any)
            .send(welcome(3, 0))
            .send_numbers(&session(3), 0..2)
            .send(Frame::Final {
                index,
                value,
                checksum: right ^ 1,
            })
            // The client still ACKs, with its own checksum, so the server
            // can log the disagreement.
            .expect(Expect::Ack),
    ])
    .await;
    let (report, events) = run_client(config(vec![server.port()], 3)).await;
    assert_eq!(acked(&server.finish().await[0]), right);

    assert!(!report.ok);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(
        report.error,
        Some(ClientError::ChecksumMismatch {
            server: right ^ 1,
            client: right,
        })
    );
    assert_eq!(report.server_checksum, Some(right ^ 1));
    assert_eq!(report.received, 3);
    assert!(reconnect_events(&events).is_empty());
    assert!(
        report
            .render_human()
            .contains("result           FAILED: checksum mismatch")
    );
}

#[tokio::test]
async fn duplicate_index_is_a_protocol_violation() {
    assert_violation(
        5,
        vec![
            encoded(&welcome(5, 0)),
            encoded(&number(5, 0)),
            encoded(&number(5, 0)),
        ],
        1,
        "expected number 1, server sent number 0",
    )
    .await;
}

#[tokio::test]
async fn skipped_index_is_a_protocol_violation() {
    assert_violation(
        5,
        vec![
            encoded(&welcome(5, 0)),
            encoded(&number(5, 0)),
            encoded(&number(5, 2)),
        ],
        1,
        "expected number 1, server sent number 2",
    )
    .await;
}

#[tokio::test]
async fn malformed_bytes_are_a_protocol_violation() {
    assert_violation(
        5,
        vec![encoded(&welcome(5, 0)), vec![0, 0, 0, 1, 0x7f]],
        0,
        "unknown frame type 0x7f",
    )
    .await;
}

#[tokio::test]
async fn oversized_frame_during_handshake_is_a_protocol_violation() {
    assert_violation(
        5,
        vec![vec![0xff, 0xff, 0xff, 0xff]],
        0,
        "exceeds the maximum",
    )
    .await;
}

#[tokio::test]
async fn welcome_with_the_wrong_count_is_a_protocol_violation() {
    assert_violation(5, vec![encoded(&welcome(6, 0))], 0, "WELCOME says count 6").await;
}

#[tokio::test]
async fn resume_welcome_with_another_token_is_a_protocol_violation() {
    let Frame::Welcome(mut other) = welcome(5, 2) else {
        unreachable!()
    };
    other.token.0[0] ^= 1;
    let server = FakeServer::start(vec![
        streamed_then_cut(5, 2),
        Script::new()
            .expect(Expect::Any)
            .send(Frame::Welcome(other))
            .expect_closed(),
    ])
    .await;
    let (report, _) = run_client(config(vec![server.port()], 5)).await;
    server.finish().await;
    assert_eq!(report.exit_code(), 5, "{}", report.render_human());
    assert_eq!(report.received, 2);
}

#[tokio::test]
async fn session_expired_on_resume_fails_with_exit_code_3() {
    let server = FakeServer::start(vec![
        streamed_then_cut(5, 2),
        Script::new()
            .expect(Expect::Resume { next_index: 2 })
            .send(error(ErrorCode::SessionExpired, "ttl passed"))
            .cut(),
    ])
    .await;
    let (report, _) = run_client(config(vec![server.port()], 5)).await;
    server.finish().await;
    assert!(!report.ok);
    assert_eq!(report.exit_code(), 3);
    assert!(matches!(
        report.error,
        Some(ClientError::SessionExpired { ttl, .. }) if ttl == Duration::from_secs(30)
    ));
    let text = report.to_json()["error"].as_str().map(str::to_owned);
    assert!(text.is_some_and(|t| t.contains("expired")));
    assert_eq!(report.received, 2);
}

#[tokio::test(start_paused = true)]
async fn session_unknown_after_the_ttl_counts_as_expired() {
    // In-memory connections under paused time: the TTL passes on the
    // test's clock, not the machine's.
    let net = MemoryNet::default();
    let server = net.listen(7000).serve(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome_with(5, 0, 0, 100))
            .cut(),
        // The TTL passes before the client's RESUME is answered.
        Script::new()
            .expect(Expect::Resume { next_index: 0 })
            .pause(Duration::from_millis(150))
            .send(error(ErrorCode::SessionUnknown, "no such session"))
            .cut(),
    ]);
    let (report, _) = run_client_in(&net, config(vec![7000], 5)).await;
    join(server).await;
    assert_eq!(report.exit_code(), 3);
    assert!(
        matches!(report.error, Some(ClientError::SessionExpired { away, ttl })
            if ttl == Duration::from_millis(100) && away >= ttl),
        "{:?}",
        report.error
    );
}

// In memory under paused time: the silence bound (from the interval) and
// the reconnect delay pass in virtual time, with nothing racing them.
#[tokio::test(start_paused = true)]
async fn silent_server_is_abandoned_and_the_session_resumed() {
    let net = MemoryNet::default();
    let config = config(vec![7000], 5);
    let server = net.listen(7000).serve(vec![
        // Open and silent after two numbers until the client gives up on
        // it and comes back on a second connection.
        Script::new()
            .expect(Expect::Any)
            .send(welcome_with(5, 0, 1_000, 30_000))
            .send_numbers(&session(5), 0..2)
            .expect_closed(),
        Script::new()
            .expect(Expect::Any)
            .send(welcome_with(5, 2, 1_000, 30_000))
            .finish(&session(5), 2),
    ]);
    let (report, events) = run_client_in(&net, config.clone()).await;
    let received = join(server).await;
    assert_resume(&received[1][0], &config, 2);
    assert_eq!(acked(&received[1]), expected(5).checksum());
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 1);
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 1);
    assert!(reconnects[0].0.contains("silent"), "{reconnects:?}");
}

/// A client that waits `handshake_timeout` for WELCOME, against a server
/// that leaves its first OPEN unanswered until the client gives up, and
/// answers its second after `second_after`. Returns the client's report
/// and its reconnect events.
async fn late_welcomes(
    handshake_timeout: Duration,
    second_after: Duration,
) -> (numstream_client::Report, Vec<(String, Duration)>) {
    let net = MemoryNet::default();
    let mut config = config(vec![7000], 2);
    config.handshake_timeout = handshake_timeout;
    let server = net.listen(7000).serve(vec![
        Script::new().expect(Expect::Any).expect_closed(),
        Script::new()
            .expect(Expect::Any)
            .pause(second_after)
            .send(welcome(2, 0))
            .finish(&session(2), 0),
    ]);
    let (report, events) = run_client_in(&net, config.clone()).await;
    let received = join(server).await;
    assert_open(&received[0][0], &config);
    // No WELCOME reached the client, so it opens again.
    assert_open(&received[1][0], &config);
    (report, reconnect_events(&events))
}

#[tokio::test(start_paused = true)]
async fn server_that_never_welcomes_is_retried_after_the_handshake_timeout() {
    let (report, reconnects) = late_welcomes(Duration::from_millis(200), Duration::ZERO).await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 0, "only WELCOMEd connections count");
    assert!(reconnects[0].0.contains("no WELCOME"), "{reconnects:?}");
}

#[tokio::test(start_paused = true)]
async fn a_slow_server_gets_longer_to_welcome_after_each_handshake_timeout() {
    // An overloaded server welcomes late; a client that kept abandoning
    // its place in the queue at the same bound would never get in. The
    // second WELCOME comes 1.5 s after OPEN: past the first 1 s wait, well
    // inside the doubled 2 s one.
    let (report, reconnects) =
        late_welcomes(Duration::from_secs(1), Duration::from_millis(1500)).await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(reconnects.len(), 1, "{reconnects:?}");
    assert!(
        reconnects[0].0.contains("no WELCOME") && reconnects[0].0.contains("1s"),
        "{reconnects:?}"
    );
}

#[tokio::test]
async fn refused_port_is_skipped_for_the_next_one() {
    let closed = closed_port();
    let server = FakeServer::start(vec![whole_session(4)]).await;
    let port = server.port();
    let (report, events) = run_client(config(vec![closed, port], 4)).await;
    server.finish().await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 0);
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 1);
    assert!(
        reconnects[0].0.contains(&format!(":{closed}")),
        "{reconnects:?}"
    );
    let connected: Vec<u16> = events
        .iter()
        .filter_map(|e| match e {
            Event::Connected { addr } => Some(addr.port()),
            _ => None,
        })
        .collect();
    assert_eq!(connected, [port]);
}

#[tokio::test]
async fn server_busy_is_retried_with_a_fresh_open() {
    let server = FakeServer::start(vec![
        refuses_open(error(ErrorCode::ServerBusy, "too many sessions")),
        whole_session(3),
    ])
    .await;
    let config = config(vec![server.port()], 3);
    let (report, events) = run_client(config.clone()).await;
    let received = server.finish().await;
    assert_open(&received[0][0], &config);
    assert_open(&received[1][0], &config);
    assert!(report.ok, "{}", report.render_human());
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 1);
    assert!(reconnects[0].0.contains("server_busy"), "{reconnects:?}");
    assert!(
        reconnects[0].1 <= Duration::from_millis(20),
        "first delay within busy_backoff.initial"
    );
}

#[tokio::test]
async fn retry_now_resumes_at_once_on_the_next_port() {
    let drain = ErrorFrame::new(ErrorCode::ShuttingDown, "draining")
        .with_disposition(Disposition::RetryNow);
    let draining = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(5, 0))
            .send_numbers(&session(5), 0..2)
            .send(Frame::Error(drain))
            .cut(),
    ])
    .await;
    let healthy = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Any)
            .send(welcome(5, 2))
            .finish(&session(5), 2),
    ])
    .await;
    let mut config = config(vec![draining.port(), healthy.port()], 5);
    // Any backoff at all would blow the test's time budget.
    config.backoff = Backoff {
        initial: Duration::from_secs(60),
        max: Duration::from_secs(60),
        multiplier: 2.0,
    };
    let (report, events) = run_client(config.clone()).await;
    draining.finish().await;
    assert_resume(&healthy.finish().await[0][0], &config, 2);
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 1);
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 1);
    assert_eq!(reconnects[0].1, Duration::ZERO);
    assert!(reconnects[0].0.contains("shutting_down"), "{reconnects:?}");
}

#[tokio::test]
async fn final_shutting_down_ends_the_run() {
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(5, 0))
            .send_numbers(&session(5), 0..1)
            .send(error(ErrorCode::ShuttingDown, "in-memory store"))
            .cut(),
    ])
    .await;
    let (report, events) = run_client(config(vec![server.port()], 5)).await;
    server.finish().await;
    assert_eq!(report.exit_code(), 3);
    assert!(matches!(
        report.error,
        Some(ClientError::ServerShuttingDown { .. })
    ));
    assert!(
        report
            .render_human()
            .contains("server shut down; the session cannot survive it")
    );
    assert!(reconnect_events(&events).is_empty());
    assert!(matches!(events.last(), Some(Event::Failed { .. })));
}

#[tokio::test]
async fn taken_over_is_resumed_twice_then_ends_the_run() {
    let taken_over = error(ErrorCode::TakenOver, "resumed elsewhere");
    let first = Script::new()
        .expect(Expect::Open)
        .send(welcome(5, 0))
        .send_numbers(&session(5), 0..1)
        .send(taken_over.clone())
        .cut();
    // The taker may have been the client's own stale RESUME: it comes
    // back, and is taken over again, twice; the third time it stops.
    let again = Script::new()
        .expect(Expect::Any)
        .send(welcome(5, 1))
        .send(taken_over)
        .cut();
    let server = FakeServer::start(vec![first, again.clone(), again]).await;
    let config = config(vec![server.port()], 5);
    let (report, events) = run_client(config.clone()).await;
    let received = server.finish().await;
    assert_resume(&received[1][0], &config, 1);
    assert_resume(&received[2][0], &config, 1);
    assert_eq!(report.exit_code(), 3);
    assert!(matches!(report.error, Some(ClientError::TakenOver { .. })));
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 2, "{reconnects:?}");
    assert!(reconnects[0].0.contains("taken over"), "{reconnects:?}");
}

#[tokio::test]
async fn other_final_errors_are_rejections() {
    let server = FakeServer::start(vec![refuses_open(error(
        ErrorCode::SessionExists,
        "already live",
    ))])
    .await;
    let (report, _) = run_client(config(vec![server.port()], 5)).await;
    server.finish().await;
    assert_eq!(report.exit_code(), 3);
    assert_eq!(
        report.error,
        Some(ClientError::Rejected {
            code: ErrorCode::SessionExists,
            message: "already live".into()
        })
    );
}

#[tokio::test]
async fn lost_first_welcome_waits_for_the_orphan_instead_of_failing() {
    let server = FakeServer::start(vec![
        // The first OPEN creates the session, but the connection dies
        // before the WELCOME (and with it the token) reaches the client.
        Script::new().expect(Expect::Open).cut(),
        // Until the orphan expires, a second OPEN meets `session_exists`.
        refuses_open(error(ErrorCode::SessionExists, "already live")),
        // Once it has expired, the OPEN succeeds.
        whole_session(3),
    ])
    .await;
    let config = config(vec![server.port()], 3);
    let (report, events) = run_client(config.clone()).await;
    for connection in server.finish().await {
        assert_open(&connection[0], &config);
    }
    assert!(report.ok, "{}", report.render_human());
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), 2, "{reconnects:?}");
    assert!(
        reconnects[1].0.contains("lost its WELCOME"),
        "{reconnects:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn never_welcomed_gives_up_at_the_open_timeout() {
    // No listener on the port: every connect is refused.
    let net = MemoryNet::default();
    let mut config = config(vec![7000], 5);
    config.open_timeout = Duration::from_millis(300);
    let (report, events) = run_client_in(&net, config).await;
    assert_eq!(report.exit_code(), 4);
    let Some(ClientError::CannotConnect {
        attempts,
        last_error,
        ..
    }) = &report.error
    else {
        panic!("expected CannotConnect, got {:?}", report.error);
    };
    assert!(last_error.contains("cannot connect"), "{last_error}");
    // Every attempt but the last was followed by a reconnect.
    assert_eq!(reconnect_events(&events).len() + 1, *attempts as usize);
    assert_eq!(report.server_checksum, None);
}

/// A server that refuses every OPEN with `server_busy` (disposition
/// `retry`) until `busy_for` has passed since it started, then serves the
/// session. Returns the script's handle (yielding the number of OPENs it
/// refused) and its port.
async fn busy_server(busy_for: Duration, count: u16) -> (tokio::task::JoinHandle<u32>, u16) {
    let (listener, port) = listen().await;
    let started = tokio::time::Instant::now();
    let server = tokio::spawn(async move {
        let mut refused = 0;
        loop {
            let mut conn = accept(&listener).await;
            let Frame::Open(open) = recv(&mut conn).await else {
                panic!("expected OPEN: no WELCOME was ever sent");
            };
            assert_eq!(open.count, count);
            if started.elapsed() < busy_for {
                send(
                    &mut conn,
                    error(ErrorCode::ServerBusy, "at the session cap"),
                )
                .await;
                refused += 1;
                continue;
            }
            send(&mut conn, welcome(count, 0)).await;
            finish(&mut conn, count, 0).await;
            return refused;
        }
    });
    (server, port)
}

/// Bound on a paused-time run: minutes of virtual time pass in no time.
const VIRTUAL_PATIENCE: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn a_server_busy_for_longer_than_a_session_ttl_is_outlasted() {
    // Busy for 45 s: longer than the 30 s default session TTL a session
    // flood can keep a server full, and longer than the old bounds (10
    // attempts, 30 s) allowed. The client runs with its default patience
    // and backoff; paused time makes the minute instant and exact.
    let busy_for = Duration::from_secs(45);
    let (server, port) = busy_server(busy_for, 3).await;
    let config = ClientConfig {
        ports: vec![port],
        count: 3,
        ..ClientConfig::default()
    };
    // Refusals of an OPEN with server_busy use the longer busy backoff.
    let backoff_cap = config.busy_backoff.max;
    let started = tokio::time::Instant::now();
    let (report, events) = run_client_within(config, VIRTUAL_PATIENCE).await;
    let refused = join_within(server, VIRTUAL_PATIENCE).await;

    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.received, 3);
    assert!(started.elapsed() >= busy_for, "{:?}", started.elapsed());
    // At most 10 s apart, so at least 5 in 45 s.
    assert!(
        refused >= 5,
        "only {refused} refusals: the test proves nothing"
    );
    let reconnects = reconnect_events(&events);
    assert_eq!(reconnects.len(), refused as usize);
    for (cause, delay) in &reconnects {
        assert!(cause.contains("server_busy"), "{cause}");
        assert!(*delay <= backoff_cap, "{delay:?} exceeds the cap");
    }
    // Full jitter: the delays at the cap are not all the same.
    let capped: std::collections::HashSet<_> = reconnects[4..].iter().map(|(_, d)| d).collect();
    assert!(capped.len() > 1, "{reconnects:?}");
}

#[tokio::test(start_paused = true)]
async fn a_server_busy_past_the_open_timeout_ends_the_run_with_exit_code_4() {
    let (server, port) = busy_server(Duration::MAX, 3).await;
    let config = ClientConfig {
        ports: vec![port],
        count: 3,
        ..ClientConfig::default()
    };
    let open_timeout = config.open_timeout;
    let started = tokio::time::Instant::now();
    let (report, events) = run_client_within(config, VIRTUAL_PATIENCE).await;
    let gave_up_after = started.elapsed();

    assert_eq!(report.exit_code(), 4, "{}", report.render_human());
    let Some(ClientError::CannotConnect {
        attempts,
        waited,
        last_error,
    }) = &report.error
    else {
        panic!("expected CannotConnect, got {:?}", report.error);
    };
    assert!(last_error.contains("server_busy"), "{last_error}");
    // Busy backoff: jittered delays of at most 20 s, so at least three
    // attempts in the 60 s (how many more is chance).
    assert!(*attempts >= 3, "{attempts}");
    assert_eq!(reconnect_events(&events).len() + 1, *attempts as usize);
    // Attempts go on until the last second of the timeout (the last one
    // needs time to be answered); the run never outlasts it.
    assert!(*waited <= open_timeout, "{waited:?}");
    assert!(
        *waited >= open_timeout - Duration::from_secs(1),
        "gave up early: {waited:?}"
    );
    assert_eq!(gave_up_after, *waited);
    assert!(report.render_human().contains("no WELCOME after"));

    // The script is still waiting for a next OPEN that never comes.
    server.abort();
    let Err(aborted) = server.await else {
        panic!("the busy server cannot have finished");
    };
    assert!(aborted.is_cancelled(), "the busy server failed: {aborted}");
}

#[tokio::test(start_paused = true)]
async fn open_session_gives_up_when_its_ttl_has_passed() {
    let net = MemoryNet::default();
    // The server vanishes after three numbers: connection and listener
    // both.
    let server = net.listen(7000).serve(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome_with(5, 0, 0, 300))
            .send_numbers(&session(5), 0..3)
            .cut(),
    ]);
    let (report, events) = run_client_in(&net, config(vec![7000], 5)).await;
    join(server).await;
    assert_eq!(report.exit_code(), 4);
    assert!(
        matches!(report.error, Some(ClientError::GaveUp { away, ttl, .. })
            if ttl == Duration::from_millis(300) && away >= ttl),
        "{:?}",
        report.error
    );
    assert_eq!(report.received, 3);
    assert!(reconnect_events(&events).len() >= 2);
}

#[tokio::test]
async fn invalid_config_is_reported_not_panicked() {
    let (report, _) = run_client(ClientConfig::default()).await;
    assert_eq!(report.exit_code(), 2);
    assert!(matches!(report.error, Some(ClientError::InvalidConfig(_))));
}

#[tokio::test]
async fn run_future_is_send_and_accepts_foreign_observers() {
    let server = FakeServer::start(vec![whole_session(3)]).await;
    let config = config(vec![server.port()], 3);
    // Spawning requires Send: load generators run many clients as tasks.
    let client = tokio::spawn(async move {
        let mut observer = Counting::default();
        let report = numstream_client::run(config, &mut observer).await;
        (report, observer.numbers)
    });
    let (report, numbers) = join(client).await;
    server.finish().await;
    assert!(report.ok);
    assert_eq!(numbers, 3);
}

#[tokio::test]
async fn absurd_timeouts_do_not_panic() {
    let server = FakeServer::start(vec![whole_session(2)]).await;
    let mut config = config(vec![server.port()], 2);
    config.connect_timeout = Duration::MAX;
    config.handshake_timeout = Duration::MAX;
    config.open_timeout = Duration::MAX;
    config.backoff.max = Duration::MAX;
    let (report, _) = run_client(config).await;
    server.finish().await;
    assert!(report.ok, "{}", report.render_human());
}

/// WELCOME announces a TTL of 2^32-1 ms (49.7 days) and the server then
/// disappears: the client believes at most an hour of it, and gives up
/// resuming after that hour (virtual time).
#[tokio::test(start_paused = true)]
async fn a_huge_ttl_in_welcome_is_clamped_to_an_hour() {
    // The listener goes with the script: every resume is refused.
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome_with(5, 0, 0, u32::MAX))
            .send_numbers(&session(5), 0..2)
            .cut(),
    ])
    .await;
    let started = tokio::time::Instant::now();
    let config = config(vec![server.port()], 5);
    let (report, _) = run_client_within(config, Duration::from_secs(3 * 3600)).await;
    server.finish().await;
    match &report.error {
        Some(ClientError::GaveUp { ttl, away, .. }) => {
            assert_eq!(*ttl, numstream_client::MAX_TRUSTED_TTL);
            assert!(*away >= *ttl, "{away:?}");
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
    assert_eq!(report.received, 2);
    assert!(
        started.elapsed() < Duration::from_secs(2 * 3600),
        "{:?}",
        started.elapsed()
    );
}

/// A server that welcomes with an interval of 2^32-1 µs (71 minutes) and
/// the largest TTL, then sends nothing: whatever the client makes of the
/// silence and however long it would retry, max_duration ends the run
/// (virtual time).
#[tokio::test(start_paused = true)]
async fn max_duration_ends_a_run_against_a_server_that_stalls() {
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome_with(5, 0, u32::MAX, u32::MAX))
            // Never a number; the connection stays open.
            .expect_closed(),
    ])
    .await;
    let limit = Duration::from_secs(600);
    let config = ClientConfig {
        max_duration: Some(limit),
        ..config(vec![server.port()], 5)
    };
    let started = tokio::time::Instant::now();
    let (report, _) = run_client_within(config, Duration::from_secs(3 * 3600)).await;
    assert_eq!(report.error, Some(ClientError::MaxDuration { limit }));
    assert_eq!(report.exit_code(), numstream_client::EXIT_CANNOT_CONNECT);
    assert!(started.elapsed() >= limit);
    server.finish().await;
}
