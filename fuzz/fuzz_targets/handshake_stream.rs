//! The server's handshake parser as it really runs: a byte stream arriving in
//! arbitrary chunks, decoded incrementally with `decode_frame` after every
//! read. Whatever the chunking, it must produce exactly the frames (and the
//! error) that decoding the whole stream at once produces, and never buffer
//! more than one maximal frame.
#![no_main]

use arbitrary::Arbitrary;
use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use numstream_protocol::codec::LENGTH_PREFIX_LEN;
use numstream_protocol::{DecodeError, Frame, MAX_PAYLOAD_LEN, decode_frame};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Sizes of successive reads (0 is read as 1); the last repeats.
    chunks: Vec<u8>,
    stream: Vec<u8>,
}

/// Decodes everything available; stops at the first error.
fn drain(buf: &mut BytesMut, out: &mut Vec<Frame>) -> Option<DecodeError> {
    loop {
        match decode_frame(buf) {
            Ok(Some(frame)) => out.push(frame),
            Ok(None) => return None,
            Err(error) => return Some(error),
        }
    }
}

fuzz_target!(|input: Input| {
    let mut whole = BytesMut::from(&input.stream[..]);
    let mut expected = Vec::new();
    let expected_error = drain(&mut whole, &mut expected);

    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut got_error = None;
    let mut rest = &input.stream[..];
    let mut sizes = input
        .chunks
        .iter()
        .copied()
        .chain(std::iter::repeat(input.chunks.last().copied().unwrap_or(1)));
    while !rest.is_empty() && got_error.is_none() {
        let size = usize::from(sizes.next().unwrap_or(1).max(1)).min(rest.len());
        buf.put_slice(&rest[..size]);
        rest = &rest[size..];
        got_error = drain(&mut buf, &mut got);
        // What is left over is always less than one whole frame.
        assert!(got_error.is_some() || buf.len() < LENGTH_PREFIX_LEN + MAX_PAYLOAD_LEN);
    }
    assert_eq!(got, expected, "chunking changed the decoded frames");
    assert_eq!(got_error, expected_error, "chunking changed the error");
});
