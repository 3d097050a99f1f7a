//! The memory this machine has free, for refusing work that cannot fit before allocating it
//! (an allocation that fails aborts the process). No candle: the data loaders use it too.

/// Memory this process can still take: the system's available memory, bounded by a cgroup
/// limit when there is one. None where it cannot be read.
pub fn available() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut bytes = kib * 1024.0;
    let read = |p: &str| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(max), Some(current)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        bytes = bytes.min((max - current).max(0.0));
    }
    Some(bytes)
}
