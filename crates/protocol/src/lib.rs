//! numstream wire protocol, version 1.
//!
//! This crate owns everything two peers must agree on byte for byte: the
//! frame layout and codec ([`frame`], [`codec`]), the per-session number
//! generator ([`prng`]), the sequence checksum ([`checksum`]), the
//! client-side rules for accepting a stream ([`receiver`]) and the server
//! side of a connection ([`server`]). It is sans-IO:
//! no sockets, no clocks, no runtime, so every rule here is testable with
//! plain function calls and reusable by any transport. `PROTOCOL.md` at the
//! repository root is the normative description; this crate is its
//! reference implementation.

pub mod checksum;
pub mod codec;
pub mod frame;
pub mod prng;
pub mod receiver;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use checksum::SequenceChecksum;
pub use codec::{DecodeError, decode_frame, encode_frame};
pub use frame::{
    ClientId, Disposition, ErrorCode, ErrorFrame, Frame, Open, Resume, ResumeToken, Welcome,
};
pub use prng::{SessionSeed, number_at};
pub use receiver::{Outcome, Progress, SequenceReceiver, StreamViolation};

/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: u16 = 1;

/// Every protocol version this implementation speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[PROTOCOL_VERSION];

/// Largest allowed payload (type byte + body) in bytes. The biggest legal v1
/// frame is an ERROR with a full-length message; anything past this bound is
/// rejected before a single byte of it is buffered.
pub const MAX_PAYLOAD_LEN: usize = 512;

/// Smallest and largest number of values a session may carry.
pub const MIN_COUNT: u16 = 1;
/// See [`MIN_COUNT`].
pub const MAX_COUNT: u16 = u16::MAX;

/// Longest human-readable message an ERROR frame may carry, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 400;

/// The ALPN protocol name of numstream v1 over TLS (PROTOCOL.md §2.1): what
/// a client offers and a server insists on.
pub const ALPN_NUMSTREAM: &[u8] = b"numstream/1";

/// Longest silence the server allows itself on a streaming connection: when
/// the interval is longer, it sends HEARTBEAT frames in between.
pub const MAX_SERVER_SILENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a client waits for *any* frame before it declares the connection
/// dead and resumes: twice the longest gap the server promises, plus slack
/// for scheduling delay on a loaded server.
pub fn client_silence_timeout(interval: std::time::Duration) -> std::time::Duration {
    2 * interval.min(MAX_SERVER_SILENCE) + std::time::Duration::from_secs(3)
}
