//! A GET for tests of the server's status endpoint (`/metrics`, `/healthz`,
//! `/readyz`), optionally from a chosen source address: hyper-util's
//! client, one connection per request, bounded in time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Bound on one exchange, so a hung endpoint fails the test.
pub const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// One GET `path`: the status code and the body.
///
/// # Panics
/// If the endpoint cannot be reached, answers something other than HTTP, or
/// takes longer than [`GET_TIMEOUT`].
pub async fn get(status: SocketAddr, path: &str) -> (u16, String) {
    exchange(None, status, path)
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
    exchange(Some(source), status, path).await
}

async fn exchange(
    source: Option<IpAddr>,
    status: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(source);
    // No connection kept for later: each GET is one connection, as a
    // scraper's or a probe's would be, and none lingers in the server's
    // per-address count.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let uri: hyper::Uri = format!("http://{status}{path}")
        .parse()
        .map_err(|error| format!("bad URI: {error}"))?;
    let exchange = async {
        let response = client
            .get(uri)
            .await
            .map_err(|error| format!("request: {error}"))?;
        let code = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("body: {error}"))?
            .to_bytes();
        Ok::<_, String>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(GET_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {GET_TIMEOUT:?}"))?
}
