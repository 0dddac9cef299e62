//! Forced drops: a one-session TCP forwarder in front of the server whose
//! current connection the load generator can cut at any moment. The client
//! library owns its socket, so cutting in between is the way to make it
//! lose a connection without changing it; the bare client goes through the
//! same forwarder so both pay the same extra hop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Cuts one session's current connection and remembers when.
#[derive(Debug, Default)]
pub(crate) struct CutSwitch {
    /// Cancelled to cut the connection being forwarded; replaced by a
    /// fresh token for the next one.
    current: Mutex<CancellationToken>,
    /// When the last cut happened, until the resumed stream picks it up.
    pending: Mutex<Option<Instant>>,
    /// True while the session is welcomed on a live connection.
    streaming: AtomicBool,
}

impl CutSwitch {
    /// Cuts the current connection if the session is streaming on one.
    pub(crate) fn cut(&self) -> bool {
        if !self.streaming.swap(false, Ordering::AcqRel) {
            return false;
        }
        *lock(&self.pending) = Some(Instant::now());
        std::mem::take(&mut *lock(&self.current)).cancel();
        true
    }

    pub(crate) fn take_cut(&self) -> Option<Instant> {
        lock(&self.pending).take()
    }

    pub(crate) fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Release);
    }

    fn token(&self) -> CancellationToken {
        lock(&self.current).clone()
    }
}

/// A forwarder on 127.0.0.1 with a free port; stops when dropped.
#[derive(Debug)]
pub(crate) struct CutProxy {
    pub(crate) addr: SocketAddr,
    pub(crate) switch: Arc<CutSwitch>,
    stop: CancellationToken,
}

impl CutProxy {
    pub(crate) async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let switch = Arc::new(CutSwitch::default());
        let stop = CancellationToken::new();
        tokio::spawn({
            let (switch, stop) = (switch.clone(), stop.clone());
            async move {
                loop {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    let cut = switch.token();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = cut.cancelled() => {}
                            _ = stop.cancelled() => {}
                            _ = forward(client, upstream) => {}
                        }
                    });
                }
            }
        });
        Ok(Self { addr, switch, stop })
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
