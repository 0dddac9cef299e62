//! Byte layout of v1 frames: encoding into and incremental decoding out of a
//! `BytesMut`.
//!
//! ```text
//! frame   = length:u32be payload       ; 1 <= length <= MAX_PAYLOAD_LEN
//! payload = type:u8 body               ; body layout fixed per type
//! ```
//!
//! The decoder is incremental: it returns `Ok(None)` until a whole frame is
//! buffered, so a frame split across any number of reads decodes exactly as
//! one that arrived at once. It judges the length prefix before buffering the
//! payload, so a hostile 4 GiB prefix costs four bytes of memory, not four
//! gigabytes.

use bytes::{Buf, BufMut, BytesMut};

use crate::frame::{
    Disposition, ErrorCode, ErrorFrame, Frame, Open, Resume, ResumeToken, Welcome, tag,
};
use crate::{MAX_ERROR_MESSAGE_LEN, MAX_PAYLOAD_LEN, SUPPORTED_VERSIONS};

/// Size of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Most versions an ERROR frame lists.
pub const MAX_LISTED_VERSIONS: usize = 16;

/// Why a byte sequence is not a valid v1 frame. Every variant is the peer's
/// fault; after any of them the connection cannot be re-synchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame length 0: a frame carries at least its type byte")]
    EmptyFrame,
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u32, max: usize },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("{frame} frame body is {actual} bytes, expected {expected}")]
    BadLength {
        frame: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("protocol version {0} is not supported (supported: {SUPPORTED_VERSIONS:?})")]
    UnsupportedVersion(u16),
    #[error("ERROR frame: unknown disposition {0}")]
    UnknownDisposition(u8),
    #[error("ERROR frame: unknown error code {0}")]
    UnknownErrorCode(u16),
    #[error("ERROR frame: {0}")]
    BadErrorFrame(&'static str),
}

/// Appends `frame` to `dst`, length prefix included.
///
/// Infallible by construction: every typed frame fits the limits, except an
/// ERROR built by hand with an overlong message or version list, which is cut
/// to the limit here rather than producing an undecodable frame.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_u32(0); // length placeholder, patched below
    match frame {
        Frame::Open(open) => {
            dst.put_u8(tag::OPEN);
            dst.put_u16(crate::PROTOCOL_VERSION);
            dst.put_slice(open.client_id.as_bytes());
            dst.put_u16(open.count);
        }
        Frame::Resume(resume) => {
            dst.put_u8(tag::RESUME);
            dst.put_u16(crate::PROTOCOL_VERSION);
            dst.put_slice(resume.client_id.as_bytes());
            dst.put_slice(&resume.token.0);
            dst.put_u16(resume.next_index);
        }
        Frame::Ack { client_checksum } => {
            dst.put_u8(tag::ACK);
            dst.put_u32(*client_checksum);
        }
        Frame::Welcome(welcome) => {
            dst.put_u8(tag::WELCOME);
            dst.put_u16(crate::PROTOCOL_VERSION);
            dst.put_u16(welcome.count);
            dst.put_u16(welcome.next_index);
            dst.put_slice(&welcome.token.0);
            dst.put_u32(welcome.interval_us);
            dst.put_u32(welcome.session_ttl_ms);
        }
        Frame::Number { index, value } => {
            dst.put_u8(tag::NUMBER);
            dst.put_u16(*index);
            dst.put_u32(*value);
        }
        Frame::Final {
            index,
            value,
            checksum,
        } => {
            dst.put_u8(tag::FINAL);
            dst.put_u16(*index);
            dst.put_u32(*value);
            dst.put_u32(*checksum);
        }
        Frame::Heartbeat => dst.put_u8(tag::HEARTBEAT),
        Frame::Error(error) => {
            dst.put_u8(tag::ERROR);
            dst.put_u16(error.code as u16);
            dst.put_u8(error.disposition as u8);
            let versions = &error.supported_versions
                [..error.supported_versions.len().min(MAX_LISTED_VERSIONS)];
            dst.put_u8(versions.len() as u8);
            for version in versions {
                dst.put_u16(*version);
            }
            dst.put_slice(truncate_utf8(&error.message, MAX_ERROR_MESSAGE_LEN).as_bytes());
        }
    }
    let payload_len = dst.len() - start - LENGTH_PREFIX_LEN;
    debug_assert!(payload_len <= MAX_PAYLOAD_LEN);
    dst[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(payload_len as u32).to_be_bytes());
}

/// Encoded size of a NUMBER frame, prefix included; useful for sizing
/// buffers on the streaming path.
pub const NUMBER_FRAME_LEN: usize = LENGTH_PREFIX_LEN + 1 + 2 + 4;
/// Encoded size of an OPEN frame: prefix, type, version, client id, count.
pub const OPEN_FRAME_LEN: usize = LENGTH_PREFIX_LEN + 1 + 2 + 16 + 2;
/// Encoded size of a RESUME frame: prefix, type, version, client id,
/// token, index.
pub const RESUME_FRAME_LEN: usize = LENGTH_PREFIX_LEN + 1 + 2 + 16 + 16 + 2;
/// Encoded size of a WELCOME frame: prefix, type, version, count, next
/// index, token, interval, session TTL.
pub const WELCOME_FRAME_LEN: usize = LENGTH_PREFIX_LEN + 1 + 2 + 2 + 2 + 16 + 4 + 4;
/// Encoded size of a FINAL frame: a NUMBER's fields and the checksum.
pub const FINAL_FRAME_LEN: usize = NUMBER_FRAME_LEN + 4;

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// Removes one whole frame from the front of `src` and decodes it.
///
/// Returns `Ok(None)` (consuming nothing) while the frame is incomplete. On
/// `Err` the stream is unusable and the caller should report and close.
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let Some(prefix) = src.get(..LENGTH_PREFIX_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len as usize > MAX_PAYLOAD_LEN {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let frame_len = LENGTH_PREFIX_LEN + len as usize;
    if src.len() < frame_len {
        src.reserve(frame_len - src.len());
        return Ok(None);
    }
    // Decoded in place from a borrowed slice, then dropped from the buffer:
    // no reference-counted split per frame.
    let mut body = &src[LENGTH_PREFIX_LEN + 1..frame_len];
    let frame = decode_body(src[LENGTH_PREFIX_LEN], &mut body);
    src.advance(frame_len);
    frame.map(Some)
}

fn expect_len(frame: &'static str, body: &[u8], expected: usize) -> Result<(), DecodeError> {
    if body.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::BadLength {
            frame,
            expected,
            actual: body.len(),
        })
    }
}

/// Handshake frames put the version first so that a peer speaking another
/// version is told so, whatever the rest of its frame looks like.
fn check_version(frame: &'static str, body: &mut &[u8]) -> Result<(), DecodeError> {
    if body.len() < 2 {
        return Err(DecodeError::BadLength {
            frame,
            expected: 2,
            actual: body.len(),
        });
    }
    let version = body.get_u16();
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion(version))
    }
}

fn get_uuid(body: &mut &[u8]) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    body.copy_to_slice(&mut bytes);
    uuid::Uuid::from_bytes(bytes)
}

fn get_token(body: &mut &[u8]) -> ResumeToken {
    let mut bytes = [0u8; 16];
    body.copy_to_slice(&mut bytes);
    ResumeToken(bytes)
}

fn decode_body(frame_type: u8, body: &mut &[u8]) -> Result<Frame, DecodeError> {
    match frame_type {
        tag::OPEN => {
            check_version("OPEN", body)?;
            expect_len("OPEN", body, 16 + 2)?;
            Ok(Frame::Open(Open {
                client_id: get_uuid(body),
                count: body.get_u16(),
            }))
        }
        tag::RESUME => {
            check_version("RESUME", body)?;
            expect_len("RESUME", body, 16 + 16 + 2)?;
            Ok(Frame::Resume(Resume {
                client_id: get_uuid(body),
                token: get_token(body),
                next_index: body.get_u16(),
            }))
        }
        tag::ACK => {
            expect_len("ACK", body, 4)?;
            Ok(Frame::Ack {
                client_checksum: body.get_u32(),
            })
        }
        tag::WELCOME => {
            check_version("WELCOME", body)?;
            expect_len("WELCOME", body, 2 + 2 + 16 + 4 + 4)?;
            Ok(Frame::Welcome(Welcome {
                count: body.get_u16(),
                next_index: body.get_u16(),
                token: get_token(body),
                interval_us: body.get_u32(),
                session_ttl_ms: body.get_u32(),
            }))
        }
        tag::NUMBER => {
            expect_len("NUMBER", body, 2 + 4)?;
            Ok(Frame::Number {
                index: body.get_u16(),
                value: body.get_u32(),
            })
        }
        tag::FINAL => {
            expect_len("FINAL", body, 2 + 4 + 4)?;
            Ok(Frame::Final {
                index: body.get_u16(),
                value: body.get_u32(),
                checksum: body.get_u32(),
            })
        }
        tag::HEARTBEAT => {
            expect_len("HEARTBEAT", body, 0)?;
            Ok(Frame::Heartbeat)
        }
        tag::ERROR => decode_error(body).map(Frame::Error),
        other => Err(DecodeError::UnknownType(other)),
    }
}

fn decode_error(body: &mut &[u8]) -> Result<ErrorFrame, DecodeError> {
    if body.len() < 4 {
        return Err(DecodeError::BadErrorFrame("shorter than its fixed header"));
    }
    let raw_code = body.get_u16();
    let code = ErrorCode::from_wire(raw_code).ok_or(DecodeError::UnknownErrorCode(raw_code))?;
    let raw_disposition = body.get_u8();
    let disposition = Disposition::from_wire(raw_disposition)
        .ok_or(DecodeError::UnknownDisposition(raw_disposition))?;
    let version_count = body.get_u8() as usize;
    if version_count > MAX_LISTED_VERSIONS {
        return Err(DecodeError::BadErrorFrame("lists too many versions"));
    }
    if body.len() < version_count * 2 {
        return Err(DecodeError::BadErrorFrame("version list is truncated"));
    }
    let supported_versions = (0..version_count).map(|_| body.get_u16()).collect();
    if body.len() > MAX_ERROR_MESSAGE_LEN {
        return Err(DecodeError::BadErrorFrame("message is too long"));
    }
    let message = std::str::from_utf8(body)
        .map_err(|_| DecodeError::BadErrorFrame("message is not UTF-8"))?
        .to_owned();
    Ok(ErrorFrame {
        code,
        disposition,
        supported_versions,
        message,
    })
}

#[cfg(feature = "tokio-codec")]
pub use tokio_adapter::{CodecError, FrameCodec};

#[cfg(feature = "tokio-codec")]
mod tokio_adapter {
    //! `tokio_util::codec` glue, so `Framed<TcpStream, FrameCodec>` speaks v1.

    use super::*;

    /// A failure reading frames from a transport.
    #[derive(Debug, thiserror::Error)]
    pub enum CodecError {
        #[error("i/o error: {0}")]
        Io(#[from] std::io::Error),
        #[error("protocol violation: {0}")]
        Decode(#[from] DecodeError),
    }

    /// Stateless adapter from the sans-IO codec to `tokio_util::codec`.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct FrameCodec;

    impl tokio_util::codec::Decoder for FrameCodec {
        type Item = Frame;
        type Error = CodecError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
            Ok(decode_frame(src)?)
        }
    }

    impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
        type Error = CodecError;

        fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            encode_frame(frame, dst);
            Ok(())
        }
    }

    impl tokio_util::codec::Encoder<Frame> for FrameCodec {
        type Error = CodecError;

        fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            encode_frame(&frame, dst);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_frame(frame, &mut buf);
        buf
    }

    fn raw(frame_type: u8, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32(1 + body.len() as u32);
        buf.put_u8(frame_type);
        buf.put_slice(body);
        buf
    }

    fn arb_token() -> impl Strategy<Value = ResumeToken> {
        any::<[u8; 16]>().prop_map(ResumeToken)
    }

    fn arb_uuid() -> impl Strategy<Value = uuid::Uuid> {
        any::<[u8; 16]>().prop_map(uuid::Uuid::from_bytes)
    }

    fn arb_error() -> impl Strategy<Value = ErrorFrame> {
        (
            proptest::sample::select(ErrorCode::ALL),
            prop_oneof![
                Just(Disposition::Final),
                Just(Disposition::Retry),
                Just(Disposition::RetryNow)
            ],
            proptest::collection::vec(any::<u16>(), 0..=MAX_LISTED_VERSIONS),
            "\\PC{0,100}",
        )
            .prop_map(|(code, disposition, versions, message)| ErrorFrame {
                code,
                disposition,
                supported_versions: versions,
                message: truncate_utf8(&message, MAX_ERROR_MESSAGE_LEN).to_owned(),
            })
    }

    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (arb_uuid(), any::<u16>())
                .prop_map(|(client_id, count)| Frame::Open(Open { client_id, count })),
            (arb_uuid(), arb_token(), any::<u16>()).prop_map(|(client_id, token, next_index)| {
                Frame::Resume(Resume {
                    client_id,
                    token,
                    next_index,
                })
            }),
            any::<u32>().prop_map(|client_checksum| Frame::Ack { client_checksum }),
            (
                any::<u16>(),
                any::<u16>(),
                arb_token(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(count, next_index, token, interval_us, session_ttl_ms)| {
                    Frame::Welcome(Welcome {
                        count,
                        next_index,
                        token,
                        interval_us,
                        session_ttl_ms,
                    })
                }),
            (any::<u16>(), any::<u32>()).prop_map(|(index, value)| Frame::Number { index, value }),
            (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(index, value, checksum)| {
                Frame::Final {
                    index,
                    value,
                    checksum,
                }
            }),
            Just(Frame::Heartbeat),
            arb_error().prop_map(Frame::Error),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in arb_frame()) {
            let mut buf = encoded(&frame);
            prop_assert!(buf.len() - LENGTH_PREFIX_LEN <= MAX_PAYLOAD_LEN);
            prop_assert_eq!(decode_frame(&mut buf), Ok(Some(frame)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn frames_split_byte_by_byte_decode_identically(
            frames in proptest::collection::vec(arb_frame(), 1..8)
        ) {
            let mut wire = BytesMut::new();
            for frame in &frames {
                encode_frame(frame, &mut wire);
            }
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            for byte in wire.iter() {
                buf.put_u8(*byte);
                while let Some(frame) = decode_frame(&mut buf).expect("valid stream") {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf) {}
        }
    }

    #[test]
    fn fixed_frame_lengths_match_encoding() {
        assert_eq!(
            encoded(&Frame::Number { index: 1, value: 2 }).len(),
            NUMBER_FRAME_LEN
        );
        let client_id = crate::frame::ClientId::from_bytes([1; 16]);
        let token = ResumeToken([2; 16]);
        let open = Frame::Open(Open {
            client_id,
            count: 3,
        });
        assert_eq!(encoded(&open).len(), OPEN_FRAME_LEN);
        let resume = Frame::Resume(Resume {
            client_id,
            token,
            next_index: 4,
        });
        assert_eq!(encoded(&resume).len(), RESUME_FRAME_LEN);
        let welcome = Frame::Welcome(Welcome {
            count: 5,
            next_index: 6,
            token,
            interval_us: 7,
            session_ttl_ms: 8,
        });
        assert_eq!(encoded(&welcome).len(), WELCOME_FRAME_LEN);
        let last = Frame::Final {
            index: 9,
            value: 10,
            checksum: 11,
        };
        assert_eq!(encoded(&last).len(), FINAL_FRAME_LEN);
    }

    #[test]
    fn wire_bytes_of_a_number_frame_are_pinned() {
        let bytes = encoded(&Frame::Number {
            index: 0x0102,
            value: 0xdeadbeef,
        });
        assert_eq!(
            &bytes[..],
            &[0, 0, 0, 7, 0x82, 0x01, 0x02, 0xde, 0xad, 0xbe, 0xef]
        );
    }

    #[test]
    fn incomplete_frames_consume_nothing() {
        let full = encoded(&Frame::Heartbeat);
        for cut in 0..full.len() {
            let mut partial = BytesMut::from(&full[..cut]);
            assert_eq!(decode_frame(&mut partial), Ok(None));
            assert_eq!(partial.len(), cut);
        }
    }

    #[test]
    fn zero_length_is_rejected() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buf), Err(DecodeError::EmptyFrame));
    }

    #[test]
    fn oversize_prefix_is_rejected_before_buffering() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode_frame(&mut buf),
            Err(DecodeError::FrameTooLarge {
                len: u32::MAX,
                max: MAX_PAYLOAD_LEN
            })
        );
        let mut just_over = BytesMut::new();
        just_over.put_u32(MAX_PAYLOAD_LEN as u32 + 1);
        assert!(matches!(
            decode_frame(&mut just_over),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn unknown_type_is_rejected() {
        assert_eq!(
            decode_frame(&mut raw(0x7f, &[])),
            Err(DecodeError::UnknownType(0x7f))
        );
    }

    #[test]
    fn every_fixed_frame_rejects_one_byte_short_and_one_byte_over() {
        let samples = [
            Frame::Open(Open {
                client_id: uuid::Uuid::from_bytes([1; 16]),
                count: 5,
            }),
            Frame::Resume(Resume {
                client_id: uuid::Uuid::from_bytes([1; 16]),
                token: ResumeToken([2; 16]),
                next_index: 3,
            }),
            Frame::Ack { client_checksum: 9 },
            Frame::Welcome(Welcome {
                count: 1,
                next_index: 0,
                token: ResumeToken([3; 16]),
                interval_us: 1,
                session_ttl_ms: 2,
            }),
            Frame::Number { index: 1, value: 2 },
            Frame::Final {
                index: 1,
                value: 2,
                checksum: 3,
            },
        ];
        for frame in samples {
            let good = encoded(&frame);
            let frame_type = good[LENGTH_PREFIX_LEN];
            let body = &good[LENGTH_PREFIX_LEN + 1..];
            let short = raw(frame_type, &body[..body.len() - 1]);
            let mut long_body = body.to_vec();
            long_body.push(0);
            let long = raw(frame_type, &long_body);
            for mut bad in [short, long] {
                assert!(
                    matches!(decode_frame(&mut bad), Err(DecodeError::BadLength { .. })),
                    "{frame:?} with a wrong length must be rejected"
                );
            }
        }
        assert!(matches!(
            decode_frame(&mut raw(tag::HEARTBEAT, &[0])),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn unsupported_version_is_reported_whatever_follows() {
        for frame_type in [tag::OPEN, tag::RESUME, tag::WELCOME] {
            assert_eq!(
                decode_frame(&mut raw(frame_type, &[0, 2, 0xaa])),
                Err(DecodeError::UnsupportedVersion(2))
            );
            assert_eq!(
                decode_frame(&mut raw(frame_type, &[0, 0])),
                Err(DecodeError::UnsupportedVersion(0))
            );
        }
    }

    #[test]
    fn malformed_error_frames_are_rejected() {
        let cases: [&[u8]; 6] = [
            &[0, 1, 0],                // shorter than header
            &[0, 99, 0, 0],            // unknown code
            &[0, 1, 9, 0],             // unknown disposition
            &[0, 1, 0, 17],            // too many versions
            &[0, 1, 0, 2, 0, 1],       // truncated version list
            &[0, 1, 0, 0, 0xff, 0xfe], // invalid UTF-8
        ];
        for body in cases {
            assert!(
                decode_frame(&mut raw(tag::ERROR, body)).is_err(),
                "{body:?}"
            );
        }
        let too_long = vec![b'a'; MAX_ERROR_MESSAGE_LEN + 1];
        let mut body = vec![0, 1, 0, 0];
        body.extend_from_slice(&too_long);
        assert!(decode_frame(&mut raw(tag::ERROR, &body)).is_err());
    }

    #[test]
    fn encoder_truncates_handmade_overlong_errors() {
        let frame = Frame::Error(ErrorFrame {
            code: ErrorCode::Internal,
            disposition: Disposition::Retry,
            supported_versions: vec![1; 40],
            message: "x".repeat(2000),
        });
        let mut buf = encoded(&frame);
        let Ok(Some(Frame::Error(decoded))) = decode_frame(&mut buf) else {
            panic!("an encoded frame must decode");
        };
        assert_eq!(decoded.message.len(), MAX_ERROR_MESSAGE_LEN);
        assert_eq!(decoded.supported_versions.len(), MAX_LISTED_VERSIONS);
    }
}
