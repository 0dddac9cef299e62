//! Every test vector in PROTOCOL.md, pinned: the number generator (7.4),
//! the checksum (8.1, 8.3), the version-first rule (3.1) and the
//! transcripts with the reference server's answers (9), the latter produced
//! by driving the sans-IO server session exactly as the reference server
//! does. A silent change in a dependency (`chacha20`'s word positions,
//! `crc32c`) or in the encoder fails here, not in the field.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};

use numstream_protocol::server::{
    Event, Grant, ServerSession, SessionConfig, StoreFailure, new_grant, store_error, taken_over,
};
use numstream_protocol::{
    ClientId, DecodeError, ErrorCode, ErrorFrame, Frame, Open, Resume, ResumeToken,
    SequenceChecksum, SessionSeed, decode_frame, encode_frame, number_at,
};

/// Hex as PROTOCOL.md writes it: pairs separated by white space.
fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).expect("hex pair"))
        .collect()
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(frame, &mut out);
    out.to_vec()
}

fn client() -> ClientId {
    ClientId::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001)
}

/// The illustrative token of the transcripts, `a0 a1 … af`.
fn token() -> ResumeToken {
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = 0xa0 + i as u8;
    }
    ResumeToken(bytes)
}

fn counting_seed() -> SessionSeed {
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = i as u8;
    }
    SessionSeed(seed)
}

#[test]
fn section_7_4_all_zero_seed() {
    let zero = SessionSeed([0; 32]);
    for (i, value) in [
        (0, 0xade0b876),
        (1, 0x903df1a0),
        (15, 0x8665eeb2),
        (16, 0xbee7079f),
    ] {
        assert_eq!(number_at(&zero, i), value, "index {i}");
    }
}

#[test]
fn section_7_4_counting_seed() {
    let seed = counting_seed();
    let rows = [
        (0, 0x7d2bfd39, 2100034873u32),
        (1, 0x6a19c5d9, 1780073945),
        (2, 0x7703bd8d, 1996733837),
        (15, 0x0c415b48, 205609800),
        (16, 0x3142b818, 826456088),
        (100, 0x55b54fc9, 1437945801),
        (65534, 0x8b35b2bc, 2335552188),
    ];
    for (i, value, decimal) in rows {
        assert_eq!(value, decimal, "the table's two columns agree");
        assert_eq!(number_at(&seed, i), value, "index {i}");
    }
}

#[test]
fn section_7_4_derivation() {
    let key = hex(
        "2a 00 00 00 00 00 00 00 00 00 00 00 00 00 40 00 80 00 00 00 00 00 00 01 6e 6d 73 74 72 6d 2d 31",
    );
    // The key is laid out as 7.3 says.
    let mut layout = Vec::new();
    layout.extend_from_slice(&42u64.to_le_bytes());
    layout.extend_from_slice(client().as_bytes());
    layout.extend_from_slice(b"nmstrm-1");
    assert_eq!(key, layout);
    let seed = hex(
        "d4 1d 75 e8 50 b0 c5 5c 81 b5 90 e7 98 7f 3a 25 e4 0e 4c 39 12 41 bb ad 88 8d 9f 47 bd 29 13 11",
    );
    // The seed is the first 32 keystream bytes under that key: the RFC 8439
    // cipher itself (zero nonce, counter 0), not the generator's RNG path.
    let key: [u8; 32] = key.try_into().expect("32 bytes");
    assert_eq!(rfc8439_keystream(&key, 0, 32), seed);
    let derived = SessionSeed::derive(42, client());
    assert_eq!(derived.0.to_vec(), seed);
    let rows = [
        (0, 0x260202d6, 637666006u32),
        (1, 0xa364f1f6, 2741301750),
        (2, 0xd5e20208, 3588358664),
        (3, 0x40642fe7, 1080307687),
    ];
    for (i, value, decimal) in rows {
        assert_eq!(value, decimal);
        assert_eq!(number_at(&derived, i), value, "index {i}");
    }
    // Number i is keystream word i, wherever the generator starts: checked
    // against the cipher's own seek, across block boundaries and at the end.
    for i in [0u16, 15, 16, 17, 1000, 65_534, 65_535] {
        let word = rfc8439_keystream(&derived.0, 4 * u64::from(i), 4);
        let expected = u32::from_le_bytes(word.try_into().expect("4 bytes"));
        assert_eq!(number_at(&derived, i), expected, "index {i}");
    }
}

/// `len` bytes of the RFC 8439 ChaCha20 keystream under `key` with a zero
/// nonce, from byte `offset` on.
fn rfc8439_keystream(key: &[u8; 32], offset: u64, len: usize) -> Vec<u8> {
    let mut cipher = chacha20::ChaCha20::new(&(*key).into(), &[0u8; 12].into());
    cipher.seek(offset);
    let mut bytes = vec![0u8; len];
    cipher.apply_keystream(&mut bytes);
    bytes
}

#[test]
fn section_8_1_check_value() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe3069283);
}

#[test]
fn section_8_3_checksums_and_sums() {
    let mut ascii = SequenceChecksum::new();
    ascii.push(0x31323334);
    ascii.push(0x35363738);
    assert_eq!(ascii.checksum(), 0x6087809a);
    assert_eq!(ascii.checksum(), crc32c::crc32c(b"12345678"));
    assert_eq!(ascii.sum(), 1718119020);
    assert_eq!(ascii.sum(), 0x66686a6c);
    let rows = [
        (counting_seed(), 1, 0x726fca89, 2100034873u64),
        (counting_seed(), 10, 0x0a79ec43, 22907825396),
        (counting_seed(), 65535, 0x2cba5f6f, 140925532149714),
        (SessionSeed::derive(42, client()), 3, 0x2bc4467f, 6967326420),
    ];
    for (seed, count, checksum, sum) in rows {
        let whole = SequenceChecksum::of_session(&seed, count);
        assert_eq!(
            (whole.checksum(), whole.sum()),
            (checksum, sum),
            "count {count}"
        );
    }
    assert_eq!(0x55569acf4u64, 22907825396);
    assert_eq!(0x802bc84897d2u64, 140925532149714);
}

#[test]
fn section_3_1_version_first() {
    let mut bytes = BytesMut::from(&hex("00 00 00 03 01 00 02")[..]);
    assert_eq!(
        decode_frame(&mut bytes),
        Err(DecodeError::UnsupportedVersion(2))
    );
}

fn config(interval: Duration) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        interval,
        session_ttl: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(5),
        ack_wait: Duration::from_secs(130),
        lease_renewal_period: Duration::from_secs(10),
        store_shared: false,
    })
}

fn transcript_grant(generation: u64) -> Grant {
    let mut grant = new_grant(client(), 3, SessionSeed::derive(42, client()), token());
    grant.generation = generation;
    grant
}

/// The reference server's session, after `hello` and the store's answer.
fn attached(interval: Duration, hello: &[u8], grant: Grant, t0: Instant) -> ServerSession {
    numstream_protocol::testing::streaming_session(config(interval), hello, grant, t0)
}

fn written(session: &mut ServerSession, now: Instant) -> Vec<u8> {
    let mut out = BytesMut::new();
    while session.poll_transmit(now, &mut out) > 0 {}
    session.handle_flushed(now);
    out.to_vec()
}

const OPEN: &str = "00 00 00 15 01 00 01 00 00 00 00 00 00 40 00 80 00 00 00 00 00 00 01 00 03";
const NUMBER_0: &str = "00 00 00 07 82 00 00 26 02 02 d6";
const NUMBER_1: &str = "00 00 00 07 82 00 01 a3 64 f1 f6";
const FINAL: &str = "00 00 00 0b 83 00 02 d5 e2 02 08 2b c4 46 7f";
const ACK: &str = "00 00 00 05 03 2b c4 46 7f";
const TOKEN: &str = "a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af";

#[test]
fn section_9_1_one_session_uninterrupted() {
    assert_eq!(
        encoded(&Frame::Open(Open {
            client_id: client(),
            count: 3
        })),
        hex(OPEN)
    );
    let t0 = Instant::now();
    let mut session = attached(Duration::ZERO, &hex(OPEN), transcript_grant(1), t0);
    let welcome = format!("00 00 00 1f 81 00 01 00 03 00 00 {TOKEN} 00 00 00 00 00 00 75 30");
    let expected = [hex(&welcome), hex(NUMBER_0), hex(NUMBER_1), hex(FINAL)].concat();
    assert_eq!(written(&mut session, t0), expected);
    session.handle_bytes(t0, &hex(ACK));
    let Some(Event::Ended(ending)) = session.poll_event() else {
        panic!("the ACK ends the session");
    };
    assert_eq!(
        ending.reason,
        numstream_protocol::server::EndReason::Completed {
            client_checksum: 0x2bc4467f,
            server_checksum: 0x2bc4467f
        }
    );
    assert_eq!(
        encoded(&Frame::Ack {
            client_checksum: 0x2bc4467f
        }),
        hex(ACK)
    );
}

#[test]
fn section_9_2_a_drop_and_a_resume() {
    let second = Duration::from_secs(1);
    let t0 = Instant::now();
    let mut first = attached(second, &hex(OPEN), transcript_grant(1), t0);
    let welcome = format!("00 00 00 1f 81 00 01 00 03 00 00 {TOKEN} 00 0f 42 40 00 00 75 30");
    assert_eq!(
        written(&mut first, t0),
        [hex(&welcome), hex(NUMBER_0)].concat()
    );
    first.handle_closed(t0 + second / 2, None);

    let resume = format!(
        "00 00 00 25 02 00 01 00 00 00 00 00 00 40 00 80 00 00 00 00 00 00 01 {TOKEN} 00 01"
    );
    assert_eq!(
        encoded(&Frame::Resume(Resume {
            client_id: client(),
            token: token(),
            next_index: 1
        })),
        hex(&resume)
    );
    let t1 = t0 + second * 5;
    let mut again = attached(second, &hex(&resume), transcript_grant(2), t1);
    let rewelcome = format!("00 00 00 1f 81 00 01 00 03 00 01 {TOKEN} 00 0f 42 40 00 00 75 30");
    assert_eq!(
        written(&mut again, t1),
        [hex(&rewelcome), hex(NUMBER_1)].concat()
    );
    assert!(written(&mut again, t1 + second / 2).is_empty());
    assert_eq!(written(&mut again, t1 + second), hex(FINAL));
}

fn header_and_message(error: &ErrorFrame) -> (Vec<u8>, String) {
    let bytes = encoded(&Frame::Error(error.clone()));
    let message = String::from_utf8(bytes[9..].to_vec()).expect("utf-8");
    (bytes[..9].to_vec(), message)
}

#[test]
fn section_9_other_answers() {
    let ttl = Duration::from_secs(30);
    let t0 = Instant::now();
    // A RESUME past the end, answered after the attach.
    let past_end = encoded(&Frame::Resume(Resume {
        client_id: client(),
        token: token(),
        next_index: 3,
    }));
    let mut session = attached(Duration::ZERO, &past_end, transcript_grant(2), t0);
    let resume_error = ending_error(&mut session);
    // Nothing sent for 5 s.
    let mut silent = ServerSession::new(config(Duration::ZERO), t0);
    silent.handle_timeout(t0 + Duration::from_secs(5));
    let timeout_error = ending_error(&mut silent);
    // An ACK while streaming.
    let mut streaming = attached(Duration::from_secs(1), &hex(OPEN), transcript_grant(1), t0);
    written(&mut streaming, t0);
    streaming.handle_bytes(t0, &hex(ACK));
    let ack_error = ending_error(&mut streaming);
    let rows = [
        (
            store_error(&StoreFailure::AlreadyExists, ttl),
            "00 00 00 65 85 00 0b 00 00",
            "a session for this client id is already open: resume it with its token, or use another client id",
        ),
        (
            store_error(&StoreFailure::BadToken, ttl),
            "00 00 00 31 85 00 06 00 00",
            "the resume token does not match this session",
        ),
        (
            resume_error,
            "00 00 00 4d 85 00 07 00 00",
            "resume index 3 is out of range: the session has 3 numbers, indices 0..=2",
        ),
        (
            timeout_error,
            "00 00 00 29 85 00 0d 01 00",
            "no complete OPEN or RESUME within 5s",
        ),
        (
            ack_error,
            "00 00 00 45 85 00 01 00 00",
            "unexpected ACK while streaming (only ACK after FINAL is allowed)",
        ),
        (
            taken_over(),
            "00 00 00 40 85 00 09 00 00",
            "a newer connection resumed this session; this one is closed",
        ),
    ];
    for (error, header, message) in rows {
        assert_eq!(
            header_and_message(&error),
            (hex(header), message.to_owned())
        );
    }
    assert_eq!(
        store_error(&StoreFailure::AlreadyExists, ttl).code,
        ErrorCode::SessionExists
    );
}

fn ending_error(session: &mut ServerSession) -> ErrorFrame {
    let Some(Event::Ended(ending)) = session.poll_event() else {
        panic!("expected the session to end");
    };
    ending
        .steps
        .into_iter()
        .find_map(|step| match step {
            numstream_protocol::server::Step::Send(error) => Some(error),
            _ => None,
        })
        .expect("an error is sent")
}
