//! Property tests across the protocol crate's public API, complementing the
//! unit-level ones in `src/` (codec round trips, PRNG random access,
//! checksum sensitivity): the client verifier must accept a correct stream
//! resumed at any points, and must never verify a stream with any single
//! corruption in it.

use std::num::NonZeroU16;

use bytes::BytesMut;
use proptest::prelude::*;

use numstream_protocol::{
    ClientId, ErrorCode, ErrorFrame, Frame, MAX_ERROR_MESSAGE_LEN, Progress, ResumeToken,
    SequenceChecksum, SequenceReceiver, SessionSeed, decode_frame, encode_frame, number_at,
};

const TOKEN: ResumeToken = ResumeToken([0x33; 16]);

fn welcome(count: u16, next_index: u16) -> Frame {
    numstream_protocol::testing::ServedSession::new(SessionSeed([0; 32]), TOKEN, count)
        .welcome(next_index)
}

/// What a correct server sends for `index`.
fn correct(seed: &SessionSeed, count: u16, index: u16) -> Frame {
    let value = number_at(seed, index);
    if index == count - 1 {
        Frame::Final {
            index,
            value,
            checksum: SequenceChecksum::of_session(seed, count).checksum(),
        }
    } else {
        Frame::Number { index, value }
    }
}

/// One way a server can get a single frame wrong.
#[derive(Debug, Clone, Copy)]
enum Corruption {
    /// The previous frame again.
    Duplicate,
    /// The next frame, skipping this one.
    Skip,
    /// The right index with another value.
    Value,
    /// FINAL here, before the last index.
    EarlyFinal,
    /// The last number as NUMBER, not FINAL.
    MissingFinal,
    /// FINAL with another checksum.
    Checksum,
}

fn arb_corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        Just(Corruption::Duplicate),
        Just(Corruption::Skip),
        Just(Corruption::Value),
        Just(Corruption::EarlyFinal),
        Just(Corruption::MissingFinal),
        Just(Corruption::Checksum),
    ]
}

proptest! {
    #[test]
    fn a_stream_resumed_anywhere_verifies_like_an_undisturbed_one(
        seed in any::<[u8; 32]>(),
        count in 1u16..400,
        cuts in proptest::collection::btree_set(0u16..400, 0..10),
    ) {
        let seed = SessionSeed(seed);
        let mut rx = SequenceReceiver::new(ClientId::from_u128(7), NonZeroU16::new(count).expect("count >= 1"));
        prop_assert!(matches!(rx.hello(), Frame::Open(_)));
        rx.accept(welcome(count, 0)).expect("first WELCOME");
        let mut outcome = None;
        for index in 0..count {
            if cuts.contains(&index) && index > 0 {
                // The connection dropped before `index`: resume there.
                let Frame::Resume(resume) = rx.hello() else {
                    panic!("an opened session must resume");
                };
                prop_assert_eq!(resume.next_index, index);
                prop_assert!(resume.token.ct_eq(&TOKEN));
                rx.accept(welcome(count, index)).expect("WELCOME on resume");
            }
            match rx.accept(correct(&seed, count, index)).expect("correct frame") {
                Progress::Number { index: got, .. } => prop_assert_eq!(got, index),
                Progress::Completed(done) => outcome = Some(done),
                other => panic!("unexpected {other:?}"),
            }
        }
        let outcome = outcome.expect("FINAL completes the sequence");
        let reference = SequenceChecksum::of_session(&seed, count);
        prop_assert!(outcome.verified());
        prop_assert_eq!(outcome.sum, reference.sum());
        prop_assert_eq!(outcome.client_checksum, reference.checksum());
        prop_assert_eq!(rx.received(), count);
    }

    #[test]
    fn no_single_corruption_ever_verifies(
        seed in any::<[u8; 32]>(),
        count in 2u16..300,
        at in any::<proptest::sample::Index>(),
        corruption in arb_corruption(),
    ) {
        let seed = SessionSeed(seed);
        let mut rx = SequenceReceiver::new(ClientId::from_u128(8), NonZeroU16::new(count).expect("count >= 1"));
        rx.hello();
        rx.accept(welcome(count, 0)).expect("WELCOME");
        let position = at.index(usize::from(count)) as u16;
        let last = count - 1;
        let mut frames: Vec<Frame> = (0..count).map(|i| correct(&seed, count, i)).collect();
        let applies = match corruption {
            Corruption::Duplicate if position > 0 => {
                frames.insert(usize::from(position), correct(&seed, count, position - 1));
                true
            }
            Corruption::Skip if position < last => {
                frames.remove(usize::from(position));
                true
            }
            Corruption::Value => {
                match &mut frames[usize::from(position)] {
                    Frame::Number { value, .. } | Frame::Final { value, .. } => *value ^= 1,
                    _ => unreachable!(),
                }
                true
            }
            Corruption::EarlyFinal if position < last => {
                frames[usize::from(position)] = Frame::Final {
                    index: position,
                    value: number_at(&seed, position),
                    checksum: SequenceChecksum::of_session(&seed, count).checksum(),
                };
                true
            }
            Corruption::MissingFinal => {
                frames[usize::from(last)] = Frame::Number {
                    index: last,
                    value: number_at(&seed, last),
                };
                true
            }
            Corruption::Checksum => {
                if let Some(Frame::Final { checksum, .. }) = frames.last_mut() {
                    *checksum ^= 0x8000_0000;
                }
                true
            }
            _ => false,
        };
        prop_assume!(applies);
        let mut verified = false;
        for frame in frames {
            match rx.accept(frame) {
                Ok(Progress::Completed(outcome)) => {
                    verified = outcome.verified();
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        prop_assert!(!verified, "{:?} at {} of {} was verified", corruption, position, count);
    }

    #[test]
    fn error_frames_with_any_message_round_trip(
        code in proptest::sample::select(ErrorCode::ALL),
        message in "\\PC{0,600}",
    ) {
        let error = ErrorFrame::new(code, message.clone());
        prop_assert!(error.message.len() <= MAX_ERROR_MESSAGE_LEN);
        prop_assert!(message.starts_with(&error.message));
        let mut buf = BytesMut::new();
        encode_frame(&Frame::Error(error.clone()), &mut buf);
        prop_assert_eq!(decode_frame(&mut buf), Ok(Some(Frame::Error(error))));
        prop_assert!(buf.is_empty());
    }
}
