//! Waiting for an observable condition instead of sleeping for a guessed
//! time: a store lookup, a gauge, a log line, a counter. The condition is
//! polled (every 10 ms) until it holds; past the bound, the test fails with
//! what it was waiting for (and, with [`until_value`], the last thing it
//! saw). Bounds are generous: they catch a hang, they do
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

/// Polls `probe` until `done` holds for what it saw, and returns that.
/// Panics with `what` and the last thing seen if `done` does not hold
/// within `within`: the failure shows how far it got.
pub async fn until_value<T, F, Fut>(
    within: Duration,
    what: &str,
    mut probe: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + within;
    loop {
        let seen = probe().await;
        if done(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "still waiting after {within:?} for {what}; last seen: {seen:#?}"
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
    async fn until_value_returns_what_satisfied_it() {
        let mut polls = 0;
        let seen = until_value(
            Duration::from_secs(1),
            "a count of three",
            || {
                polls += 1;
                std::future::ready(polls)
            },
            |&count| count >= 3,
        )
        .await;
        assert_eq!(seen, 3);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "for a count of ten; last seen: 0")]
    async fn until_value_fails_with_the_last_value_seen() {
        until_value(
            Duration::from_secs(1),
            "a count of ten",
            || std::future::ready(0),
            |&count| count >= 10,
        )
        .await;
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
