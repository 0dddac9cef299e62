//! The progress notifications a run emits, and the [`Observer`] hook that
//! receives them (progress bars, tests, load generators).

use std::net::SocketAddr;
use std::time::Duration;

/// Something that happened during a run, in the order it happened.
///
/// Non-exhaustive: new kinds of events may be added, so match with a
/// wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A TCP connection to `addr` is established; OPEN or RESUME follows.
    Connected { addr: SocketAddr },
    /// The server accepted the session on this connection; numbers from
    /// `next_index` on follow.
    Welcomed { next_index: u16, count: u16 },
    /// Number `index` arrived and was accepted (FINAL's value included).
    Number { index: u16, value: u32 },
    /// The server proved it is alive without sending a number.
    Heartbeat,
    /// A connection attempt failed or an established connection was lost;
    /// the client waits `delay` and tries again. `attempt` counts the
    /// consecutive failures since the last WELCOME (1 for the first).
    Reconnecting {
        cause: String,
        delay: Duration,
        attempt: u32,
    },
    /// The whole sequence arrived (verified or not); the ACK has been sent.
    Completed,
    /// The run ended without a verified sequence; the same text is in the
    /// report's `error`.
    Failed { error: String },
}

/// Receives every [`Event`] of a run, synchronously and in order.
///
/// Called on the connection task between reads, so it must be quick: a slow
/// observer delays reading from the socket.
pub trait Observer: Send {
    fn event(&mut self, event: &Event) {
        let _ = event;
    }
}

/// Ignores every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// So callers without an observer can write `run(config, &mut ())`.
impl Observer for () {}

/// Collects every event; handy in tests.
impl Observer for Vec<Event> {
    fn event(&mut self, event: &Event) {
        self.push(event.clone());
    }
}
