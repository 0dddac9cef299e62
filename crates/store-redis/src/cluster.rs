//! The Redis Cluster side of the store: the `redis-cluster://` URL, the
//! connection the operations share (one Redis's or a cluster's, behind one
//! type the scripts run on), and the takeover notices' subscriber on the
//! groups' shard channels.
//!
//! redis-rs's cluster client keeps a connection to every master, routes
//! each script by its first key's slot, follows MOVED and ASK, and reloads
//! the slot map after a failover or resharding; none of that is ours. What
//! it also does is resend a command whose connection dropped, which a
//! single-Redis `ConnectionManager` never does: after a dropped connection
//! a create or attach may run twice. ARCHITECTURE.md ("Redis Cluster")
//! says what each replay can do; none gives a wrong result.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::ConnectionManager;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion, PushKind};
use redis::{RedisFuture, Value};
use tokio::sync::mpsc;
use tokio::time::sleep;

use numstream_store::{StoreError, TakeoverNotice};

use crate::RedisStoreConfig;
use crate::notices::parse;

/// The scheme of a cluster URL: `redis-cluster://[user:password@]host:port[,host:port…]`.
pub(crate) const CLUSTER_SCHEME: &str = "redis-cluster://";

/// The connection every operation of one store shares.
#[derive(Clone)]
pub(crate) enum Connection {
    Single(ConnectionManager),
    /// Boxed: a cluster connection is several times the manager's size.
    Cluster(Box<ClusterConnection>),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

impl Connection {
    /// `WAIT replicas timeout_ms` on the master of `slot` (the cluster
    /// client would otherwise send it to every master), or on the one
    /// Redis. WAIT counts the replicas that have every write this
    /// connection sent so far, which includes the caller's.
    pub(crate) async fn wait_for_replicas(
        &mut self,
        slot: Option<u16>,
        replicas: usize,
        timeout_ms: u64,
    ) -> redis::RedisResult<Value> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms);
        match (self, slot) {
            (Connection::Cluster(connection), Some(slot)) => {
                let route = Route::new(slot, SlotAddr::Master);
                connection
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await
            }
            (connection, _) => wait.query_async(connection).await,
        }
    }
}

/// A cluster's seed nodes and connection settings: builds the operations'
/// client and, with a push channel, each notice subscriber's.
#[derive(Debug, Clone)]
pub(crate) struct ClusterEndpoint {
    seeds: Vec<ConnectionInfo>,
    connection_timeout: Duration,
    response_timeout: Duration,
}

impl ClusterEndpoint {
    /// Parses `redis-cluster://[user:password@]host:port[,host:port…][/]`.
    /// The URL is never echoed into errors: it may hold a password.
    pub(crate) fn parse(url: &str, config: &RedisStoreConfig) -> Result<Self, StoreError> {
        let invalid =
            |why: &str| StoreError::Unavailable(format!("invalid Redis Cluster URL: {why}"));
        let rest = url
            .strip_prefix(CLUSTER_SCHEME)
            .ok_or_else(|| invalid("it does not start with redis-cluster://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (credentials, hosts) = match rest.rsplit_once('@') {
            Some((credentials, hosts)) => (Some(credentials), hosts),
            None => (None, rest),
        };
        if hosts.contains(['/', '?', '#']) {
            return Err(invalid(
                "expected only seed nodes host:port[,host:port…] (a cluster has no database \
                 number, and no query options are supported)",
            ));
        }
        let seeds = hosts
            .split(',')
            .map(|host| {
                if host.is_empty() {
                    return Err(invalid("an empty seed node"));
                }
                let single = match credentials {
                    Some(credentials) => format!("redis://{credentials}@{host}"),
                    None => format!("redis://{host}"),
                };
                single
                    .as_str()
                    .into_connection_info()
                    .map_err(|_| invalid("a seed node is not host:port"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let endpoint = Self {
            seeds,
            connection_timeout: config.connection_timeout,
            response_timeout: config.response_timeout,
        };
        // Validates the seeds together (the client insists that they share
        // credentials) without any I/O.
        endpoint.builder().build().map_err(|error| {
            StoreError::Unavailable(format!("invalid Redis Cluster URL: {:?}", error.kind()))
        })?;
        Ok(endpoint)
    }

    /// RESP3, which the shard channel subscriptions need.
    fn builder(&self) -> ClusterClientBuilder {
        ClusterClientBuilder::new(self.seeds.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout)
    }

    pub(crate) fn client(&self) -> Result<ClusterClient, StoreError> {
        self.builder()
            .build()
            .map_err(|error| StoreError::Unavailable(format!("redis cluster: {error}")))
    }
}

/// Reconnection backoff of the notice subscriber, doubled up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Subscribes to every group's shard channel on a cluster connection of
/// its own and forwards the notices, until the returned stream is dropped.
///
/// The cluster client sends each SSUBSCRIBE to the master of the channel's
/// slot and subscribes again after reconnecting or moving slots; notices
/// published meanwhile are lost, and lease renewal fences what they
/// concerned, as on one Redis.
pub(crate) fn subscribe(
    endpoint: Arc<ClusterEndpoint>,
    channels: Vec<String>,
) -> BoxStream<'static, TakeoverNotice> {
    let (sender, receiver) = mpsc::channel(crate::notices::BUFFER);
    tokio::spawn(async move {
        tokio::select! {
            _ = sender.closed() => {}
            _ = run(&endpoint, &channels, &sender) => {}
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|notice| (notice, receiver))
    })
    .boxed()
}

async fn run(
    endpoint: &ClusterEndpoint,
    channels: &[String],
    sender: &mpsc::Sender<TakeoverNotice>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (pushes, mut incoming) = mpsc::unbounded_channel();
        let subscribed = async {
            let client = endpoint.builder().push_sender(pushes).build()?;
            let mut connection = client.get_async_connection().await?;
            // One channel a command: SSUBSCRIBE's channels must share a
            // slot, and each group's is in a slot of its own.
            for channel in channels {
                connection.ssubscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(connection)
        };
        let connection = match subscribed.await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot subscribe to takeover notices");
                sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        tracing::info!(
            channels = channels.len(),
            "subscribed to takeover notices (shard channels)"
        );
        backoff = FIRST_BACKOFF;
        // The connection resubscribes by itself; it lives as long as the
        // pushes are read.
        while let Some(push) = incoming.recv().await {
            if push.kind != PushKind::SMessage {
                continue;
            }
            let payload = match push.data.get(1) {
                Some(Value::BulkString(payload)) => payload.as_slice(),
                _ => &[],
            };
            match parse(payload) {
                Some(notice) => {
                    if sender.send(notice).await.is_err() {
                        return;
                    }
                }
                None => tracing::warn!(
                    payload = %String::from_utf8_lossy(payload),
                    "ignoring a malformed takeover notice"
                ),
            }
        }
        drop(connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<ClusterEndpoint, StoreError> {
        ClusterEndpoint::parse(url, &RedisStoreConfig::default())
    }

    #[test]
    fn seed_lists_parse_and_bad_ones_say_why_without_the_url() {
        let endpoint = parse("redis-cluster://127.0.0.1:7000,127.0.0.1:7001/").expect("parses");
        assert_eq!(endpoint.seeds.len(), 2);
        assert_eq!(
            parse("redis-cluster://user:secret@10.0.0.1:7000")
                .expect("parses")
                .seeds
                .len(),
            1
        );
        for bad in [
            "redis-cluster://",
            "redis-cluster://127.0.0.1:7000,,127.0.0.1:7001",
            "redis-cluster://127.0.0.1:7000/3",
            "redis-cluster://u:secret@127.0.0.1:7000?x=1",
            "redis-cluster://127.0.0.1:notaport",
        ] {
            let error = parse(bad).expect_err(bad).to_string();
            assert!(
                error.contains("invalid Redis Cluster URL"),
                "{bad}: {error}"
            );
            assert!(!error.contains("secret"), "{bad}: {error}");
        }
    }
}
