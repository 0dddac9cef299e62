//! CPU over a run, second by second: how busy each CPU of the machine was
//! (`/proc/stat`) and how much of it the servers, the load generator and
//! Redis took (`/proc/<pid>/stat`). A window average cannot tell servers
//! that had their CPU to themselves from servers that shared it with a
//! neighbour's build; the timeline can (CPU busy minus the servers' share
//! is everyone else's).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::procfs::ProcSample;

/// Gap between two samples.
const EVERY: Duration = Duration::from_secs(1);

/// Whose CPU the timeline follows.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parties {
    pub(crate) servers: Vec<u32>,
    pub(crate) loadgen: Vec<u32>,
    pub(crate) redis: Vec<u32>,
}

/// One second of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Tick {
    /// Seconds since the timeline started (the end of this second).
    pub(crate) t_s: f64,
    /// Busy % of each CPU of the machine (all processes, interrupts).
    pub(crate) cpu_busy: Vec<f64>,
    /// % of one core used by each party in this second.
    pub(crate) servers: f64,
    pub(crate) loadgen: f64,
    pub(crate) redis: f64,
}

/// A running timeline; [`Timeline::finish`] stops it and returns its ticks.
#[derive(Debug)]
pub(crate) struct Timeline {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Tick>>,
}

impl Timeline {
    /// Samples on a thread of its own: a load generator runtime busy with
    /// tens of thousands of sessions must not skew the seconds.
    pub(crate) fn start(parties: Parties) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::task::spawn_blocking(move || sample(&parties, &flag));
        Self { stop, task }
    }

    pub(crate) async fn finish(self) -> Vec<Tick> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

fn sample(parties: &Parties, stop: &AtomicBool) -> Vec<Tick> {
    let began = Instant::now();
    let read = |pids: &[u32]| -> Vec<ProcSample> {
        pids.iter()
            .filter_map(|&pid| ProcSample::read(pid))
            .collect()
    };
    // `+ 0.0`: an empty sum is -0.0, which would print as "-0".
    let used = |a: &[ProcSample], b: &[ProcSample]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(a, b)| a.cpu_percent_until(b))
            .sum::<f64>()
            + 0.0
    };
    let mut ticks = Vec::new();
    let mut before = (
        cpu_times(),
        read(&parties.servers),
        read(&parties.loadgen),
        read(&parties.redis),
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(EVERY);
        let now = (
            cpu_times(),
            read(&parties.servers),
            read(&parties.loadgen),
            read(&parties.redis),
        );
        let cpu_busy = before
            .0
            .iter()
            .zip(&now.0)
            .map(|(a, b)| {
                let total = b.total.saturating_sub(a.total) as f64;
                let idle = b.idle.saturating_sub(a.idle) as f64;
                if total > 0.0 {
                    100.0 * (total - idle) / total
                } else {
                    0.0
                }
            })
            .collect();
        ticks.push(Tick {
            t_s: began.elapsed().as_secs_f64(),
            cpu_busy,
            servers: used(&before.1, &now.1),
            loadgen: used(&before.2, &now.2),
            redis: used(&before.3, &now.3),
        });
        before = now;
    }
    ticks
}

/// Jiffies of one CPU: all, and idle (idle + iowait).
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    total: u64,
    idle: u64,
}

/// Per-CPU lines of `/proc/stat` (`cpu0 user nice system idle iowait irq
/// softirq steal ...`), in CPU order.
fn cpu_times() -> Vec<CpuTimes> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .map(|n| n.parse().unwrap_or(0))
                .collect();
            let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
            CpuTimes {
                total: fields.iter().sum(),
                idle,
            }
        })
        .collect()
}

/// One line per `every` ticks, averaged: `t  cpu0/cpu1 busy  servers
/// loadgen redis`, for the terminal.
pub(crate) fn render(ticks: &[Tick], every: usize) -> Vec<String> {
    ticks
        .chunks(every.max(1))
        .map(|chunk| {
            let n = chunk.len() as f64;
            let mean = |f: &dyn Fn(&Tick) -> f64| chunk.iter().map(f).sum::<f64>() / n;
            let cpus = chunk.first().map_or(0, |t| t.cpu_busy.len());
            let busy: Vec<String> = (0..cpus)
                .map(|i| format!("{:.0}", mean(&|t| t.cpu_busy.get(i).copied().unwrap_or(0.0))))
                .collect();
            format!(
                "{:>5.0} s  CPUs busy {:>9} %  servers {:>4.0} %  loadgen {:>4.0} %  redis {:>3.0} %",
                chunk.last().map_or(0.0, |t| t.t_s),
                busy.join("/"),
                mean(&|t| t.servers),
                mean(&|t| t.loadgen),
                mean(&|t| t.redis)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_has_this_machines_cpus() {
        let times = cpu_times();
        assert!(!times.is_empty());
        assert!(times.iter().all(|t| t.total >= t.idle));
    }

    #[test]
    fn rendering_averages_chunks() {
        let tick = |t_s, servers| Tick {
            t_s,
            cpu_busy: vec![100.0, 50.0],
            servers,
            loadgen: 10.0,
            redis: 0.0,
        };
        let lines = render(&[tick(1.0, 90.0), tick(2.0, 70.0), tick(3.0, 10.0)], 2);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("100/50"), "{}", lines[0]);
        assert!(lines[0].contains("servers   80 %"), "{}", lines[0]);
        assert!(lines[1].starts_with("    3 s"), "{}", lines[1]);
    }
}
