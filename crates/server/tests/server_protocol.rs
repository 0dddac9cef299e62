//! The server's side of the protocol, driven frame by frame over real TCP:
//! handshakes good and bad, resume rules, takeover, completion, limits and
//! shutdown. Each test asserts the exact error code the spec prescribes.

use std::time::Duration;

use bytes::BytesMut;
use numstream_harness::raw::RawClient;
use numstream_harness::wait;
use numstream_protocol::prng::NumberGenerator;
use numstream_protocol::{
    ClientId, Disposition, ErrorCode, Frame, Open, PROTOCOL_VERSION, Resume, ResumeToken,
    SequenceChecksum, SessionSeed, Welcome, encode_frame,
};
use numstream_server::ServerConfig;
use numstream_server::testing::{TestServer, fast_config};

/// Bound on any wait for the server, so a bug fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(15);

fn open(client_id: ClientId, count: u16) -> Frame {
    Frame::Open(Open { client_id, count })
}

fn resume(client_id: ClientId, token: ResumeToken, next_index: u16) -> Frame {
    Frame::Resume(Resume {
        client_id,
        token,
        next_index,
    })
}

async fn welcome(client: &mut RawClient) -> Welcome {
    match client.frame().await {
        Frame::Welcome(welcome) => welcome,
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// Reads numbers `from..to` and checks them against the seeded sequence.
async fn read_numbers(client: &mut RawClient, client_id: ClientId, from: u16, to: u16) {
    let seed = SessionSeed::derive(42, client_id);
    let mut expected = NumberGenerator::starting_at(&seed, from);
    for index in from..to {
        match client.frame().await {
            Frame::Number { index: got, value } => {
                assert_eq!(got, index);
                assert_eq!(value, expected.next_number(), "number {index}");
            }
            other => panic!("expected NUMBER {index}, got {other:?}"),
        }
    }
}

async fn read_final(client: &mut RawClient, client_id: ClientId, count: u16) -> u32 {
    let seed = SessionSeed::derive(42, client_id);
    match client.frame().await {
        Frame::Final {
            index,
            value,
            checksum,
        } => {
            assert_eq!(index, count - 1);
            assert_eq!(value, numstream_protocol::number_at(&seed, index));
            let expected = SequenceChecksum::of_session(&seed, count).checksum();
            assert_eq!(checksum, expected, "FINAL must carry the seed's checksum");
            checksum
        }
        other => panic!("expected FINAL, got {other:?}"),
    }
}

#[tokio::test]
async fn full_session_then_ack_forgets_it() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 10)).await;
    let hello = welcome(&mut client).await;
    assert_eq!((hello.count, hello.next_index), (10, 0));
    assert_eq!(hello.interval_us, 2_000);
    assert_eq!(hello.session_ttl_ms, 5_000);
    read_numbers(&mut client, id, 0, 9).await;
    let checksum = read_final(&mut client, id, 10).await;
    client
        .send(Frame::Ack {
            client_checksum: checksum,
        })
        .await;
    client.expect_closed().await;
    assert_eq!(
        server.session(id).await,
        None,
        "a completed session is forgotten at once"
    );

    // Resuming a completed session is rejected, never restarted.
    let mut again = RawClient::connect(server.addr).await;
    again.send(resume(id, hello.token, 3)).await;
    again.expect_error(ErrorCode::SessionUnknown).await;
}

#[tokio::test]
async fn resume_continues_at_the_requested_index_with_identical_numbers() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut first = RawClient::connect(server.addr).await;
    first.send(open(id, 30)).await;
    let hello = welcome(&mut first).await;
    read_numbers(&mut first, id, 0, 7).await;
    drop(first);

    let mut second = RawClient::connect(server.addr).await;
    second.send(resume(id, hello.token, 7)).await;
    let rehello = welcome(&mut second).await;
    assert_eq!(rehello.next_index, 7);
    assert_eq!(rehello.token, hello.token, "the token survives resumes");
    read_numbers(&mut second, id, 7, 29).await;
    read_final(&mut second, id, 30).await;
}

#[tokio::test]
async fn final_lost_before_ack_is_redelivered_on_resume() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut first = RawClient::connect(server.addr).await;
    first.send(open(id, 4)).await;
    let hello = welcome(&mut first).await;
    read_numbers(&mut first, id, 0, 3).await;
    // Pretend FINAL was lost: close without ACK.
    drop(first);

    let mut second = RawClient::connect(server.addr).await;
    second.send(resume(id, hello.token, 3)).await;
    assert_eq!(welcome(&mut second).await.next_index, 3);
    let checksum = read_final(&mut second, id, 4).await;
    second
        .send(Frame::Ack {
            client_checksum: checksum,
        })
        .await;
    second.expect_closed().await;
    assert_eq!(server.session(id).await, None);
}

#[tokio::test]
async fn missing_ack_keeps_the_session_for_a_resume() {
    let config = ServerConfig {
        ack_timeout: Duration::from_millis(200),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 2)).await;
    welcome(&mut client).await;
    read_numbers(&mut client, id, 0, 1).await;
    read_final(&mut client, id, 2).await;
    // No ACK: the server closes after its bounded wait, keeping the session.
    client.expect_closed().await;
    let info = server.session(id).await;
    let info = info.expect("an unacknowledged session must survive");
    assert!(!info.attached);
}

#[tokio::test]
async fn wrong_token_is_rejected_and_the_session_is_untouched() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut owner = RawClient::connect(server.addr).await;
    owner.send(open(id, 50)).await;
    let hello = welcome(&mut owner).await;
    read_numbers(&mut owner, id, 0, 2).await;

    let mut forged = hello.token;
    forged.0[0] ^= 0xff;
    let mut thief = RawClient::connect(server.addr).await;
    thief.send(resume(id, forged, 0)).await;
    thief.expect_error(ErrorCode::BadResumeToken).await;

    // The owner's stream goes on undisturbed.
    read_numbers(&mut owner, id, 2, 6).await;
}

#[tokio::test]
async fn resume_index_past_the_end_is_rejected_and_session_stays_resumable() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut first = RawClient::connect(server.addr).await;
    first.send(open(id, 5)).await;
    let hello = welcome(&mut first).await;
    drop(first);

    let mut bad = RawClient::connect(server.addr).await;
    bad.send(resume(id, hello.token, 5)).await;
    bad.expect_error(ErrorCode::ResumeIndexOutOfRange).await;

    let mut good = RawClient::connect(server.addr).await;
    good.send(resume(id, hello.token, 4)).await;
    assert_eq!(welcome(&mut good).await.next_index, 4);
    read_final(&mut good, id, 5).await;
}

#[tokio::test]
async fn resume_after_the_ttl_is_rejected_as_expired() {
    let config = ServerConfig {
        session_ttl: Duration::from_millis(300),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    let mut first = RawClient::connect(server.addr).await;
    first.send(open(id, 1000)).await;
    let hello = welcome(&mut first).await;
    read_numbers(&mut first, id, 0, 3).await;
    drop(first);
    // Until the server has noticed the drop and detached, and the TTL has
    // passed since: the session is no longer live in the store.
    let store = server.store.clone();
    wait::until(PATIENCE, "the detached session to expire", || {
        let store = store.clone();
        async move { store.lookup(id).await.expect("lookup").is_none() }
    })
    .await;

    let mut late = RawClient::connect(server.addr).await;
    late.send(resume(id, hello.token, 3)).await;
    let message = late.expect_error(ErrorCode::SessionExpired).await;
    assert!(message.contains("expired"), "{message}");

    // Rejected for good, never restarted.
    let mut later = RawClient::connect(server.addr).await;
    later.send(resume(id, hello.token, 3)).await;
    later.expect_error(ErrorCode::SessionUnknown).await;
}

#[tokio::test]
async fn newest_connection_takes_over_and_the_old_one_is_told() {
    let config = ServerConfig {
        interval: Duration::from_millis(20),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    let mut old = RawClient::connect(server.addr).await;
    old.send(open(id, 1000)).await;
    let hello = welcome(&mut old).await;
    read_numbers(&mut old, id, 0, 3).await;

    let mut new = RawClient::connect(server.addr).await;
    new.send(resume(id, hello.token, 3)).await;
    assert_eq!(welcome(&mut new).await.next_index, 3);

    // The old connection gets at most numbers already in flight, then
    // TAKEN_OVER, then the close; never a number after the new WELCOME
    // was written.
    loop {
        match old.frame().await {
            Frame::Number { .. } => continue,
            Frame::Error(error) => {
                assert_eq!(error.code, ErrorCode::TakenOver);
                assert_eq!(error.disposition, Disposition::Final);
                break;
            }
            other => panic!("unexpected frame on the superseded connection: {other:?}"),
        }
    }
    old.expect_closed().await;
    read_numbers(&mut new, id, 3, 8).await;
    let info = server.session(id).await.expect("live");
    assert_eq!(info.generation, 2);
}

#[tokio::test]
async fn duplicate_open_for_a_live_session_is_rejected() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut first = RawClient::connect(server.addr).await;
    first.send(open(id, 100)).await;
    welcome(&mut first).await;
    let mut second = RawClient::connect(server.addr).await;
    second.send(open(id, 100)).await;
    second.expect_error(ErrorCode::SessionExists).await;
}

#[tokio::test]
async fn bad_handshakes_get_their_errors_and_the_server_keeps_serving() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "4 GiB length prefix",
            vec![0xff, 0xff, 0xff, 0xff],
            ErrorCode::Malformed,
        ),
        ("zero length", vec![0, 0, 0, 0], ErrorCode::Malformed),
        ("unknown type", vec![0, 0, 0, 1, 0x7e], ErrorCode::Malformed),
        (
            "OPEN one byte short",
            {
                let mut bytes = vec![0, 0, 0, 20, 0x01, 0, 1];
                bytes.extend_from_slice(&[7; 17]);
                bytes
            },
            ErrorCode::Malformed,
        ),
        (
            "unsupported version",
            vec![0, 0, 0, 3, 0x01, 0, 9],
            ErrorCode::UnsupportedVersion,
        ),
        (
            "ACK as first frame",
            vec![0, 0, 0, 5, 0x03, 0, 0, 0, 0],
            ErrorCode::Malformed,
        ),
        (
            "server frame from a client",
            vec![0, 0, 0, 1, 0x84],
            ErrorCode::Malformed,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut client = RawClient::connect(server.addr).await;
        client.send_bytes(&bytes).await;
        match client.frame().await {
            Frame::Error(error) => {
                assert_eq!(error.code, code, "{name}: {error}");
                if code == ErrorCode::UnsupportedVersion {
                    assert_eq!(error.supported_versions, vec![PROTOCOL_VERSION]);
                }
            }
            other => panic!("{name}: expected ERROR, got {other:?}"),
        }
        client.expect_closed().await;
    }

    let mut zero = RawClient::connect(server.addr).await;
    zero.send(open(id, 0)).await;
    let message = zero.expect_error(ErrorCode::CountOutOfRange).await;
    assert!(message.contains("between 1 and 65535"), "{message}");

    let mut nil = RawClient::connect(server.addr).await;
    nil.send(open(ClientId::nil(), 5)).await;
    nil.expect_error(ErrorCode::Malformed).await;

    let mut unknown = RawClient::connect(server.addr).await;
    unknown
        .send(resume(ClientId::new_v4(), ResumeToken([1; 16]), 0))
        .await;
    unknown.expect_error(ErrorCode::SessionUnknown).await;

    let mut silent = RawClient::connect(server.addr).await;
    silent.expect_error(ErrorCode::HandshakeTimeout).await;

    let mut slow = RawClient::connect(server.addr).await;
    slow.send_bytes(&[0, 0]).await; // half a length prefix, then nothing
    slow.expect_error(ErrorCode::HandshakeTimeout).await;

    // After all that, a well-behaved client is served normally.
    let mut good = RawClient::connect(server.addr).await;
    good.send(open(id, 3)).await;
    welcome(&mut good).await;
    read_numbers(&mut good, id, 0, 2).await;
    read_final(&mut good, id, 3).await;
}

#[tokio::test]
async fn frames_from_the_client_while_streaming_are_violations() {
    let config = ServerConfig {
        interval: Duration::from_millis(50),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 100)).await;
    let hello = welcome(&mut client).await;
    client.send(Frame::Ack { client_checksum: 0 }).await;
    loop {
        match client.frame().await {
            Frame::Number { .. } => continue,
            Frame::Error(error) => {
                assert_eq!(error.code, ErrorCode::Malformed);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    client.expect_closed().await;
    // The session was detached, not destroyed: it can be resumed.
    let mut again = RawClient::connect(server.addr).await;
    again.send(resume(id, hello.token, 0)).await;
    assert_eq!(welcome(&mut again).await.next_index, 0);
}

/// PROTOCOL.md 5.1: every byte before FINAL is a violation, answered at
/// once, so half an ACK sent early can never be completed after FINAL.
#[tokio::test]
async fn part_of_a_frame_while_streaming_is_answered_at_once() {
    // Number 1 is due 2 s after WELCOME, FINAL 4 s after: the answer to
    // the stray bytes must come first, not after the rest of an ACK.
    let config = ServerConfig {
        interval: Duration::from_secs(2),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 3)).await;
    let hello = welcome(&mut client).await;
    read_numbers(&mut client, id, 0, 1).await;
    client.send_bytes(&[0, 0, 0, 5, 3]).await;
    let message = client.expect_error(ErrorCode::Malformed).await;
    assert!(
        message.contains("5 stray bytes while streaming"),
        "{message}"
    );
    client.expect_closed().await;
    let info = server.session(id).await;
    assert!(
        info.is_some_and(|info| !info.attached),
        "the session is detached, not completed"
    );
    let mut again = RawClient::connect(server.addr).await;
    again.send(resume(id, hello.token, 1)).await;
    assert_eq!(welcome(&mut again).await.next_index, 1);
}

/// PROTOCOL.md 5.1: a frame pipelined behind the hello is judged once the
/// session is attached: WELCOME and the first number, then `malformed`.
#[tokio::test]
async fn a_frame_pipelined_behind_the_hello_is_malformed_after_the_first_number() {
    let server = TestServer::start(fast_config()).await;
    let id = ClientId::new_v4();
    let mut both = BytesMut::new();
    encode_frame(&open(id, 50), &mut both);
    encode_frame(&Frame::Ack { client_checksum: 7 }, &mut both);
    let mut client = RawClient::connect(server.addr).await;
    client.send_bytes(&both).await;
    let hello = welcome(&mut client).await;
    read_numbers(&mut client, id, 0, 1).await;
    let message = client.expect_error(ErrorCode::Malformed).await;
    assert_eq!(
        message,
        "unexpected ACK while streaming (only ACK after FINAL is allowed)"
    );
    client.expect_closed().await;
    let mut again = RawClient::connect(server.addr).await;
    again.send(resume(id, hello.token, 1)).await;
    assert_eq!(welcome(&mut again).await.next_index, 1);
}

#[tokio::test]
async fn connections_past_the_limit_get_server_busy() {
    let config = ServerConfig {
        max_connections: 2,
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = RawClient::connect(server.addr).await;
        client.send(open(ClientId::new_v4(), 1000)).await;
        welcome(&mut client).await;
        held.push(client);
    }
    let mut third = RawClient::connect(server.addr).await;
    match third.frame().await {
        Frame::Error(error) => {
            assert_eq!(error.code, ErrorCode::ServerBusy);
            assert_eq!(error.disposition, Disposition::Retry);
        }
        other => panic!("expected server_busy, got {other:?}"),
    }
    drop(held);
}

#[tokio::test]
async fn heartbeats_fill_long_gaps() {
    let config = ServerConfig {
        interval: Duration::from_secs(12),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 3)).await;
    welcome(&mut client).await;
    read_numbers(&mut client, id, 0, 1).await;
    // Next number is due in 12 s; the server must not stay silent > 5 s.
    let started = tokio::time::Instant::now();
    assert_eq!(client.frame().await, Frame::Heartbeat);
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn shutdown_tells_streaming_clients_their_in_memory_session_ends() {
    let config = ServerConfig {
        interval: Duration::from_millis(20),
        ..fast_config()
    };
    let server = TestServer::start(config).await;
    let id = ClientId::new_v4();
    // Connected, but no hello yet: it has nothing to lose, so it is told
    // to retry (once the server is back, or elsewhere). It connects first:
    // the accept loop takes connections in the order they queued, so once
    // the next client is welcomed, this one was accepted too (one still in
    // the listen queue at shutdown would be reset instead).
    let mut newcomer = RawClient::connect(server.addr).await;
    let mut client = RawClient::connect(server.addr).await;
    client.send(open(id, 1000)).await;
    welcome(&mut client).await;
    read_numbers(&mut client, id, 0, 2).await;
    let shutdown = tokio::spawn(server.shutdown());
    match newcomer.frame().await {
        Frame::Error(error) => {
            assert_eq!(error.code, ErrorCode::ShuttingDown);
            assert_eq!(error.disposition, Disposition::Retry, "{error:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    loop {
        match client.frame().await {
            Frame::Number { .. } => continue,
            Frame::Error(error) => {
                assert_eq!(error.code, ErrorCode::ShuttingDown);
                assert_eq!(
                    error.disposition,
                    Disposition::Final,
                    "in-memory sessions cannot survive the server"
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    shutdown.await.expect("server shut down cleanly");
}
