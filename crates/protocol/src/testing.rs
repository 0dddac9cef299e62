//! Frames as a correct server would send them, and their bytes, for the
//! tests and tools of other crates (feature `testing`): fake servers,
//! hostile clients, byte-exact fault triggers. Not part of the production
//! API.

use bytes::BytesMut;

use crate::checksum::SequenceChecksum;
use crate::codec::encode_frame;
use crate::frame::{Frame, ResumeToken, Welcome};
use crate::prng::{SessionSeed, number_at};

/// The bytes of `frame` on the wire, length prefix included.
pub fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    buf.to_vec()
}

/// One session as its server knows it: the frames a correct server sends
/// for it, and the checksum a correct client computes.
#[derive(Debug, Clone, Copy)]
pub struct ServedSession {
    pub seed: SessionSeed,
    pub token: ResumeToken,
    pub count: u16,
    /// What its WELCOMEs announce.
    pub interval_us: u32,
    pub session_ttl_ms: u32,
}

impl ServedSession {
    /// A session of `count` numbers keyed by `seed`, announced with no
    /// pacing (interval 0) and a 30 s TTL.
    pub fn new(seed: SessionSeed, token: ResumeToken, count: u16) -> Self {
        Self {
            seed,
            token,
            count,
            interval_us: 0,
            session_ttl_ms: 30_000,
        }
    }

    /// The WELCOME that starts (or resumes) the session at `next_index`.
    pub fn welcome(&self, next_index: u16) -> Frame {
        Frame::Welcome(Welcome {
            count: self.count,
            next_index,
            token: self.token,
            interval_us: self.interval_us,
            session_ttl_ms: self.session_ttl_ms,
        })
    }

    /// The correct frame for `index`: NUMBER, or FINAL with the checksum
    /// for the last one.
    pub fn number(&self, index: u16) -> Frame {
        let value = number_at(&self.seed, index);
        if index.checked_add(1) == Some(self.count) {
            Frame::Final {
                index,
                value,
                checksum: self.expected().checksum(),
            }
        } else {
            Frame::Number { index, value }
        }
    }

    /// What a client that received the whole session computed.
    pub fn expected(&self) -> SequenceChecksum {
        SequenceChecksum::of_session(&self.seed, self.count)
    }
}

/// A server session accepted at `t0` that read `hello`, was attached with
/// the store's `grant` and won its claim: streaming from `t0`. Panics if
/// the session asks for anything else on the way.
pub fn streaming_session(
    config: std::sync::Arc<crate::server::SessionConfig>,
    hello: &[u8],
    grant: crate::server::Grant,
    t0: std::time::Instant,
) -> crate::server::ServerSession {
    use crate::server::{Event, ServerSession};
    let mut session = ServerSession::new(config, t0);
    session.handle_bytes(t0, hello);
    assert!(matches!(session.poll_event(), Some(Event::Admit(_))));
    session.handle_attach(t0, Ok(grant));
    assert!(matches!(session.poll_event(), Some(Event::Claim { .. })));
    session.handle_claim(t0, true);
    session
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{FINAL_FRAME_LEN, NUMBER_FRAME_LEN, WELCOME_FRAME_LEN};

    #[test]
    fn a_served_session_ends_with_its_checksum() {
        let session = ServedSession::new(SessionSeed([3; 32]), ResumeToken([4; 16]), 3);
        assert_eq!(encoded(&session.welcome(0)).len(), WELCOME_FRAME_LEN);
        assert_eq!(encoded(&session.number(1)).len(), NUMBER_FRAME_LEN);
        let mut received = SequenceChecksum::new();
        for index in 0..3 {
            match session.number(index) {
                Frame::Number { value, .. } => received.push(value),
                Frame::Final {
                    value, checksum, ..
                } => {
                    assert_eq!(index, 2, "only the last number is FINAL");
                    assert_eq!(encoded(&session.number(index)).len(), FINAL_FRAME_LEN);
                    received.push(value);
                    assert_eq!(checksum, received.checksum());
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(received, session.expected());
    }
}
