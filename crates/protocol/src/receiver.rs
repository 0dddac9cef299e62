//! The client side of a session as a pure state machine: what to say when a
//! connection opens, and whether each received frame is acceptable.
//!
//! It survives reconnections: the running checksum and the index of the
//! first missing number are all a client needs to resume, so nothing here
//! grows with the count. It never trusts the server: a wrong index, a
//! duplicate, a skipped number, a premature or missing FINAL, or a WELCOME
//! that does not match the session is a [`StreamViolation`], never silently
//! accepted.

use std::num::NonZeroU16;

use crate::checksum::SequenceChecksum;
use crate::frame::{ClientId, ErrorFrame, Frame, Open, Resume, ResumeToken, Welcome};

/// The verified result of a complete sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub count: u16,
    pub sum: u64,
    /// Checksum the server sent in FINAL.
    pub server_checksum: u32,
    /// Checksum computed over the numbers received.
    pub client_checksum: u32,
}

impl Outcome {
    pub fn verified(&self) -> bool {
        self.server_checksum == self.client_checksum
    }
}

/// What an accepted frame meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The handshake succeeded; numbers follow.
    Welcomed(Welcome),
    /// Number `index` was received and counted.
    Number { index: u16, value: u32 },
    /// The server is alive but has nothing to send yet.
    Heartbeat,
    /// The last number and the checksum arrived; the client should send
    /// [`SequenceReceiver::ack`] and close.
    Completed(Outcome),
    /// The server reported an error; the connection is over.
    ServerError(ErrorFrame),
}

/// The server broke the protocol. The connection must be closed; resuming
/// may or may not help, depending on the violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamViolation {
    #[error("server sent {0} where a WELCOME or ERROR was expected")]
    ExpectedWelcome(&'static str),
    #[error("server sent {0}, which a server never sends")]
    ClientFrame(&'static str),
    #[error("server sent {0} after the sequence was complete")]
    AfterCompletion(&'static str),
    #[error("WELCOME says count {got}, but the session has count {expected}")]
    WelcomeCount { expected: u16, got: u16 },
    #[error("WELCOME starts at index {got}, but the first missing index is {expected}")]
    WelcomeIndex { expected: u16, got: u16 },
    #[error("WELCOME carries a different resume token than the session's")]
    WelcomeToken,
    #[error("expected number {expected}, server sent number {got}")]
    WrongIndex { expected: u16, got: u16 },
    #[error("number {index} is the last of {count} but did not come as FINAL")]
    MissingFinal { index: u16, count: u16 },
    #[error("FINAL arrived at index {index}, but the sequence has {count} numbers")]
    EarlyFinal { index: u16, count: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A hello was sent; only WELCOME or ERROR may come.
    AwaitingWelcome,
    Streaming,
    Done(Outcome),
}

/// Client-side session state across any number of connections.
#[derive(Debug, Clone)]
pub struct SequenceReceiver {
    client_id: ClientId,
    /// Never 0: a session has at least one number, its FINAL.
    count: NonZeroU16,
    /// Set by the first WELCOME; its presence means "resume, don't open".
    token: Option<ResumeToken>,
    next_index: u16,
    checksum: SequenceChecksum,
    phase: Phase,
}

impl SequenceReceiver {
    /// A receiver for a session of `count` numbers (a session has at least
    /// one, its FINAL: the type rules out 0, whose last index would not
    /// exist).
    pub fn new(client_id: ClientId, count: NonZeroU16) -> Self {
        Self {
            client_id,
            count,
            token: None,
            next_index: 0,
            checksum: SequenceChecksum::new(),
            phase: Phase::AwaitingWelcome,
        }
    }

    /// The frame to send first on a fresh connection: OPEN until the server
    /// has welcomed us once, RESUME at the first missing index afterwards.
    pub fn hello(&mut self) -> Frame {
        if !matches!(self.phase, Phase::Done(_)) {
            self.phase = Phase::AwaitingWelcome;
        }
        match self.token {
            None => Frame::Open(Open {
                client_id: self.client_id,
                count: self.count.get(),
            }),
            Some(token) => Frame::Resume(Resume {
                client_id: self.client_id,
                token,
                next_index: self.next_index,
            }),
        }
    }

    /// Whether the session has been opened (a resume token is held).
    pub fn is_opened(&self) -> bool {
        self.token.is_some()
    }

    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    pub fn count(&self) -> u16 {
        self.count.get()
    }

    /// The index FINAL must carry.
    fn last_index(&self) -> u16 {
        self.count.get() - 1
    }

    /// How many numbers have been received so far.
    pub fn received(&self) -> u16 {
        self.next_index
    }

    /// Sum and checksum of what has been received so far.
    pub fn running(&self) -> SequenceChecksum {
        self.checksum
    }

    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// The ACK to send once [`Progress::Completed`] was returned.
    pub fn ack(&self) -> Frame {
        Frame::Ack {
            client_checksum: self.checksum.checksum(),
        }
    }

    /// Judges one frame from the server.
    pub fn accept(&mut self, frame: Frame) -> Result<Progress, StreamViolation> {
        if let Frame::Error(error) = frame {
            return Ok(Progress::ServerError(error));
        }
        match self.phase {
            Phase::Done(_) => Err(StreamViolation::AfterCompletion(frame_name(&frame))),
            Phase::AwaitingWelcome => match frame {
                Frame::Welcome(welcome) => self.accept_welcome(welcome),
                other => Err(expected_welcome(&other)),
            },
            Phase::Streaming => match frame {
                Frame::Number { index, value } => {
                    self.check_index(index)?;
                    if index == self.last_index() {
                        return Err(StreamViolation::MissingFinal {
                            index,
                            count: self.count(),
                        });
                    }
                    self.record(value);
                    Ok(Progress::Number { index, value })
                }
                Frame::Final {
                    index,
                    value,
                    checksum,
                } => {
                    self.check_index(index)?;
                    if index != self.last_index() {
                        return Err(StreamViolation::EarlyFinal {
                            index,
                            count: self.count(),
                        });
                    }
                    self.record(value);
                    let outcome = Outcome {
                        count: self.count(),
                        sum: self.checksum.sum(),
                        server_checksum: checksum,
                        client_checksum: self.checksum.checksum(),
                    };
                    self.phase = Phase::Done(outcome);
                    Ok(Progress::Completed(outcome))
                }
                Frame::Heartbeat => Ok(Progress::Heartbeat),
                Frame::Welcome(_) => Err(StreamViolation::ExpectedWelcome("a second WELCOME")),
                other => Err(StreamViolation::ClientFrame(frame_name(&other))),
            },
        }
    }

    fn accept_welcome(&mut self, welcome: Welcome) -> Result<Progress, StreamViolation> {
        if welcome.count != self.count() {
            return Err(StreamViolation::WelcomeCount {
                expected: self.count(),
                got: welcome.count,
            });
        }
        if welcome.next_index != self.next_index {
            return Err(StreamViolation::WelcomeIndex {
                expected: self.next_index,
                got: welcome.next_index,
            });
        }
        match self.token {
            Some(token) if !token.ct_eq(&welcome.token) => {
                return Err(StreamViolation::WelcomeToken);
            }
            Some(_) => {}
            None => self.token = Some(welcome.token),
        }
        self.phase = Phase::Streaming;
        Ok(Progress::Welcomed(welcome))
    }

    fn check_index(&self, index: u16) -> Result<(), StreamViolation> {
        if index == self.next_index {
            Ok(())
        } else {
            Err(StreamViolation::WrongIndex {
                expected: self.next_index,
                got: index,
            })
        }
    }

    fn record(&mut self, value: u32) {
        self.checksum.push(value);
        // Cannot overflow: the largest recorded index is count - 1 <= 65534,
        // so next_index ends at count <= 65535. After FINAL the phase is
        // Done and `hello` is never used to resume again.
        self.next_index += 1;
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Open(_) => "OPEN",
        Frame::Resume(_) => "RESUME",
        Frame::Ack { .. } => "ACK",
        Frame::Welcome(_) => "WELCOME",
        Frame::Number { .. } => "NUMBER",
        Frame::Final { .. } => "FINAL",
        Frame::Heartbeat => "HEARTBEAT",
        Frame::Error(_) => "ERROR",
    }
}

fn expected_welcome(frame: &Frame) -> StreamViolation {
    match frame {
        Frame::Open(_) | Frame::Resume(_) | Frame::Ack { .. } => {
            StreamViolation::ClientFrame(frame_name(frame))
        }
        _ => StreamViolation::ExpectedWelcome(frame_name(frame)),
    }
}

impl Frame {
    /// Upper-case wire name of the frame, for logs and errors.
    pub fn name(&self) -> &'static str {
        frame_name(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prng::{NumberGenerator, SessionSeed};

    const TOKEN: ResumeToken = ResumeToken([9; 16]);

    fn welcome(count: u16, next_index: u16) -> Frame {
        crate::testing::ServedSession::new(SessionSeed([0; 32]), TOKEN, count).welcome(next_index)
    }

    fn receiver(count: u16) -> SequenceReceiver {
        SequenceReceiver::new(
            ClientId::from_bytes([1; 16]),
            NonZeroU16::new(count).expect("a test session has numbers"),
        )
    }

    /// Feeds a correct server's frames for indices `from..to`.
    fn feed(rx: &mut SequenceReceiver, seed: &SessionSeed, from: u16, to: u16) -> Progress {
        let mut numbers = NumberGenerator::starting_at(seed, from);
        let mut last = Progress::Heartbeat;
        for index in from..to {
            let value = numbers.next_number();
            let frame = if index == rx.count() - 1 {
                Frame::Final {
                    index,
                    value,
                    checksum: SequenceChecksum::of_session(seed, rx.count()).checksum(),
                }
            } else {
                Frame::Number { index, value }
            };
            last = rx.accept(frame).expect("valid frame");
        }
        last
    }

    #[test]
    fn resumed_stream_verifies_like_an_uninterrupted_one() {
        let seed = SessionSeed([3; 32]);
        let mut rx = receiver(10);
        assert!(matches!(rx.hello(), Frame::Open(_)));
        rx.accept(welcome(10, 0)).expect("welcome");
        feed(&mut rx, &seed, 0, 4);
        let Frame::Resume(resume) = rx.hello() else {
            panic!("second hello must resume");
        };
        assert_eq!(resume.next_index, 4);
        rx.accept(welcome(10, 4)).expect("welcome on resume");
        let Progress::Completed(outcome) = feed(&mut rx, &seed, 4, 10) else {
            panic!("sequence must complete");
        };
        assert!(outcome.verified());
        assert_eq!(outcome.sum, SequenceChecksum::of_session(&seed, 10).sum());
    }

    #[test]
    fn duplicates_gaps_and_misplaced_finals_are_violations() {
        let mut rx = receiver(5);
        rx.hello();
        rx.accept(welcome(5, 0)).expect("welcome");
        rx.accept(Frame::Number { index: 0, value: 1 })
            .expect("first");
        assert_eq!(
            rx.accept(Frame::Number { index: 0, value: 1 }),
            Err(StreamViolation::WrongIndex {
                expected: 1,
                got: 0
            })
        );
        assert!(rx.accept(Frame::Number { index: 2, value: 1 }).is_err());
        assert!(matches!(
            rx.accept(Frame::Final {
                index: 1,
                value: 0,
                checksum: 0
            }),
            Err(StreamViolation::EarlyFinal { .. })
        ));
        for index in 1..4 {
            rx.accept(Frame::Number { index, value: 1 })
                .expect("number");
        }
        assert!(matches!(
            rx.accept(Frame::Number { index: 4, value: 1 }),
            Err(StreamViolation::MissingFinal { .. })
        ));
    }

    #[test]
    fn wrong_checksum_completes_unverified() {
        let mut rx = receiver(1);
        rx.hello();
        rx.accept(welcome(1, 0)).expect("welcome");
        let Ok(Progress::Completed(outcome)) = rx.accept(Frame::Final {
            index: 0,
            value: 5,
            checksum: 1234,
        }) else {
            panic!("final must complete");
        };
        assert!(!outcome.verified());
        assert!(rx.accept(Frame::Heartbeat).is_err());
    }

    #[test]
    fn mismatched_welcomes_are_violations() {
        let mut rx = receiver(5);
        rx.hello();
        assert!(rx.accept(Frame::Number { index: 0, value: 1 }).is_err());
        assert!(matches!(
            rx.accept(welcome(6, 0)),
            Err(StreamViolation::WelcomeCount { .. })
        ));
        assert!(matches!(
            rx.accept(welcome(5, 1)),
            Err(StreamViolation::WelcomeIndex { .. })
        ));
        rx.accept(welcome(5, 0)).expect("welcome");
        rx.hello();
        let mut other_token = welcome(5, 0);
        if let Frame::Welcome(w) = &mut other_token {
            w.token = ResumeToken([1; 16]);
        }
        assert_eq!(rx.accept(other_token), Err(StreamViolation::WelcomeToken));
    }
}
