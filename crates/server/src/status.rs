//! The status endpoint (`--metrics-addr`): Prometheus metrics, liveness and
//! readiness over plain HTTP/1.1, for scrapers, load balancers and
//! orchestrators.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | 200, Prometheus text format 0.0.4; `numstream_ready` says what `/readyz` answers at that moment |
//! | `/healthz` | 200 `ok` while the process runs (liveness) |
//! | `/readyz` | 200 `ready` while the server accepts connections (and is not waiting for its run queue to drain), has a free connection slot, does not refuse new sessions for overload, and the session store answers `ping` within [`READY_PING_TIMEOUT`] with room for a session; otherwise 503 and the reason (starting, draining, run queue too deep, at the connection or session limit, overloaded, store down) |
//!
//! It runs beside the session listener on its own address and is bounded
//! like it, with one more duty: an orchestrator that cannot reach
//! `/healthz` restarts the instance (and with the in-memory store every
//! session dies with it), so no client may starve the probes. Hence:
//!
//! - at most [`MAX_STATUS_CONNECTIONS`] kept-alive connections at once,
//!   and at most [`STATUS_CONNECTIONS_PER_ADDRESS`] of them (and of the
//!   spare ones below) from one address, so one address never holds more
//!   than a small share;
//! - a short header timeout, which also closes idle kept-alive
//!   connections, and a lifetime per connection;
//! - when the regular slots are full, up to [`SPARE_STATUS_CONNECTIONS`]
//!   more connections are served one request each, within
//!   [`SPARE_CONNECTION_LIFETIME`], and closed: a probe gets through even
//!   while idle connections from many addresses hold every regular slot.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use numstream_store::SessionStore;

use crate::peers::{PeerKey, PeerLimits, Peers};
use crate::telemetry::{Telemetry, buckets, names};

/// How long `/readyz` waits for the store's answer.
pub const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Regular (kept-alive) status connections served at once.
pub const MAX_STATUS_CONNECTIONS: usize = 32;
/// Status connections one address may hold at once, regular and spare: a
/// scraper and a prober or two need no more.
pub const STATUS_CONNECTIONS_PER_ADDRESS: u32 = 4;
/// Connections served one request each while the regular slots are full;
/// past these, connections are closed at once.
pub const SPARE_STATUS_CONNECTIONS: usize = 32;
/// Everything a spare connection may take, request and answer included.
const SPARE_CONNECTION_LIFETIME: Duration = Duration::from_secs(1);
/// Time a status client has to send its request headers; also how long a
/// kept-alive connection may sit idle between requests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a status connection (kept alive between scrapes) may live.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How often histogram samples are folded into their buckets between
/// scrapes, so memory stays flat when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A Prometheus recorder with numstream's histogram buckets, and a task
/// that keeps its memory flat between scrapes (call inside a runtime).
pub fn prometheus_recorder() -> PrometheusRecorder {
    let mut builder = PrometheusBuilder::new();
    for (name, bounds) in [
        (names::SEND_LATENESS, buckets::SEND_LATENESS),
        (names::TIME_TO_RESUME, buckets::TIME_TO_RESUME),
        (names::STORE_OPERATION_DURATION, buckets::STORE_OPERATION),
    ] {
        builder = builder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name.to_owned()),
                bounds,
            )
            .unwrap_or_else(|_| unreachable!("bucket lists are not empty"));
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_EVERY);
        loop {
            ticks.tick().await;
            handle.run_upkeep();
        }
    });
    recorder
}

/// What the status endpoint reports on.
#[derive(Debug, Clone)]
pub struct Status {
    pub metrics: PrometheusHandle,
    pub telemetry: Telemetry,
    /// The store `/readyz` pings.
    pub store: Arc<dyn SessionStore>,
}

/// Serves the status endpoint on `listener` until the task is dropped.
pub async fn serve_status(listener: TcpListener, status: Status) {
    let status = Arc::new(status);
    let regular = Arc::new(Semaphore::new(MAX_STATUS_CONNECTIONS));
    let spare = Arc::new(Semaphore::new(SPARE_STATUS_CONNECTIONS));
    let per_address = Arc::new(Peers::new(PeerLimits {
        connections: Some(STATUS_CONNECTIONS_PER_ADDRESS),
        ..PeerLimits::UNLIMITED
    }));
    per_address.spawn_sweeper();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "status endpoint: accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(mut ticket) = per_address.admit_connection(PeerKey::from(peer.ip())) else {
            debug!(%peer, "status endpoint: too many connections from this address; closing");
            continue;
        };
        ticket.handshake_done();
        let (slot, keep_alive, lifetime) = match regular.clone().try_acquire_owned() {
            Ok(slot) => (slot, true, CONNECTION_LIFETIME),
            Err(_) => match spare.clone().try_acquire_owned() {
                Ok(slot) => (slot, false, SPARE_CONNECTION_LIFETIME),
                Err(_) => {
                    debug!(%peer, "status endpoint: too many connections; closing");
                    continue;
                }
            },
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(status.respond(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT.min(lifetime))
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(stream), service);
            // A connection past its lifetime is simply closed.
            if let Ok(Err(error)) = tokio::time::timeout(lifetime, connection).await {
                debug!(%peer, %error, "status connection failed");
            }
            drop((slot, ticket));
        });
    }
}

impl Status {
    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served\n".to_owned(),
            );
        }
        match request.uri().path() {
            "/metrics" => {
                // Readiness as a metric, so that alerts see what a load
                // balancer sees (a scrape of a live but unready instance
                // still succeeds: `up` stays 1).
                self.telemetry.set_ready(self.readiness().await.is_ok());
                self.telemetry.refresh();
                let mut response = text(StatusCode::OK, self.metrics.render());
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
            "/readyz" => match self.readiness().await {
                Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; this endpoint serves /metrics, /healthz and /readyz\n".to_owned(),
            ),
        }
    }

    /// Why this instance should not get traffic, if it should not.
    async fn readiness(&self) -> Result<(), String> {
        if !self.telemetry.is_accepting() {
            return Err("not accepting connections (starting or draining)".to_owned());
        }
        // Saturated: new clients would only be told server_busy here, so a
        // load balancer should send them to another instance meanwhile.
        if let Some(limit) = self.telemetry.connections_saturated() {
            return Err(format!(
                "at its connection limit ({limit} connections); new clients get server_busy"
            ));
        }
        if let Some(limit) = self.telemetry.accept_paused() {
            return Err(format!(
                "over {limit} tasks wait in the run queue; not accepting connections until it drains"
            ));
        }
        if let Some(overloaded) = self.telemetry.overloaded() {
            return Err(format!("{overloaded}; new sessions get server_busy"));
        }
        match tokio::time::timeout(READY_PING_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => self.session_room().await,
            Ok(Err(error)) => Err(format!("{} store: {error}", self.store.kind())),
            Err(_) => Err(format!(
                "{} store did not answer within {}",
                self.store.kind(),
                humantime::format_duration(READY_PING_TIMEOUT)
            )),
        }
    }
}

impl Status {
    /// Whether the store has room for a new session (a full store answers
    /// every OPEN server_busy). A store that cannot say is taken to have
    /// room: the ping already answered for its health.
    async fn session_room(&self) -> Result<(), String> {
        match tokio::time::timeout(READY_PING_TIMEOUT, self.store.occupancy()).await {
            Ok(Ok(Some(occupancy))) if occupancy.sessions >= occupancy.max => Err(format!(
                "at its session limit ({} of {} sessions); new sessions get server_busy",
                occupancy.sessions, occupancy.max
            )),
            _ => Ok(()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT));
    response
}
