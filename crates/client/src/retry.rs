//! The client's retry policy as pure code: given how a connection ended,
//! what the run has seen so far and the time (passed in, never read), it
//! decides whether to stop (and with which result) or when to try again
//! and on which port. `session.rs` does the I/O and sleeps; everything it
//! decides between connections is here, testable with simulated time.

use std::time::{Duration, Instant};

use numstream_protocol::{Disposition, ErrorCode, ErrorFrame, Outcome};

use crate::{Backoff, ClientError};

/// How long a client keeps re-sending OPEN when the server says the
/// session already exists because an earlier OPEN of this run created it
/// and its WELCOME was lost. That orphan holds the client id until it
/// expires: up to ~10 s for the server to notice the drop plus the session
/// TTL (30 s by default), so give it comfortably longer.
pub(crate) const LOST_WELCOME_WAIT: Duration = Duration::from_secs(45);

/// How many `taken_over` errors a run answers by resuming again. The usual
/// taker is this client's own stale RESUME (sent on a connection it had
/// already given up, and delivered late), which then dies with its
/// abandoned socket; resuming once takes the session back. A second client
/// holding the token would make the session bounce, so this is small.
pub(crate) const TAKEOVER_RESUMES: u32 = 2;

/// Before the first WELCOME, no attempt starts later than this before the
/// open deadline (or a tenth of the open allowance, if less): an attempt
/// starting at the deadline would have no time to be answered, and its
/// OPEN could leave an orphan session on the server. A second covers a
/// connect and a round trip on any sane network, and a busy server refuses
/// within milliseconds; the tenth keeps a short timeout from ending early.
pub(crate) const LAST_OPEN_WINDOW: Duration = Duration::from_secs(1);

/// How much longer than the session TTL a client keeps resuming (or the
/// TTL itself, if shorter): it stops at `TTL + min(TTL, RESUME_GRACE)`
/// away, unless the server says first that the session is gone.
///
/// The TTL by the client's clock is a lower bound of the session's life,
/// not its end: the server starts the TTL when it notices the drop, up to
/// its dead-peer bound (10 s by default) after the client's last contact,
/// and a server short of CPU answers a RESUME seconds late while it still
/// holds the session. A client that stopped at the TTL gave up sessions the
/// server still held: at 80,000 sessions on one core, hundreds of clients
/// gave up "away for 30 s" after resumes the server had not answered
/// within 10 s (issue 15). Only the server knows when the session is
/// gone, and it says so (`session_unknown`, `session_expired`), so the
/// grace costs a client whose session did expire nothing but that answer.
pub(crate) const RESUME_GRACE: Duration = Duration::from_secs(30);

/// How long after its drop a client keeps resuming a session of `ttl`.
pub(crate) fn resume_patience(ttl: Duration) -> Duration {
    ttl.saturating_add(ttl.min(RESUME_GRACE))
}

/// What the last WELCOME promised about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Terms {
    pub(crate) interval: Duration,
    pub(crate) ttl: Duration,
}

/// How one connection ended.
#[derive(Debug)]
pub(crate) enum Ending {
    /// FINAL arrived and ACK was sent.
    Completed(Outcome),
    /// The connection failed or was lost; resuming may help.
    Lost(String),
    /// The server sent ERROR; its disposition decides what next.
    ServerError(ErrorFrame),
    /// Nothing more can help.
    Fatal(ClientError),
}

/// What the run had seen when a connection ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    /// The connection got a WELCOME.
    pub(crate) welcomed: bool,
    /// The connection delivered at least one new number.
    pub(crate) progressed: bool,
    /// The last WELCOME's terms, if any came in this run.
    pub(crate) terms: Option<Terms>,
    /// OPEN frames sent so far in this run.
    pub(crate) opens_sent: u32,
}

/// What to do after a connection.
#[derive(Debug)]
pub(crate) enum Decision {
    /// The run is over, with this result.
    Stop(Result<(), ClientError>),
    /// Try again on port `port_index` after `delay`.
    Retry {
        delay: Duration,
        port_index: usize,
        attempt: u32,
        cause: String,
    },
}

/// The retry state of one run.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    ports: usize,
    backoff: Backoff,
    /// The backoff after `server_busy` before the first WELCOME.
    busy_backoff: Backoff,
    open_timeout: Duration,
    started: Instant,
    port_index: usize,
    /// Consecutive failed attempts since the last connection that made
    /// progress (or the start).
    attempt: u32,
    /// When the last connection that made progress ended: the session's
    /// TTL counts from there. A WELCOME alone is not progress: a server
    /// that welcomes and then delivers nothing must not keep the client
    /// trying forever.
    dropped_at: Option<Instant>,
    /// Whether the last attempt found an orphan of ours to wait out, which
    /// extends the time allowed before the first WELCOME.
    awaiting_orphan: bool,
    /// `taken_over` errors received so far.
    takeovers: u32,
}

/// What a server ERROR means for the run.
struct Retry {
    cause: String,
    /// The server asked for an immediate resume elsewhere (drain).
    immediate: bool,
    /// An earlier OPEN of this run created the session but its WELCOME
    /// was lost; only time (the orphan's expiry) helps.
    awaits_orphan: bool,
    /// The server said `server_busy`: it is full, not failing.
    busy: bool,
}

impl RetryPolicy {
    pub(crate) fn new(
        ports: usize,
        backoff: Backoff,
        busy_backoff: Backoff,
        open_timeout: Duration,
        started: Instant,
    ) -> Self {
        Self {
            ports: ports.max(1),
            backoff,
            busy_backoff,
            open_timeout,
            started,
            port_index: 0,
            attempt: 0,
            dropped_at: None,
            awaiting_orphan: false,
            takeovers: 0,
        }
    }

    /// The port (index) of the next attempt.
    pub(crate) fn port_index(&self) -> usize {
        self.port_index
    }

    /// Before the first WELCOME the run has a deadline of its own, which
    /// neither a connect nor a handshake wait may overshoot.
    pub(crate) fn open_deadline(&self, terms: Option<Terms>) -> Option<Instant> {
        terms
            .is_none()
            .then(|| deadline_from(self.started, self.open_allowance(self.awaiting_orphan)))
    }

    /// Decides after a connection that ended at `now`; `jitter` draws the
    /// backoff.
    pub(crate) fn decide(
        &mut self,
        now: Instant,
        ending: Ending,
        seen: Seen,
        jitter: &mut impl rand::Rng,
    ) -> Decision {
        if seen.progressed || (seen.welcomed && self.dropped_at.is_none()) {
            self.attempt = 0;
            self.dropped_at = Some(now);
        }
        let away = self
            .dropped_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        let retry = match ending {
            Ending::Completed(outcome) if outcome.verified() => return Decision::Stop(Ok(())),
            Ending::Completed(outcome) => {
                return Decision::Stop(Err(ClientError::ChecksumMismatch {
                    server: outcome.server_checksum,
                    client: outcome.client_checksum,
                }));
            }
            Ending::Fatal(error) => return Decision::Stop(Err(error)),
            Ending::Lost(cause) => Retry {
                cause,
                immediate: false,
                awaits_orphan: false,
                busy: false,
            },
            Ending::ServerError(error) => match self.classify(error, away, seen) {
                Ok(retry) => retry,
                Err(error) => return Decision::Stop(Err(error)),
            },
        };
        self.attempt = self.attempt.saturating_add(1);
        self.awaiting_orphan = retry.awaits_orphan;

        // A RetryNow skips the backoff only while there are untried ports:
        // if every instance is draining, hammering them in a tight loop
        // helps nobody.
        let immediate = retry.immediate && self.attempt as usize <= self.ports;
        let mut delay = if immediate {
            Duration::ZERO
        } else if retry.busy && seen.terms.is_none() {
            // A full server refuses new sessions until some of its
            // sessions end, seconds at best: coming back within 100 ms
            // only adds to the load that made it refuse.
            self.busy_backoff.delay(self.attempt, jitter)
        } else {
            self.backoff.delay(self.attempt, jitter)
        };
        match seen.terms {
            None => {
                // Only time bounds the retries before the first WELCOME,
                // never a number of attempts: a busy server may refuse for
                // a whole session TTL, and the capped backoff already keeps
                // a patient client cheap for it.
                let allowance = self.open_allowance(retry.awaits_orphan);
                let waited = now.saturating_duration_since(self.started);
                let left = allowance.saturating_sub(waited);
                let last_window = LAST_OPEN_WINDOW.min(allowance / 10);
                if left <= last_window {
                    return Decision::Stop(Err(ClientError::CannotConnect {
                        attempts: self.attempt,
                        waited,
                        last_error: retry.cause,
                    }));
                }
                delay = delay.min(left - last_window);
            }
            Some(terms) => {
                let patience = resume_patience(terms.ttl);
                if away >= patience {
                    return Decision::Stop(Err(ClientError::GaveUp {
                        away,
                        ttl: terms.ttl,
                        last_error: retry.cause,
                    }));
                }
                // One last attempt at the end of the patience beats
                // sleeping past it.
                delay = delay.min(patience - away);
            }
        }
        self.port_index = (self.port_index + 1) % self.ports;
        Decision::Retry {
            delay,
            port_index: self.port_index,
            attempt: self.attempt,
            cause: retry.cause,
        }
    }

    /// How long the run may try before its first WELCOME: the open
    /// timeout, or longer while an orphan of ours must expire first.
    fn open_allowance(&self, awaiting_orphan: bool) -> Duration {
        if awaiting_orphan {
            self.open_timeout.max(LOST_WELCOME_WAIT)
        } else {
            self.open_timeout
        }
    }

    /// Turns a server ERROR into a retry decision or the run's final error.
    fn classify(
        &mut self,
        error: ErrorFrame,
        away: Duration,
        seen: Seen,
    ) -> Result<Retry, ClientError> {
        if error.code == ErrorCode::TakenOver && self.takeovers < TAKEOVER_RESUMES {
            self.takeovers += 1;
            return Ok(Retry {
                cause: format!(
                    "taken over ({} of {TAKEOVER_RESUMES} tolerated), probably by a stale \
                     RESUME of ours: {error}",
                    self.takeovers
                ),
                immediate: false,
                awaits_orphan: false,
                busy: false,
            });
        }
        match error.disposition {
            Disposition::RetryNow => Ok(Retry {
                cause: format!("server asked to resume elsewhere: {error}"),
                immediate: true,
                awaits_orphan: false,
                busy: false,
            }),
            Disposition::Retry => Ok(Retry {
                cause: format!("server error {error}"),
                immediate: false,
                awaits_orphan: false,
                busy: error.code == ErrorCode::ServerBusy,
            }),
            // Our own earlier OPEN created this session and the connection
            // died before its WELCOME (and token) reached us. Nobody can
            // resume it, so it expires; then our OPEN succeeds.
            Disposition::Final
                if error.code == ErrorCode::SessionExists
                    && seen.terms.is_none()
                    && seen.opens_sent > 1 =>
            {
                Ok(Retry {
                    cause: format!(
                        "the session an earlier attempt opened lost its WELCOME in transit; \
                         waiting for the server to expire it ({error})"
                    ),
                    immediate: false,
                    awaits_orphan: true,
                    busy: false,
                })
            }
            Disposition::Final => Err(match (error.code, seen.terms) {
                (ErrorCode::ShuttingDown, _) => ClientError::ServerShuttingDown {
                    message: error.message,
                },
                (ErrorCode::TakenOver, _) => ClientError::TakenOver {
                    message: error.message,
                },
                (ErrorCode::SessionExpired, Some(terms)) => ClientError::SessionExpired {
                    away,
                    ttl: terms.ttl,
                },
                // Unknown after the TTL means expired and already forgotten;
                // before it, something else is wrong and the server's own
                // words say it best.
                (ErrorCode::SessionUnknown, Some(terms)) if away >= terms.ttl => {
                    ClientError::SessionExpired {
                        away,
                        ttl: terms.ttl,
                    }
                }
                (code, _) => ClientError::Rejected {
                    code,
                    message: error.message,
                },
            }),
        }
    }
}

/// `from + wait`, saturating far in the future instead of overflowing.
pub(crate) fn deadline_from(from: Instant, wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    from.checked_add(wait.min(CENTURY))
        .or_else(|| from.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const SECOND: Duration = Duration::from_secs(1);

    fn policy(ports: usize, t0: Instant) -> RetryPolicy {
        RetryPolicy::new(ports, Backoff::default(), busy_backoff(), 60 * SECOND, t0)
    }

    fn busy_backoff() -> Backoff {
        Backoff {
            initial: SECOND,
            max: 10 * SECOND,
            multiplier: 2.0,
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn seen(welcomed: bool, progressed: bool, terms: Option<Terms>) -> Seen {
        Seen {
            welcomed,
            progressed,
            terms,
            opens_sent: 1,
        }
    }

    fn terms() -> Option<Terms> {
        Some(Terms {
            interval: SECOND,
            ttl: 30 * SECOND,
        })
    }

    fn error(code: ErrorCode) -> Ending {
        Ending::ServerError(ErrorFrame::new(code, "test"))
    }

    fn retry_delay(decision: Decision) -> (Duration, usize, u32) {
        match decision {
            Decision::Retry {
                delay,
                port_index,
                attempt,
                ..
            } => (delay, port_index, attempt),
            Decision::Stop(result) => panic!("expected a retry, got {result:?}"),
        }
    }

    #[test]
    fn lost_connections_back_off_with_growing_ceilings_and_rotate_ports() {
        let t0 = Instant::now();
        let mut policy = policy(3, t0);
        let mut rng = rng();
        let mut ports = Vec::new();
        for attempt in 1..=8u32 {
            let decision = policy.decide(
                t0,
                Ending::Lost("reset".into()),
                seen(false, false, None),
                &mut rng,
            );
            let (delay, port, counted) = retry_delay(decision);
            assert_eq!(counted, attempt);
            assert!(
                delay <= Backoff::default().ceiling(attempt),
                "attempt {attempt}: {delay:?}"
            );
            ports.push(port);
        }
        assert_eq!(ports, vec![1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn before_the_first_welcome_only_the_open_timeout_bounds_retries() {
        let t0 = Instant::now();
        let mut policy = policy(1, t0);
        let mut rng = rng();
        let busy = || error(ErrorCode::ServerBusy);
        // At 58.5 s the next attempt may wait at most until 59 s.
        let (delay, _, _) = retry_delay(policy.decide(
            t0 + Duration::from_millis(58_500),
            busy(),
            seen(false, false, None),
            &mut rng,
        ));
        assert!(delay <= Duration::from_millis(500), "{delay:?}");
        // In the last second, it gives up.
        let stop = policy.decide(t0 + 59 * SECOND, busy(), seen(false, false, None), &mut rng);
        assert!(matches!(
            stop,
            Decision::Stop(Err(ClientError::CannotConnect { .. }))
        ));
    }

    #[test]
    fn after_a_welcome_the_run_gives_up_once_away_for_the_ttl_and_its_grace() {
        let t0 = Instant::now();
        let mut policy = policy(1, t0);
        let mut rng = rng();
        // A connection that delivered numbers dropped at t0 + 5 s.
        let dropped = t0 + 5 * SECOND;
        let (_, _, attempt) = retry_delay(policy.decide(
            dropped,
            Ending::Lost("eof".into()),
            seen(true, true, terms()),
            &mut rng,
        ));
        assert_eq!(attempt, 1);
        // Away for the TTL (30 s): the server may still hold the session
        // (its TTL starts when it notices the drop), so the run goes on.
        retry_delay(policy.decide(
            dropped + 30 * SECOND,
            Ending::Lost("no WELCOME in time".into()),
            seen(false, false, terms()),
            &mut rng,
        ));
        // 59 s away: one more try, sleeping at most to the end of the
        // grace (TTL + 30 s).
        let (delay, _, _) = retry_delay(policy.decide(
            dropped + 59 * SECOND,
            Ending::Lost("refused".into()),
            seen(false, false, terms()),
            &mut rng,
        ));
        assert!(delay <= SECOND);
        let stop = policy.decide(
            dropped + 60 * SECOND,
            Ending::Lost("refused".into()),
            seen(false, false, terms()),
            &mut rng,
        );
        assert!(matches!(
            stop,
            Decision::Stop(Err(ClientError::GaveUp { .. }))
        ));
    }

    #[test]
    fn the_grace_is_the_ttl_itself_when_shorter() {
        assert_eq!(
            resume_patience(Duration::from_millis(300)),
            Duration::from_millis(600)
        );
        assert_eq!(resume_patience(30 * SECOND), 60 * SECOND);
        assert_eq!(resume_patience(3600 * SECOND), 3630 * SECOND);
    }

    #[test]
    fn a_welcome_without_numbers_does_not_restart_the_ttl_clock() {
        let t0 = Instant::now();
        let mut policy = policy(1, t0);
        let mut rng = rng();
        policy.decide(
            t0,
            Ending::Lost("eof".into()),
            seen(true, true, terms()),
            &mut rng,
        );
        // Welcomed again but no number: the clock still runs from t0.
        let stop = policy.decide(
            t0 + 61 * SECOND,
            Ending::Lost("eof".into()),
            seen(true, false, terms()),
            &mut rng,
        );
        assert!(matches!(
            stop,
            Decision::Stop(Err(ClientError::GaveUp { .. }))
        ));
    }

    #[test]
    fn retry_now_skips_the_backoff_once_per_port() {
        let t0 = Instant::now();
        let mut policy = policy(2, t0);
        let mut rng = rng();
        let drain = || {
            Ending::ServerError(
                ErrorFrame::new(ErrorCode::ShuttingDown, "drain")
                    .with_disposition(Disposition::RetryNow),
            )
        };
        for _ in 0..2 {
            let (delay, _, _) =
                retry_delay(policy.decide(t0, drain(), seen(false, false, terms()), &mut rng));
            assert_eq!(delay, Duration::ZERO);
        }
        // Every port said so: back to the backoff (its draw may be zero,
        // but its ceiling is now the third attempt's).
        let mut delays = Vec::new();
        for _ in 0..20 {
            let (delay, _, _) =
                retry_delay(policy.decide(t0, drain(), seen(false, false, terms()), &mut rng));
            delays.push(delay);
        }
        assert!(delays.iter().any(|delay| !delay.is_zero()));
    }

    #[test]
    fn server_busy_before_the_first_welcome_backs_off_longer() {
        let t0 = Instant::now();
        let mut rng = rng();
        let mut busy_policy = policy(1, t0);
        let mut longest = Duration::ZERO;
        for attempt in 1..=3 {
            let (busy, _, _) = retry_delay(busy_policy.decide(
                t0,
                error(ErrorCode::ServerBusy),
                seen(false, false, None),
                &mut rng,
            ));
            assert!(busy <= busy_backoff().ceiling(attempt));
            longest = longest.max(busy);
        }
        assert!(longest > Backoff::default().ceiling(3), "{longest:?}");
        // Once streaming, a busy server is retried like any other error.
        let mut streaming = policy(1, t0);
        streaming.decide(
            t0,
            Ending::Lost("eof".into()),
            seen(true, true, terms()),
            &mut rng,
        );
        let (delay, _, _) = retry_delay(streaming.decide(
            t0,
            error(ErrorCode::ServerBusy),
            seen(false, false, terms()),
            &mut rng,
        ));
        assert!(delay <= Backoff::default().ceiling(1));
    }

    #[test]
    fn takeovers_are_resumed_twice_then_final() {
        let t0 = Instant::now();
        let mut policy = policy(1, t0);
        let mut rng = rng();
        for _ in 0..TAKEOVER_RESUMES {
            retry_delay(policy.decide(
                t0,
                error(ErrorCode::TakenOver),
                seen(false, false, terms()),
                &mut rng,
            ));
        }
        let stop = policy.decide(
            t0,
            error(ErrorCode::TakenOver),
            seen(false, false, terms()),
            &mut rng,
        );
        assert!(matches!(
            stop,
            Decision::Stop(Err(ClientError::TakenOver { .. }))
        ));
    }

    #[test]
    fn final_errors_stop_with_their_meaning() {
        let t0 = Instant::now();
        let mut rng = rng();
        type Expected = fn(&ClientError) -> bool;
        let cases: [(ErrorCode, Duration, Expected); 4] = [
            (ErrorCode::SessionExpired, SECOND, |e| {
                matches!(e, ClientError::SessionExpired { .. })
            }),
            (ErrorCode::SessionUnknown, 31 * SECOND, |e| {
                matches!(e, ClientError::SessionExpired { .. })
            }),
            (ErrorCode::SessionUnknown, SECOND, |e| {
                matches!(
                    e,
                    ClientError::Rejected {
                        code: ErrorCode::SessionUnknown,
                        ..
                    }
                )
            }),
            (ErrorCode::BadResumeToken, SECOND, |e| {
                matches!(e, ClientError::Rejected { .. })
            }),
        ];
        for (code, away, expected) in cases {
            let mut policy = policy(1, t0);
            policy.decide(
                t0,
                Ending::Lost("eof".into()),
                seen(true, true, terms()),
                &mut rng,
            );
            match policy.decide(
                t0 + away,
                error(code),
                seen(false, false, terms()),
                &mut rng,
            ) {
                Decision::Stop(Err(error)) => assert!(expected(&error), "{code}: {error:?}"),
                other => panic!("{code}: expected a stop, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_lost_welcome_waits_for_its_orphan_longer_than_the_open_timeout() {
        let t0 = Instant::now();
        let mut policy = RetryPolicy::new(1, Backoff::default(), busy_backoff(), 10 * SECOND, t0);
        let mut rng = rng();
        let orphan = Seen {
            opens_sent: 2,
            ..seen(false, false, None)
        };
        // Past the 10 s open timeout, but the orphan wait (45 s) applies.
        let (_, _, _) = retry_delay(policy.decide(
            t0 + 20 * SECOND,
            error(ErrorCode::SessionExists),
            orphan,
            &mut rng,
        ));
        assert_eq!(
            policy.open_deadline(None),
            Some(t0 + LOST_WELCOME_WAIT),
            "the next attempt's deadline follows"
        );
        // A first OPEN that finds the id taken is final.
        let mut fresh = RetryPolicy::new(1, Backoff::default(), busy_backoff(), 10 * SECOND, t0);
        let stop = fresh.decide(
            t0,
            error(ErrorCode::SessionExists),
            seen(false, false, None),
            &mut rng,
        );
        assert!(matches!(
            stop,
            Decision::Stop(Err(ClientError::Rejected { .. }))
        ));
    }

    #[test]
    fn completion_stops_the_run_verified_or_not() {
        let t0 = Instant::now();
        let mut policy = policy(1, t0);
        let mut rng = rng();
        let outcome = |server_checksum| Outcome {
            count: 1,
            sum: 1,
            server_checksum,
            client_checksum: 5,
        };
        assert!(matches!(
            policy.decide(
                t0,
                Ending::Completed(outcome(5)),
                seen(true, true, terms()),
                &mut rng
            ),
            Decision::Stop(Ok(()))
        ));
        assert!(matches!(
            policy.decide(
                t0,
                Ending::Completed(outcome(6)),
                seen(true, true, terms()),
                &mut rng
            ),
            Decision::Stop(Err(ClientError::ChecksumMismatch { .. }))
        ));
    }
}
