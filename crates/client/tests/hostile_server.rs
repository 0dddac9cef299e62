//! The client library against a hostile or broken server: a scripted fake
//! server on real TCP that sends malformed frames, wrong or repeated
//! indices, tampered values, frames a server never sends, or makes no
//! progress at all. The client must fail clearly (exit 1 for a checksum
//! mismatch, 5 for a protocol violation, 4 when it gives up), never print
//! OK for a sequence that is not the server's, and never hang: every run is
//! bounded by a timeout.
//!
//! `crates/client/tests/fake_server.rs` has the basic cases (a duplicate or
//! skipped index, an unknown frame type, an oversized frame, a WELCOME with
//! the wrong count or token, a wrong checksum, a lost first WELCOME); this
//! suite adds the rest, plus trickled and torn frames that must *not* be
//! mistaken for violations.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use numstream_client::{
    Backoff, ClientConfig, EXIT_CANNOT_CONNECT, EXIT_CHECKSUM_MISMATCH, EXIT_PROTOCOL_VIOLATION,
    Report,
};
use numstream_harness::fake_server::{
    SEED, TOKEN, expected as reference, hello, linger, listen, number, send, send_raw,
    try_accept as accept, welcome, welcome_with,
};
use numstream_protocol::frame::tag;
use numstream_protocol::testing::encoded as wire;
use numstream_protocol::{Frame, Open, Resume, number_at};

/// Bound on a whole client run: past it, the client hung.
const RUN_LIMIT: Duration = Duration::from_secs(20);

fn config(port: u16, count: u16) -> ClientConfig {
    ClientConfig {
        ports: vec![port],
        count,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(1),
        open_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// Runs the client to its end; a run past [`RUN_LIMIT`] is a hang.
async fn run_client(config: ClientConfig) -> Report {
    let started = Instant::now();
    let report = tokio::time::timeout(RUN_LIMIT, numstream_client::run(config, &mut ()))
        .await
        .unwrap_or_else(|_| panic!("the client hung: no result after {RUN_LIMIT:?}"));
    assert!(started.elapsed() < RUN_LIMIT);
    report
}

/// The run failed with `exit_code`, and nothing in its output says OK.
fn assert_failed(report: &Report, exit_code: u8, expect_in_error: &str) {
    let text = report.render_human();
    assert!(!report.ok, "{text}");
    assert_eq!(report.exit_code(), exit_code, "{text}");
    assert!(!text.contains("result           OK"), "{text}");
    assert_eq!(report.to_json()["ok"], serde_json::Value::Bool(false));
    let error = report
        .error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        error.contains(expect_in_error),
        "error {error:?} should mention {expect_in_error:?}"
    );
}

/// A one-connection fake server: takes the hello, then writes `script`
/// (raw bytes) and waits for the client to hang up.
fn scripted(listener: TcpListener, script: Vec<Vec<u8>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut conn) = accept(&listener).await else {
            return;
        };
        hello(&mut conn).await;
        for bytes in script {
            send_raw(&mut conn, &bytes).await;
        }
        // Keep the connection open until the client is done with it.
        linger(&mut conn).await;
    })
}

/// Script: WELCOME, then the correct numbers `0..upto`, then `tail`.
async fn violation(count: u16, upto: u16, tail: Vec<Vec<u8>>, expect_in_error: &str) {
    let (listener, port) = listen().await;
    let mut script = vec![wire(&welcome(count, 0))];
    script.extend((0..upto).map(|i| wire(&number(count, i))));
    script.extend(tail);
    let server = scripted(listener, script);
    let report = run_client(config(port, count)).await;
    assert_failed(&report, EXIT_PROTOCOL_VIOLATION, expect_in_error);
    assert_eq!(report.received, upto, "numbers before the violation count");
    assert_eq!(report.reconnects, 0, "a lying server is never retried");
    server.abort();
}

#[tokio::test]
async fn last_number_sent_as_number_instead_of_final() {
    let count = 4;
    let last = Frame::Number {
        index: 3,
        value: number_at(&SEED, 3),
    };
    violation(count, 3, vec![wire(&last)], "did not come as FINAL").await;
}

#[tokio::test]
async fn final_before_the_last_index() {
    let early = Frame::Final {
        index: 2,
        value: number_at(&SEED, 2),
        checksum: reference(10).checksum(),
    };
    violation(10, 2, vec![wire(&early)], "FINAL arrived at index 2").await;
}

#[tokio::test]
async fn indices_past_the_count_or_from_the_past() {
    for (bad, expect) in [
        (10u16, "server sent number 10"),
        (u16::MAX, "server sent number 65535"),
        (0, "server sent number 0"),
    ] {
        let frame = Frame::Number {
            index: bad,
            value: 1,
        };
        violation(10, 3, vec![wire(&frame)], expect).await;
    }
}

#[tokio::test]
async fn first_welcome_at_the_wrong_index() {
    let (listener, port) = listen().await;
    let server = scripted(listener, vec![wire(&welcome(10, 3))]);
    let report = run_client(config(port, 10)).await;
    assert_failed(
        &report,
        EXIT_PROTOCOL_VIOLATION,
        "WELCOME starts at index 3",
    );
    server.abort();
}

#[tokio::test]
async fn frames_only_a_client_sends() {
    let client_frames = [
        Frame::Open(Open {
            client_id: uuid::Uuid::from_u128(9),
            count: 5,
        }),
        Frame::Resume(Resume {
            client_id: uuid::Uuid::from_u128(9),
            token: TOKEN,
            next_index: 0,
        }),
        Frame::Ack { client_checksum: 0 },
    ];
    for frame in &client_frames {
        // In place of the WELCOME...
        let (listener, port) = listen().await;
        let server = scripted(listener, vec![wire(frame)]);
        let report = run_client(config(port, 5)).await;
        assert_failed(
            &report,
            EXIT_PROTOCOL_VIOLATION,
            "which a server never sends",
        );
        server.abort();
        // ...and in the middle of the stream.
        violation(5, 2, vec![wire(frame)], "which a server never sends").await;
    }
}

#[tokio::test]
async fn a_second_welcome_mid_stream() {
    violation(5, 2, vec![wire(&welcome(5, 2))], "WELCOME").await;
}

#[tokio::test]
async fn zero_length_and_truncated_frames() {
    violation(5, 1, vec![vec![0, 0, 0, 0]], "frame length 0").await;
    // A NUMBER one byte short, and one byte over.
    let mut short = BytesMut::new();
    short.put_u32(6);
    short.put_slice(&[tag::NUMBER, 0, 1, 0, 0, 0]);
    violation(5, 1, vec![short.to_vec()], "NUMBER frame body is 5 bytes").await;
    let mut long = BytesMut::new();
    long.put_u32(8);
    long.put_slice(&[tag::NUMBER, 0, 1, 0, 0, 0, 0, 0]);
    violation(5, 1, vec![long.to_vec()], "NUMBER frame body is 7 bytes").await;
}

#[tokio::test]
async fn malformed_error_frames() {
    let error = |body: &[u8]| {
        let mut buf = BytesMut::new();
        buf.put_u32(1 + body.len() as u32);
        buf.put_u8(tag::ERROR);
        buf.put_slice(body);
        buf.to_vec()
    };
    let mut too_long = vec![0, 1, 0, 0];
    too_long.extend_from_slice(&[b'x'; 401]);
    for (body, expect) in [
        (vec![0, 99, 0, 0], "unknown error code 99"),
        (vec![0, 1, 7, 0], "unknown disposition 7"),
        (vec![0, 1, 0, 0, 0xff, 0xfe], "not UTF-8"),
        (vec![0, 2, 0, 3, 0, 1], "truncated"),
        (vec![0, 1], "shorter than its fixed header"),
        (too_long, "too long"),
    ] {
        violation(5, 1, vec![error(&body)], expect).await;
    }
}

#[tokio::test]
async fn a_tampered_value_is_caught_by_the_checksum() {
    // Every index right, one value wrong, FINAL with the true checksum:
    // structurally perfect, so only the checksum can tell.
    for tampered in [0u16, 3, 7] {
        let count = 8;
        let (listener, port) = listen().await;
        let mut script = vec![wire(&welcome(count, 0))];
        for index in 0..count {
            let mut frame = number(count, index);
            if index == tampered {
                match &mut frame {
                    Frame::Number { value, .. } | Frame::Final { value, .. } => *value ^= 0x10,
                    _ => unreachable!(),
                }
            }
            script.push(wire(&frame));
        }
        let server = scripted(listener, script);
        let report = run_client(config(port, count)).await;
        assert_failed(&report, EXIT_CHECKSUM_MISMATCH, "checksum mismatch");
        assert_eq!(report.server_checksum, Some(reference(count).checksum()));
        assert_ne!(report.client_checksum, reference(count).checksum());
        server.abort();
    }
}

#[tokio::test]
async fn numbers_replayed_after_a_resume() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut first = accept(&listener).await.expect("first connection");
        hello(&mut first).await;
        send(&mut first, welcome(10, 0)).await;
        for index in 0..4 {
            send(&mut first, number(10, index)).await;
        }
        drop(first);
        let mut second = accept(&listener).await.expect("second connection");
        let Some(Frame::Resume(resume)) = hello(&mut second).await else {
            panic!("expected RESUME");
        };
        assert_eq!(resume.next_index, 4);
        // The right WELCOME, then the numbers from 2 again.
        send(&mut second, welcome(10, 4)).await;
        send(&mut second, number(10, 2)).await;
        let _ = tokio::time::timeout(RUN_LIMIT, second.next()).await;
    });
    let report = run_client(config(port, 10)).await;
    assert_failed(&report, EXIT_PROTOCOL_VIOLATION, "expected number 4");
    assert_eq!(report.received, 4);
    server.abort();
}

#[tokio::test]
async fn a_welcome_trickled_byte_by_byte_is_cut_off_by_the_handshake_timeout() {
    // A slowloris server: one byte of WELCOME every 300 ms, on every
    // connection (a whole WELCOME would take 10 s). The client's handshake
    // timeout (1 s here, doubled after each timeout up to 4 s) bounds each
    // attempt, and its open deadline (10 s) ends the run.
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let bytes = wire(&welcome(5, 0));
        let mut connections = Vec::new();
        while let Some(mut conn) = accept(&listener).await {
            hello(&mut conn).await;
            let bytes = bytes.clone();
            connections.push(tokio::spawn(async move {
                for byte in bytes {
                    send_raw(&mut conn, &[byte]).await;
                    tokio::time::sleep(Duration::from_millis(300)).await; // the slowloris pace of this hostile server (its behaviour)
                }
            }));
            if connections.len() >= 10 {
                break;
            }
        }
    });
    let started = Instant::now();
    let report = run_client(config(port, 5)).await;
    assert_failed(&report, EXIT_CANNOT_CONNECT, "no WELCOME");
    // The deadline plus scheduling slack: no handshake wait overshoots it.
    assert!(
        started.elapsed() < Duration::from_millis(10_500),
        "{:?}",
        started.elapsed()
    );
    server.abort();
}

/// The right frames, written one byte per write with pauses: reassembly
/// must not be mistaken for a violation.
#[tokio::test]
async fn frames_trickled_one_byte_at_a_time_still_verify() {
    let count = 20;
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await.expect("connection");
        hello(&mut conn).await;
        let mut bytes = wire(&welcome(count, 0));
        for index in 0..count {
            bytes.extend(wire(&number(count, index)));
        }
        for (i, byte) in bytes.iter().enumerate() {
            send_raw(&mut conn, &[*byte]).await;
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await; // trickle pace, so the bytes arrive in many reads (its behaviour)
            }
        }
        let _ = tokio::time::timeout(RUN_LIMIT, conn.next()).await;
    });
    let report = run_client(config(port, count)).await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.sum, reference(count).sum());
    server.abort();
}

/// A connection torn in the middle of a frame is a lost connection, not a
/// protocol violation: the client resumes and verifies.
#[tokio::test]
async fn a_frame_torn_by_a_dropped_connection_is_resumed() {
    let count = 6;
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut first = accept(&listener).await.expect("first connection");
        hello(&mut first).await;
        send(&mut first, welcome(count, 0)).await;
        send(&mut first, number(count, 0)).await;
        send_raw(&mut first, &wire(&number(count, 1))[..5]).await;
        drop(first);
        let mut second = accept(&listener).await.expect("second connection");
        let Some(Frame::Resume(resume)) = hello(&mut second).await else {
            panic!("expected RESUME");
        };
        assert_eq!(resume.next_index, 1);
        send(&mut second, welcome(count, 1)).await;
        for index in 1..count {
            send(&mut second, number(count, index)).await;
        }
        let _ = tokio::time::timeout(RUN_LIMIT, second.next()).await;
    });
    let report = run_client(config(port, count)).await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 1);
    assert_eq!(report.sum, reference(count).sum());
    server.abort();
}

/// A server that keeps the connection alive with HEARTBEATs but never sends
/// the next number. The WELCOME promised one every 10 ms and a 2 s TTL;
/// the client must give up, not wait forever.
#[tokio::test]

async fn heartbeats_without_progress_do_not_hold_the_client_forever() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        while let Some(mut conn) = accept(&listener).await {
            let next_index = match hello(&mut conn).await {
                Some(Frame::Resume(resume)) => resume.next_index,
                _ => 0,
            };
            send(&mut conn, welcome_with(100, next_index, 10_000, 2_000)).await;
            if next_index == 0 {
                send(&mut conn, number(100, 0)).await;
            }
            tokio::spawn(async move {
                for _ in 0..300 {
                    send(&mut conn, Frame::Heartbeat).await;
                    tokio::time::sleep(Duration::from_millis(100)).await; // heartbeat pace of this stalling server (its behaviour)
                }
            });
        }
    });
    let started = Instant::now();
    let report = run_client(config(port, 100)).await;
    assert!(!report.ok, "{}", report.render_human());
    assert_ne!(report.exit_code(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up only after {:?}, with a 2 s session TTL",
        started.elapsed()
    );
    server.abort();
}

/// A server that welcomes every resume and drops the connection before any
/// number: no progress is ever made, so the client must give up within
/// about the session TTL (1 s here) instead of looping forever.
#[tokio::test]

async fn welcomes_without_progress_do_not_loop_forever() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        // As long as the client keeps coming back (the test bounds it).
        while let Some(mut conn) = accept(&listener).await {
            let next_index = match hello(&mut conn).await {
                Some(Frame::Resume(resume)) => resume.next_index,
                _ => 0,
            };
            send(&mut conn, welcome_with(100, next_index, 1_000, 1_000)).await;
            if next_index == 0 {
                send(&mut conn, number(100, 0)).await;
            }
            drop(conn);
        }
    });
    let started = Instant::now();
    let report = run_client(config(port, 100)).await;
    assert_failed(&report, EXIT_CANNOT_CONNECT, "");
    assert_eq!(report.received, 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up only after {:?}, with a 1 s session TTL",
        started.elapsed()
    );
    server.abort();
}
