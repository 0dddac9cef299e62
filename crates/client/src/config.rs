//! What a client run is asked to do and how patient it is: the target
//! addresses, the session parameters and every timeout and retry bound.

use std::time::Duration;

use crate::{Backoff, ClientTls};

/// Everything [`crate::run`] needs. Build it with struct update syntax over
/// [`ClientConfig::default`]; `ports` has no sensible default and must be
/// set.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Host name or IP address of the server(s). Default `127.0.0.1`.
    pub host: String,
    /// Server ports, at least one. The first connection goes to `ports[0]`;
    /// after every failed or dropped connection the client moves on to the
    /// next port, wrapping around, so that a drained or crashed instance is
    /// not retried before the others. Default: empty (must be set).
    pub ports: Vec<u16>,
    /// How many numbers to request, `1..=65535`. Default 1.
    pub count: u16,
    /// The client's identity. Default: a fresh random v4 UUID.
    pub client_id: uuid::Uuid,
    /// Delay policy between failed connection attempts.
    pub backoff: Backoff,
    /// Delay policy after a `server_busy` refusal of the OPEN: the server
    /// is full and frees room only as its sessions end, so the client
    /// comes back later than after a failure. Default: a first delay of
    /// up to 1 s, doubling, capped at 20 s, full jitter; a client waiting
    /// out a full server then tries about every 10 s (plus the up to 2 s
    /// the server may hold its OPEN). Why that long: a server at twice its
    /// capacity has tens of thousands of clients waiting, and each attempt
    /// costs it a connection, a hello and an ERROR; at one attempt every
    /// 2.5 s (the failure backoff's cap of 5 s) their refusals took more
    /// of its core than its streams did, and it went under.
    pub busy_backoff: Backoff,
    /// Bound on each TCP connect. Default 3 s.
    pub connect_timeout: Duration,
    /// Local address to connect from, the port left to the kernel. Default
    /// `None`: the kernel chooses both. A load generator spreads its
    /// connections over several 127.x.y.z addresses with it, so that tens
    /// of thousands of them to one server port do not exhaust (or slowly
    /// search) one source address's ephemeral ports.
    pub local_addr: Option<std::net::IpAddr>,
    /// Bound on waiting for WELCOME (or ERROR) after OPEN/RESUME. Default
    /// 5 s; doubled after each handshake in a row that timed out, up to
    /// 4 times this (an overloaded server welcomes late, and reconnecting
    /// would only put the client at the back of its queue again).
    pub handshake_timeout: Duration,
    /// Until the first WELCOME there is no session and no TTL to bound the
    /// retries, so this does: the client keeps trying, with [`Self::backoff`]
    /// between attempts and however many attempts that takes, and gives up
    /// with `CannotConnect` within this much time of the run's start. No
    /// connect or WELCOME wait runs past it, and no attempt starts in its
    /// last tenth or last second, whichever is shorter (it could not be
    /// answered in time). Default 60 s: a server may legitimately refuse
    /// new sessions (`server_busy`, `store_unavailable`) for a whole
    /// session TTL (30 s by default) while the sessions that fill it
    /// expire, and an honest client must outlast that with room to spare.
    pub open_timeout: Duration,
    /// TLS settings; `None` (the default) speaks plain TCP.
    pub tls: Option<ClientTls>,
    /// Bound on the whole run, whatever the server announces or does:
    /// past it the run ends with `MaxDuration`. Default `None`: the run
    /// is bounded by the open timeout, the session TTL and the count.
    pub max_duration: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            ports: Vec::new(),
            count: 1,
            client_id: uuid::Uuid::new_v4(),
            backoff: Backoff::default(),
            busy_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(20),
                multiplier: 2.0,
            },
            connect_timeout: Duration::from_secs(3),
            local_addr: None,
            handshake_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(60),
            tls: None,
            max_duration: None,
        }
    }
}

impl ClientConfig {
    /// Why this configuration cannot run, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.ports.is_empty() {
            return Err("at least one server port is required".to_owned());
        }
        if self.ports.contains(&0) {
            return Err("port 0 cannot be connected to".to_owned());
        }
        if self.count < numstream_protocol::MIN_COUNT {
            return Err(format!(
                "count must be between {} and {}",
                numstream_protocol::MIN_COUNT,
                numstream_protocol::MAX_COUNT
            ));
        }
        if self.host.is_empty() {
            return Err("host must not be empty".to_owned());
        }
        if self.open_timeout.is_zero() {
            return Err("open_timeout must be more than zero".to_owned());
        }
        if self.max_duration.is_some_and(|limit| limit.is_zero()) {
            return Err("max_duration must be more than zero".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let config = ClientConfig::default();
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.connect_timeout, Duration::from_secs(3));
        assert_eq!(config.handshake_timeout, Duration::from_secs(5));
        assert_eq!(config.open_timeout, Duration::from_secs(60));
        assert_eq!(config.client_id.get_version_num(), 4);
        assert_ne!(config.client_id, ClientConfig::default().client_id);
    }

    #[test]
    fn validation_rejects_unusable_configs() {
        let good = ClientConfig {
            ports: vec![7000],
            ..ClientConfig::default()
        };
        assert_eq!(good.validate(), Ok(()));
        for bad in [
            ClientConfig {
                ports: vec![],
                ..good.clone()
            },
            ClientConfig {
                ports: vec![7000, 0],
                ..good.clone()
            },
            ClientConfig {
                count: 0,
                ..good.clone()
            },
            ClientConfig {
                host: String::new(),
                ..good.clone()
            },
            ClientConfig {
                open_timeout: Duration::ZERO,
                ..good.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
