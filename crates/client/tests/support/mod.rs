//! What the client's tests share: the harness's scripted fake server (real
//! TCP on 127.0.0.1) or in-memory pipes (`memory`) for the other end, a
//! client config with fast retries, and bounded client runs.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub(crate) mod memory;

use std::time::Duration;

use numstream_client::{Backoff, ClientConfig, Event, Observer, Report};

pub(crate) use numstream_harness::fake_server::{
    PATIENCE, TOKEN, accept, closed_by_client, expected, finish, join, join_within, listen, number,
    recv, send, send_numbers, session, welcome, welcome_with,
};

/// A port on which nothing listens: bound, then released.
pub(crate) async fn closed_port() -> u16 {
    let (listener, port) = listen().await;
    drop(listener);
    port
}

/// A config with fast retries, so tests that reconnect stay quick.
pub(crate) fn config(ports: Vec<u16>, count: u16) -> ClientConfig {
    ClientConfig {
        ports,
        count,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
            multiplier: 2.0,
        },
        // Scaled down like `backoff`, but distinct, so a test sees which
        // one a refusal used.
        busy_backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// Runs the client to the end, failing the test if it does not finish
/// within [`PATIENCE`].
pub(crate) async fn run_client(config: ClientConfig) -> (Report, Vec<Event>) {
    run_client_within(config, PATIENCE).await
}

/// [`run_client`] with another bound: paused-time tests run minutes of
/// virtual time, and a hang still fails once the bound has passed.
pub(crate) async fn run_client_within(
    config: ClientConfig,
    limit: Duration,
) -> (Report, Vec<Event>) {
    let mut events: Vec<Event> = Vec::new();
    let report = tokio::time::timeout(limit, numstream_client::run(config, &mut events))
        .await
        .expect("client hung");
    (report, events)
}

/// [`run_client`] over in-memory connections to `net`'s ports.
pub(crate) async fn run_client_in(
    net: &memory::MemoryNet,
    config: ClientConfig,
) -> (Report, Vec<Event>) {
    let mut events: Vec<Event> = Vec::new();
    let run = numstream_client::run_with(config, net, &mut events);
    let report = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("client hung");
    (report, events)
}

pub(crate) fn reconnect_events(events: &[Event]) -> Vec<(String, Duration)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Reconnecting { cause, delay, .. } => Some((cause.clone(), *delay)),
            _ => None,
        })
        .collect()
}

/// An observer that is usable from another crate's point of view: only the
/// public trait and enum.
#[derive(Debug, Default)]
pub(crate) struct Counting {
    pub(crate) numbers: u32,
}

impl Observer for Counting {
    fn event(&mut self, event: &Event) {
        if let Event::Number { .. } = event {
            self.numbers += 1;
        }
    }
}
