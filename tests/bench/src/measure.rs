//! Measuring tools shared by the sections: latency percentiles, process memory from /proc,
//! disk use of a directory, and the run's size settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kez_tests::NatsServer;

/// How big a run is: `--quick` shrinks every count and size so the whole run takes under two
/// minutes; the full run uses the sizes the issue names (1 GiB files, 100,000 users).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Whether this is a `--quick` run.
    pub quick: bool,
    /// `--users`: registrations in the footprint section instead of the default.
    pub users: Option<usize>,
    /// `--clients`: clients in the storm section instead of the default.
    pub clients: Option<usize>,
}

impl Budget {
    /// `quick` in a quick run, `full` otherwise.
    pub fn pick<T>(self, quick: T, full: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// Latencies collected for one figure.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    /// Records one.
    pub fn push(&mut self, latency: Duration) {
        self.0.push(latency);
    }

    /// Adds every latency of `other`.
    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// How many were recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (0-100, nearest rank) in milliseconds; 0 when empty.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.0.len()) - 1;
        self.0[index].as_secs_f64() * 1000.0
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`); `None` once the process is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// The pid of the fixture's nats-server: the process whose command line names its config.
pub fn nats_pid(nats: &NatsServer) -> Result<u32, String> {
    let conf: PathBuf = nats
        .store_dir()
        .parent()
        .map(|dir| dir.join("nats.conf"))
        .ok_or("the store directory has no parent")?;
    find_process(&conf).ok_or(format!(
        "no process runs with {}: cannot measure nats-server",
        conf.display()
    ))
}

fn find_process(arg: &Path) -> Option<u32> {
    let wanted = arg.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|byte| *byte == 0)
                .any(|part| part == wanted)
                .then_some(pid)
        })
}

/// CPU time (user + system) a process has used so far; `None` once it is gone. `/proc` counts
/// it in ticks of 1/100 s (`USER_HZ`, fixed by the kernel's ABI).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let user: u64 = fields.nth(11)?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// The CPU time of all of `pids` together (see [`cpu_time`]).
pub fn cpu_of(pids: &[u32]) -> Result<Duration, String> {
    pids.iter()
        .map(|&pid| cpu_time(pid).ok_or(format!("process {pid} is gone: cannot read its CPU time")))
        .sum()
}

/// The median of `times` (the upper one of an even count); zero when empty.
pub fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// KiB to MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Disk space the files under `dir` occupy, in bytes, as `du` counts it (allocated blocks).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Operations per second.
pub fn per_sec(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// MiB per second.
pub fn mib_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut latencies = Latencies::default();
        for ms in 1..=100 {
            latencies.push(Duration::from_millis(ms));
        }
        assert_eq!(latencies.percentile_ms(50.0), 50.0);
        assert_eq!(latencies.percentile_ms(99.0), 99.0);
        assert_eq!(latencies.percentile_ms(100.0), 100.0);
        assert_eq!(Latencies::default().percentile_ms(50.0), 0.0);
    }

    #[test]
    fn medians() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(median(Vec::new()), Duration::ZERO);
    }

    #[test]
    fn reads_own_memory() {
        let kib = proc_status_kib(std::process::id(), "VmHWM").expect("Linux /proc");
        assert!(kib > 0);
    }
}
