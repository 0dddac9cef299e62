//! What the servers logged during a run, counted: their JSON log lines
//! (`--log-format json`, one object per line, the event's fields at the
//! top) grouped by level and message, and for warnings and errors by the
//! `error` or `why` they name too ("could not detach session [redis:
//! timed out]"), most frequent first.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// Distinct lines kept in the report, most frequent first.
const KEPT: usize = 30;

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LogCounts {
    pub(crate) lines: u64,
    /// Lines that were not JSON objects (a panic message, say).
    pub(crate) unparsed: u64,
    /// `(count, "LEVEL message [error]")`, most frequent first.
    pub(crate) top: Vec<(u64, String)>,
}

/// Counts the log at `path`.
pub(crate) fn count(path: &Path) -> anyhow::Result<LogCounts> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut counts = LogCounts::default();
    let mut by_kind: HashMap<String, u64> = HashMap::new();
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        counts.lines += 1;
        match kind(&line) {
            Some(kind) => *by_kind.entry(kind).or_default() += 1,
            None => counts.unparsed += 1,
        }
    }
    let mut top: Vec<(u64, String)> = by_kind.into_iter().map(|(k, n)| (n, k)).collect();
    top.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    top.truncate(KEPT);
    counts.top = top;
    Ok(counts)
}

/// `LEVEL message`, plus `[error]` for warnings and errors.
fn kind(line: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let level = event.get("level")?.as_str()?;
    let message = event.get("message")?.as_str()?;
    let mut kind = format!("{level} {message}");
    let cause = ["error", "why"]
        .iter()
        .find_map(|key| event.get(*key).and_then(|v| v.as_str()));
    if let (true, Some(cause)) = (matches!(level, "WARN" | "ERROR"), cause) {
        kind.push_str(&format!(" [{cause}]"));
    }
    Some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_grouped_by_level_message_and_cause() {
        let dir = std::env::temp_dir().join(format!("bench-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("servers.log");
        let text = [
            r#"{"level":"INFO","message":"session opened","count":3}"#,
            r#"{"level":"INFO","message":"session opened","count":4}"#,
            r#"{"level":"WARN","message":"could not detach session","error":"redis: timed out"}"#,
            r#"{"level":"WARN","message":"could not detach session","error":"redis: timed out"}"#,
            r#"{"level":"WARN","message":"could not detach session","error":"redis: timed out"}"#,
            r#"{"level":"WARN","message":"stopped streaming","why":"no answer"}"#,
            "thread 'main' panicked",
        ]
        .join("\n");
        std::fs::write(&path, text).expect("write log");
        let counts = count(&path).expect("count");
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert_eq!((counts.lines, counts.unparsed), (7, 1));
        assert_eq!(
            counts.top,
            [
                (
                    3,
                    "WARN could not detach session [redis: timed out]".to_owned()
                ),
                (2, "INFO session opened".to_owned()),
                (1, "WARN stopped streaming [no answer]".to_owned()),
            ]
        );
    }
}
