//! Confinement to a set of CPUs, for the overload scenario: servers run
//! under `taskset -c LIST` (the server binary itself, no wrapper script:
//! `taskset` execs it, so the child's pid is the server's), and running
//! processes (the load generator itself, redis-server) are moved with
//! `taskset -a -p -c LIST PID`, every thread included. The workspace
//! forbids `unsafe`, so `sched_setaffinity` is reached through `taskset`
//! (util-linux) rather than called directly.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::process::{Command, Stdio};
use std::str::FromStr;

use anyhow::{Context, bail};

/// A non-empty set of CPU numbers, as `taskset -c` and
/// `/proc/self/status` (`Cpus_allowed_list`) write it: `0`, `0-2,5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuList(BTreeSet<usize>);

/// Far above any machine this runs on; bounds a typo like `0-99999999`.
const MAX_CPU: usize = 4095;

impl FromStr for CpuList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut cpus = BTreeSet::new();
        for part in text.trim().split(',') {
            let part = part.trim();
            let number = |s: &str| -> Result<usize, String> {
                let cpu: usize = s.trim().parse().map_err(|_| {
                    format!("{part:?} is not a CPU number or range (e.g. 0, 0-3, 0,2)")
                })?;
                if cpu > MAX_CPU {
                    return Err(format!("CPU {cpu} is past {MAX_CPU}"));
                }
                Ok(cpu)
            };
            match part.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(format!("the range {part:?} is backwards"));
                    }
                    cpus.extend(first..=last);
                }
                None => {
                    cpus.insert(number(part)?);
                }
            }
        }
        if cpus.is_empty() {
            return Err("no CPU given".to_owned());
        }
        Ok(Self(cpus))
    }
}

impl fmt::Display for CpuList {
    /// Ranges folded: `{0, 1, 2, 5}` is `0-2,5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &cpu in &self.0 {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == cpu => *last = cpu,
                _ => runs.push((cpu, cpu)),
            }
        }
        let text: Vec<String> = runs
            .iter()
            .map(|&(first, last)| {
                if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                }
            })
            .collect();
        f.write_str(&text.join(","))
    }
}

impl CpuList {
    /// The CPUs this process may run on (`Cpus_allowed_list`).
    pub(crate) fn allowed() -> anyhow::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")
            .context("reading /proc/self/status for the CPUs this process may use")?;
        let list = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .context("/proc/self/status has no Cpus_allowed_list")?;
        list.parse()
            .map_err(|why| anyhow::anyhow!("Cpus_allowed_list {list:?}: {why}"))
    }

    /// The CPUs of `self` that are not in `other`, if any are left.
    pub(crate) fn without(&self, other: &CpuList) -> Option<CpuList> {
        let rest: BTreeSet<usize> = self.0.difference(&other.0).copied().collect();
        (!rest.is_empty()).then_some(CpuList(rest))
    }

    /// Fails unless every CPU of `self` is one this process may use: a
    /// `taskset` to another CPU would fail late, inside a run.
    pub(crate) fn check_within(&self, allowed: &CpuList, flag: &str) -> anyhow::Result<()> {
        if let Some(outside) = self.without(allowed) {
            bail!("{flag} {self}: CPU(s) {outside} are not available here (available: {allowed})");
        }
        Ok(())
    }
}

/// `program` as a command, under `taskset -c CPUS` when `cpus` is given.
pub(crate) fn command(program: impl AsRef<OsStr>, cpus: Option<&CpuList>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpus.to_string()).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Confines the running process `pid`, all its threads, to `cpus`.
pub(crate) fn pin(pid: u32, cpus: &CpuList) -> anyhow::Result<()> {
    let output = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpus.to_string(), &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running taskset (util-linux) to pin a process to its CPUs")?;
    if !output.status.success() {
        bail!(
            "taskset could not pin process {pid} to CPU(s) {cpus}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Raises the running process `pid` to nice -10 (all its threads), so that
/// a saturated neighbour on its CPUs cannot preempt it for whole time
/// slices. Returns why not if that is refused (not root): the caller
/// reports it and carries on.
pub(crate) fn prioritize(pid: u32) -> Result<(), String> {
    let output = Command::new("renice")
        .args(["-n", "-10", "-p", &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run renice (util-linux): {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Fails early, with the package to install, when `taskset` is missing.
pub(crate) fn require_taskset() -> anyhow::Result<()> {
    match Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        _ => bail!(
            "confining servers to CPUs needs taskset on PATH (util-linux: apt-get install -y util-linux)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_like_taskset_writes_them() {
        for (text, printed) in [
            ("0", "0"),
            ("0-2,5", "0-2,5"),
            ("3,1,2", "1-3"),
            (" 0 , 1 ", "0-1"),
        ] {
            let list: CpuList = text.parse().expect(text);
            assert_eq!(list.to_string(), printed, "{text}");
        }
        for bad in ["", "a", "2-1", "0-", "-1", "1,,2", "99999"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_complement_and_the_range_check() {
        let all: CpuList = "0-3".parse().expect("list");
        let servers: CpuList = "0".parse().expect("list");
        let rest = all.without(&servers).expect("three left");
        assert_eq!(rest.to_string(), "1-3");
        assert!(servers.without(&all).is_none());
        assert!(servers.check_within(&all, "--server-cpus").is_ok());
        let error = "2,7"
            .parse::<CpuList>()
            .expect("list")
            .check_within(&all, "--server-cpus")
            .expect_err("7 is outside");
        assert!(error.to_string().contains("CPU(s) 7"), "{error}");
    }

    #[test]
    fn this_process_knows_its_cpus() {
        let allowed = CpuList::allowed().expect("Linux /proc");
        assert!(!allowed.to_string().is_empty());
    }
}
