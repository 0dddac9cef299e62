//! `RedisStore`: the numstream session store on Redis, shared by every
//! server instance pointed at the same Redis, so a client can resume on any
//! of them.
//!
//! Each session is one hash, `{prefix}session:{<client id>}` (the braces are
//! a Redis Cluster hash tag, so a session always lives in one slot), and
//! each life-cycle event is one Lua script on that key (see `scripts`):
//! atomic against every other server, one round trip, and nothing per
//! number streamed. The key's Redis expiry *is* the session's deadline: the
//! lease while attached, the disconnection TTL once detached. Redis forgets
//! an expired session on its own, so it cannot tell "expired" from "never
//! existed": `attach` answers `NotFound` for both.
//!
//! ## The bound
//!
//! The same scripts keep an index of the deployment's sessions,
//! `{prefix}sessions`, scored by each key's expiry on Redis's clock, so
//! `create` refuses with `Full` once [`RedisStoreConfig::max_sessions`]
//! live sessions exist under the prefix, however many servers share it,
//! and a session that Redis expires stops counting at its expiry instant.
//! On one Redis the count is exact: a create never overshoots the bound.
//! Every store of one deployment should be given the same bound; each
//! create is checked against its own caller's.
//!
//! The resume token never reaches Redis: only its SHA-256 is stored and
//! compared, so a Redis dump, replica, `MONITOR` or `SLOWLOG` cannot be
//! used to resume someone else's session.
//!
//! ## Failures and retries
//!
//! The connection is made lazily and remade after every failure:
//! [`RedisStore::connect_lazy`] does no I/O, so a server can start while
//! Redis is down, answer `Unavailable` meanwhile, and serve again as soon
//! as Redis answers. [`RedisStore::connect`] additionally insists on a
//! first successful connection.
//!
//! ## Takeover notices
//!
//! The attach script publishes `"<client id> <generation>"` on the channel
//! `{prefix}takeovers`; [`SessionStore::takeover_notices`] subscribes to it
//! on a dedicated connection (see `notices`), so a server streaming an
//! older generation hears of the takeover within the pub/sub latency rather
//! than at its next lease renewal.
//!
//! Connection and I/O failures, timeouts and Redis-side errors are
//! `StoreError::Unavailable`; a record or reply of the wrong shape (or a key
//! of the wrong Redis type) is `StoreError::Corrupt`. Every operation is
//! bounded by [`RedisStoreConfig::operation_timeout`], whatever the
//! connection is doing. The connection manager reconnects by itself; on top
//! of that an operation is sent a second time only when that cannot repeat
//! an effect:
//!
//! - `lookup`, `renew` and `ping` are idempotent (a repeated renew only
//!   moves the deadline again) and are retried once after any transport
//!   failure;
//! - `create`, `attach`, `detach` and `complete` are retried only when the
//!   connection was refused, i.e. the command provably never left this
//!   process. After a timeout or a dropped connection the first attempt may
//!   have run: a replayed attach would bump the generation twice and fence
//!   out the caller's own first attempt, a replayed create or complete would
//!   report `AlreadyExists` / `NotFound` for what succeeded. Those callers
//!   get `Unavailable` and must treat the outcome as unknown.

mod cluster;
mod layout;
mod notices;
mod reply;
mod scripts;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::{Client, IntoConnectionInfo, ProtocolVersion, RedisError, Script, Value};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use numstream_protocol::{ClientId, ResumeToken, SequenceChecksum, SessionSeed};
use numstream_store::{
    Attachment, NewSession, Occupancy, SessionInfo, SessionStore, StoreError, TakeoverNotice,
};

use cluster::{CLUSTER_SCHEME, ClusterEndpoint, Connection};
pub use layout::CLUSTER_GROUPS;
use layout::Layout;
use reply::{Reply, corrupt};
use scripts::Scripts;

/// Key prefix used by [`RedisStore::connect`] callers that have no reason to
/// pick another (several deployments sharing one Redis would).
pub const DEFAULT_PREFIX: &str = "numstream:";

/// Sessions one deployment may hold unless configured otherwise: the
/// server's `--max-sessions` default.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;

/// Longest expiry sent to Redis. PEXPIRE rejects deadlines that overflow its
/// millisecond clock; a century is far beyond any sensible lease or TTL.
const MAX_EXPIRY_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Connection tuning for [`RedisStore::connect_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// Prepended to every key, e.g. `numstream:` gives
    /// `numstream:session:{<client id>}`.
    pub prefix: String,
    /// Limit on one TCP connect (plus handshake) to Redis.
    pub connection_timeout: Duration,
    /// Limit on one command's answer on an established connection.
    pub response_timeout: Duration,
    /// Extra connect attempts per reconnection, with short backoff, before
    /// waiting commands fail.
    pub reconnect_retries: usize,
    /// Limit on a whole store operation, retries and reconnection included:
    /// the longest a caller waits to learn that Redis is unavailable.
    pub operation_timeout: Duration,
    /// Most live sessions under `prefix`, counted across every server
    /// sharing it; creates past it fail with `StoreError::Full`.
    pub max_sessions: usize,
    /// After a create or attach, wait (`WAIT`) until this many replicas of
    /// the session's master have it, for at most `replica_wait`; 0 (the
    /// default) does not wait. Best effort: past the wait the operation
    /// succeeds all the same. It narrows the window in which a failover
    /// loses a new session or a takeover (never a correctness matter, see
    /// ARCHITECTURE.md, "Failover"), at the price of a replication round
    /// trip, and of every command behind it on the shared connection
    /// (Redis answers a client's pipelined commands in order).
    pub wait_replicas: usize,
    /// The longest `WAIT` for [`wait_replicas`](Self::wait_replicas).
    pub replica_wait: Duration,
    /// Limit on a batch of lease renewals ([`SessionStore::renew_many`]),
    /// which on one Redis go over a connection of their own. Longer than
    /// [`operation_timeout`](Self::operation_timeout): a renewal answered
    /// late still confirms its lease (from when it was sent), where a
    /// timeout turns a store that is slow into one that fails, and the
    /// renewal, which Redis ran all the same, is sent again.
    pub renewal_timeout: Duration,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        // Scripts touch one small hash, so a healthy Redis answers in well
        // under a millisecond; these bounds only decide how fast an outage
        // is reported: within about 2 s, well inside a client's patience.
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            connection_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(1),
            reconnect_retries: 2,
            operation_timeout: Duration::from_secs(2),
            max_sessions: DEFAULT_MAX_SESSIONS,
            wait_replicas: 0,
            replica_wait: Duration::from_millis(50),
            // Under the 10 s between a default lease's renewals: an answer
            // later than that is overtaken by the next renewal anyway.
            renewal_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`SessionStore`] on Redis. Cheap to clone: clones share one
/// multiplexed, self-reconnecting connection.
#[derive(Clone)]
pub struct RedisStore {
    endpoint: Endpoint,
    /// Made by the first operation that finds Redis up; until then every
    /// operation tries once more (the connection reconnects by itself after).
    connection: Arc<OnceCell<Connection>>,
    /// On one Redis, lease renewals' own connection, made on first use
    /// (see [`RedisStore::renew_many`]); a cluster's renewals share
    /// `connection`, which already holds a connection per node.
    renewals: Arc<OnceCell<Connection>>,
    scripts: Arc<Scripts>,
    prefix: Arc<str>,
    /// Where each session's keys, index and takeover channel are.
    layout: Arc<Layout>,
    config: Arc<RedisStoreConfig>,
}

/// What the store connects to.
#[derive(Clone)]
enum Endpoint {
    /// One Redis, through a reconnecting connection manager.
    Single {
        client: Client,
        manager_config: ConnectionManagerConfig,
        /// `manager_config` with the renewals' longer response timeout.
        renewals_config: ConnectionManagerConfig,
    },
    /// A Redis Cluster from its seed nodes: the client follows MOVED and
    /// ASK and reloads the slot map by itself.
    Cluster {
        client: ClusterClient,
        endpoint: Arc<ClusterEndpoint>,
    },
}

impl fmt::Debug for RedisStore {
    // Not derived: the connection's Debug includes the Redis address and
    // settings, which may carry credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("operation_timeout", &self.config.operation_timeout)
            .field("max_sessions", &self.config.max_sessions)
            .finish_non_exhaustive()
    }
}

/// Which connection an operation goes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The one every operation shares.
    Shared,
    /// Lease renewal batches' own, on one Redis: Redis answers a
    /// connection's commands in order, so on the shared one a batch waits
    /// behind every attach and create the server sent before it, and
    /// behind each create's `WAIT` when `wait_replicas` is set. Their own
    /// connection puts them beside that queue instead of behind it. (It
    /// gives them no more of a Redis that is short of CPU: issue 15's
    /// 100,000-session runs still stopped 29,000 streams on unrenewed
    /// leases with it, against 38,500–44,300 without.)
    Renewals,
}

/// The keys a per-session script is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// Reads the session only.
    Session,
    /// Moves the session's deadline or count, so also its index entry.
    SessionAndIndex,
}

/// When a failed command may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Running it twice has the effect of running it once.
    Idempotent,
    /// Only if it never reached Redis.
    IfUnsent,
}

impl Replay {
    fn allows(self, error: &RedisError) -> bool {
        // A refused connection is the one failure that proves the command
        // was not sent: the manager only hands out established connections,
        // so refusal comes from (re)connecting, before anything is written.
        error.is_connection_refusal()
            || (self == Replay::Idempotent
                && (error.is_io_error() || error.is_unrecoverable_error()))
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port/db`,
    /// or `redis-cluster://[user:password@]host:port[,host:port…]` for a
    /// Redis Cluster from its seed nodes) with keys under `prefix` and
    /// default timeouts. Fails with
    /// `Unavailable` if Redis cannot be reached within the operation timeout.
    ///
    /// Unless the URL chooses a protocol (`?protocol=resp2`), RESP3 is used:
    /// on RESP3 the connection manager notices a dropped connection and
    /// reconnects while idle, instead of failing the next command with it.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let config = RedisStoreConfig {
            prefix: prefix.to_owned(),
            ..RedisStoreConfig::default()
        };
        Self::connect_with(url, config).await
    }

    /// [`connect`](Self::connect) with explicit timeouts.
    pub async fn connect_with(url: &str, config: RedisStoreConfig) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(url, config)?;
        tokio::time::timeout(store.config.operation_timeout, store.manager(Lane::Shared))
            .await
            .map_err(|_| timed_out(store.config.operation_timeout))?
            .map_err(unavailable)?;
        Ok(store)
    }

    /// A store for the Redis at `url` that connects on first use: fails
    /// only if the URL is unusable, never because Redis is down. Until
    /// Redis answers, operations fail with `Unavailable` within the
    /// operation timeout; afterwards the store works without a restart.
    pub fn connect_lazy(url: &str, config: RedisStoreConfig) -> Result<Self, StoreError> {
        if url.starts_with(CLUSTER_SCHEME) {
            let endpoint = ClusterEndpoint::parse(url, &config)?;
            let client = endpoint.client()?;
            return Ok(Self::with_endpoint(
                Endpoint::Cluster {
                    client,
                    endpoint: Arc::new(endpoint),
                },
                Layout::cluster(&config.prefix),
                config,
            ));
        }
        // The URL is never echoed into errors: it may hold a password.
        let parsed = redis::parse_redis_url(url)
            .ok_or_else(|| StoreError::Unavailable("the Redis URL does not parse".to_owned()))?;
        let protocol_chosen = parsed.query_pairs().any(|(name, _)| name == "protocol");
        let mut info = parsed
            .into_connection_info()
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis URL: {error}")))?;
        if !protocol_chosen {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
        }
        let client = Client::open(info).map_err(unavailable)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connection_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(config.reconnect_retries)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(400));
        let renewals_config = manager_config
            .clone()
            .set_response_timeout(Some(config.renewal_timeout));
        let layout = Layout::single(&config.prefix);
        Ok(Self::with_endpoint(
            Endpoint::Single {
                client,
                manager_config,
                renewals_config,
            },
            layout,
            config,
        ))
    }

    fn with_endpoint(endpoint: Endpoint, layout: Layout, config: RedisStoreConfig) -> Self {
        Self {
            endpoint,
            connection: Arc::new(OnceCell::new()),
            renewals: Arc::new(OnceCell::new()),
            scripts: Arc::new(Scripts::new()),
            prefix: config.prefix.as_str().into(),
            layout: Arc::new(layout),
            config: Arc::new(config),
        }
    }

    /// The connection of `lane`, made now if no operation has made it yet.
    async fn manager(&self, lane: Lane) -> Result<Connection, RedisError> {
        let (cell, renewals) = match (lane, &self.endpoint) {
            (Lane::Renewals, Endpoint::Single { .. }) => (&self.renewals, true),
            _ => (&self.connection, false),
        };
        cell.get_or_try_init(|| async {
            match &self.endpoint {
                Endpoint::Single {
                    client,
                    manager_config,
                    renewals_config,
                } => {
                    let config = if renewals {
                        renewals_config
                    } else {
                        manager_config
                    };
                    ConnectionManager::new_with_config(client.clone(), config.clone())
                        .await
                        .map(Connection::Single)
                }
                Endpoint::Cluster { client, .. } => client
                    .get_async_connection()
                    .await
                    .map(|connection| Connection::Cluster(Box::new(connection))),
            }
        })
        .await
        .cloned()
    }

    /// Whether this store is on a Redis Cluster (`redis-cluster://`).
    pub fn is_cluster(&self) -> bool {
        self.layout.is_cluster()
    }

    /// The Redis key holding `client_id`'s session:
    /// `{prefix}session:{<client id>}` on one Redis,
    /// `{prefix}session:{<group tag>}:<client id>` on a cluster.
    pub fn session_key(&self, client_id: ClientId) -> String {
        self.layout.session_key(client_id)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The sorted set indexing the deployment's sessions for its bound, on
    /// one Redis: `{prefix}sessions`, client ids scored by their key's
    /// expiry (Unix milliseconds on Redis's clock). On a cluster, the
    /// index of the first group (see [`index_key_of`](Self::index_key_of)).
    pub fn index_key(&self) -> &str {
        &self.layout.groups()[0].index_key
    }

    /// The index `client_id` is counted in: [`index_key`](Self::index_key)
    /// on one Redis, `{prefix}sessions:{<group tag>}` on a cluster.
    pub fn index_key_of(&self, client_id: ClientId) -> &str {
        &self.layout.group(client_id).index_key
    }

    /// Every index key of the deployment: one on one Redis, one per group
    /// on a cluster.
    pub fn index_keys(&self) -> Vec<&str> {
        self.layout
            .groups()
            .iter()
            .map(|group| group.index_key.as_str())
            .collect()
    }

    /// Every takeover channel: one on one Redis, one shard channel per
    /// group on a cluster.
    pub fn takeover_channels(&self) -> Vec<&str> {
        self.layout
            .groups()
            .iter()
            .map(|group| group.channel.as_str())
            .collect()
    }

    /// The pub/sub channel carrying takeover notices on one Redis:
    /// `{prefix}takeovers`. On a cluster, the first group's shard channel.
    pub fn takeover_channel(&self) -> &str {
        &self.layout.groups()[0].channel
    }

    /// Runs a per-session script on `client_id`'s key and, unless
    /// `Keys::Session`, the index.
    async fn eval(
        &self,
        script: &Script,
        client_id: ClientId,
        keys: Keys,
        args: &[Vec<u8>],
        replay: Replay,
    ) -> Result<Reply, StoreError> {
        let session_key = self.session_key(client_id);
        let index_key = &self.layout.group(client_id).index_key;
        let value = self
            .bounded(replay, |mut connection| {
                let mut invocation = script.key(&session_key);
                if keys == Keys::SessionAndIndex {
                    invocation.key(index_key);
                }
                for arg in args {
                    invocation.arg(arg.as_slice());
                }
                async move { invocation.invoke_async::<Value>(&mut connection).await }
            })
            .await?;
        Reply::decode(value)
    }

    /// [`eval`](Self::eval) for a script that moves the session's deadline
    /// or count, so its index entry too, with its refusals as errors.
    async fn eval_indexed(
        &self,
        script: &Script,
        client_id: ClientId,
        args: &[Vec<u8>],
        replay: Replay,
    ) -> Result<Reply, StoreError> {
        self.eval(script, client_id, Keys::SessionAndIndex, args, replay)
            .await?
            .expect_ok()
    }

    /// `WAIT`s for [`RedisStoreConfig::wait_replicas`] replicas of
    /// `client_id`'s master, if configured. Never fails the operation: a
    /// write the master acknowledged stands whether or not it reached a
    /// replica in time.
    async fn wait_for_replicas(&self, client_id: ClientId) {
        if self.config.wait_replicas == 0 {
            return;
        }
        let wait_ms = u64::try_from(self.config.replica_wait.as_millis()).unwrap_or(u64::MAX);
        let slot = self.layout.slot_of(client_id);
        let replicas = self
            .bounded(Replay::Idempotent, |mut connection| async move {
                connection
                    .wait_for_replicas(slot, self.config.wait_replicas, wait_ms)
                    .await
            })
            .await;
        match replicas {
            Ok(Value::Int(count))
                if usize::try_from(count).is_ok_and(|count| count >= self.config.wait_replicas) => {
            }
            other => tracing::debug!(?other, "a write reached fewer replicas than asked in time"),
        }
    }

    /// Renews `renewals`, all of group `group`, in one script.
    async fn renew_group(
        &self,
        group: usize,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
        let index_key = &self.layout.groups()[group].index_key;
        let keys: Vec<String> = renewals
            .iter()
            .map(|&(client_id, _)| self.session_key(client_id))
            .collect();
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(1 + 2 * renewals.len());
        args.push(expiry_ms(lease));
        for &(client_id, generation) in renewals {
            args.push(decimal(generation));
            args.push(member(client_id));
        }
        let replies = self
            .bounded_on(Lane::Renewals, Replay::Idempotent, |mut connection| {
                let mut invocation = self.scripts.renew_many.prepare_invoke();
                invocation.key(index_key);
                for key in &keys {
                    invocation.key(key);
                }
                for arg in &args {
                    invocation.arg(arg.as_slice());
                }
                async move { invocation.invoke_async::<Value>(&mut connection).await }
            })
            .await;
        match replies {
            Ok(Value::Array(replies)) if replies.len() == renewals.len() => {
                replies.into_iter().map(reply::renewal).collect()
            }
            Ok(_) => {
                let error = reply::corrupt("renewals replied something else than one reply each");
                vec![Err(error); renewals.len()]
            }
            Err(error) => vec![Err(error); renewals.len()],
        }
    }

    /// Runs `attempt` on the shared connection, once more if `replay`
    /// allows, all within the operation timeout.
    async fn bounded<F, Fut>(&self, replay: Replay, attempt: F) -> Result<Value, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = Result<Value, RedisError>>,
    {
        self.bounded_on(Lane::Shared, replay, attempt).await
    }

    /// [`bounded`](Self::bounded) on `lane`'s connection, within its
    /// timeout.
    async fn bounded_on<F, Fut>(
        &self,
        lane: Lane,
        replay: Replay,
        attempt: F,
    ) -> Result<Value, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = Result<Value, RedisError>>,
    {
        let attempts = async {
            // Failing to make the first connection sent nothing, and the
            // manager already retried it: no replay needed.
            let connection = self.manager(lane).await?;
            match attempt(connection.clone()).await {
                Ok(value) => Ok(value),
                Err(error) if replay.allows(&error) => {
                    // The failed attempt has already made the manager start
                    // reconnecting; the second one waits for that.
                    tracing::debug!(%error, "redis command failed, retrying once");
                    attempt(connection).await
                }
                Err(error) => Err(error),
            }
        };
        let limit = match lane {
            Lane::Shared => self.config.operation_timeout,
            Lane::Renewals => self.config.renewal_timeout,
        };
        match tokio::time::timeout(limit, attempts).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(timed_out(limit)),
        }
    }
}

/// What is stored and compared in place of the token. An unsalted hash is
/// enough: the token is 128 random bits, so there is nothing to guess.
fn token_digest(token: &ResumeToken) -> Vec<u8> {
    Sha256::digest(token.0).to_vec()
}

/// A duration as PEXPIRE milliseconds: rounded up, because PEXPIRE 0 deletes
/// the key at once, and capped where Redis would reject it.
fn expiry_ms(duration: Duration) -> Vec<u8> {
    let ms = duration.as_nanos().div_ceil(1_000_000);
    let ms = u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS);
    ms.to_string().into_bytes()
}

fn decimal(number: impl fmt::Display) -> Vec<u8> {
    number.to_string().into_bytes()
}

/// The client id as the index stores it.
fn member(client_id: ClientId) -> Vec<u8> {
    client_id.to_string().into_bytes()
}

fn unavailable(error: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

fn timed_out(limit: Duration) -> StoreError {
    StoreError::Unavailable(format!("redis did not answer within {limit:?}"))
}

/// A key of another Redis type under our name is a damaged record; every
/// other Redis error (I/O, timeout, OOM, READONLY after a failover,
/// LOADING, cluster redirections) means the store cannot serve right now.
fn classify(error: RedisError) -> StoreError {
    if error.code() == Some("WRONGTYPE") {
        return corrupt(format!("session key has the wrong Redis type: {error}"));
    }
    unavailable(error)
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn create(&self, session: NewSession, lease: Duration) -> Result<Attachment, StoreError> {
        let args = [
            session.seed.0.to_vec(),
            decimal(session.count),
            token_digest(&session.token),
            decimal(session.checksum),
            expiry_ms(lease),
            member(session.client_id),
            decimal(self.layout.group_bound(self.config.max_sessions)),
            decimal(self.config.max_sessions),
        ];
        self.eval_indexed(
            &self.scripts.create,
            session.client_id,
            &args,
            Replay::IfUnsent,
        )
        .await?;
        self.wait_for_replicas(session.client_id).await;
        Ok(Attachment {
            client_id: session.client_id,
            seed: session.seed,
            count: session.count,
            token: session.token,
            checksum: session.checksum,
            generation: 1,
        })
    }

    async fn attach(
        &self,
        client_id: ClientId,
        token: &ResumeToken,
        lease: Duration,
    ) -> Result<Attachment, StoreError> {
        let args = [
            token_digest(token),
            expiry_ms(lease),
            self.layout.group(client_id).channel.as_bytes().to_vec(),
            member(client_id),
            self.layout.publish_command().as_bytes().to_vec(),
        ];
        let mut reply = self
            .eval_indexed(&self.scripts.attach, client_id, &args, Replay::IfUnsent)
            .await?;
        self.wait_for_replicas(client_id).await;
        let seed = reply.bytes("seed")?;
        let seed =
            SessionSeed(seed.try_into().map_err(|seed: Vec<u8>| {
                corrupt(format!("seed is {} bytes, not 32", seed.len()))
            })?);
        let count = reply.count()?;
        let generation = reply.number("generation")?;
        // A session created by a version that did not store the checksum
        // may still be resumed after an upgrade: compute it once here, as
        // that version did at every FINAL.
        let checksum = match reply.optional_number("checksum")? {
            Some(checksum) => checksum,
            None => SequenceChecksum::of_session(&seed, count).checksum(),
        };
        Ok(Attachment {
            client_id,
            seed,
            count,
            // The stored digest matched this token's, so it is the token.
            token: *token,
            checksum,
            generation,
        })
    }

    async fn renew(
        &self,
        client_id: ClientId,
        generation: u64,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let args = [decimal(generation), expiry_ms(lease), member(client_id)];
        self.eval_indexed(&self.scripts.renew, client_id, &args, Replay::Idempotent)
            .await?;
        Ok(())
    }

    async fn renew_many(
        &self,
        renewals: &[(ClientId, u64)],
        lease: Duration,
    ) -> Vec<Result<(), StoreError>> {
        // One script per group: a script's keys must share a slot on a
        // cluster (one group on one Redis, so one script as before). The
        // groups' scripts run concurrently over the multiplexed
        // connections, so a renewal round costs one round trip per node.
        let mut by_group: Vec<Vec<usize>> = vec![Vec::new(); self.layout.groups().len()];
        for (position, &(client_id, _)) in renewals.iter().enumerate() {
            by_group[self.layout.group_of(client_id)].push(position);
        }
        let batches = by_group
            .iter()
            .enumerate()
            .filter(|(_, positions)| !positions.is_empty())
            .map(|(group, positions)| async move {
                let batch: Vec<(ClientId, u64)> = positions
                    .iter()
                    .map(|&position| renewals[position])
                    .collect();
                (positions, self.renew_group(group, &batch, lease).await)
            });
        let mut results: Vec<Result<(), StoreError>> =
            vec![Err(corrupt("renewal not answered")); renewals.len()];
        for (positions, replies) in futures::future::join_all(batches).await {
            for (&position, reply) in positions.iter().zip(replies) {
                results[position] = reply;
            }
        }
        results
    }

    async fn detach(
        &self,
        client_id: ClientId,
        generation: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let args = [decimal(generation), expiry_ms(ttl), member(client_id)];
        self.eval_indexed(&self.scripts.detach, client_id, &args, Replay::IfUnsent)
            .await?;
        Ok(())
    }

    async fn complete(&self, client_id: ClientId, generation: u64) -> Result<(), StoreError> {
        let args = [decimal(generation), member(client_id)];
        self.eval_indexed(&self.scripts.complete, client_id, &args, Replay::IfUnsent)
            .await?;
        Ok(())
    }

    async fn lookup(&self, client_id: ClientId) -> Result<Option<SessionInfo>, StoreError> {
        let reply = self
            .eval(
                &self.scripts.lookup,
                client_id,
                Keys::Session,
                &[],
                Replay::Idempotent,
            )
            .await?;
        let mut reply = match reply.expect_ok() {
            Ok(reply) => reply,
            Err(StoreError::NotFound) => return Ok(None),
            Err(other) => return Err(other),
        };
        let count = reply.count()?;
        let generation = reply.number("generation")?;
        let attached = match reply.bytes("attached")?.as_slice() {
            b"1" => true,
            b"0" => false,
            _ => return Err(corrupt("attached is neither 1 nor 0")),
        };
        let pttl: i64 = reply.number("pttl")?;
        // -1 (no expiry) cannot come from these scripts; a session that
        // would never expire is a damaged record, not an immortal one.
        let expires_in = u64::try_from(pttl)
            .map(Duration::from_millis)
            .map_err(|_| corrupt(format!("session key has no expiry (PTTL {pttl})")))?;
        Ok(Some(SessionInfo {
            count,
            generation,
            attached,
            expires_in,
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong = self
            .bounded(Replay::Idempotent, |mut connection| async move {
                redis::cmd("PING")
                    .query_async::<Value>(&mut connection)
                    .await
            })
            .await?;
        match pong {
            Value::SimpleString(text) if text == "PONG" => Ok(()),
            Value::BulkString(text) if text == b"PONG" => Ok(()),
            other => Err(StoreError::Unavailable(format!(
                "redis answered PING with something other than PONG: {other:?}"
            ))),
        }
    }

    async fn occupancy(&self) -> Result<Option<Occupancy>, StoreError> {
        // One count per group (one group on one Redis), concurrently.
        let counts = self.layout.groups().iter().map(|group| async move {
            let live = self
                .bounded(Replay::Idempotent, |mut connection| {
                    let invocation = self.scripts.occupancy.key(&group.index_key);
                    async move { invocation.invoke_async::<Value>(&mut connection).await }
                })
                .await?;
            match live {
                Value::Int(live) => usize::try_from(live)
                    .map_err(|_| corrupt(format!("the index counted {live} live sessions"))),
                _ => Err(corrupt("the index count is not an integer")),
            }
        });
        let mut sessions = 0;
        for count in futures::future::join_all(counts).await {
            sessions += count?;
        }
        Ok(Some(Occupancy {
            sessions,
            max: self.config.max_sessions,
        }))
    }

    fn takeover_notices(&self) -> Option<BoxStream<'static, TakeoverNotice>> {
        Some(match &self.endpoint {
            Endpoint::Single { client, .. } => notices::subscribe(
                client.clone(),
                self.takeover_channel().into(),
                self.config.clone(),
            ),
            Endpoint::Cluster { endpoint, .. } => cluster::subscribe(
                endpoint.clone(),
                self.layout
                    .groups()
                    .iter()
                    .map(|group| group.channel.clone())
                    .collect(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_round_up_and_stay_in_range() {
        assert_eq!(expiry_ms(Duration::from_millis(400)), b"400");
        assert_eq!(expiry_ms(Duration::from_micros(1)), b"1");
        assert_eq!(expiry_ms(Duration::ZERO), b"1");
        assert_eq!(expiry_ms(Duration::from_micros(1_500)), b"2");
        assert_eq!(
            expiry_ms(Duration::MAX),
            MAX_EXPIRY_MS.to_string().as_bytes()
        );
    }

    #[test]
    fn the_digest_is_not_the_token() {
        let token = ResumeToken([5; 16]);
        let digest = token_digest(&token);
        assert_eq!(digest.len(), 32);
        assert!(!digest.windows(16).any(|window| window == token.0));
    }
}
