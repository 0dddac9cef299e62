//! Per-connection socket options that bound how long a vanished peer (cut
//! cable, dead host: no FIN, no RST) can keep a session looking attached.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Applies `TCP_NODELAY`, keepalive probes and `TCP_USER_TIMEOUT`.
///
/// With data in flight (a number every interval), `TCP_USER_TIMEOUT` fails
/// the socket once sent data stays unacknowledged for `dead_peer_timeout`.
/// When nothing is in flight (waiting for an ACK, long intervals), keepalive
/// probes start after a third of it; the user timeout then bounds how long
/// unanswered probes are tolerated. Either way the server learns of a dead
/// peer within about `dead_peer_timeout` and starts the session's TTL clock.
pub(crate) fn configure(stream: &TcpStream, dead_peer_timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
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
