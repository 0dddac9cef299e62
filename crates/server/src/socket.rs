//! Socket set-up: the listening socket (backlog, `SO_REUSEPORT`) and the
//! per-connection options that bound how long a vanished peer (cut cable,
//! dead host: no FIN, no RST) can keep a session looking attached.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket};

/// Listen backlog asked of the kernel (which caps it at
/// `net.core.somaxconn`, 4096 on current Linux). The 128 of older defaults
/// and the 1024 tokio asks for overflow when thousands of clients reconnect
/// at once after an outage: the kernel then drops their SYNs and each
/// client loses a whole SYN-retransmit second.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

/// How the client listener is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    /// Set `SO_REUSEPORT`, so several server processes can listen on one
    /// port and the kernel spreads new connections over them.
    pub reuse_port: bool,
    /// Pending-connection queue length; see [`DEFAULT_LISTEN_BACKLOG`].
    pub backlog: u32,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            reuse_port: false,
            backlog: DEFAULT_LISTEN_BACKLOG,
        }
    }
}

/// Binds and listens on `address` as `options` say. `SO_REUSEADDR` is
/// always set, so a restarted server can bind while old connections of its
/// predecessor linger in TIME_WAIT.
pub fn listen(address: SocketAddr, options: ListenOptions) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if options.reuse_port {
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        #[cfg(not(unix))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_REUSEPORT is only available on Unix",
        ));
    }
    socket.bind(address)?;
    socket.listen(options.backlog)
}

/// Per-connection socket options (see [`configure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketOptions {
    /// Bound on detecting a vanished peer.
    pub(crate) dead_peer_timeout: Duration,
    /// `SO_SNDBUF`, when the kernel's autotuning must not decide it.
    pub(crate) send_buffer: Option<usize>,
}

/// Applies `TCP_NODELAY`, keepalive probes, `TCP_USER_TIMEOUT` and, when
/// asked, a fixed send buffer, to a
/// connection or, where accepted sockets inherit them (see
/// [`ACCEPTED_SOCKETS_INHERIT`]), once to the listener.
///
/// With data in flight (a number every interval), `TCP_USER_TIMEOUT` fails
/// the socket once sent data stays unacknowledged for `dead_peer_timeout`.
/// When nothing is in flight (waiting for an ACK, long intervals), keepalive
/// probes start after a third of it; the user timeout then bounds how long
/// unanswered probes are tolerated. Either way the server learns of a dead
/// peer within about `dead_peer_timeout` and starts the session's TTL clock.
///
/// A fixed send buffer (burst mode) also turns off the kernel's send-buffer
/// autotuning, which would otherwise grow a non-reading client's queue to
/// megabytes before any write blocks and the write timeout can start.
pub(crate) fn configure(socket: SockRef<'_>, options: SocketOptions) -> io::Result<()> {
    let dead_peer_timeout = options.dead_peer_timeout;
    socket.set_tcp_nodelay(true)?;
    if let Some(size) = options.send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    let probe_every = (dead_peer_timeout / 5).max(Duration::from_secs(1));
    let keepalive = TcpKeepalive::new()
        .with_time((dead_peer_timeout / 3).max(Duration::from_secs(1)))
        .with_interval(probe_every)
        .with_retries(4);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    socket.set_tcp_user_timeout(Some(dead_peer_timeout))?;
    Ok(())
}

/// Whether an accepted socket carries `options` already, copied from its
/// listener: one `getsockopt` instead of the six calls that set them.
/// Connections the kernel completed before the listener was configured
/// (a caller's listener, connected to at once) were copied without them.
pub(crate) fn has_inherited(socket: SockRef<'_>, options: SocketOptions) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    {
        socket.tcp_user_timeout().ok().flatten() == Some(options.dead_peer_timeout)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
    {
        let _ = (socket, options);
        false
    }
}

/// Whether a socket accepted by a listener starts with the listener's
/// `TCP_NODELAY`, keepalive and `TCP_USER_TIMEOUT` settings. Linux copies
/// them (the accepted socket is cloned from the listening one), which
/// saves six `setsockopt` calls per connection: a few per cent of the
/// server's CPU when sessions are short. Elsewhere each connection is
/// configured on its own.
pub(crate) const ACCEPTED_SOCKETS_INHERIT: bool = cfg!(target_os = "linux");

#[cfg(test)]
mod tests {
    use super::*;

    /// The server relies on this to skip per-connection set-up on Linux.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let listener = listen(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ListenOptions::default(),
        )
        .expect("listen");
        let dead_peer_timeout = Duration::from_secs(12);
        let options = SocketOptions {
            dead_peer_timeout,
            send_buffer: Some(64 * 1024),
        };
        configure(SockRef::from(&listener), options).expect("configure");
        let address = listener.local_addr().expect("address");
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
        let (accepted_stream, _) = accepted.expect("accept");
        let accepted = SockRef::from(&accepted_stream);
        assert!(accepted.tcp_nodelay().expect("TCP_NODELAY"));
        assert!(accepted.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            accepted.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(4)
        );
        assert_eq!(
            accepted.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(dead_peer_timeout)
        );
        assert!(has_inherited(SockRef::from(&accepted_stream), options));
        // Linux doubles what was asked, for its own bookkeeping.
        assert_eq!(
            accepted.send_buffer_size().expect("SO_SNDBUF"),
            2 * 64 * 1024
        );
    }

    /// A connection the kernel completed before the listener was configured
    /// carries the old options, and the server must notice.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connections_queued_before_configuring_did_not_inherit() {
        let listener = listen(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ListenOptions::default(),
        )
        .expect("listen");
        let address = listener.local_addr().expect("address");
        let _early = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let options = SocketOptions {
            dead_peer_timeout: Duration::from_secs(12),
            send_buffer: None,
        };
        configure(SockRef::from(&listener), options).expect("configure");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(!has_inherited(SockRef::from(&accepted), options));
    }
}
