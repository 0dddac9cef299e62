//! Test support for this crate's users (feature `testing`): a server
//! running inside the test process on a loopback port the kernel picked, a
//! configuration with short bounds, and TLS from certificates made for a
//! test. Not part of the production API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use numstream_protocol::ClientId;
use numstream_store::{InMemoryStore, SessionInfo, SessionStore};

use crate::{ServerConfig, ServerTls, TlsFiles};

/// A server running inside the test process on 127.0.0.1, on the port the
/// kernel gave its listener.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<dyn SessionStore>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// What the store holds of `id` now (`None`: nothing).
    ///
    /// # Panics
    /// If the store fails to answer.
    pub async fn session(&self, id: ClientId) -> Option<SessionInfo> {
        self.store
            .lookup(id)
            .await
            .expect("the store answers a lookup")
    }

    /// Starts a server with an in-memory store.
    pub async fn start(config: ServerConfig) -> Self {
        Self::start_with_store(config, Arc::new(InMemoryStore::new(100_000))).await
    }

    pub async fn start_with_store(config: ServerConfig, store: Arc<dyn SessionStore>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free loopback port");
        let addr = listener.local_addr().expect("listener address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let store = store.clone();
            let shutdown = shutdown.clone();
            async move {
                crate::run(listener, store, config, shutdown)
                    .await
                    .expect("server run");
            }
        });
        Self {
            addr,
            store,
            shutdown,
            task: Some(task),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Starts a graceful shutdown and waits (bounded) for `run` to return.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server must stop within its grace period")
                .expect("server task must not panic");
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A test config: short interval, short timeouts, reproducible seed.
pub fn fast_config() -> ServerConfig {
    ServerConfig {
        interval: Duration::from_millis(2),
        session_ttl: Duration::from_secs(5),
        seed: Some(42),
        handshake_timeout: Duration::from_secs(2),
        ack_timeout: Duration::from_secs(2),
        dead_peer_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(3),
        ..ServerConfig::default()
    }
}

/// Server TLS from PEM files made for a test (the harness's `TestPki`),
/// with mutual TLS when `client_ca` is given.
///
/// # Panics
/// If the files do not load.
pub fn tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Arc<ServerTls> {
    Arc::new(
        ServerTls::load(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        })
        .expect("the test certificate loads"),
    )
}
