//! CPU time and memory read from Linux's `/proc`: user + system time and
//! peak / current RSS of a process (`/proc/<pid>/stat`, `status`), CPU time
//! per live thread of this process summed by thread-name group, and the
//! machine's load average. It only reads and parses; which processes and
//! groups a run reports, and how, is the modes' and `report.rs`'s business.

use std::collections::BTreeMap;
use std::time::Duration;

/// Linux reports `/proc/<pid>/stat` times in USER_HZ, which is 100 on every
/// architecture Linux supports for user space.
const USER_HZ: u64 = 100;
/// CPU time and memory of one process at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// User + system CPU time.
    pub cpu: Duration,
    /// Peak resident set size (`VmHWM`) in KiB, over the process lifetime.
    pub peak_rss_kib: u64,
    /// Current resident set size (`VmRSS`) in KiB.
    pub rss_kib: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {path}")]
    Parse { path: String },
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `pid` may be `self`.
pub fn sample_process(pid: &str) -> Result<ProcSample, ProcError> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat = read(&stat_path)?;
    let (_, ticks) = parse_stat(&stat).ok_or(ProcError::Parse { path: stat_path })?;
    let status_path = format!("/proc/{pid}/status");
    let status = read(&status_path)?;
    let peak_rss_kib = status_kib(&status, "VmHWM").ok_or(ProcError::Parse {
        path: status_path.clone(),
    })?;
    let rss_kib = status_kib(&status, "VmRSS").ok_or(ProcError::Parse { path: status_path })?;
    Ok(ProcSample {
        cpu: ticks_to_duration(ticks),
        peak_rss_kib,
        rss_kib,
    })
}

/// CPU time per live thread of this process, keyed by thread id, with the
/// thread's name (`comm`). Threads that already exited are not listed; their
/// time is still in the process total.
pub fn sample_threads() -> Result<BTreeMap<u64, (String, Duration)>, ProcError> {
    let dir = "/proc/self/task";
    let entries = std::fs::read_dir(dir).map_err(|source| ProcError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut threads = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        // A thread may exit between listing and reading; skip it then.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, ticks)) = parse_stat(&stat) {
            threads.insert(tid, (comm, ticks_to_duration(ticks)));
        }
    }
    Ok(threads)
}

/// CPU time spent between two thread samples, summed per group, where a
/// thread's group is the first of `prefixes` its name starts with, or
/// `other`. Threads born after `before` count from zero.
pub fn thread_cpu_by_group(
    before: &BTreeMap<u64, (String, Duration)>,
    after: &BTreeMap<u64, (String, Duration)>,
    prefixes: &[(&str, &'static str)],
) -> BTreeMap<&'static str, Duration> {
    let mut groups: BTreeMap<&'static str, Duration> = BTreeMap::new();
    for (tid, (comm, cpu)) in after {
        let start = before.get(tid).map(|(_, c)| *c).unwrap_or_default();
        let group = prefixes
            .iter()
            .find(|(prefix, _)| comm.starts_with(prefix))
            .map(|(_, group)| *group)
            .unwrap_or("other");
        *groups.entry(group).or_default() += cpu.saturating_sub(start);
    }
    groups
}

fn read(path: &str) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_owned(),
        source,
    })
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 1000 / USER_HZ)
}

/// Parses the name and `utime + stime` (in ticks) from a `stat` line. The
/// name is in parentheses and may itself contain spaces or `)`, so the
/// fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // After ")": field 3 (state) is index 0, so utime (14) is 11, stime 12.
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The 1-minute load average from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    parse_load_average(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_load_average(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "1234 (tokio (w) x) S 1 2 3 4 5 6 7 8 9 10 250 40 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("tokio (w) x".to_owned(), 290)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(ticks_to_duration(290), Duration::from_millis(2900));
    }

    #[test]
    fn load_average_is_the_first_field() {
        assert_eq!(
            parse_load_average("10.96 11.02 8.49 3/812 4242\n"),
            Some(10.96)
        );
        assert_eq!(parse_load_average(""), None);
        assert!(load_average().is_some());
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tcourier\nVmPeak:\t  999 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(51200));
        assert_eq!(status_kib(status, "VmRSS"), Some(40000));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = sample_process("self").expect("/proc/self readable");
        assert!(sample.peak_rss_kib >= sample.rss_kib && sample.rss_kib > 0);
        let threads = sample_threads().expect("/proc/self/task readable");
        assert!(!threads.is_empty());
        let groups = thread_cpu_by_group(&BTreeMap::new(), &threads, &[("zz-none", "none")]);
        assert_eq!(groups.keys().copied().collect::<Vec<_>>(), vec!["other"]);
    }
}
