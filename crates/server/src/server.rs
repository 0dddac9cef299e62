//! The accept loop: admits connections up to the configured bound and
//! within their address's quotas (`peers`), turns away the rest with
//! `server_busy`, and drains everything on shutdown.
//!
//! Shaped like tokio's graceful-shutdown example: one `CancellationToken`
//! tells every task to stop, one `TaskTracker` tells `run` when they have.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use socket2::SockRef;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use numstream_protocol::{ErrorCode, ErrorFrame, Frame, encode_frame};
use numstream_store::{SessionStore, TakeoverNotice};

use crate::config::ServerConfig;
use crate::connection::{self, Shared};
use crate::digest::LogDigest;
use crate::overload::Overload;
use crate::peers::{PeerKey, Peers};
use crate::registry::Registry;
use crate::telemetry::{AdmissionRefusal, HandshakeFailure, Telemetry};

/// Connections being turned away at once; past this, excess connections are
/// closed without a word rather than spending memory on politeness. Each
/// holds a descriptor while it is told, so a connection limit derived from
/// the descriptor limit must leave room for them.
pub const MAX_CONCURRENT_REJECTIONS: usize = 256;
const REJECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// Fatal server errors. Per-connection problems are logged, never returned.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    #[error("the accept loop failed: {0}")]
    AcceptLoop(#[source] tokio::task::JoinError),
}

/// Serves `listener` until `shutdown` is cancelled, then drains: every
/// connection detaches its session and tells its client why, and `run`
/// returns once they are done or `config.shutdown_grace` has passed.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn SessionStore>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    run_with_telemetry(listener, store, config, shutdown, Telemetry::disabled()).await
}

/// [`run`], reporting to `telemetry`: connection and session metrics, and
/// readiness (accepting from the start of the accept loop until the drain).
/// Store operation metrics come from passing a store wrapped by
/// [`crate::InstrumentedStore::wrap`] with the same `telemetry`.
///
/// The accept loop runs as a task of the runtime, whatever thread awaits
/// this (dropping the returned future stops it). Why: a task spawned from
/// one of the runtime's worker threads goes into that worker's own queue,
/// but one spawned from any other thread, such as a binary's main thread
/// in `block_on`, goes into the runtime's shared queue, which a busy worker
/// looks at only once every few dozen polls of its own tasks, so on a
/// server short of CPU new connections waited there behind everything
/// else. Measured (issue 15, 80,000 sessions with Redis on one core):
/// median 71,154 sessions verified in seven runs with the loop on a
/// worker, 57,536 in five with it on the main thread (BENCHMARKS.md).
pub async fn run_with_telemetry(
    listener: TcpListener,
    store: Arc<dyn SessionStore>,
    config: ServerConfig,
    shutdown: CancellationToken,
    telemetry: Telemetry,
) -> Result<(), ServerError> {
    let accept_loop = tokio::spawn(serve_listener(listener, store, config, shutdown, telemetry));
    tokio_util::task::AbortOnDropHandle::new(accept_loop)
        .await
        .map_err(ServerError::AcceptLoop)?
}

/// The body of [`run_with_telemetry`], on a task of its own.
async fn serve_listener(
    listener: TcpListener,
    store: Arc<dyn SessionStore>,
    config: ServerConfig,
    shutdown: CancellationToken,
    telemetry: Telemetry,
) -> Result<(), ServerError> {
    let local = listener
        .local_addr()
        .map_err(ServerError::ListenerAddress)?;
    let grace = config.shutdown_grace;
    let admission = Arc::new(Semaphore::new(config.max_connections));
    let rejections = Arc::new(Semaphore::new(MAX_CONCURRENT_REJECTIONS));
    // Once here rather than for every connection, where accepted sockets
    // inherit the listener's options.
    let send_buffer = config
        .interval
        .is_zero()
        .then_some(config.burst_send_buffer)
        .flatten();
    let socket_options = crate::socket::SocketOptions {
        dead_peer_timeout: config.dead_peer_timeout,
        send_buffer,
    };
    let inherited = crate::socket::ACCEPTED_SOCKETS_INHERIT
        && match crate::socket::configure(SockRef::from(&listener), socket_options) {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, "cannot set socket options on the listener; setting them per connection");
                false
            }
        };
    // With a shared store, lease renewals are a round trip each; batch
    // them (see `renewals`). In memory they cost nanoseconds as they are.
    let store = if store.is_shared() && !store.batches_renewals() {
        crate::renewals::BatchedRenewals::wrap(store)
    } else {
        store
    };
    let overload = Arc::new(Overload::new(config.overload));
    overload.spawn_probe(store.clone(), telemetry.clone(), shutdown.clone());
    telemetry.set_overload(overload.clone());
    let peers = Arc::new(Peers::new(config.per_address));
    peers.spawn_sweeper();
    let digest = Arc::new(LogDigest::new());
    digest.spawn_reporter(config.log_digest_every);
    telemetry.set_connection_limit(config.max_connections);
    let shared = Arc::new(Shared {
        socket_options,
        socket_options_inherited: inherited,
        session_config: Arc::new(connection::session_config(&config, store.is_shared())),
        config,
        store,
        registry: Registry::new(shutdown.clone()),
        shutdown: shutdown.clone(),
        telemetry,
        peers,
        digest,
        overload,
    });
    let tracker = TaskTracker::new();
    // Takeovers by other instances sharing the store stop our streamers
    // within the notice latency; the task ends with `run`.
    let notices = shared
        .store
        .takeover_notices()
        .map(|notices| tokio::spawn(forward_notices(notices, shared.clone())));
    info!(%local, store = shared.store.kind(), "listening");
    shared.telemetry.set_accepting(true);

    let mut accept_backoff = Duration::from_millis(5);
    let runtime = tokio::runtime::Handle::current().metrics();
    // Set when the accept loop first waits for the run queue (see
    // `Overload::wait_for_run_queue`), and kept until it finds the queue
    // short again: the connections taken meanwhile may have waited in the
    // listen backlog since then (how long each did, the kernel does not
    // say, and a backlog that looks empty may only not have been reported
    // yet), so their handshake time counts from then, and an OPEN whose
    // client has stopped waiting gets server_busy rather than a session
    // nobody will take. RESUMEs are unaffected: their hello is in the
    // socket by then, and is read at the door.
    let mut backlog_since: Option<Instant> = None;
    // Connections to take before looking at the run queue again.
    let mut unchecked = 0;
    loop {
        if unchecked > 0 {
            unchecked -= 1;
        } else {
            match shared
                .overload
                .wait_for_run_queue(|| runtime.global_queue_depth(), &shutdown)
                .await
            {
                Some(began) => {
                    shared.telemetry.accept_pause_ended();
                    backlog_since.get_or_insert(began);
                    unchecked = crate::overload::ACCEPTS_AFTER_PAUSE;
                    if shutdown.is_cancelled() {
                        break;
                    }
                }
                None => backlog_since = None,
            }
        }
        let accepted = match backlog_since {
            // Whatever is in the backlog now, without waiting for more:
            // the loop looks at the queue again before it waits.
            Some(_) => match listener.accept().now_or_never() {
                Some(accepted) => accepted,
                None => {
                    unchecked = 0;
                    continue;
                }
            },
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            },
        };
        let (stream, peer) = match accepted {
            Ok(connection) => {
                accept_backoff = Duration::from_millis(5);
                connection
            }
            Err(error) => {
                // Usually EMFILE/ENFILE: out of descriptors. Back off rather
                // than spin; connections finishing will free some.
                warn!(%error, "accept failed; backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(accept_backoff) => {}
                }
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        shared.telemetry.connection_accepted();
        let peer_key = PeerKey::from(peer.ip());
        let early = match shared.config.tls {
            None => crate::door::read_now(&stream),
            Some(_) => crate::door::Early::NOTHING,
        };
        if early.abandoned() {
            debug!(%peer, "the client closed after its hello, before it was accepted");
            shared.handshake_failed(HandshakeFailure::Closed, peer_key);
            continue;
        }
        if crate::door::turned_away(&stream, &early, peer_key, &shared) {
            debug!(%peer, "OPEN refused at the door: overloaded");
            continue;
        }
        // The address's own quotas first: an address over them is refused
        // even while the server has room, so it cannot take the room.
        let ticket = match shared.peers.admit_connection(peer_key) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                debug!(%peer, ?refusal, "address over its connection quota; rejecting");
                shared.admission_refused(refusal.into(), peer_key);
                refuse(
                    stream,
                    refusal.error_frame(peer_key),
                    &rejections,
                    &tracker,
                    &shared,
                );
                continue;
            }
        };
        match admission.clone().try_acquire_owned() {
            Ok(permit) => {
                let admission = connection::Admission::new(
                    permit,
                    shared.telemetry.connection_open(),
                    ticket,
                    backlog_since.unwrap_or_else(Instant::now) + shared.config.handshake_timeout,
                    early,
                );
                configure_socket(&stream, peer, &shared);
                match &shared.config.tls {
                    // Separate tasks, so that a plaintext connection's
                    // task carries nothing of TLS.
                    None => {
                        tracker.spawn(connection::serve(stream, peer, shared.clone(), admission));
                    }
                    Some(tls) => {
                        tracker.spawn(crate::tls::serve(
                            stream,
                            peer,
                            shared.clone(),
                            admission,
                            tls.clone(),
                        ));
                    }
                }
            }
            Err(_) => {
                debug!(%peer, "connection limit reached; rejecting");
                shared.telemetry.connection_over_limit();
                shared.admission_refused(AdmissionRefusal::Connections, peer_key);
                let error = ErrorFrame::new(
                    ErrorCode::ServerBusy,
                    "server is at its connection limit; try again later",
                );
                refuse(stream, error, &rejections, &tracker, &shared);
            }
        }
    }

    // The shutdown token is cancelled: every streaming connection stops.
    shared.registry.stop_all();
    drop(listener);
    shared.telemetry.set_accepting(false);
    tracker.close();
    info!(
        connections = tracker.len(),
        grace = %humantime::format_duration(grace),
        "shutting down: draining connections"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            remaining = tracker.len(),
            "shutdown grace period ended with connections still open"
        );
    }
    if let Some(notices) = notices {
        notices.abort();
    }
    info!("server stopped");
    Ok(())
}

/// Sets the options every connection's socket needs, unless it inherited
/// them from the listener.
fn configure_socket(stream: &tokio::net::TcpStream, peer: std::net::SocketAddr, shared: &Shared) {
    let options = shared.socket_options;
    let inherited = shared.socket_options_inherited
        && crate::socket::has_inherited(SockRef::from(stream), options);
    if inherited {
        return;
    }
    if let Err(error) = crate::socket::configure(SockRef::from(stream), options) {
        debug!(%peer, %error, "could not set socket options");
    }
}

async fn forward_notices(mut notices: BoxStream<'static, TakeoverNotice>, shared: Arc<Shared>) {
    while let Some(notice) = notices.next().await {
        if shared
            .registry
            .supersede(notice.client_id, notice.generation)
        {
            debug!(
                client_id = %notice.client_id,
                generation = notice.generation,
                "another instance took over a session streamed here"
            );
        }
    }
}

/// Tells a connection it is turned away (`error`), while at most
/// [`MAX_CONCURRENT_REJECTIONS`] such answers are in flight; past that it
/// is closed without a word rather than spending memory on politeness.
fn refuse(
    stream: tokio::net::TcpStream,
    error: ErrorFrame,
    rejections: &Arc<Semaphore>,
    tracker: &TaskTracker,
    shared: &Shared,
) {
    let Ok(permit) = rejections.clone().try_acquire_owned() else {
        return;
    };
    shared.telemetry.rejected(error.code);
    tracker.spawn(async move {
        reject(stream, error).await;
        drop(permit);
    });
}

async fn reject(mut stream: tokio::net::TcpStream, error: ErrorFrame) {
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    encode_frame(&Frame::Error(error), &mut buf);
    let _ = tokio::time::timeout(REJECTION_TIMEOUT, async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop is a task of its own (see `run_with_telemetry`), but
    /// it is still `run`'s: dropping `run`'s future stops it, as it did
    /// when the loop ran inside that future, and the port is closed.
    #[tokio::test]
    async fn dropping_runs_future_stops_the_accept_loop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let store = Arc::new(numstream_store::InMemoryStore::new(10));
        let server = tokio::spawn(run(
            listener,
            store,
            ServerConfig::default(),
            CancellationToken::new(),
        ));
        numstream_harness::wait::until(Duration::from_secs(10), "the server accepts", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        server.abort();
        assert!(server.await.is_err_and(|error| error.is_cancelled()));
        numstream_harness::wait::until(Duration::from_secs(10), "the port is closed", || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await;
    }
}
