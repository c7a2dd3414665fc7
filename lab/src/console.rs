//! What the guest's console says: its progress lines, and the one
//! continuity check (every vCPU's `seq` goes up by exactly one: no line
//! lost or repeated across a failover, a restore or a reconnection).

use std::collections::BTreeMap;

use guest::Progress;

/// The progress lines of a console stream (other lines are skipped).
pub fn progress_lines(stream: &[u8]) -> Vec<Progress> {
    // Whole lines only: a stream read up to a moment ends mid-line as
    // often as not, and a last line cut inside its `ops=` digits parses
    // with a smaller count (a quick bench once measured 0 ops/s from one).
    String::from_utf8_lossy(stream)
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| Progress::parse(l.trim_end()))
        .collect()
}

/// The outcome of a continuity check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Continuity {
    /// Progress lines seen.
    pub lines: usize,
    /// Gaps, duplicates and missing starts, in words.
    pub problems: Vec<String>,
}

impl Continuity {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks that every vCPU's `seq` goes up by exactly one from line to line.
/// With `from_start = Some(n)`, also that each of vCPUs `0..n` printed and
/// started at seq 1 (a stream read from the guest's boot).
pub fn check(lines: &[Progress], from_start: Option<u32>) -> Continuity {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut problems = Vec::new();
    for p in lines {
        match last.insert(p.cpu, p.seq) {
            Some(prev) if p.seq != prev + 1 => {
                problems.push(format!("vCPU {}: seq {} follows {}", p.cpu, p.seq, prev));
            }
            None if from_start.is_some() && p.seq != 1 => {
                problems.push(format!("vCPU {}: starts at seq {}, not 1", p.cpu, p.seq));
            }
            _ => {}
        }
    }
    for cpu in 0..from_start.unwrap_or(0) {
        if !last.contains_key(&cpu) {
            problems.push(format!("vCPU {cpu}: no lines"));
        }
    }
    Continuity {
        lines: lines.len(),
        problems,
    }
}

/// [`check`] on a console stream read from anywhere in the guest's life.
pub fn continuity(stream: &[u8]) -> Continuity {
    check(&progress_lines(stream), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(cpu: u32, seq: u64) -> Progress {
        Progress {
            cpu,
            seq,
            t_us: 0,
            ops: 0,
        }
    }

    #[test]
    fn a_line_cut_off_at_the_end_of_a_read_is_not_a_line() {
        let s = b"seq=4 t_us=10 ops=9\ncpu=0 seq=5 t_us=100 ops=4000\ncpu=0 seq=6 t_us=200 ops=40";
        let l = progress_lines(s);
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!((l[0].seq, l[0].ops), (5, 4000));
        assert_eq!(
            progress_lines(b"cpu=0 seq=6 t_us=200 ops=4100\r\n").len(),
            1
        );
    }

    #[test]
    fn gaps_duplicates_and_late_starts_are_named() {
        let ok = [line(0, 5), line(1, 1), line(0, 6), line(1, 2)];
        assert!(check(&ok, None).ok());
        assert_eq!(check(&ok, None).lines, 4);
        let c = check(&ok, Some(2));
        assert_eq!(c.problems, ["vCPU 0: starts at seq 5, not 1"]);
        let c = check(&[line(0, 1), line(0, 3), line(0, 3)], Some(2));
        assert_eq!(
            c.problems,
            [
                "vCPU 0: seq 3 follows 1",
                "vCPU 0: seq 3 follows 3",
                "vCPU 1: no lines"
            ]
        );
        let text = b"hello\ncpu=0 seq=1 t_us=10 ops=1\nnoise\ncpu=0 seq=2 t_us=20 ops=2\n";
        assert_eq!(progress_lines(text).len(), 2, "{:?}", progress_lines(text));
        assert!(continuity(text).ok());
    }
}
