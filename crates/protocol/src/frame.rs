//! The messages of protocol v1 as typed values, and their error vocabulary.
//!
//! Wire layout lives in [`crate::codec`]; this module only says what each
//! message means. Numeric type tags and error codes are part of the wire
//! format and must never be renumbered.

use std::fmt;

/// A client's identity: a UUID chosen by the client (v4 random by default).
pub type ClientId = uuid::Uuid;

/// The secret that proves a resume comes from the client that opened the
/// session. 128 random bits issued by the server in the first WELCOME.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; 16]);

impl ResumeToken {
    /// Compares two tokens in time independent of where they differ, so a
    /// network attacker cannot learn a token byte by byte from timing.
    pub fn ct_eq(&self, other: &ResumeToken) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

/// Tokens are secrets: they never appear in logs or debug output.
impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeToken(<redacted>)")
    }
}

/// Client → server: start a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub client_id: ClientId,
    /// How many numbers the session carries, `MIN_COUNT..=MAX_COUNT`.
    pub count: u16,
}

/// Client → server: continue an existing session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub client_id: ClientId,
    pub token: ResumeToken,
    /// Index of the first number the client has not received.
    pub next_index: u16,
}

/// Server → client: the session is (re)attached to this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub count: u16,
    /// Index of the first NUMBER the server is about to send.
    pub next_index: u16,
    pub token: ResumeToken,
    /// Gap between consecutive numbers, in microseconds; 0 = as fast as the
    /// connection allows.
    pub interval_us: u32,
    /// How long the session survives a disconnection, in milliseconds. The
    /// client may keep trying to resume for this long after a drop.
    pub session_ttl_ms: u32,
}

/// Whether and how a client should try again after an ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Disposition {
    /// Do not retry: the same request will fail the same way.
    Final = 0,
    /// Retry later, with backoff.
    Retry = 1,
    /// Resume at once, preferably on another server (drain).
    RetryNow = 2,
}

impl Disposition {
    pub fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Final),
            1 => Some(Self::Retry),
            2 => Some(Self::RetryNow),
            _ => None,
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $disp:ident, $label:literal; )*) => {
        /// Every error a server can report. The numeric value is the wire code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl ErrorCode {
            /// All codes, in wire order (for docs, metrics and tests).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            pub fn from_wire(code: u16) -> Option<Self> {
                match code {
                    $( $value => Some(Self::$name), )*
                    _ => None,
                }
            }

            /// The disposition a server attaches to this code unless the
            /// situation calls for another (see `SHUTTING_DOWN`).
            pub fn default_disposition(self) -> Disposition {
                match self {
                    $( Self::$name => Disposition::$disp, )*
                }
            }

            /// Stable snake_case name, used in logs, metrics labels and JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$name => $label, )*
                }
            }
        }
    };
}

error_codes! {
    /// The request could not be parsed, or a frame arrived that is not
    /// allowed in the current state.
    Malformed = 1, Final, "malformed";
    /// The OPEN/RESUME named a protocol version the server does not speak.
    UnsupportedVersion = 2, Final, "unsupported_version";
    /// OPEN asked for a count outside 1..=65535.
    CountOutOfRange = 3, Final, "count_out_of_range";
    /// RESUME for a session whose disconnection TTL has passed.
    SessionExpired = 4, Final, "session_expired";
    /// RESUME for a session the store does not hold: it expired and was
    /// forgotten, it completed, or it never existed.
    SessionUnknown = 5, Final, "session_unknown";
    /// RESUME with a token that does not match the session's.
    BadResumeToken = 6, Final, "bad_resume_token";
    /// RESUME with `next_index >= count`.
    ResumeIndexOutOfRange = 7, Final, "resume_index_out_of_range";
    /// Connection or session capacity is exhausted; try again later.
    ServerBusy = 8, Retry, "server_busy";
    /// A newer connection resumed this session; this one is closed.
    TakenOver = 9, Final, "taken_over";
    /// The server is shutting down. `Final` when sessions die with it
    /// (in-memory store), `RetryNow` when another instance can continue.
    ShuttingDown = 10, Final, "shutting_down";
    /// OPEN for a client id that already has a live session.
    SessionExists = 11, Final, "session_exists";
    /// The session store cannot be reached; nothing was changed.
    StoreUnavailable = 12, Retry, "store_unavailable";
    /// The client did not complete its handshake in time.
    HandshakeTimeout = 13, Retry, "handshake_timeout";
    /// An unexpected server-side failure; nothing was changed.
    Internal = 14, Retry, "internal";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Server → client: the request failed, or the connection is being closed
/// for a reason the client should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub disposition: Disposition,
    /// Protocol versions the server speaks; filled for `UnsupportedVersion`,
    /// usually empty otherwise.
    pub supported_versions: Vec<u16>,
    /// Human-readable explanation, at most `MAX_ERROR_MESSAGE_LEN` bytes.
    pub message: String,
}

impl ErrorFrame {
    /// An error with the code's default disposition. Overlong messages are
    /// cut at a character boundary so the frame always encodes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > crate::MAX_ERROR_MESSAGE_LEN {
            let mut cut = crate::MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self {
            code,
            disposition: code.default_disposition(),
            supported_versions: Vec::new(),
            message,
        }
    }

    pub fn with_disposition(mut self, disposition: Disposition) -> Self {
        self.disposition = disposition;
        self
    }

    pub fn unsupported_version(requested: u16) -> Self {
        let mut frame = Self::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {requested} is not supported; this server speaks {:?}",
                crate::SUPPORTED_VERSIONS
            ),
        );
        frame.supported_versions = crate::SUPPORTED_VERSIONS.to_vec();
        frame
    }
}

impl fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.code as u16, self.message)
    }
}

/// Every frame of protocol v1, in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// C→S `0x01`.
    Open(Open),
    /// C→S `0x02`.
    Resume(Resume),
    /// C→S `0x03`: the client received FINAL and is done; the server may
    /// forget the session. Carries the checksum the client computed so the
    /// server can log a disagreement.
    Ack { client_checksum: u32 },
    /// S→C `0x81`.
    Welcome(Welcome),
    /// S→C `0x82`: one number of the sequence.
    Number { index: u16, value: u32 },
    /// S→C `0x83`: the last number of the sequence and the checksum of all.
    Final {
        index: u16,
        value: u32,
        checksum: u32,
    },
    /// S→C `0x84`: keeps a quiet connection provably alive.
    Heartbeat,
    /// S→C `0x85`.
    Error(ErrorFrame),
}

/// Wire type tags (the byte after the length prefix). Public so that tools
/// which write frames byte by byte (malformed ones above all) name them
/// instead of re-deriving them.
pub mod tag {
    pub const OPEN: u8 = 0x01;
    pub const RESUME: u8 = 0x02;
    pub const ACK: u8 = 0x03;
    pub const WELCOME: u8 = 0x81;
    pub const NUMBER: u8 = 0x82;
    pub const FINAL: u8 = 0x83;
    pub const HEARTBEAT: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_matches_equality() {
        let a = ResumeToken([7; 16]);
        let mut b = a;
        assert!(a.ct_eq(&b));
        b.0[15] ^= 1;
        assert!(!a.ct_eq(&b));
        b = a;
        b.0[0] ^= 0x80;
        assert!(!a.ct_eq(&b));
    }

    #[test]
    fn token_debug_is_redacted() {
        // Exactly the redacted form: a derived Debug would print the bytes
        // (in decimal, `171`, so checking for `ab` alone would pass).
        let token = ResumeToken([0xab; 16]);
        assert_eq!(format!("{token:?}"), "ResumeToken(<redacted>)");
        assert_eq!(format!("{token:#?}"), "ResumeToken(<redacted>)");
    }

    #[test]
    fn error_codes_round_trip_and_are_unique() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(ErrorCode::from_wire(*code as u16), Some(*code));
            for other in &ErrorCode::ALL[i + 1..] {
                assert_ne!(code.as_str(), other.as_str());
            }
        }
        assert_eq!(ErrorCode::from_wire(0), None);
        assert_eq!(ErrorCode::from_wire(999), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let frame = ErrorFrame::new(ErrorCode::Internal, "é".repeat(500));
        assert!(frame.message.len() <= crate::MAX_ERROR_MESSAGE_LEN);
        assert!(frame.message.chars().all(|c| c == 'é'));
    }
}
