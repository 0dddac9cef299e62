//! Hostile and broken input against a running server, over real TCP. Each
//! test attacks a server while a well-behaved client on the same server
//! (the canary, `hostile_support::Canary`) streams its numbers: every attack
//! must end in the documented ERROR frame or a bounded close, never a panic,
//! and the canary must be served on time throughout.
//!
//! `server_protocol.rs` has the basic single-connection cases (zero length,
//! OPEN one byte short, nil client id, count 0, ...); this suite adds the
//! rest, the variants and the canary. Resource exhaustion (thousands of
//! silent connections, clients that stop reading) is in
//! `hostile_resources.rs`, which measures memory and so runs on its own.

mod hostile_support;

use std::time::Duration;

use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

use numstream_harness::raw::RawClient;
use numstream_protocol::{ClientId, Disposition, ErrorCode, Frame, ResumeToken};
use numstream_server::testing::TestServer;
use numstream_store::InMemoryStore;

use hostile_support::*;

/// Errors a server may answer to bytes that are not a valid handshake.
const HANDSHAKE_REJECTIONS: &[ErrorCode] = &[
    ErrorCode::Malformed,
    ErrorCode::UnsupportedVersion,
    ErrorCode::HandshakeTimeout,
    ErrorCode::CountOutOfRange,
    ErrorCode::SessionUnknown,
];

/// Longest a rejected connection may stay open: the handshake timeout (for
/// input that never completes a frame) plus slack for a loaded machine.
const REJECTION_BOUND: Duration = Duration::from_secs(4);

/// A server under attack, with its canary already streaming.
async fn attacked_server() -> (TestServer, Canary) {
    watch_server_panics();
    let server = TestServer::start(hostile_config()).await;
    let canary = Canary::start(server.addr).await;
    (server, canary)
}

/// The aftermath every test checks: the canary was never disturbed, no
/// server task panicked, and a new client is still served a whole session.
async fn assert_survived(server: &TestServer, canary: Canary) {
    canary.assert_healthy().await;
    assert_no_server_panics();
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 3)).await;
    welcome(&mut client).await;
    for index in 0..2 {
        assert!(matches!(client.frame().await, Frame::Number { index: i, .. } if i == index));
    }
    let Frame::Final { checksum, .. } = client.frame().await else {
        panic!("expected FINAL");
    };
    client
        .send(Frame::Ack {
            client_checksum: checksum,
        })
        .await;
    client.expect_closed().await;
}

/// Sends `bytes` as the first thing on a new connection and asserts the
/// server answers with an ERROR among `codes` and closes, within
/// [`REJECTION_BOUND`].
async fn assert_rejected(
    server: &TestServer,
    name: &str,
    bytes: &[u8],
    codes: &[ErrorCode],
) -> ErrorCode {
    let started = Instant::now();
    let mut client = RawClient::connect(server.addr).await;
    client.send_bytes(bytes).await;
    let code = match client.recv().await {
        Some(Ok(Frame::Error(error))) => {
            assert!(codes.contains(&error.code), "{name}: unexpected {error}");
            if error.code == ErrorCode::UnsupportedVersion {
                assert_eq!(error.supported_versions, vec![current_version()], "{name}");
            }
            error.code
        }
        other => panic!("{name}: expected an ERROR among {codes:?}, got {other:?}"),
    };
    client.expect_closed().await;
    assert!(
        started.elapsed() <= REJECTION_BOUND,
        "{name}: took {:?} to reject",
        started.elapsed()
    );
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_are_rejected_and_closed() {
    let (server, canary) = attacked_server().await;
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        (
            "an HTTP request".into(),
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        (
            "a TLS ClientHello".into(),
            vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
        ),
        ("an SSH banner".into(), b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("a kilobyte of zeros".into(), vec![0; 1024]),
        ("a kilobyte of 0xff".into(), vec![0xff; 1024]),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for n in 0..40 {
        let len = rng.random_range(1..600);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        cases.push((format!("random blob {n} ({len} bytes)"), bytes));
    }
    for (name, bytes) in &cases {
        assert_rejected(&server, name, bytes, HANDSHAKE_REJECTIONS).await;
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_while_streaming_is_a_violation_and_the_session_survives() {
    let (server, canary) = attacked_server().await;
    for garbage in [
        b"\r\n\r\nGET / HTTP/1.1\r\n".to_vec(),
        vec![0xff; 4],
        vec![0, 0, 0, 0],
        raw_frame(0x7f, &[1, 2, 3]),
    ] {
        let id = ClientId::new_v4();
        let mut client = RawClient::connect(server.addr).await;
        client.send(open(id, 1000)).await;
        let hello = welcome(&mut client).await;
        client.send_bytes(&garbage).await;
        expect_error_after_numbers(&mut client, &[ErrorCode::Malformed]).await;
        // The session was detached, not destroyed: its owner can resume.
        let mut again = RawClient::connect(server.addr).await;
        again.send(resume(id, hello.token, 0)).await;
        assert_eq!(welcome(&mut again).await.next_index, 0);
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_length_prefixes_are_rejected_before_any_buffering() {
    let (server, canary) = attacked_server().await;
    for prefix in [u32::MAX, 0x8000_0000, 0x0100_0000, 513] {
        // Only the prefix: the server must not wait for the payload.
        let started = Instant::now();
        let mut client = RawClient::connect(server.addr).await;
        client.send_bytes(&prefix.to_be_bytes()).await;
        let message = client.expect_error(ErrorCode::Malformed).await;
        assert!(message.contains("exceeds the maximum"), "{message}");
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT,
            "prefix {prefix:#x} must be judged at once, not after a timeout"
        );
    }
    // 512 is the largest legal payload: judged by its content, not its size.
    assert_rejected(
        &server,
        "max-size frame",
        &raw_frame(0x7e, &[0x33; 511]),
        &[ErrorCode::Malformed],
    )
    .await;
    // Mid-stream, too.
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 1000)).await;
    welcome(&mut client).await;
    client.send_bytes(&u32::MAX.to_be_bytes()).await;
    client.send_bytes(&[0xaa; 4096]).await;
    expect_error_after_numbers(&mut client, &[ErrorCode::Malformed]).await;
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_one_byte_short_or_over_are_malformed() {
    let (server, canary) = attacked_server().await;
    let id = ClientId::new_v4();
    let token = [7u8; 16];
    let good_open = open_body(current_version(), id, &5u16.to_be_bytes());
    let good_resume = resume_body(current_version(), id, &token, 0);
    let mut cases = Vec::new();
    for (name, frame_type, body) in [
        ("OPEN", OPEN_TYPE, good_open),
        ("RESUME", RESUME_TYPE, good_resume),
        ("ACK", ACK_TYPE, vec![0, 0, 0, 0]),
    ] {
        let short = raw_frame(frame_type, &body[..body.len() - 1]);
        let mut long_body = body.clone();
        long_body.push(0);
        let long = raw_frame(frame_type, &long_body);
        cases.push((format!("{name} one byte short"), short));
        cases.push((format!("{name} one byte over"), long));
    }
    for (name, bytes) in &cases {
        assert_rejected(&server, name, bytes, &[ErrorCode::Malformed]).await;
    }
    // An ACK one byte short or over, where an ACK belongs (after FINAL).
    for ack in [
        raw_frame(ACK_TYPE, &[0, 0, 0]),
        raw_frame(ACK_TYPE, &[0; 5]),
    ] {
        let id = ClientId::new_v4();
        let mut client = RawClient::connect(server.addr).await;
        client.send(open(id, 2)).await;
        let hello = welcome(&mut client).await;
        assert!(matches!(client.frame().await, Frame::Number { .. }));
        assert!(matches!(client.frame().await, Frame::Final { .. }));
        client.send_bytes(&ack).await;
        client.expect_error(ErrorCode::Malformed).await;
        // Not completed: the session waits for a proper resume.
        let info = server.session(id).await;
        assert!(info.is_some_and(|i| !i.attached), "{info:?}");
        let mut again = RawClient::connect(server.addr).await;
        again.send(resume(id, hello.token, 1)).await;
        assert_eq!(welcome(&mut again).await.next_index, 1);
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unknown_or_misplaced_type_byte_is_malformed() {
    let (server, canary) = attacked_server().await;
    // Every type byte with an empty body: the unknown ones, the server's
    // own frames, and the client's frames without their bodies.
    for frame_type in 0..=u8::MAX {
        let name = format!("type {frame_type:#04x}");
        assert_rejected(
            &server,
            &name,
            &raw_frame(frame_type, &[]),
            &[ErrorCode::Malformed],
        )
        .await;
    }
    // Unknown types with plausible bodies.
    for frame_type in [0x00, 0x04, 0x7f, 0x80, 0x86, 0xff] {
        let name = format!("type {frame_type:#04x} with an OPEN body");
        let body = open_body(current_version(), ClientId::new_v4(), &[0, 9]);
        assert_rejected(
            &server,
            &name,
            &raw_frame(frame_type, &body),
            &[ErrorCode::Malformed],
        )
        .await;
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_versions_are_told_what_the_server_speaks() {
    let (server, canary) = attacked_server().await;
    let id = ClientId::new_v4();
    for version in [0u16, 2, 3, 0x0100, 0x7fff, u16::MAX] {
        let open = raw_frame(OPEN_TYPE, &open_body(version, id, &5u16.to_be_bytes()));
        let resume = raw_frame(RESUME_TYPE, &resume_body(version, id, &[1; 16], 0));
        // The version is judged first, whatever follows it.
        let bare = raw_frame(OPEN_TYPE, &version.to_be_bytes());
        for (kind, bytes) in [("OPEN", open), ("RESUME", resume), ("bare OPEN", bare)] {
            let name = format!("{kind} version {version}");
            assert_rejected(&server, &name, &bytes, &[ErrorCode::UnsupportedVersion]).await;
        }
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nil_and_max_client_ids_are_malformed() {
    let (server, canary) = attacked_server().await;
    for id in [ClientId::nil(), ClientId::max()] {
        let open = encoded(&open(id, 5));
        let resume = encoded(&resume(id, ResumeToken([1; 16]), 0));
        for (kind, bytes) in [("OPEN", open), ("RESUME", resume)] {
            let name = format!("{kind} with client id {id}");
            assert_rejected(&server, &name, &bytes, &[ErrorCode::Malformed]).await;
        }
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_outside_1_to_65535_are_rejected() {
    let (server, canary) = attacked_server().await;
    let id = ClientId::new_v4();
    // 0 is expressible and out of range.
    assert_rejected(
        &server,
        "count 0",
        &encoded(&open(id, 0)),
        &[ErrorCode::CountOutOfRange],
    )
    .await;
    // 65536 is not expressible: the count field is a u16. A client that
    // truncates it to 16 bits sends 0 (out of range); one that widens the
    // field sends a frame one byte over (malformed). Both are refused.
    let truncated = raw_frame(OPEN_TYPE, &open_body(current_version(), id, &[0x00, 0x00]));
    assert_rejected(
        &server,
        "count 65536 truncated to u16",
        &truncated,
        &[ErrorCode::CountOutOfRange],
    )
    .await;
    let widened = raw_frame(
        OPEN_TYPE,
        &open_body(current_version(), id, &65536u32.to_be_bytes()[1..]),
    );
    assert_rejected(
        &server,
        "count 65536 in 3 bytes",
        &widened,
        &[ErrorCode::Malformed],
    )
    .await;
    // The largest legal count is accepted.
    let mut max = RawClient::connect(server.addr).await;
    max.send(open(ClientId::new_v4(), u16::MAX)).await;
    assert_eq!(welcome(&mut max).await.count, u16::MAX);
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_truncated_tokens_never_touch_the_session() {
    let (server, canary) = attacked_server().await;
    let id = ClientId::new_v4();
    let mut owner = RawClient::connect(server.addr).await;
    owner.send(open(id, 1000)).await;
    let hello = welcome(&mut owner).await;
    drop(owner);

    let other = ClientId::new_v4();
    let mut other_owner = RawClient::connect(server.addr).await;
    other_owner.send(open(other, 1000)).await;
    let other_token = welcome(&mut other_owner).await.token;

    let mut forged = Vec::new();
    for byte in [0, 7, 15] {
        let mut token = hello.token;
        token.0[byte] ^= 0x01;
        forged.push((format!("token with byte {byte} flipped"), token));
    }
    forged.push(("all-zero token".into(), ResumeToken([0; 16])));
    forged.push(("all-ones token".into(), ResumeToken([0xff; 16])));
    forged.push(("another session's token".into(), other_token));
    for (name, token) in &forged {
        let bytes = encoded(&resume(id, *token, 0));
        assert_rejected(&server, name, &bytes, &[ErrorCode::BadResumeToken]).await;
    }
    for len in [0, 1, 15, 17] {
        let token: Vec<u8> = hello.token.0.iter().copied().cycle().take(len).collect();
        let bytes = raw_frame(RESUME_TYPE, &resume_body(current_version(), id, &token, 0));
        let name = format!("token of {len} bytes");
        assert_rejected(&server, &name, &bytes, &[ErrorCode::Malformed]).await;
    }
    // None of that changed the session: same generation, still detached,
    // and its owner resumes with the real token.
    let info = server.session(id).await.expect("live");
    assert_eq!(info.generation, 1);
    assert!(!info.attached);
    let mut back = RawClient::connect(server.addr).await;
    back.send(resume(id, hello.token, 0)).await;
    assert_eq!(welcome(&mut back).await.next_index, 0);
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_index_past_the_end_is_rejected() {
    let (server, canary) = attacked_server().await;
    let id = ClientId::new_v4();
    let mut owner = RawClient::connect(server.addr).await;
    owner.send(open(id, 10)).await;
    let hello = welcome(&mut owner).await;
    drop(owner);
    for next_index in [10, 11, 0x8000, u16::MAX] {
        let name = format!("resume at {next_index} of 10");
        let bytes = encoded(&resume(id, hello.token, next_index));
        assert_rejected(&server, &name, &bytes, &[ErrorCode::ResumeIndexOutOfRange]).await;
    }
    let mut good = RawClient::connect(server.addr).await;
    good.send(resume(id, hello.token, 9)).await;
    assert_eq!(welcome(&mut good).await.next_index, 9);
    assert!(matches!(good.frame().await, Frame::Final { index: 9, .. }));
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_time_out_and_never_complete() {
    let (server, canary) = attacked_server().await;
    // 40 connections, each sending a valid OPEN one byte per second: the
    // whole handshake must arrive within the handshake timeout, not each
    // byte, so all of them are cut off after the first byte or two.
    let bytes = encoded(&open(ClientId::new_v4(), 5));
    let attackers: Vec<_> = (0..40)
        .map(|_| {
            let bytes = bytes.clone();
            let addr = server.addr;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut client = RawClient::connect(addr).await;
                let mut sent = 0;
                let error = loop {
                    if sent < bytes.len() {
                        client.send_bytes(&bytes[sent..=sent]).await;
                        sent += 1;
                    }
                    tokio::select! {
                        frame = client.recv() => break frame,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {} // one byte per second unless the server answers first (the attack's pace)
                    }
                };
                (error, sent, started.elapsed())
            })
        })
        .collect();
    for attacker in attackers {
        let (error, sent, elapsed) = attacker.await.expect("attacker");
        match error {
            Some(Ok(Frame::Error(error))) => {
                assert_eq!(error.code, ErrorCode::HandshakeTimeout, "{error}");
                assert_eq!(error.disposition, Disposition::Retry);
            }
            other => panic!("expected handshake_timeout, got {other:?}"),
        }
        assert!(sent < bytes.len(), "the slow OPEN must never complete");
        assert!(elapsed <= REJECTION_BOUND, "cut off after {elapsed:?}");
    }
    assert_survived(&server, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_max_sessions_get_server_busy() {
    watch_server_panics();
    // Room for 4 sessions: the canary, two long ones and one short one.
    let store = std::sync::Arc::new(InMemoryStore::new(4));
    let server = TestServer::start_with_store(hostile_config(), store).await;
    let canary = Canary::start(server.addr).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = RawClient::connect(server.addr).await;
        client.send(open(ClientId::new_v4(), 1000)).await;
        welcome(&mut client).await;
        held.push(client);
    }
    let short_id = ClientId::new_v4();
    let mut short = RawClient::connect(server.addr).await;
    short.send(open(short_id, 3)).await;
    welcome(&mut short).await;

    for n in 0..20 {
        let bytes = encoded(&open(ClientId::new_v4(), 10));
        let name = format!("OPEN {n} past the limit");
        let mut client = RawClient::connect(server.addr).await;
        client.send_bytes(&bytes).await;
        match client.frame().await {
            Frame::Error(error) => {
                assert_eq!(error.code, ErrorCode::ServerBusy, "{name}: {error}");
                assert_eq!(error.disposition, Disposition::Retry, "{name}");
            }
            other => panic!("{name}: expected server_busy, got {other:?}"),
        }
        client.expect_closed().await;
    }
    // A disconnected session still holds its place until it expires...
    drop(held.pop());
    let mut refused = RawClient::connect(server.addr).await;
    refused.send(open(ClientId::new_v4(), 10)).await;
    refused.expect_error(ErrorCode::ServerBusy).await;
    // ...but a completed one frees it at once.
    for _ in 0..2 {
        assert!(matches!(short.frame().await, Frame::Number { .. }));
    }
    let Frame::Final { checksum, .. } = short.frame().await else {
        panic!("expected FINAL");
    };
    short
        .send(Frame::Ack {
            client_checksum: checksum,
        })
        .await;
    short.expect_closed().await;
    let mut admitted = RawClient::connect(server.addr).await;
    admitted.send(open(ClientId::new_v4(), 10)).await;
    welcome(&mut admitted).await;
    canary.assert_healthy().await;
    assert_no_server_panics();
}
