//! Forced drops: the harness's fault proxy in front of the server, one per
//! victim session, whose current connection the load generator cuts at
//! any moment. The client library owns its socket, so cutting in between
//! is the way to make it lose a connection without changing it; the bare
//! client goes through the same proxy so both pay the same extra hop.
//! What this module adds is the measurement: a cut only lands while the
//! session streams, and its time is kept until the resumed stream picks it
//! up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use numstream_harness::proxy::{FaultProxy, ProxyError};
use tokio::time::Instant;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A proxy on 127.0.0.1 with a free port that cuts one session's current
/// connection on demand and remembers when; stops when dropped.
#[derive(Debug)]
pub(crate) struct CutSwitch {
    /// Passes every connection untouched; [`FaultProxy::cut_all`] closes
    /// the one open.
    proxy: FaultProxy,
    /// When the last cut happened, until the resumed stream picks it up.
    pending: Mutex<Option<Instant>>,
    /// True while the session is welcomed on a live connection.
    streaming: AtomicBool,
}

impl CutSwitch {
    pub(crate) async fn start(upstream: SocketAddr) -> Result<Self, ProxyError> {
        Ok(Self {
            proxy: FaultProxy::start_queue(upstream).await?,
            pending: Mutex::new(None),
            streaming: AtomicBool::new(false),
        })
    }

    /// Where the session connects.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.proxy.addr()
    }

    /// Cuts the current connection if the session is streaming on one.
    pub(crate) fn cut(&self) -> bool {
        if !self.streaming.swap(false, Ordering::AcqRel) {
            return false;
        }
        *lock(&self.pending) = Some(Instant::now());
        self.proxy.cut_all();
        true
    }

    pub(crate) fn take_cut(&self) -> Option<Instant> {
        lock(&self.pending).take()
    }

    pub(crate) fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Release);
    }
}
