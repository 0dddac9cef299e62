//! The accept loop: admits connections up to the configured bound and
//! within their address's quotas (`peers`), turns away the rest with
//! `server_busy`, and drains everything on shutdown.
//!
//! Shaped like tokio's graceful-shutdown example: one `CancellationToken`
//! tells every task to stop, one `TaskTracker` tells `run` when they have.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use socket2::SockRef;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
use crate::telemetry::{AdmissionRefusal, Telemetry};

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
    #[error("cannot move the listener to the accept loop's runtime: {0}")]
    Listener(#[source] std::io::Error),
    #[error("cannot start the accept loop's thread: {0}")]
    DoorThread(#[source] std::io::Error),
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
pub async fn run_with_telemetry(
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

    // The accept loop runs on a thread of its own at a lower priority
    // (`Door`): a storm of new connections takes what CPU the streams
    // leave, not the other way round.
    let door = Door {
        listener: listener.into_std().map_err(ServerError::Listener)?,
        shared: shared.clone(),
        tracker: tracker.clone(),
        streams: tokio::runtime::Handle::current(),
        admission,
        rejections,
    };
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("numstream-door".to_owned())
        .spawn(move || {
            let _ = closed_tx.send(door.run_on_this_thread());
        })
        .map_err(ServerError::DoorThread)?;
    // The door closes the listener on shutdown, or on its own failure
    // (then `run` drains what was admitted and reports it); a panic there
    // drops the sender, and the server drains all the same.
    let door_failed = match closed.await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => {
            // Everything admitted stops and drains, as on shutdown.
            shutdown.cancel();
            Some(error)
        }
        Err(_) => {
            warn!("the accept loop's thread panicked; shutting down");
            shutdown.cancel();
            None
        }
    };

    // The shutdown token is cancelled: every streaming connection stops.
    shared.registry.stop_all();
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
    door_failed.map_or(Ok(()), Err)
}

/// The accept loop and what it needs: admits connections up to the bound
/// and within their address's quotas, turns the rest away, and hands
/// admitted connections to the runtime that streams (`streams`).
///
/// It runs on a current-thread runtime on a thread of its own, at a lower
/// scheduling priority than the streams' threads ([`DOOR_NICENESS`]). Why:
/// a server short of CPU has more clients knocking than it can take (each
/// refused client comes back, every few seconds, until it is let in), and
/// on one runtime their connections, hellos and refusals sat in the same
/// run queue as the streams, each making every stream later: at 80,000
/// sessions on one core the lag reached 10 s with the number of streams
/// flat (issue 15), and admitted streams were lost to it. Here the kernel
/// gives the streams' threads the core first and the door what they leave
/// (at least about a tenth of it per server), so the storm slows the door,
/// not the streams. The door itself stays cheap: an OPEN it can refuse at
/// once is refused in the loop ([`crate::door`]), with no task.
struct Door {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    streams: tokio::runtime::Handle,
    admission: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
}

/// The door thread's niceness, relative to the process's (Linux nice
/// values: the kernel weighs 0 against 5 about 3:1, so under contention
/// the streams' thread gets three quarters of a core, the door a quarter).
const DOOR_NICENESS: i32 = 5;

impl Door {
    /// Serves until the server's shutdown; then closes the listener and
    /// lets refusals in flight finish (each is bounded).
    fn run_on_this_thread(self) -> Result<(), ServerError> {
        lower_this_threads_priority();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServerError::DoorThread)?;
        runtime.block_on(async move {
            let rejections = self.rejections.clone();
            let result = self.run().await;
            // Refusals in flight run on this runtime: let them end (each
            // is bounded by REJECTION_TIMEOUT) before it goes.
            let _ = rejections
                .acquire_many(MAX_CONCURRENT_REJECTIONS as u32)
                .await;
            result
        })
    }

    async fn run(self) -> Result<(), ServerError> {
        let Door {
            listener,
            shared,
            tracker,
            streams,
            admission,
            rejections,
        } = self;
        let listener = TcpListener::from_std(listener).map_err(ServerError::Listener)?;
        let shutdown = shared.shutdown.clone();
        // Connections whose hello is being read (`let_in`), on this thread.
        let hellos = TaskTracker::new();
        let mut accept_backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
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
                        tokio::time::Instant::now() + shared.config.handshake_timeout,
                    );
                    configure_socket(&stream, peer, &shared);
                    match &shared.config.tls {
                        // The hello is read here, on the door's thread
                        // (`door::read_hello`), then the connection goes on
                        // to the streams' runtime, or is refused at once.
                        None => {
                            hellos.spawn(let_in(
                                stream,
                                peer,
                                admission,
                                shared.clone(),
                                tracker.clone(),
                                streams.clone(),
                            ));
                        }
                        // TLS's first bytes are its handshake: all of it
                        // runs with the connection, on the streams' runtime,
                        // in a task of its own that carries TLS.
                        Some(tls) => {
                            let Some(stream) = hand_over(stream, peer, &streams) else {
                                continue;
                            };
                            tracker.spawn_on(
                                crate::tls::serve(
                                    stream,
                                    peer,
                                    shared.clone(),
                                    admission,
                                    tls.clone(),
                                ),
                                &streams,
                            );
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
        // On shutdown each hello being read is handed on at once, and its
        // connection's task says why it closes.
        drop(listener);
        hellos.close();
        hellos.wait().await;
        Ok(())
    }
}

/// A plaintext connection's way in: reads its hello on the door's thread,
/// refuses it there if it is an OPEN the server turns away at once, and
/// otherwise hands it, hello read, to the streams' runtime.
async fn let_in(
    mut stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    mut admission: connection::Admission,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    streams: tokio::runtime::Handle,
) {
    let early =
        crate::door::read_hello(&mut stream, admission.handshake_deadline, &shared.shutdown).await;
    if crate::door::turned_away(&stream, &early, PeerKey::from(peer.ip()), &shared) {
        debug!(%peer, "OPEN refused at the door: overloaded");
        return;
    }
    admission.early = early;
    let Some(stream) = hand_over(stream, peer, &streams) else {
        return;
    };
    tracker.spawn_on(connection::serve(stream, peer, shared, admission), &streams);
}

/// Moves `stream` from the door's runtime to the streams' runtime, whose
/// reactor then watches it; `None` (closing it) if the system refuses.
fn hand_over(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    streams: &tokio::runtime::Handle,
) -> Option<tokio::net::TcpStream> {
    let moved = stream.into_std().and_then(|stream| {
        let _streams = streams.enter();
        tokio::net::TcpStream::from_std(stream)
    });
    moved
        .inspect_err(
            |error| debug!(%peer, %error, "could not hand the connection over; closing it"),
        )
        .ok()
}

/// Lowers the calling thread's scheduling priority by [`DOOR_NICENESS`]
/// (on Linux a thread's niceness is its own); if the system refuses, the
/// door runs at the process's priority, as a single runtime would.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        let current = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
        if let Err(error) =
            rustix::process::setpriority_process(Some(thread), current + DOOR_NICENESS)
        {
            warn!(%error, "cannot lower the accept loop's priority; it competes with the streams");
        }
    }
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
