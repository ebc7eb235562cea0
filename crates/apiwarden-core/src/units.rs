//! Human-readable sizes and durations used in the configuration.

use std::time::Duration;

/// A byte count written as an integer (`1048576`) or with a unit (`512KiB`, `10MiB`, `1GB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"10MiB"`, `"64 KB"`, `"1000"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected a number such as \"10MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit {other:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

/// A duration written as `"250ms"`, `"5s"`, `"24h"`, `"90d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses a duration such as `"1s"` or `"1h 30m"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}): expected e.g. \"500ms\", \"30s\", \"24h\"")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1000"), Ok(ByteSize(1000)));
        assert_eq!(ByteSize::parse("10MiB"), Ok(ByteSize(10 << 20)));
        assert_eq!(ByteSize::parse("64 KB"), Ok(ByteSize(64_000)));
        assert!(ByteSize::parse("10 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            HumanDuration::parse("1s").unwrap().0,
            Duration::from_secs(1)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert!(HumanDuration::parse("soon").is_err());
    }
}

/// A point in time written as a duration back from `now` (`1h`, `30m`) or an RFC 3339 time,
/// with `Z` or a numeric offset (`2026-11-25T10:00:00Z`, `2026-11-25T12:00:00+02:00`; a time
/// without either is taken as UTC).
pub fn parse_time(text: &str, now: std::time::SystemTime) -> Result<std::time::SystemTime, String> {
    let t = text.trim();
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(now.checked_sub(d).unwrap_or(std::time::UNIX_EPOCH));
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return Ok(at);
    }
    // `+HH:MM` or `-HH:MM` at the end: the local time, less the offset.
    let bad = || {
        format!("{text:?}: write a duration back from now (1h, 30m) or an RFC 3339 time (2026-11-25T10:00:00Z)")
    };
    let split = t.len().checked_sub(6).ok_or_else(bad)?;
    if !t.is_char_boundary(split) {
        return Err(bad());
    }
    let (local, offset) = t.split_at(split);
    let sign = match offset.as_bytes()[0] {
        b'+' => 1i64,
        b'-' => -1i64,
        _ => return Err(bad()),
    };
    let (h, m) = offset[1..].split_once(':').ok_or_else(bad)?;
    let (h, m): (u64, u64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || !local.contains('T') {
        return Err(bad());
    }
    let at = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let shift = Duration::from_secs(h * 3600 + m * 60);
    if sign > 0 {
        at.checked_sub(shift).ok_or_else(bad)
    } else {
        at.checked_add(shift).ok_or_else(bad)
    }
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn times_with_offsets_and_durations_back_from_now() {
        let utc = parse_time("2026-11-25T10:00:00Z", std::time::SystemTime::now()).unwrap();
        for same in [
            "2026-11-25T12:00:00+02:00",
            "2026-11-25T05:30:00-04:30",
            "2026-11-25T10:00:00",
        ] {
            assert_eq!(
                parse_time(same, std::time::SystemTime::now()),
                Ok(utc),
                "{same}"
            );
        }
        let now = std::time::SystemTime::now();
        assert_eq!(parse_time("1h", now), Ok(now - Duration::from_secs(3600)));
        // Not ASCII: six bytes from the end is inside a character (it panicked).
        for bad in [
            "yesterday",
            "2026-11-25T10:00:00+25:00",
            "+02:00",
            "",
            "€é€",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }
}
