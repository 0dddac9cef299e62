//! `CutProxy`: a TCP proxy on loopback that forwards bytes between clients
//! and an upstream server and cuts connections on command or on a byte
//! budget, so tests can break real connections at exact points.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How the proxy treats one proxied connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutRule {
    /// Close both sides after forwarding this many server→client bytes.
    pub downstream_budget: Option<usize>,
    /// Close both sides after forwarding this many client→server bytes.
    pub upstream_budget: Option<usize>,
}

impl CutRule {
    pub const PASS: CutRule = CutRule {
        downstream_budget: None,
        upstream_budget: None,
    };

    pub fn after_downstream_bytes(bytes: usize) -> Self {
        Self {
            downstream_budget: Some(bytes),
            upstream_budget: None,
        }
    }
}

#[derive(Debug)]
struct State {
    upstream: Mutex<SocketAddr>,
    /// Rules for the next connections, in order; later ones pass through.
    rules: Mutex<std::collections::VecDeque<CutRule>>,
    /// Cancelled (and replaced) by `cut_all`.
    epoch: Mutex<CancellationToken>,
    accepted: AtomicUsize,
}

/// A running proxy; dropping it stops accepting and cuts everything.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl CutProxy {
    /// Starts a proxy on 127.0.0.1 with a free port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let state = Arc::new(State {
            upstream: Mutex::new(upstream),
            rules: Mutex::new(Default::default()),
            epoch: Mutex::new(CancellationToken::new()),
            accepted: AtomicUsize::new(0),
        });
        tokio::spawn(accept_loop(listener, state.clone(), stop.clone()));
        Ok(Self { addr, state, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Queues rules applied to the next connections, one rule each.
    pub fn push_rules(&self, rules: impl IntoIterator<Item = CutRule>) {
        lock(&self.state.rules).extend(rules);
    }

    /// Points new connections at another upstream.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.state.upstream) = upstream;
    }

    /// Closes every connection open right now (both sides see EOF).
    pub fn cut_all(&self) {
        let mut epoch = lock(&self.state.epoch);
        epoch.cancel();
        *epoch = CancellationToken::new();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let rule = lock(&state.rules).pop_front().unwrap_or(CutRule::PASS);
        let upstream = *lock(&state.upstream);
        let epoch = lock(&state.epoch).clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Whichever direction ends first (EOF, error, budget, cut) ends
            // the connection: dropping all four halves closes both sockets.
            tokio::select! {
                _ = epoch.cancelled() => {}
                _ = pipe(server_read, client_write, rule.downstream_budget) => {}
                _ = pipe(client_read, server_write, rule.upstream_budget) => {}
            }
        });
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    budget: Option<usize>,
) {
    let mut remaining = budget.unwrap_or(usize::MAX);
    let mut buf = vec![0u8; 16 * 1024];
    while remaining > 0 {
        let want = buf.len().min(remaining);
        let n = match from.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        remaining -= n;
    }
}
