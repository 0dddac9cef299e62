//! A minimal HTTP/1.1 GET for tests of the server's status endpoint,
//! optionally from a chosen source address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on one exchange, so a hung endpoint fails the test.
pub const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// One GET `path` with `Connection: close`: the status code and the body.
///
/// # Panics
/// If the endpoint cannot be reached, answers something other than HTTP, or
/// takes longer than [`GET_TIMEOUT`].
pub async fn get(status: SocketAddr, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(status).await.expect("connect to status");
    exchange(stream, path)
        .await
        .unwrap_or_else(|why| panic!("GET {path}: {why}"))
}

/// [`get`] from `source`, returning why it failed instead of panicking: for
/// tests that count how many probes get through.
pub async fn try_get_from(
    source: IpAddr,
    status: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let stream = crate::server::connect_from(source, status)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    exchange(stream, path).await
}

async fn exchange(mut stream: TcpStream, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|error| format!("send: {error}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|error| format!("read: {error}"))?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(GET_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {GET_TIMEOUT:?}"))??;
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
