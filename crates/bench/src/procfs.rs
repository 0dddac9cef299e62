//! CPU time and resident memory of a process, from `/proc/<pid>/stat` and
//! `/proc/<pid>/status` (Linux only).

use std::time::Instant;

use serde::Serialize;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcSample {
    pub(crate) at: Instant,
    /// User + system CPU time, in clock ticks.
    pub(crate) cpu_ticks: u64,
    pub(crate) rss_kib: u64,
}

impl ProcSample {
    /// Reads `pid`'s counters (`None` when the process is gone).
    pub(crate) fn read(pid: u32) -> Option<Self> {
        let at = Instant::now();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses: the fields
        // that follow start after the last ')'. utime and stime are fields
        // 14 and 15 (1-based), i.e. 12th and 13th after the name.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())?;
        Some(Self {
            at,
            cpu_ticks: utime + stime,
            rss_kib,
        })
    }

    /// CPU used between `self` and `later`, as a percentage of one core.
    pub(crate) fn cpu_percent_until(&self, later: &ProcSample) -> f64 {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        let ticks = later.cpu_ticks.saturating_sub(self.cpu_ticks) as f64;
        100.0 * ticks / clock_ticks_per_second() / seconds
    }
}

/// `getconf CLK_TCK`, 100 on every Linux this will meet.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The machine's conditions when a measurement was taken.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Conditions {
    /// 1, 5 and 15 minute load averages from `/proc/loadavg`.
    pub(crate) loadavg: String,
    pub(crate) cpus: usize,
    /// Processes using the most CPU right now (`top`), so a
    /// reader can tell what else was competing.
    pub(crate) busiest: Vec<String>,
}

impl Conditions {
    pub(crate) fn now() -> Self {
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .map(|text| {
                text.split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Self {
            loadavg,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busiest: busiest(),
        }
    }
}

/// The processes using the most CPU over the next half second, from the
/// second frame of `top` (its first frame averages over each process's
/// whole life).
fn busiest() -> Vec<String> {
    let Some(text) = std::process::Command::new("top")
        .args(["-b", "-n", "2", "-d", "0.5", "-w", "200"])
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
    else {
        return Vec::new();
    };
    let Some(last_frame) = text.rsplit("  PID ").next() else {
        return Vec::new();
    };
    last_frame
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // PID USER PR NI VIRT RES SHR S %CPU %MEM TIME+ COMMAND
            let cpu: f64 = fields.get(8)?.parse().ok()?;
            let command = fields.get(11)?;
            (cpu >= 5.0).then(|| format!("{cpu}% {command}"))
        })
        .take(6)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let sample = ProcSample::read(std::process::id()).expect("own /proc entry");
        assert!(sample.rss_kib > 0);
        let later = ProcSample::read(std::process::id()).expect("own /proc entry");
        assert!(sample.cpu_percent_until(&later) >= 0.0);
    }
}
