//! The result of a run, and its two renderings: aligned text for people and
//! one JSON object for scripts.

use crate::ClientError;

/// What a run achieved. Produced by [`crate::run`] whatever happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub client_id: uuid::Uuid,
    /// Numbers requested.
    pub count: u16,
    /// Numbers received and accepted, across all connections (equals
    /// `count` once FINAL arrived).
    pub received: u16,
    /// Arithmetic sum of the numbers received.
    pub sum: u64,
    /// The checksum FINAL carried; `None` if FINAL never arrived.
    pub server_checksum: Option<u32>,
    /// CRC-32C computed over the numbers received so far.
    pub client_checksum: u32,
    /// Connections after the first that got a WELCOME, i.e. successful
    /// resumptions. Failed attempts are not counted: a client that needed
    /// ten tries to get its first WELCOME has 0 reconnects.
    pub reconnects: u32,
    /// True exactly when the whole sequence arrived and the checksums match.
    pub ok: bool,
    /// Why the run failed; `None` when `ok`.
    pub error: Option<ClientError>,
}

/// Width of the label column of [`Report::render_human`]: the longest label
/// ("server checksum", "client checksum") plus two spaces.
const LABEL_WIDTH: usize = 17;

impl Report {
    /// The report as one JSON object with exactly the keys `client_id`
    /// (hyphenated lower-case UUID string), `count`, `received`, `sum`,
    /// `reconnects` (numbers; `sum` is at most 65535 × (2³² − 1) < 2⁵³, so
    /// it is exact even in JavaScript), `server_checksum` (string or null),
    /// `client_checksum` (string), `ok` (bool) and `error` (string or
    /// null). Checksums are strings of the form `"0x%08x"`, lower-case hex,
    /// because that is how people compare them with server logs.
    ///
    /// This is a stable interface for scripts, specified by
    /// `docs/client-report.schema.json` (the binary's tests check real
    /// output against it): keys may be added, never renamed or retyped.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "client_id": self.client_id.hyphenated().to_string(),
            "count": self.count,
            "received": self.received,
            "sum": self.sum,
            "server_checksum": self.server_checksum.map(hex),
            "client_checksum": hex(self.client_checksum),
            "reconnects": self.reconnects,
            "ok": self.ok,
            "error": self.error.as_ref().map(ToString::to_string),
        })
    }

    /// The process exit code for this outcome (see the `EXIT_*` constants).
    pub fn exit_code(&self) -> u8 {
        match (&self.error, self.ok) {
            (None, true) => crate::EXIT_OK,
            (Some(error), _) => error.exit_code(),
            // Unreachable for reports built by `run`, but a hand-made
            // failure without a reason must not pass for success.
            (None, false) => crate::EXIT_CHECKSUM_MISMATCH,
        }
    }

    /// The report as aligned `label  value` lines, one per field, ending
    /// with `result  OK` or `result  FAILED: <reason>` and a newline.
    ///
    /// Every value is escaped ([`crate::escape`]): a reason quoting a
    /// server can neither start a line of its own (forging `result  OK`)
    /// nor send escape sequences to the terminal.
    pub fn render_human(&self) -> String {
        let server_checksum = self
            .server_checksum
            .map_or_else(|| "none (FINAL not received)".to_owned(), hex);
        let result = match (&self.error, self.ok) {
            (None, true) => "OK".to_owned(),
            (Some(error), _) => format!("FAILED: {error}"),
            (None, false) => "FAILED".to_owned(),
        };
        let rows = [
            ("client id", self.client_id.hyphenated().to_string()),
            ("count", self.count.to_string()),
            ("received", self.received.to_string()),
            ("sum", self.sum.to_string()),
            ("server checksum", server_checksum),
            ("client checksum", hex(self.client_checksum)),
            ("reconnects", self.reconnects.to_string()),
            ("result", result),
        ];
        let mut out = String::new();
        for (label, value) in rows {
            let value = crate::escape(&value);
            out.push_str(&format!("{label:<LABEL_WIDTH$}{value}\n"));
        }
        out
    }
}

fn hex(checksum: u32) -> String {
    format!("0x{checksum:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn report(ok: bool, error: Option<ClientError>) -> Report {
        Report {
            client_id: uuid::Uuid::from_u128(0x5f0c_1234_5678_4abc_8def_0123_4567_89ab),
            count: 65535,
            received: 65535,
            sum: 65535 * u64::from(u32::MAX),
            server_checksum: Some(0x1a2b_3c4d),
            client_checksum: 0x1a2b_3c4d,
            reconnects: 2,
            ok,
            error,
        }
    }

    #[test]
    fn json_has_exactly_the_documented_keys_and_types() {
        let text = report(true, None).to_json().to_string();
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let object = value.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "client_checksum",
                "client_id",
                "count",
                "error",
                "ok",
                "received",
                "reconnects",
                "server_checksum",
                "sum"
            ]
        );
        assert_eq!(
            object["client_id"].as_str(),
            Some("5f0c1234-5678-4abc-8def-0123456789ab")
        );
        assert_eq!(object["count"].as_u64(), Some(65535));
        assert_eq!(object["received"].as_u64(), Some(65535));
        assert_eq!(object["sum"].as_u64(), Some(65535 * u64::from(u32::MAX)));
        assert_eq!(object["server_checksum"].as_str(), Some("0x1a2b3c4d"));
        assert_eq!(object["client_checksum"].as_str(), Some("0x1a2b3c4d"));
        assert_eq!(object["reconnects"].as_u64(), Some(2));
        assert_eq!(object["ok"].as_bool(), Some(true));
        assert!(object["error"].is_null());
    }

    #[test]
    fn json_of_a_failure_has_error_text_and_null_server_checksum() {
        let mut failed = report(
            false,
            Some(ClientError::CannotConnect {
                attempts: 10,
                waited: Duration::from_secs(60),
                last_error: "connection refused".into(),
            }),
        );
        failed.server_checksum = None;
        failed.client_checksum = 0xab;
        let value = failed.to_json();
        assert!(value["server_checksum"].is_null());
        assert_eq!(value["client_checksum"].as_str(), Some("0x000000ab"));
        assert_eq!(value["ok"].as_bool(), Some(false));
        let error = value["error"].as_str().expect("error is a string");
        assert!(error.contains("connection refused"), "{error}");
    }

    #[test]
    fn exit_codes_follow_the_error() {
        assert_eq!(report(true, None).exit_code(), 0);
        assert_eq!(
            report(
                false,
                Some(ClientError::ChecksumMismatch {
                    server: 1,
                    client: 2
                })
            )
            .exit_code(),
            1
        );
        assert_eq!(
            report(
                false,
                Some(ClientError::SessionExpired {
                    away: Duration::ZERO,
                    ttl: Duration::ZERO
                })
            )
            .exit_code(),
            3
        );
        assert_eq!(
            report(
                false,
                Some(ClientError::GaveUp {
                    away: Duration::ZERO,
                    ttl: Duration::ZERO,
                    last_error: String::new()
                })
            )
            .exit_code(),
            4
        );
        assert_eq!(
            report(false, Some(ClientError::ProtocolViolation("x".into()))).exit_code(),
            5
        );
        assert_ne!(report(false, None).exit_code(), 0);
    }

    #[test]
    fn human_rendering_is_aligned_for_the_largest_session() {
        let text = report(true, None).render_human();
        assert_eq!(
            text,
            "client id        5f0c1234-5678-4abc-8def-0123456789ab\n\
             count            65535\n\
             received         65535\n\
             sum              281470681677825\n\
             server checksum  0x1a2b3c4d\n\
             client checksum  0x1a2b3c4d\n\
             reconnects       2\n\
             result           OK\n"
        );
    }

    #[test]
    fn a_server_message_cannot_forge_a_line_or_reach_the_terminal() {
        let forged = report(
            false,
            Some(ClientError::Rejected {
                code: numstream_protocol::ErrorCode::Malformed,
                message: "no\nresult           OK\u{1b}]0;pwned\u{7}\u{1b}[1A\u{1b}[2K".into(),
            }),
        );
        let text = forged.render_human();
        assert_eq!(text.lines().count(), 8, "{text}");
        assert_eq!(
            text.lines()
                .filter(|line| line.starts_with("result"))
                .count(),
            1
        );
        assert!(!text.lines().any(|line| line.ends_with("OK")), "{text}");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(text.contains("no\\nresult"), "{text}");
        assert!(text.contains("\\x1b]0;pwned\\x07"), "{text}");
    }

    #[test]
    fn human_rendering_of_a_small_failed_session() {
        let failed = Report {
            count: 1,
            received: 0,
            sum: 0,
            server_checksum: None,
            client_checksum: 0,
            reconnects: 0,
            ..report(
                false,
                Some(ClientError::ProtocolViolation(
                    "expected number 0, server sent number 3".into(),
                )),
            )
        };
        let text = failed.render_human();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8);
        assert_eq!(lines[1], "count            1");
        assert_eq!(lines[4], "server checksum  none (FINAL not received)");
        assert_eq!(lines[5], "client checksum  0x00000000");
        assert_eq!(
            lines[7],
            "result           FAILED: protocol violation by the server: expected number 0, server sent number 3"
        );
        for line in lines {
            assert_eq!(line.as_bytes()[LABEL_WIDTH - 1], b' ', "{line}");
            assert_ne!(line.as_bytes()[LABEL_WIDTH], b' ', "{line}");
        }
    }
}
