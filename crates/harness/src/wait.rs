//! Waiting for an observable condition instead of sleeping for a guessed
//! time: a store lookup, a gauge, a log line, a counter. The condition is
//! polled (every 10 ms) until it holds; past the bound, the test fails with
//! what it was waiting for. Bounds are generous: they catch a hang, they do
//! not measure speed.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `condition` holds. Panics with `what` if it does not within
/// `within`.
pub async fn until<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "still waiting after {within:?} for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`until`] for a condition that needs no `.await`.
pub async fn until_sync(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    until(within, what, || std::future::ready(condition())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_condition_holds() {
        let mut polls = 0;
        until_sync(Duration::from_secs(1), "the third poll", || {
            polls += 1;
            polls == 3
        })
        .await;
        assert_eq!(polls, 3);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "still waiting after 1s for something that never happens")]
    async fn fails_with_what_it_waited_for() {
        until_sync(
            Duration::from_secs(1),
            "something that never happens",
            || false,
        )
        .await;
    }
}
