//! Text and numbers the server chose, made safe before they reach a
//! person: error messages escaped so they cannot draw on the terminal or
//! forge a line of the summary, and the WELCOME's timing terms clamped so
//! a hostile or broken server cannot keep the client waiting for weeks.

use std::fmt::Write;
use std::time::Duration;

/// The longest session TTL the client believes: it keeps retrying a
/// dropped session for at most this long, whatever WELCOME announced
/// (up to 49.7 days fit in its field). An hour outlasts any sane outage
/// of one server; `--max-duration` bounds a whole run besides.
pub const MAX_TRUSTED_TTL: Duration = Duration::from_secs(3600);

/// The shortest TTL the client assumes: it keeps trying a resume for at
/// least this long even if WELCOME said less (the server refuses a TTL
/// under 100 ms; 0 would give up at the first drop).
pub const MIN_TRUSTED_TTL: Duration = Duration::from_millis(100);

/// The longest interval between numbers the client believes (the
/// server's own maximum): with it come the silence and progress bounds
/// after which a connection counts as dead.
pub const MAX_TRUSTED_INTERVAL: Duration = Duration::from_secs(3600);

/// `ttl` within [`MIN_TRUSTED_TTL`]..=[`MAX_TRUSTED_TTL`].
pub(crate) fn clamp_ttl(ttl: Duration) -> Duration {
    ttl.clamp(MIN_TRUSTED_TTL, MAX_TRUSTED_TTL)
}

/// `interval` at most [`MAX_TRUSTED_INTERVAL`].
pub(crate) fn clamp_interval(interval: Duration) -> Duration {
    interval.min(MAX_TRUSTED_INTERVAL)
}

/// `text` with every character that could act on a terminal or break a
/// line written as an escape: control characters (`\n`, `\r`, `\t`,
/// `\x1b`, ..., C1 included), line and paragraph separators and the
/// bidirectional overrides that reorder what is shown. Everything else,
/// backslashes included, is kept, so escaping twice changes nothing.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{2028}'
            | '\u{2029}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}' => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_reordering_marks_are_escaped() {
        assert_eq!(escape("plain text, 100% fine"), "plain text, 100% fine");
        assert_eq!(
            escape("busy\nresult           OK"),
            "busy\\nresult           OK"
        );
        assert_eq!(
            escape("\u{1b}]0;owned\u{7}\u{1b}[2K\u{1b}[1A\r\t\u{0}\u{7f}\u{85}"),
            "\\x1b]0;owned\\x07\\x1b[2K\\x1b[1A\\r\\t\\x00\\x7f\\x85"
        );
        assert_eq!(
            escape("a\u{2028}b\u{202e}c\u{2066}"),
            "a\\u{2028}b\\u{202e}c\\u{2066}"
        );
        assert_eq!(escape("naïve — ok ✓"), "naïve — ok ✓");
        let once = escape("x\ny\\n");
        assert_eq!(escape(&once), once, "idempotent");
        assert!(
            !escape(&"\u{1b}\n".repeat(100))
                .chars()
                .any(char::is_control)
        );
    }

    #[test]
    fn timing_terms_are_clamped() {
        assert_eq!(
            clamp_ttl(Duration::from_millis(u64::from(u32::MAX))),
            MAX_TRUSTED_TTL
        );
        assert_eq!(clamp_ttl(Duration::ZERO), MIN_TRUSTED_TTL);
        assert_eq!(clamp_ttl(Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(
            clamp_interval(Duration::from_micros(u64::from(u32::MAX))),
            MAX_TRUSTED_INTERVAL
        );
        assert_eq!(clamp_interval(Duration::ZERO), Duration::ZERO);
    }
}
