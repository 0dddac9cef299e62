//! The run loop: one session across as many TCP connections as it takes.
//!
//! Each connection is OPEN/RESUME, WELCOME, then frames until FINAL, an
//! ERROR or a drop. The pure rules of what is acceptable live in
//! [`SequenceReceiver`]; this module owns the timing around them (connect,
//! handshake and silence timeouts) and carries out what the pure retry
//! policy ([`crate::retry`]) decides between connections.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use numstream_protocol::codec::{CodecError, DecodeError, FrameCodec, decode_frame};
use numstream_protocol::{ErrorFrame, Frame, Progress, SequenceReceiver, client_silence_timeout};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::Framed;

use crate::error::human;
use crate::retry::{Decision, Ending, RetryPolicy, Seen, Terms};
use crate::transport::{self, Connector, HandshakeFailure, TcpConnector};
use crate::untrusted::{clamp_interval, clamp_ttl, escape};
use crate::{ClientConfig, ClientError, Event, Observer, Report};

/// Sending ACK is a courtesy (the server deletes the session sooner); a
/// peer that stopped reading must not keep a finished client waiting.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// After a handshake times out, the next one waits twice as long, up to
/// 2^this times `handshake_timeout` (5 s, 10 s, 20 s by default). A server
/// that accepts but welcomes late is overloaded (a reconnect storm after
/// an outage, a saturated machine); a client that gave up at the same
/// bound every time would re-join the back of its queue, adding a fresh
/// handshake to the load, and might never get in. Any WELCOME resets it.
const MAX_HANDSHAKE_DOUBLINGS: u32 = 2;

/// Fetches the session described by `config`, resuming across dropped
/// connections, and reports the outcome. Never panics: every failure is
/// described in the [`Report`].
///
/// `observer` sees every [`Event`] as it happens.
pub async fn run(config: ClientConfig, observer: &mut dyn Observer) -> Report {
    let connector = TcpConnector::new(config.local_addr, config.tls.clone());
    run_with(config, &connector, observer).await
}

/// [`run`] over connections `connector` opens: the real [`TcpConnector`],
/// or in-memory streams in tests. `config.local_addr` and `config.tls` are
/// the connector's business, not read here.
pub async fn run_with<C: Connector>(
    config: ClientConfig,
    connector: &C,
    observer: &mut dyn Observer,
) -> Report {
    let mut driver = Driver {
        config: &config,
        connector,
        // A count of 0 fails `validate` below, and the receiver is then
        // never fed: any count stands in for it.
        receiver: SequenceReceiver::new(
            config.client_id,
            NonZeroU16::new(config.count).unwrap_or(NonZeroU16::MIN),
        ),
        observer,
        welcomes: 0,
        opens_sent: 0,
        slow_handshakes: 0,
        terms: None,
    };
    let result = match (config.validate(), config.max_duration) {
        (Err(problem), _) => Err(ClientError::InvalidConfig(problem)),
        (Ok(()), None) => driver.drive().await,
        // Whatever the server announces or does, the run ends by then.
        (Ok(()), Some(limit)) => timeout(limit, driver.drive())
            .await
            .unwrap_or(Err(ClientError::MaxDuration { limit })),
    };
    if let Err(error) = &result {
        tracing::debug!(%error, "run failed");
        driver.observer.event(&Event::Failed {
            error: error.to_string(),
        });
    }
    let running = driver.receiver.running();
    Report {
        client_id: config.client_id,
        count: config.count,
        received: driver.receiver.received(),
        sum: running.sum(),
        server_checksum: driver.receiver.outcome().map(|o| o.server_checksum),
        client_checksum: running.checksum(),
        reconnects: driver.welcomes.saturating_sub(1),
        ok: result.is_ok(),
        error: result.err(),
    }
}

struct Driver<'a, C> {
    config: &'a ClientConfig,
    connector: &'a C,
    receiver: SequenceReceiver,
    observer: &'a mut dyn Observer,
    /// Connections that got a WELCOME.
    welcomes: u32,
    /// OPEN frames sent (RESUMEs not counted).
    opens_sent: u32,
    /// Handshakes in a row that got no WELCOME in time.
    slow_handshakes: u32,
    /// Set by the first WELCOME, refreshed by every later one.
    terms: Option<Terms>,
}

impl<C: Connector> Driver<'_, C> {
    async fn drive(&mut self) -> Result<(), ClientError> {
        let ports = &self.config.ports;
        let mut policy = RetryPolicy::new(
            ports.len(),
            self.config.backoff,
            self.config.busy_backoff,
            self.config.open_timeout,
            Instant::now().into_std(),
        );
        loop {
            let port = ports[policy.port_index()];
            let welcomes_before = self.welcomes;
            let received_before = self.receiver.received();
            let open_until = policy.open_deadline(self.terms).map(Instant::from_std);
            let ending = self.connection(port, open_until).await;
            let seen = Seen {
                welcomed: self.welcomes > welcomes_before,
                progressed: self.receiver.received() > received_before,
                terms: self.terms,
                opens_sent: self.opens_sent,
            };
            let now = Instant::now().into_std();
            let (delay, port_index, attempt, cause) =
                match policy.decide(now, ending, seen, &mut rand::rng()) {
                    Decision::Stop(result) => return result,
                    Decision::Retry {
                        delay,
                        port_index,
                        attempt,
                        cause,
                    } => (delay, port_index, attempt, cause),
                };
            tracing::info!(
                cause = %cause,
                delay = %human(delay),
                attempt,
                next_port = ports[port_index],
                "reconnecting"
            );
            self.observer.event(&Event::Reconnecting {
                cause,
                delay,
                attempt,
            });
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection, from TCP connect to FINAL, ERROR or loss.
    /// `open_until`: no connect or handshake wait goes past it.
    async fn connection(&mut self, port: u16, open_until: Option<Instant>) -> Ending {
        let within_open = |wait: Duration| match open_until {
            Some(open_until) => wait.min(open_until.saturating_duration_since(Instant::now())),
            None => wait,
        };
        let host = self.config.host.as_str();
        let connect = self.connector.connect(host, port);
        let connect_wait = within_open(self.config.connect_timeout);
        let (transport, addr) = match timeout_at(deadline_after(connect_wait), connect).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => {
                return Ending::Lost(format!("cannot connect to {host}:{port}: {error}"));
            }
            Err(_) => {
                return Ending::Lost(format!(
                    "connecting to {host}:{port} timed out after {}",
                    human(connect_wait)
                ));
            }
        };
        tracing::debug!(%addr, "connected");
        self.observer.event(&Event::Connected { addr });

        let handshake_wait = self
            .config
            .handshake_timeout
            .saturating_mul(1 << self.slow_handshakes.min(MAX_HANDSHAKE_DOUBLINGS));
        let handshake_wait = within_open(handshake_wait);
        // The server counts its handshake timeout from accept, TLS
        // included; so does the client.
        let deadline = deadline_after(handshake_wait);
        let stream = match timeout_at(deadline, self.connector.secure(transport, host)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(HandshakeFailure::Mismatch(why))) => {
                return Ending::Fatal(ClientError::Tls {
                    message: format!("{addr}: {why}"),
                });
            }
            Ok(Err(HandshakeFailure::PlaintextRetry(error))) => {
                return Ending::ServerError(untrusted_error(error));
            }
            Ok(Err(HandshakeFailure::Broken(error))) => {
                return Ending::Lost(format!("TLS handshake with {addr}: {error}"));
            }
            Err(_) => {
                self.slow_handshakes = self.slow_handshakes.saturating_add(1);
                return Ending::Lost(format!(
                    "no TLS handshake with {addr} within {}",
                    human(handshake_wait)
                ));
            }
        };
        let mut framed = Framed::new(stream, FrameCodec);

        let hello = self.receiver.hello();
        if matches!(hello, Frame::Open(_)) {
            self.opens_sent = self.opens_sent.saturating_add(1);
        }
        let hello_name = hello.name();
        match timeout_at(deadline, framed.send(hello)).await {
            Ok(Ok(())) => {}
            Ok(Err(CodecError::Io(error))) => {
                return lost_or_mismatch(error, format!("sending {hello_name} to {addr}"));
            }
            Ok(Err(error)) => {
                return Ending::Lost(format!("sending {hello_name} to {addr}: {error}"));
            }
            Err(_) => return Ending::Lost(format!("sending {hello_name} to {addr} timed out")),
        }
        let frame = match read_before(&mut framed, deadline, addr).await {
            Ok(frame) => frame,
            Err(ReadError::Ended(ending)) => return ending,
            Err(ReadError::TimedOut) => {
                self.slow_handshakes = self.slow_handshakes.saturating_add(1);
                return Ending::Lost(format!(
                    "no WELCOME from {addr} within {}",
                    human(handshake_wait)
                ));
            }
        };
        let terms = match self.receiver.accept(frame) {
            Ok(Progress::Welcomed(welcome)) => {
                // Believed only within sane bounds: they decide how long
                // this client waits and retries.
                let terms = Terms {
                    interval: clamp_interval(Duration::from_micros(u64::from(welcome.interval_us))),
                    ttl: clamp_ttl(Duration::from_millis(u64::from(welcome.session_ttl_ms))),
                };
                self.welcomes = self.welcomes.saturating_add(1);
                self.slow_handshakes = 0;
                self.terms = Some(terms);
                tracing::debug!(
                    %addr,
                    next_index = welcome.next_index,
                    count = welcome.count,
                    interval = %human(terms.interval),
                    session_ttl = %human(terms.ttl),
                    "welcomed"
                );
                self.observer.event(&Event::Welcomed {
                    next_index: welcome.next_index,
                    count: welcome.count,
                });
                terms
            }
            Ok(Progress::ServerError(error)) => return Ending::ServerError(untrusted_error(error)),
            Ok(other) => {
                // The receiver only accepts WELCOME or ERROR here; kept as
                // a violation rather than a panic in case that ever changes.
                return Ending::Fatal(ClientError::ProtocolViolation(format!(
                    "unexpected {other:?} during the handshake"
                )));
            }
            Err(violation) => {
                return Ending::Fatal(ClientError::ProtocolViolation(violation.to_string()));
            }
        };

        let silence = client_silence_timeout(terms.interval);
        // Heartbeats prove the server is alive, not that the session moves:
        // a number must follow the previous one within an interval plus the
        // silence bound, or the connection is treated as dead.
        let progress_window = terms.interval.saturating_add(silence);
        let mut progress_mark = (self.receiver.received(), Instant::now());
        // Which bound the pending read waits for, to name it if it strikes.
        let mut waiting_for_progress = false;
        loop {
            // A frame already buffered (a burst delivers hundreds per read)
            // is decoded straight from the buffer: no future, no clock read,
            // no timer. The silence timeout only matters when the next read
            // has to wait.
            let buffered = match decode_frame(framed.read_buffer_mut()) {
                Ok(buffered) => buffered,
                Err(error) => return undecodable(error, addr),
            };
            let next = match buffered {
                Some(frame) => Ok(frame),
                None => {
                    let now = Instant::now();
                    if self.receiver.received() != progress_mark.0 {
                        progress_mark = (self.receiver.received(), now);
                    }
                    let silent_at = deadline_from(now, silence);
                    let stalled_at = deadline_from(progress_mark.1, progress_window);
                    waiting_for_progress = stalled_at < silent_at;
                    read_before(&mut framed, silent_at.min(stalled_at), addr).await
                }
            };
            let frame = match next {
                Ok(frame) => frame,
                Err(ReadError::Ended(ending)) => return ending,
                Err(ReadError::TimedOut) if waiting_for_progress => {
                    return Ending::Lost(format!(
                        "no new number from {addr} for {} (interval {})",
                        human(progress_window),
                        human(terms.interval)
                    ));
                }
                Err(ReadError::TimedOut) => {
                    return Ending::Lost(format!(
                        "{addr} silent for {} (interval {})",
                        human(silence),
                        human(terms.interval)
                    ));
                }
            };
            let last = match &frame {
                Frame::Final { index, value, .. } => Some((*index, *value)),
                _ => None,
            };
            match self.receiver.accept(frame) {
                Ok(Progress::Number { index, value }) => {
                    self.observer.event(&Event::Number { index, value });
                }
                Ok(Progress::Heartbeat) => self.observer.event(&Event::Heartbeat),
                Ok(Progress::Completed(outcome)) => {
                    if let Some((index, value)) = last {
                        self.observer.event(&Event::Number { index, value });
                    }
                    send_ack(framed, self.receiver.ack(), addr).await;
                    self.observer.event(&Event::Completed);
                    return Ending::Completed(outcome);
                }
                Ok(Progress::ServerError(error)) => {
                    return Ending::ServerError(untrusted_error(error));
                }
                Ok(Progress::Welcomed(_)) => {
                    return Ending::Fatal(ClientError::ProtocolViolation(
                        "a second WELCOME on one connection".to_owned(),
                    ));
                }
                Err(violation) => {
                    return Ending::Fatal(ClientError::ProtocolViolation(violation.to_string()));
                }
            }
        }
    }
}

/// Sends ACK and closes, best effort: the sequence is already complete, so
/// a failure here changes nothing for the client.
async fn send_ack<S: AsyncRead + AsyncWrite + Unpin>(
    mut framed: Framed<S, FrameCodec>,
    ack: Frame,
    addr: SocketAddr,
) {
    match timeout(ACK_TIMEOUT, async {
        framed.send(ack).await?;
        SinkExt::<Frame>::close(&mut framed).await
    })
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%addr, %error, "could not send ACK"),
        Err(_) => tracing::debug!(%addr, "sending ACK timed out"),
    }
}

/// A broken connection (retry), or a TLS verdict that no retry changes: in
/// TLS 1.3 a server refuses a client certificate only after the
/// handshake, with an alert the first read or write meets.
fn lost_or_mismatch(error: std::io::Error, doing: String) -> Ending {
    match transport::tls_mismatch(&error, None) {
        Some(why) => Ending::Fatal(ClientError::Tls {
            message: format!("{doing}: {why}"),
        }),
        None => Ending::Lost(format!("{doing}: {error}")),
    }
}

/// A server's ERROR with its message made harmless for terminals and log
/// lines, before anything else sees it.
fn untrusted_error(mut error: ErrorFrame) -> ErrorFrame {
    error.message = escape(&error.message);
    error
}

/// `now + wait`, saturating (see [`deadline_from`]).
fn deadline_after(wait: Duration) -> Instant {
    deadline_from(Instant::now(), wait)
}

/// `from + wait`, saturating: a caller may configure an absurdly long
/// timeout, and that must mean "wait a very long time", not a panic.
/// `from + wait` on tokio's clock (see [`crate::retry::deadline_from`]).
fn deadline_from(from: Instant, wait: Duration) -> Instant {
    Instant::from_std(crate::retry::deadline_from(from.into_std(), wait))
}

/// Why no frame came out of [`read_before`].
enum ReadError {
    /// Nothing arrived in time; the caller knows which timeout that was.
    TimedOut,
    /// The connection is over.
    Ended(Ending),
}

/// Bytes that are not a v1 frame mean the stream cannot be trusted, let
/// alone re-synchronised: not a network hiccup to retry.
fn undecodable(error: DecodeError, addr: SocketAddr) -> Ending {
    Ending::Fatal(ClientError::ProtocolViolation(format!(
        "undecodable frame from {addr}: {error}"
    )))
}

/// Reads the next frame, or says why there is none by `deadline`.
async fn read_before<S: AsyncRead + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    deadline: Instant,
    addr: SocketAddr,
) -> Result<Frame, ReadError> {
    match timeout_at(deadline, framed.next()).await {
        Ok(Some(Ok(frame))) => Ok(frame),
        Ok(Some(Err(CodecError::Io(error)))) => Err(ReadError::Ended(lost_or_mismatch(
            error,
            format!("reading from {addr}"),
        ))),
        Ok(Some(Err(CodecError::Decode(error)))) => Err(ReadError::Ended(undecodable(error, addr))),
        Ok(None) => Err(ReadError::Ended(Ending::Lost(format!(
            "{addr} closed the connection"
        )))),
        Err(_) => Err(ReadError::TimedOut),
    }
}
