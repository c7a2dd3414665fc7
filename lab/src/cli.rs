//! Parsers for castor's command-line values, shared by the binary and the
//! local-pair orchestration.

use std::time::Duration;

/// Parses `--workload NAME[,key=value...]`.
pub fn parse_workload(s: &str) -> Result<guest::Workload, String> {
    guest::Workload::parse(s).map_err(|e| e.to_string())
}

/// Parses a size: a number with an optional K, M, G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(format!(
                        "unknown size suffix '{c}' in '{s}' (use K, M or G)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 512M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses a duration: a number with us, ms, s or m.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 500ms, 3s, 2m)"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => {
            return Err(format!(
                "unknown duration unit '{unit}' in '{s}' (use us, ms, s or m)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e7).contains(&secs) {
        return Err(format!("duration '{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1T").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

/// An emulated link's rate in bytes per second; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRate(pub Option<u64>);

/// Parses a link rate (`1gbit`, `100mbit`, `50MB`, `none`).
pub fn parse_rate(s: &str) -> Result<LinkRate, String> {
    transport::link::parse_rate(s).map(LinkRate)
}
