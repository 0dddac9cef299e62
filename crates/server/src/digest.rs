//! One periodic info line for the events a peer can cause at will: failed
//! handshakes (garbage, timeouts, hang-ups) and refusals at admission
//! (limits reached). Logged one by one they would let any client write the
//! server's logs for it (a loop of malformed hellos was about 10 GB an hour
//! from one thread); each still has its debug line, and every reason has a
//! counter in `/metrics`.
//!
//! The digest says how many of each happened in the period and which
//! addresses caused the most, which is what an operator needs to decide
//! whether to tune a limit or block an address.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracing::info;

use crate::peers::PeerKey;
use crate::telemetry::{AdmissionRefusal, HandshakeFailure};

/// Addresses tracked per period; past this, new ones are counted in the
/// totals but not by address (a flood from many addresses cannot grow the
/// table without bound).
const MAX_TRACKED_ADDRESSES: usize = 4096;
/// Heaviest addresses named in each digest line.
const TOP_ADDRESSES: usize = 3;

/// Tallies since the last digest line.
#[derive(Debug)]
pub(crate) struct LogDigest {
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    refusals: [AtomicU64; AdmissionRefusal::ALL.len()],
    by_address: Mutex<HashMap<PeerKey, u64>>,
}

impl LogDigest {
    pub(crate) fn new() -> Self {
        Self {
            handshake_failures: std::array::from_fn(|_| AtomicU64::new(0)),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            by_address: Mutex::default(),
        }
    }

    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure, peer: PeerKey) {
        self.handshake_failures[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.blame(peer);
    }

    pub(crate) fn refused(&self, reason: AdmissionRefusal, peer: PeerKey) {
        self.refusals[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.blame(peer);
    }

    fn blame(&self, peer: PeerKey) {
        let mut by_address = self
            .by_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tracked = by_address.len();
        match by_address.get_mut(&peer) {
            Some(count) => *count += 1,
            None if tracked < MAX_TRACKED_ADDRESSES => {
                by_address.insert(peer, 1);
            }
            None => {}
        }
    }

    /// The digest of everything since the last call, and a fresh start;
    /// `None` when nothing happened.
    pub(crate) fn take(&self) -> Option<String> {
        let mut line = String::new();
        let mut total = 0;
        let mut section = |name: &str, counts: Vec<(&str, u64)>| {
            let counts: Vec<_> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
            if counts.is_empty() {
                return;
            }
            let _ = write!(line, "{}{name}:", if line.is_empty() { "" } else { "; " });
            for (reason, count) in counts {
                total += count;
                let _ = write!(line, " {reason}={count}");
            }
        };
        section(
            "handshake failures",
            HandshakeFailure::ALL
                .iter()
                .map(|r| {
                    (
                        r.as_str(),
                        self.handshake_failures[r.index()].swap(0, Ordering::Relaxed),
                    )
                })
                .collect(),
        );
        section(
            "refused",
            AdmissionRefusal::ALL
                .iter()
                .map(|r| {
                    (
                        r.as_str(),
                        self.refusals[r.index()].swap(0, Ordering::Relaxed),
                    )
                })
                .collect(),
        );
        let by_address = std::mem::take(
            &mut *self
                .by_address
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if total == 0 {
            return None;
        }
        let mut heaviest: Vec<_> = by_address.into_iter().collect();
        heaviest.sort_unstable_by_key(|&(_, count)| std::cmp::Reverse(count));
        let _ = write!(line, "; most from:");
        for (peer, count) in heaviest.into_iter().take(TOP_ADDRESSES) {
            let _ = write!(line, " {peer} ({count})");
        }
        Some(line)
    }

    /// Logs a digest every `every` (when there is anything to say) until
    /// the last `Arc` is dropped.
    pub(crate) fn spawn_reporter(self: &Arc<Self>, every: Duration) {
        let digest: Weak<Self> = Arc::downgrade(self);
        // The first period starts now, not whenever the task first runs.
        let first = tokio::time::Instant::now() + every;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(first, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(digest) = digest.upgrade() else {
                    return;
                };
                if let Some(summary) = digest.take() {
                    info!(
                        period = %humantime::format_duration(every),
                        "connections that failed or were refused: {summary}"
                    );
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn peer(last: u8) -> PeerKey {
        PeerKey::from(IpAddr::V4(Ipv4Addr::new(198, 51, 100, last)))
    }

    #[test]
    fn a_digest_counts_each_reason_names_the_heaviest_addresses_and_resets() {
        let digest = LogDigest::new();
        assert_eq!(digest.take(), None, "nothing happened");
        for _ in 0..5 {
            digest.handshake_failed(HandshakeFailure::Malformed, peer(1));
        }
        digest.handshake_failed(HandshakeFailure::Timeout, peer(2));
        for _ in 0..3 {
            digest.refused(AdmissionRefusal::SessionRatePerAddress, peer(1));
        }
        let line = digest.take().expect("a digest");
        assert_eq!(
            line,
            "handshake failures: timeout=1 malformed=5; refused: \
             new_session_rate_per_address=3; most from: 198.51.100.1 (8) 198.51.100.2 (1)"
        );
        assert_eq!(digest.take(), None, "taken means reset");
    }

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned();
            text.lines().map(str::to_owned).collect()
        }
    }

    async fn let_tasks_run() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_reporter_logs_once_a_period_and_not_when_quiet() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let digest = Arc::new(LogDigest::new());
        let every = Duration::from_secs(60);
        digest.spawn_reporter(every);
        for _ in 0..3 {
            digest.handshake_failed(HandshakeFailure::Malformed, peer(7));
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        let_tasks_run().await;
        assert!(captured.lines().is_empty(), "{:?}", captured.lines());
        tokio::time::advance(Duration::from_secs(1)).await;
        let_tasks_run().await;
        let lines = captured.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(" INFO "), "{}", lines[0]);
        assert!(
            lines[0].contains("handshake failures: malformed=3; most from: 198.51.100.7 (3)"),
            "{}",
            lines[0]
        );
        // A quiet period says nothing.
        tokio::time::advance(every).await;
        let_tasks_run().await;
        assert_eq!(captured.lines().len(), 1);
    }

    #[test]
    fn the_address_table_is_bounded() {
        let digest = LogDigest::new();
        for n in 0..(MAX_TRACKED_ADDRESSES as u32 + 100) {
            let peer = PeerKey::from(IpAddr::V4(Ipv4Addr::from_bits(n)));
            digest.handshake_failed(HandshakeFailure::Closed, peer);
        }
        assert_eq!(
            digest.by_address.lock().expect("lock").len(),
            MAX_TRACKED_ADDRESSES
        );
        let line = digest.take().expect("a digest");
        assert!(
            line.starts_with("handshake failures: closed=4196;"),
            "{line}"
        );
    }
}
