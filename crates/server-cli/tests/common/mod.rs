//! Helpers shared by the tests that run real clients against several
//! server instances on shared Redis (one Redis in `redis_instances`, a
//! Redis Cluster in `redis_cluster`): the known undisturbed result, clients
//! that report every event, and ordering of ports.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use numstream_client::{ClientConfig, Event, Observer, Report};
use numstream_protocol::{ClientId, SequenceChecksum, SessionSeed};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");
/// Every server here derives session seeds from this, so an undisturbed
/// run's result is known in advance.
pub(crate) const SEED: u64 = 42;
/// Bound on any client run, so a hang fails instead of blocking CI.
pub(crate) const RUN_LIMIT: Duration = Duration::from_secs(30);

pub(crate) fn reference(client_id: ClientId, count: u16) -> SequenceChecksum {
    SequenceChecksum::of_session(&SessionSeed::derive(SEED, client_id), count)
}

/// The report must be exactly that of an undisturbed run.
pub(crate) fn assert_undisturbed_result(report: &Report) {
    assert!(report.ok, "{}", report.render_human());
    let expected = reference(report.client_id, report.count);
    assert_eq!(report.received, report.count);
    assert_eq!(report.sum, expected.sum());
    assert_eq!(report.client_checksum, expected.checksum());
    assert_eq!(report.server_checksum, Some(expected.checksum()));
}

/// Forwards every client event, stamped with when it happened.
pub(crate) struct Live(pub(crate) mpsc::UnboundedSender<(Instant, Event)>);

impl Observer for Live {
    fn event(&mut self, event: &Event) {
        let _ = self.0.send((Instant::now(), event.clone()));
    }
}

pub(crate) type Events = mpsc::UnboundedReceiver<(Instant, Event)>;

pub(crate) fn spawn_client(ports: Vec<u16>, count: u16) -> (JoinHandle<Report>, Events) {
    spawn_client_as(ClientId::new_v4(), ports, count)
}

pub(crate) fn spawn_client_as(
    client_id: ClientId,
    ports: Vec<u16>,
    count: u16,
) -> (JoinHandle<Report>, Events) {
    spawn_client_within(client_id, ports, count, RUN_LIMIT)
}

/// [`spawn_client_as`] whose run must finish within `limit`.
pub(crate) fn spawn_client_within(
    client_id: ClientId,
    ports: Vec<u16>,
    count: u16,
    limit: Duration,
) -> (JoinHandle<Report>, Events) {
    let (sender, events) = mpsc::unbounded_channel();
    let config = ClientConfig {
        ports,
        count,
        client_id,
        ..ClientConfig::default()
    };
    let run = tokio::spawn(async move {
        let mut observer = Live(sender);
        tokio::time::timeout(limit, numstream_client::run(config, &mut observer))
            .await
            .expect("client run must finish")
    });
    (run, events)
}

pub(crate) fn drain(events: &mut Events) -> Vec<(Instant, Event)> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

/// Waits (bounded by [`RUN_LIMIT`]) until every client has been welcomed,
/// so a fault from here on strikes sessions that exist. Returns each
/// client's events so far, which [`drain`] will not see again.
pub(crate) async fn until_welcomed(
    clients: &mut [(JoinHandle<Report>, Events)],
) -> Vec<Vec<(Instant, Event)>> {
    let mut seen = Vec::with_capacity(clients.len());
    for (i, (_, events)) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        let welcomed = tokio::time::timeout(RUN_LIMIT, async {
            while let Some(event) = events.recv().await {
                let welcome = matches!(event.1, Event::Welcomed { .. });
                got.push(event);
                if welcome {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(welcomed, Ok(true)),
            "client {i} was never welcomed: {got:?}"
        );
        seen.push(got);
    }
    seen
}

/// When the first WELCOME after `since` arrived.
pub(crate) fn first_welcome_after(events: &[(Instant, Event)], since: Instant) -> Option<Instant> {
    events
        .iter()
        .find(|(at, event)| *at > since && matches!(event, Event::Welcomed { .. }))
        .map(|(at, _)| *at)
}

pub(crate) fn rotated(ports: &[u16], by: usize) -> Vec<u16> {
    let mut rotated = ports.to_vec();
    rotated.rotate_left(by % ports.len());
    rotated
}
