//! Helpers both throughput harnesses share: splitting work over tasks,
//! reading shell `times` output, and formatting the tables.

use std::time::Duration;

/// Splits `n` messages among `c` senders as evenly as possible.
pub fn share(n: usize, c: usize, i: usize) -> usize {
    n / c + usize::from(i < n % c)
}

/// Parses the children's line of the shell's `times`: "0m1.230000s 0m0.450000s".
pub fn parse_times(line: &str) -> Option<Duration> {
    let mut total = 0.0;
    for field in line.split_whitespace() {
        let (min, sec) = field.strip_suffix('s')?.split_once('m')?;
        total += min.parse::<f64>().ok()? * 60.0 + sec.parse::<f64>().ok()?;
    }
    Some(Duration::from_secs_f64(total))
}

pub fn ms(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
}

pub fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}
