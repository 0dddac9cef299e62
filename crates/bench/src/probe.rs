//! What a session measures as its numbers arrive: lateness against the
//! schedule the server announced, the time from a forced drop to the
//! first number of the resumed stream, and the session's path through the
//! client's retries (refused before its WELCOME, streams lost after it),
//! so that a retry that ends well cannot hide a failure. The same probe
//! watches numstream sessions (as a client-library `Observer`) and bare
//! ones.

use std::time::Duration;

use numstream_client::{Event, Observer};
use numstream_protocol::ErrorCode;
use tokio::time::Instant;

use crate::proxy::CutSwitch;
use crate::stats::Shards;

#[derive(Debug)]
pub(crate) struct Probe<'a> {
    shard: usize,
    interval: Duration,
    /// Where lateness goes; `None` in burst mode, where the schedule is
    /// "as fast as possible" and lateness means nothing.
    lateness: Option<&'a Shards>,
    /// Arrival of the last WELCOME and the index it announced: number
    /// `index` is due at `at + (index - first) * interval`.
    origin: Option<(Instant, u16)>,
    /// Set for sessions whose connection the load generator cuts.
    resume: Option<(&'a CutSwitch, &'a Shards)>,
    /// The cut being recovered from, once the new connection is welcomed.
    recovering: Option<Instant>,
    pub(crate) numbers: u64,
    pub(crate) path: SessionPath,
}

/// How a session got (or did not get) to its end, from the client's
/// retries: what the final verdict alone does not show.
#[derive(Debug, Default)]
pub(crate) struct SessionPath {
    /// At least one WELCOME arrived (bare: at least one frame).
    pub(crate) welcomed: bool,
    /// A `server_busy` refusal arrived before the first WELCOME.
    pub(crate) refused_busy: bool,
    /// Why each attempt before the first WELCOME failed ([`cause_kind`]).
    pub(crate) admission_causes: Vec<&'static str>,
    /// Why each stream was lost after a WELCOME ([`cause_kind`]): every
    /// entry is a failure after admission, even if a resume then succeeded.
    pub(crate) interruptions: Vec<&'static str>,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(shard: usize, interval: Duration, lateness: Option<&'a Shards>) -> Self {
        Self {
            shard,
            interval,
            lateness,
            origin: None,
            resume: None,
            recovering: None,
            numbers: 0,
            path: SessionPath::default(),
        }
    }

    /// Also measures drop → first resumed number for cuts made by `switch`.
    pub(crate) fn with_resume(mut self, switch: &'a CutSwitch, latency: &'a Shards) -> Self {
        self.resume = Some((switch, latency));
        self
    }

    pub(crate) fn welcomed(&mut self, next_index: u16) {
        self.path.welcomed = true;
        let now = Instant::now();
        self.origin = Some((now, next_index));
        if let Some((switch, _)) = self.resume {
            // Numbers read after a cut but before this WELCOME were already
            // in flight on the old connection; they do not count.
            self.recovering = switch.take_cut();
            switch.set_streaming(true);
        }
    }

    pub(crate) fn number(&mut self, index: u16) {
        self.numbers += 1;
        if self.lateness.is_none() && self.resume.is_none() {
            return;
        }
        let now = Instant::now();
        if let (Some(lateness), Some((origin, first))) = (self.lateness, self.origin) {
            let due = origin + self.interval * u32::from(index.saturating_sub(first));
            let late = now.saturating_duration_since(due);
            if late > Duration::from_secs(1) && std::env::var_os("BENCH_DEBUG").is_some() {
                eprintln!(
                    "session {} index {index} first {first} late {late:?}",
                    self.shard
                );
            }
            lateness.record(self.shard, late);
        }
        if let (Some(cut), Some((_, latency))) = (self.recovering.take(), self.resume) {
            latency.record(self.shard, now.duration_since(cut));
        }
    }

    /// A connection attempt failed or a connection was lost, and the
    /// client will try again.
    pub(crate) fn retrying(&mut self, cause: &str) {
        let kind = cause_kind(cause);
        if self.path.welcomed {
            self.path.interruptions.push(kind);
        } else {
            self.path.refused_busy |= kind == ErrorCode::ServerBusy.as_str();
            self.path.admission_causes.push(kind);
        }
    }
}

impl Observer for Probe<'_> {
    fn event(&mut self, event: &Event) {
        match event {
            Event::Welcomed { next_index, .. } => self.welcomed(*next_index),
            Event::Number { index, .. } => self.number(*index),
            Event::Reconnecting { cause, .. } => self.retrying(cause),
            _ => {}
        }
    }
}

/// A retry's cause in a few words, to count alike causes together: the
/// protocol error code when the server sent one (the client's cause text
/// carries the code's name, e.g. `server error server_busy (8): ...`),
/// else what the client saw of the connection.
pub(crate) fn cause_kind(cause: &str) -> &'static str {
    let named = ErrorCode::ALL
        .iter()
        .filter_map(|code| cause.find(code.as_str()).map(|at| (at, code.as_str())))
        .min();
    if let Some((_, code)) = named {
        return code;
    }
    const PHRASES: &[(&str, &str)] = &[
        ("no WELCOME", "no WELCOME in time"),
        ("closed the connection", "closed by the server"),
        ("no new number", "stalled (no new number)"),
        ("silent for", "silent (no frame)"),
        ("timed out", "connect or send timed out"),
        ("cannot connect", "connect failed"),
        ("bare connection lost", "bare connection lost"),
    ];
    PHRASES
        .iter()
        .find(|(phrase, _)| cause.contains(phrase))
        .map_or("connection error", |&(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_named_by_the_servers_code_first() {
        assert_eq!(
            cause_kind("server error server_busy (8): too many connections"),
            "server_busy"
        );
        // The code comes first; the message may name another.
        assert_eq!(
            cause_kind(
                "server error store_unavailable (12): redis: timed out, not session_unknown"
            ),
            "store_unavailable"
        );
        assert_eq!(
            cause_kind("no WELCOME from 127.0.0.1:7000 within 5s"),
            "no WELCOME in time"
        );
        assert_eq!(
            cause_kind("127.0.0.1:7000 closed the connection"),
            "closed by the server"
        );
        assert_eq!(
            cause_kind("reading from 127.0.0.1:7000: Connection reset by peer (os error 104)"),
            "connection error"
        );
    }

    #[test]
    fn a_loss_after_the_welcome_is_kept_though_the_resume_succeeds() {
        let mut probe = Probe::new(0, Duration::from_secs(1), None);
        probe.event(&Event::Reconnecting {
            cause: "server error server_busy (8): busy".into(),
            delay: Duration::ZERO,
            attempt: 1,
        });
        probe.event(&Event::Welcomed {
            next_index: 0,
            count: 3,
        });
        probe.event(&Event::Number { index: 0, value: 7 });
        probe.event(&Event::Reconnecting {
            cause: "127.0.0.1:7000 closed the connection".into(),
            delay: Duration::ZERO,
            attempt: 1,
        });
        probe.event(&Event::Welcomed {
            next_index: 1,
            count: 3,
        });
        assert!(probe.path.welcomed);
        assert!(probe.path.refused_busy);
        assert_eq!(probe.path.admission_causes, ["server_busy"]);
        assert_eq!(probe.path.interruptions, ["closed by the server"]);
    }
}
