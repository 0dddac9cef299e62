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

mod support;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::time::Instant;

use numstream_client::{
    ClientConfig, EXIT_CANNOT_CONNECT, EXIT_CHECKSUM_MISMATCH, EXIT_PROTOCOL_VIOLATION, Report,
};
use numstream_protocol::frame::tag;
use numstream_protocol::testing::encoded as wire;
use numstream_protocol::{Frame, Open, Resume, number_at};
use support::{
    Expect, FakeServer, SEED, Script, TOKEN, assert_failed, assert_violation,
    expected as reference, number, session, streamed_then_cut, welcome, welcome_with,
};

/// The shared test config with the bounds the timing assertions below
/// rely on: a 1 s handshake timeout and a 10 s open deadline.
fn config(port: u16, count: u16) -> ClientConfig {
    ClientConfig {
        handshake_timeout: Duration::from_secs(1),
        open_timeout: Duration::from_secs(10),
        ..support::config(vec![port], count)
    }
}

/// Runs the client to its end; a run past [`support::PATIENCE`] is a hang.
async fn run_client(config: ClientConfig) -> Report {
    support::run_client(config).await.0
}

/// WELCOME, then the correct numbers `0..upto`, then `tail`: a protocol
/// violation after `upto` numbers.
async fn violation(count: u16, upto: u16, tail: Vec<Vec<u8>>, expect_in_error: &str) {
    let mut raw = vec![wire(&welcome(count, 0))];
    raw.extend((0..upto).map(|i| wire(&number(count, i))));
    raw.extend(tail);
    assert_violation(count, raw, upto, expect_in_error).await;
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
    assert_violation(
        10,
        vec![wire(&welcome(10, 3))],
        0,
        "WELCOME starts at index 3",
    )
    .await;
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
        assert_violation(5, vec![wire(frame)], 0, "which a server never sends").await;
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
        let mut script = Script::new().expect(Expect::Open).send(welcome(count, 0));
        for index in 0..count {
            let mut frame = number(count, index);
            if index == tampered {
                match &mut frame {
                    Frame::Number { value, .. } | Frame::Final { value, .. } => *value ^= 0x10,
                    _ => unreachable!(),
                }
            }
            script = script.send(frame);
        }
        let server = FakeServer::start(vec![script]).await;
        let report = run_client(config(server.port(), count)).await;
        server.finish().await;
        assert_failed(&report, EXIT_CHECKSUM_MISMATCH, "checksum mismatch");
        assert_eq!(report.server_checksum, Some(reference(count).checksum()));
        assert_ne!(report.client_checksum, reference(count).checksum());
    }
}

#[tokio::test]
async fn numbers_replayed_after_a_resume() {
    let server = FakeServer::start(vec![
        streamed_then_cut(10, 4),
        // The right WELCOME, then the numbers from 2 again.
        Script::new()
            .expect(Expect::Resume { next_index: 4 })
            .send(welcome(10, 4))
            .send(number(10, 2))
            .expect_closed(),
    ])
    .await;
    let report = run_client(config(server.port(), 10)).await;
    server.finish().await;
    assert_failed(&report, EXIT_PROTOCOL_VIOLATION, "expected number 4");
    assert_eq!(report.received, 4);
}

#[tokio::test]
async fn a_welcome_trickled_byte_by_byte_is_cut_off_by_the_handshake_timeout() {
    // A slowloris server: one byte of WELCOME every 300 ms, on every
    // connection (a whole WELCOME would take 10 s). The client's handshake
    // timeout (1 s here, doubled after each timeout up to 4 s) bounds each
    // attempt, and its open deadline (10 s) ends the run.
    let slowloris = Script::new()
        .hello()
        .send_trickled(&wire(&welcome(5, 0)), Duration::from_millis(300));
    let server = FakeServer::start_concurrent(Vec::new(), slowloris).await;
    let started = Instant::now();
    let report = run_client(config(server.port(), 5)).await;
    assert_failed(&report, EXIT_CANNOT_CONNECT, "no WELCOME");
    // The deadline plus scheduling slack: no handshake wait overshoots it.
    assert!(
        started.elapsed() < Duration::from_millis(10_500),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

/// The right frames, written one byte per write with pauses: reassembly
/// must not be mistaken for a violation.
#[tokio::test]
async fn frames_trickled_one_byte_at_a_time_still_verify() {
    let count = 20;
    let mut bytes = wire(&welcome(count, 0));
    for index in 0..count {
        bytes.extend(wire(&number(count, index)));
    }
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send_trickled(&bytes, Duration::from_millis(1))
            .expect(Expect::Ack),
    ])
    .await;
    let report = run_client(config(server.port(), count)).await;
    server.finish().await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.sum, reference(count).sum());
}

/// A connection torn in the middle of a frame is a lost connection, not a
/// protocol violation: the client resumes and verifies.
#[tokio::test]
async fn a_frame_torn_by_a_dropped_connection_is_resumed() {
    let count = 6;
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(count, 0))
            .send(number(count, 0))
            .send_raw(&wire(&number(count, 1))[..5])
            .cut(),
        Script::new()
            .expect(Expect::Resume { next_index: 1 })
            .send(welcome(count, 1))
            .finish(&session(count), 1),
    ])
    .await;
    let report = run_client(config(server.port(), count)).await;
    server.finish().await;
    assert!(report.ok, "{}", report.render_human());
    assert_eq!(report.reconnects, 1);
    assert_eq!(report.sum, reference(count).sum());
}

/// A server that keeps the connection alive with HEARTBEATs but never sends
/// the next number. The WELCOME promised one every 10 ms and a 2 s TTL;
/// the client must give up, not wait forever.
#[tokio::test]

async fn heartbeats_without_progress_do_not_hold_the_client_forever() {
    let heartbeat = Script::new()
        .send(Frame::Heartbeat)
        .pause(Duration::from_millis(100));
    // Number 0 on the first connection; a resume (at 1) gets its WELCOME
    // and heartbeats only.
    let first = Script::new()
        .hello()
        .send(welcome_with(100, 0, 10_000, 2_000))
        .send(number(100, 0))
        .repeat(300, &heartbeat);
    let resumed = Script::new()
        .hello()
        .send(welcome_with(100, 1, 10_000, 2_000))
        .repeat(300, &heartbeat);
    let server = FakeServer::start_concurrent(vec![first], resumed).await;
    let started = Instant::now();
    let report = run_client(config(server.port(), 100)).await;
    assert!(!report.ok, "{}", report.render_human());
    assert_ne!(report.exit_code(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up only after {:?}, with a 2 s session TTL",
        started.elapsed()
    );
    server.stop().await;
}

/// A server that welcomes every resume and drops the connection before any
/// number: no progress is ever made, so the client must give up within
/// about the session TTL (1 s here) instead of looping forever.
#[tokio::test]

async fn welcomes_without_progress_do_not_loop_forever() {
    // Number 0 on the first connection; every resume (at 1), as long as
    // the client keeps coming back, gets its WELCOME and nothing more.
    let first = Script::new()
        .hello()
        .send(welcome_with(100, 0, 1_000, 1_000))
        .send(number(100, 0))
        .cut();
    let resumed = Script::new()
        .hello()
        .send(welcome_with(100, 1, 1_000, 1_000))
        .cut();
    let server = FakeServer::start_concurrent(vec![first], resumed).await;
    let started = Instant::now();
    let report = run_client(config(server.port(), 100)).await;
    assert_failed(&report, EXIT_CANNOT_CONNECT, "");
    assert_eq!(report.received, 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up only after {:?}, with a 1 s session TTL",
        started.elapsed()
    );
    server.stop().await;
}
