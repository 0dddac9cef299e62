//! `SequenceReceiver::accept` on arbitrary frame sequences, with reconnects
//! (`hello`) in between: never panics, and whatever it accepts is exactly
//! one in-order, gap-free, duplicate-free prefix of the sequence, completed
//! at most once, by a FINAL at index `count - 1`.
#![no_main]

use std::num::NonZeroU16;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use numstream_protocol::{
    ClientId, Disposition, ErrorCode, ErrorFrame, Frame, Progress, ResumeToken, SequenceChecksum,
    SequenceReceiver, Welcome,
};

#[derive(Debug, Arbitrary)]
enum Step {
    /// The connection dropped; the client says hello on a new one.
    Reconnect,
    Welcome {
        count: u16,
        next_index: u16,
        token: [u8; 16],
        interval_us: u32,
        session_ttl_ms: u32,
    },
    Number {
        index: u16,
        value: u32,
    },
    Final {
        index: u16,
        value: u32,
        checksum: u32,
    },
    Heartbeat,
    Error(u8),
    Ack(u32),
    Open(u16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// A receiver cannot be made for 0 numbers (its type says so).
    count: NonZeroU16,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    let mut rx = SequenceReceiver::new(ClientId::from_u128(1), input.count);
    let count = input.count.get();
    rx.hello();
    // The harness's own record of what was accepted.
    let mut accepted = SequenceChecksum::new();
    let mut token: Option<[u8; 16]> = None;
    let mut completed = false;
    for step in input.steps {
        let frame = match step {
            Step::Reconnect => {
                let hello = rx.hello();
                match (&hello, token) {
                    (Frame::Open(open), None) => assert_eq!(open.count, count),
                    (Frame::Resume(resume), Some(t)) => {
                        assert_eq!(resume.token.0, t);
                        assert_eq!(u32::from(resume.next_index), accepted.len());
                    }
                    other => panic!("hello {other:?} does not match the session state"),
                }
                continue;
            }
            Step::Welcome {
                count,
                next_index,
                token,
                interval_us,
                session_ttl_ms,
            } => Frame::Welcome(Welcome {
                count,
                next_index,
                token: ResumeToken(token),
                interval_us,
                session_ttl_ms,
            }),
            Step::Number { index, value } => Frame::Number { index, value },
            Step::Final {
                index,
                value,
                checksum,
            } => Frame::Final {
                index,
                value,
                checksum,
            },
            Step::Heartbeat => Frame::Heartbeat,
            Step::Error(code) => {
                let code = ErrorCode::ALL[usize::from(code) % ErrorCode::ALL.len()];
                Frame::Error(ErrorFrame::new(code, "fuzz").with_disposition(Disposition::Retry))
            }
            Step::Ack(client_checksum) => Frame::Ack { client_checksum },
            Step::Open(count) => Frame::Open(numstream_protocol::Open {
                client_id: ClientId::from_u128(2),
                count,
            }),
        };
        let sent = frame.clone();
        match rx.accept(frame) {
            Ok(Progress::Welcomed(welcome)) => {
                assert!(!completed);
                assert_eq!(welcome.count, count);
                assert_eq!(u32::from(welcome.next_index), accepted.len());
                match token {
                    Some(t) => assert_eq!(t, welcome.token.0),
                    None => token = Some(welcome.token.0),
                }
            }
            Ok(Progress::Number { index, value }) => {
                assert!(!completed);
                assert_eq!(
                    u32::from(index),
                    accepted.len(),
                    "out-of-order number accepted"
                );
                assert!(index < count - 1, "the last number must come as FINAL");
                accepted.push(value);
            }
            Ok(Progress::Completed(outcome)) => {
                assert!(!completed, "completed twice");
                let Frame::Final {
                    index,
                    value,
                    checksum,
                } = sent
                else {
                    panic!("only FINAL completes, not {sent:?}");
                };
                assert_eq!(index, count - 1);
                assert_eq!(u32::from(index), accepted.len());
                accepted.push(value);
                assert_eq!(outcome.count, count);
                assert_eq!(outcome.sum, accepted.sum());
                assert_eq!(outcome.client_checksum, accepted.checksum());
                assert_eq!(outcome.server_checksum, checksum);
                completed = true;
            }
            Ok(Progress::Heartbeat) => assert!(matches!(sent, Frame::Heartbeat)),
            Ok(Progress::ServerError(_)) => assert!(matches!(sent, Frame::Error(_))),
            Err(_) => {}
        }
        assert_eq!(u32::from(rx.received()), accepted.len());
        assert_eq!(rx.running(), accepted);
        assert_eq!(rx.outcome().is_some(), completed);
    }
});
