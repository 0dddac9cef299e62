//! The servers' own account of a run: every spawned numstream server's
//! `/metrics` (Prometheus text, `docs/operations.md`), read just before it
//! stops and summed over the servers: counters that moved, and for each
//! histogram its count, mean and bucket-bound p50/p99 (e.g. the store
//! operation latency the servers waited for, against what Redis says it
//! spent).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Serialize;

/// One series: its name and its labels as written (`{op="renew",...}`,
/// `le` excluded for buckets).
type Series = (String, String);

/// `/metrics` of several servers, added together.
#[derive(Debug, Default)]
pub(crate) struct MetricsSum {
    /// Counters and gauges, summed.
    values: BTreeMap<Series, f64>,
    /// Histogram buckets: series of the `_bucket` lines → upper bound →
    /// cumulative count, summed.
    buckets: BTreeMap<Series, Vec<(f64, f64)>>,
    /// Servers whose `/metrics` could not be read, and why.
    pub(crate) unreadable: Vec<String>,
}

/// One histogram, summed over the servers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HistogramSummary {
    pub(crate) count: f64,
    pub(crate) mean_ms: f64,
    /// Upper bound of the bucket holding the median (`+Inf` past the
    /// last bound): "at most this".
    pub(crate) p50_at_most_ms: f64,
    pub(crate) p99_at_most_ms: f64,
    /// (bound in ms, observations above it) for every bound of 100 ms or
    /// more that any observation passed: how many waited past 1 s, 2.5 s...
    pub(crate) above_ms: Vec<(f64, f64)>,
}

impl MetricsSum {
    /// Reads and adds every endpoint's `/metrics`.
    pub(crate) async fn read(endpoints: &[SocketAddr]) -> Self {
        let mut sum = Self::default();
        for &endpoint in endpoints {
            let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
            match numstream_harness::http::try_get_from(local, endpoint, "/metrics").await {
                Ok((200, body)) => sum.add(&body),
                Ok((code, _)) => sum.unreadable.push(format!("{endpoint}: HTTP {code}")),
                Err(why) => sum.unreadable.push(format!("{endpoint}: {why}")),
            }
        }
        sum
    }

    /// Adds one exposition (comments and unparsable lines skipped).
    pub(crate) fn add(&mut self, text: &str) {
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            if let Some(base) = name.strip_suffix("_bucket") {
                let mut le = None;
                let rest: Vec<&str> = split_labels(labels)
                    .filter(|label| match label.strip_prefix("le=") {
                        Some(bound) => {
                            le = parse_bound(bound.trim_matches('"'));
                            false
                        }
                        None => true,
                    })
                    .collect();
                let Some(le) = le else { continue };
                let buckets = self
                    .buckets
                    .entry((base.to_owned(), rest.join(",")))
                    .or_default();
                match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                    Some((_, count)) => *count += value,
                    None => {
                        buckets.push((le, value));
                        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    }
                }
            } else {
                *self
                    .values
                    .entry((name.to_owned(), labels.to_owned()))
                    .or_default() += value;
            }
        }
    }

    /// Every `_total` counter that is not zero, as `name{labels}`.
    pub(crate) fn counters(&self) -> BTreeMap<String, f64> {
        self.values
            .iter()
            .filter(|((name, _), value)| name.ends_with("_total") && **value != 0.0)
            .map(|((name, labels), value)| (display(name, labels), *value))
            .collect()
    }

    /// Every histogram with at least one observation, as `name{labels}`.
    pub(crate) fn histograms(&self) -> BTreeMap<String, HistogramSummary> {
        let mut out = BTreeMap::new();
        for ((name, labels), buckets) in &self.buckets {
            let series = |suffix: &str| {
                self.values
                    .get(&(format!("{name}{suffix}"), labels.clone()))
                    .copied()
                    .unwrap_or(0.0)
            };
            let (count, sum) = (series("_count"), series("_sum"));
            if count == 0.0 {
                continue;
            }
            let quantile = |q: f64| {
                let rank = q * count;
                buckets
                    .iter()
                    .find(|(_, cumulative)| *cumulative >= rank)
                    .map_or(f64::INFINITY, |(bound, _)| *bound * 1000.0)
            };
            let above_ms = buckets
                .iter()
                .filter(|(bound, cumulative)| {
                    bound.is_finite() && *bound >= 0.1 && count - cumulative > 0.0
                })
                .map(|(bound, cumulative)| (bound * 1000.0, count - cumulative))
                .collect();
            out.insert(
                display(name, labels),
                HistogramSummary {
                    count,
                    mean_ms: sum / count * 1000.0,
                    p50_at_most_ms: quantile(0.50),
                    p99_at_most_ms: quantile(0.99),
                    above_ms,
                },
            );
        }
        out
    }
}

fn display(name: &str, labels: &str) -> String {
    if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    }
}

/// `a="x",b="y,z"` → `a="x"`, `b="y,z"` (commas inside quotes kept).
fn split_labels(labels: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&labels[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&labels[start..]);
    parts.into_iter().filter(|part| !part.is_empty())
}

fn parse_bound(bound: &str) -> Option<f64> {
    match bound {
        "+Inf" => Some(f64::INFINITY),
        _ => bound.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"# TYPE numstream_store_errors_total counter
numstream_store_errors_total{store="redis",op="renew"} 3
numstream_store_errors_total{store="redis",op="create"} 0
numstream_sessions_attached{store="redis"} 10
numstream_store_operation_duration_seconds_bucket{store="redis",op="renew",le="0.001"} 90
numstream_store_operation_duration_seconds_bucket{store="redis",op="renew",le="1"} 97
numstream_store_operation_duration_seconds_bucket{store="redis",op="renew",le="2.5"} 100
numstream_store_operation_duration_seconds_bucket{store="redis",op="renew",le="+Inf"} 100
numstream_store_operation_duration_seconds_sum{store="redis",op="renew"} 7.5
numstream_store_operation_duration_seconds_count{store="redis",op="renew"} 100
"#;

    #[test]
    fn two_servers_add_up() {
        let mut sum = MetricsSum::default();
        sum.add(ONE);
        sum.add(ONE);
        let counters = sum.counters();
        assert_eq!(
            counters.get(r#"numstream_store_errors_total{store="redis",op="renew"}"#),
            Some(&6.0)
        );
        assert_eq!(
            counters.len(),
            1,
            "zero counters and gauges left out: {counters:?}"
        );
        let histograms = sum.histograms();
        let renew =
            &histograms[r#"numstream_store_operation_duration_seconds{store="redis",op="renew"}"#];
        assert_eq!(renew.count, 200.0);
        assert!((renew.mean_ms - 75.0).abs() < 1e-9, "{renew:?}");
        assert_eq!(renew.p50_at_most_ms, 1.0);
        assert_eq!(renew.p99_at_most_ms, 2500.0);
        assert_eq!(renew.above_ms, [(1000.0, 6.0)]);
    }

    #[test]
    fn labels_split_outside_quotes_only() {
        let parts: Vec<&str> = split_labels(r#"a="x,y",b="\"q\"",c="z""#).collect();
        assert_eq!(parts, [r#"a="x,y""#, r#"b="\"q\"""#, r#"c="z""#]);
    }
}
