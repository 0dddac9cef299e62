//! What a session measures as its numbers arrive: lateness against the
//! schedule the server announced, and the time from a forced drop to the
//! first number of the resumed stream. The same probe watches numstream
//! sessions (as a client-library `Observer`) and bare ones.

use std::time::Duration;

use numstream_client::{Event, Observer};
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
        }
    }

    /// Also measures drop → first resumed number for cuts made by `switch`.
    pub(crate) fn with_resume(mut self, switch: &'a CutSwitch, latency: &'a Shards) -> Self {
        self.resume = Some((switch, latency));
        self
    }

    pub(crate) fn welcomed(&mut self, next_index: u16) {
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
}

impl Observer for Probe<'_> {
    fn event(&mut self, event: &Event) {
        match event {
            Event::Welcomed { next_index, .. } => self.welcomed(*next_index),
            Event::Number { index, .. } => self.number(*index),
            _ => {}
        }
    }
}
