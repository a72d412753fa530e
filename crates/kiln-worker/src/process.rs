//! Facts about the calling process that forking depends on.

/// Number of threads of the calling process (`usize::MAX` if it cannot be read, which every
/// caller treats as "not single-threaded").
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}
