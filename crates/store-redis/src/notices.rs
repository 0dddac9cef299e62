//! Takeover notices: a dedicated pub/sub connection subscribed to
//! `{prefix}takeovers`, on which the attach script announces every new
//! generation as `"<client id> <generation>"`.
//!
//! The subscriber outlives Redis outages: when the connection drops, or a
//! PING on it goes unanswered (a silent partition), it reconnects with
//! capped backoff and subscribes again. Notices published meanwhile are
//! lost; lease renewal still fences the connections they concerned, within
//! one renewal period. The task ends when the returned stream is dropped.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use redis::{Client, Value};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout};

use numstream_protocol::ClientId;
use numstream_store::TakeoverNotice;

use crate::RedisStoreConfig;

/// How often an idle subscription is checked with PING. A dead connection
/// that no RST announced would otherwise look like a quiet channel.
const LIVENESS_PERIOD: Duration = Duration::from_secs(2);
/// Reconnection backoff, doubled after each failure up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Notices buffered for a consumer that is momentarily busy; past it the
/// subscriber waits, and Redis buffers (then drops the connection, which is
/// survived like any other drop).
pub(crate) const BUFFER: usize = 4096;

/// Starts the subscriber task and returns its notices.
pub(crate) fn subscribe(
    client: Client,
    channel: Arc<str>,
    config: Arc<RedisStoreConfig>,
) -> BoxStream<'static, TakeoverNotice> {
    let (sender, receiver) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        tokio::select! {
            // The consumer went away: stop, and close the connection.
            _ = sender.closed() => {}
            _ = run(&client, &channel, &config, &sender) => {}
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|notice| (notice, receiver))
    })
    .boxed()
}

/// Subscribes, forwards, and resubscribes forever.
async fn run(
    client: &Client,
    channel: &str,
    config: &RedisStoreConfig,
    sender: &mpsc::Sender<TakeoverNotice>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut was_subscribed = false;
    let mut failures: u32 = 0;
    loop {
        match session(client, channel, config, sender, &mut was_subscribed).await {
            Ok(()) => return, // the consumer is gone
            Err(error) => {
                failures += 1;
                if was_subscribed {
                    tracing::warn!(
                        %error,
                        "takeover notice subscription lost; resubscribing (until then, \
                         lease renewal fences takeovers by other instances)"
                    );
                    was_subscribed = false;
                    backoff = FIRST_BACKOFF;
                    failures = 0;
                } else if failures == 1 || backoff == MAX_BACKOFF {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot subscribe to takeover notices");
                }
            }
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: connect, subscribe, forward until it fails.
/// `Ok` only when the consumer has gone.
async fn session(
    client: &Client,
    channel: &str,
    config: &RedisStoreConfig,
    sender: &mpsc::Sender<TakeoverNotice>,
    was_subscribed: &mut bool,
) -> Result<(), String> {
    let connect_limit = config.connection_timeout + config.response_timeout;
    let mut pubsub = timeout(connect_limit, client.get_async_pubsub())
        .await
        .map_err(|_| format!("no connection within {connect_limit:?}"))?
        .map_err(|error| error.to_string())?;
    timeout(config.response_timeout, pubsub.subscribe(channel))
        .await
        .map_err(|_| format!("SUBSCRIBE unanswered within {:?}", config.response_timeout))?
        .map_err(|error| error.to_string())?;
    *was_subscribed = true;
    tracing::info!(channel, "subscribed to takeover notices");

    let (mut sink, mut messages) = pubsub.split();
    let mut liveness = interval_at(Instant::now() + LIVENESS_PERIOD, LIVENESS_PERIOD);
    liveness.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Err("the connection closed".to_owned());
                };
                match parse(message.get_payload_bytes()) {
                    Some(notice) => {
                        if sender.send(notice).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => tracing::warn!(
                        payload = %String::from_utf8_lossy(message.get_payload_bytes()),
                        "ignoring a malformed takeover notice"
                    ),
                }
            }
            _ = liveness.tick() => {
                match timeout(config.response_timeout, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Err(format!("PING failed: {error}")),
                    Err(_) => {
                        return Err(format!("PING unanswered within {:?}", config.response_timeout));
                    }
                }
            }
        }
    }
}

/// `"<client id> <generation>"`, as the attach script publishes it.
pub(crate) fn parse(payload: &[u8]) -> Option<TakeoverNotice> {
    let text = std::str::from_utf8(payload).ok()?;
    let (client_id, generation) = text.split_once(' ')?;
    Some(TakeoverNotice {
        client_id: ClientId::parse_str(client_id).ok()?,
        generation: generation.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_parse_and_garbage_does_not() {
        let id = ClientId::from_bytes([7; 16]);
        assert_eq!(
            parse(format!("{id} 12").as_bytes()),
            Some(TakeoverNotice {
                client_id: id,
                generation: 12
            })
        );
        for bad in [
            "".to_owned(),
            format!("{id}"),
            format!("{id} -1"),
            format!("{id} 1 2"),
            "not-a-uuid 3".to_owned(),
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
