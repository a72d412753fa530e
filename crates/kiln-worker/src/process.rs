//! Facts about the calling process that forking depends on, and its command line.

/// Number of threads of the calling process (`usize::MAX` if it cannot be read, which every
/// caller treats as "not single-threaded").
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Replaces this process's command line (what `ps` and `/proc/PID/cmdline` show) with `title`
/// (arguments separated by NUL bytes), cut to the length of the original argument area. For
/// processes that were forked rather than exec'd, and whose inherited command line would say
/// what they are not. `std::env::args` reads the same memory: call this only once the process
/// has read its arguments.
pub fn set_cmdline(title: &str) {
    // /proc/self/stat fields 48 and 49 (after the parenthesised comm) are the bounds of the
    // argv area that /proc/self/cmdline shows.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return;
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): field N is rest[N - 3].
    let (Some(start), Some(end)) = (
        fields.get(45).and_then(|f| f.parse::<usize>().ok()),
        fields.get(46).and_then(|f| f.parse::<usize>().ok()),
    ) else {
        return;
    };
    if end <= start {
        return;
    }
    let len = end - start;
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, end) is this process's own argv area, mapped and writable (it is on the
    // initial stack); the callers are single-threaded and have read their arguments.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
}
