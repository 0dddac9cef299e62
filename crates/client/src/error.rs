//! Every way a client run can fail, and which process exit code each maps
//! to.

use std::time::Duration;

use numstream_protocol::ErrorCode;

/// Why a run did not end with a verified sequence.
///
/// Clone and comparable (errors from the network are kept as text) so a
/// [`crate::Report`] can be copied, asserted on and rendered freely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// All numbers arrived, but the server's checksum disagrees with the
    /// one computed over them.
    #[error("checksum mismatch: server sent 0x{server:08x}, client computed 0x{client:08x}")]
    ChecksumMismatch { server: u32, client: u32 },

    /// The server refused the session with a `Final` error.
    #[error("server rejected the session: {code}: {message}")]
    Rejected { code: ErrorCode, message: String },

    /// The server no longer holds the session because its disconnection TTL
    /// ran out: it said `session_expired`, or `session_unknown` after the
    /// client had been away longer than the TTL.
    #[error(
        "session expired: the server forgot it after the client was away for {} (session TTL {})",
        human(*away),
        human(*ttl)
    )]
    SessionExpired { away: Duration, ttl: Duration },

    /// Another connection resumed this session (`taken_over`): someone else
    /// holds our token, and continuing would race them.
    #[error("session taken over: another connection resumed it ({message})")]
    TakenOver { message: String },

    /// The server said `shutting_down` with a `Final` disposition: its
    /// sessions live only in its memory and die with it.
    #[error("server shut down; the session cannot survive it ({message})")]
    ServerShuttingDown { message: String },

    /// The server broke the protocol: undecodable bytes, or a frame the
    /// sequence verifier refused. Never retried: a server that lies once
    /// cannot be trusted to continue the sequence.
    #[error("protocol violation by the server: {0}")]
    ProtocolViolation(String),

    /// No server welcomed the session within the open timeout
    /// ([`crate::ClientConfig::open_timeout`]): every attempt failed, and
    /// the next one could not have started in time.
    #[error(
        "cannot connect: no WELCOME after {attempts} attempt(s) in {}; last error: {last_error}",
        human(*waited)
    )]
    CannotConnect {
        attempts: u32,
        /// Time from the start of the run to giving up.
        waited: Duration,
        last_error: String,
    },

    /// The session was open, but no reconnection succeeded within the
    /// session TTL announced by the server and a grace after it (see
    /// `retry::RESUME_GRACE`), so it has expired there; the client did not
    /// get to ask (unlike [`Self::SessionExpired`]).
    #[error(
        "gave up resuming: the session expired after the client was away for {} (session TTL {}); last error: {last_error}",
        human(*away),
        human(*ttl)
    )]
    GaveUp {
        away: Duration,
        ttl: Duration,
        last_error: String,
    },

    /// The [`crate::ClientConfig`] cannot run.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// TLS could not be established, for a reason no retry changes: the
    /// server does not speak TLS on that port (or speaks it without
    /// numstream/1), its certificate is untrusted, expired or for another
    /// name, or it refused this client's certificate.
    #[error("secure connection failed: {message}")]
    Tls { message: String },

    /// The run went on longer than [`crate::ClientConfig::max_duration`].
    #[error("gave up: the run took longer than its maximum duration of {}", human(*limit))]
    MaxDuration { limit: Duration },
}

impl ClientError {
    /// The process exit code this failure maps to (see the `EXIT_*`
    /// constants).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::ChecksumMismatch { .. } => crate::EXIT_CHECKSUM_MISMATCH,
            Self::Rejected { .. }
            | Self::SessionExpired { .. }
            | Self::TakenOver { .. }
            | Self::ServerShuttingDown { .. } => crate::EXIT_REJECTED,
            Self::CannotConnect { .. } | Self::GaveUp { .. } | Self::MaxDuration { .. } => {
                crate::EXIT_CANNOT_CONNECT
            }
            Self::Tls { .. } => crate::EXIT_TLS,
            Self::ProtocolViolation(_) => crate::EXIT_PROTOCOL_VIOLATION,
            Self::InvalidConfig(_) => crate::EXIT_USAGE,
        }
    }
}

/// Durations in messages are for people: millisecond precision is plenty,
/// and humantime would otherwise print down to the nanosecond.
pub(crate) fn human(duration: Duration) -> humantime::FormattedDuration {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_documented_exit_code() {
        let cases = [
            (
                ClientError::ChecksumMismatch {
                    server: 1,
                    client: 2,
                },
                crate::EXIT_CHECKSUM_MISMATCH,
            ),
            (
                ClientError::Rejected {
                    code: ErrorCode::SessionUnknown,
                    message: "x".into(),
                },
                3,
            ),
            (
                ClientError::SessionExpired {
                    away: Duration::ZERO,
                    ttl: Duration::ZERO,
                },
                3,
            ),
            (
                ClientError::TakenOver {
                    message: "x".into(),
                },
                3,
            ),
            (
                ClientError::ServerShuttingDown {
                    message: "x".into(),
                },
                3,
            ),
            (ClientError::ProtocolViolation("x".into()), 5),
            (
                ClientError::CannotConnect {
                    attempts: 1,
                    waited: Duration::ZERO,
                    last_error: "x".into(),
                },
                4,
            ),
            (
                ClientError::GaveUp {
                    away: Duration::ZERO,
                    ttl: Duration::ZERO,
                    last_error: "x".into(),
                },
                4,
            ),
            (ClientError::InvalidConfig("x".into()), 2),
            (
                ClientError::Tls {
                    message: "x".into(),
                },
                6,
            ),
            (
                ClientError::MaxDuration {
                    limit: Duration::from_secs(1),
                },
                4,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.exit_code(), code, "{error}");
        }
    }

    #[test]
    fn messages_are_specific() {
        let expired = ClientError::SessionExpired {
            away: Duration::from_micros(1_234_567),
            ttl: Duration::from_secs(30),
        };
        assert_eq!(
            expired.to_string(),
            "session expired: the server forgot it after the client was away for 1s 234ms (session TTL 30s)"
        );
        let mismatch = ClientError::ChecksumMismatch {
            server: 0xab,
            client: 0x1a2b3c4d,
        };
        assert_eq!(
            mismatch.to_string(),
            "checksum mismatch: server sent 0x000000ab, client computed 0x1a2b3c4d"
        );
        let cannot = ClientError::CannotConnect {
            attempts: 31,
            waited: Duration::from_millis(58_250),
            last_error: "server error server_busy".into(),
        };
        assert_eq!(
            cannot.to_string(),
            "cannot connect: no WELCOME after 31 attempt(s) in 58s 250ms; last error: server error server_busy"
        );
        let shutdown = ClientError::ServerShuttingDown {
            message: "bye".into(),
        };
        assert!(
            shutdown
                .to_string()
                .starts_with("server shut down; the session cannot survive it")
        );
    }
}
