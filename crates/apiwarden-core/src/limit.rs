//! GCRA, the generic cell rate algorithm: the arithmetic of every rate limit, with no clock and
//! no storage.
//!
//! A limit keeps one number per key, the theoretical arrival time (TAT): when the key's budget
//! would be full again if no more requests came. A request at `now` is admitted when
//! `max(TAT, now) - tolerance <= now`; admitting it moves the TAT on by one emission interval.
//! There is no window, so there is no window boundary to exploit: over any span of time `T`, at
//! most `burst + rate × T` requests are admitted. A refused request does not move the TAT, so it
//! uses no budget. A key whose TAT lies in the past has its full budget, which is why the stores
//! may forget it (Redis lets it expire; the local store evicts it first).
//!
//! Times are integers in an arbitrary unit (nanoseconds locally, microseconds in Redis, whose
//! script mirrors [`Gcra::decide`]).

use crate::config::LimitConfig;

/// One limit's parameters, in the unit of the clock that drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Time between two requests at the steady rate.
    pub interval: u64,
    /// How far ahead of `now` the TAT may be: `interval × (burst - 1)`.
    pub tolerance: u64,
}

/// What one limit says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The TAT to store when the request is admitted (unchanged when refused).
    pub tat: u64,
    /// Requests that could still be admitted at once after this one.
    pub remaining: u64,
    /// When refused: time until one request would be admitted.
    pub retry_after: u64,
    /// Time until the budget is full again.
    pub reset: u64,
}

impl Gcra {
    /// The parameters of `limit` with a clock that ticks `units_per_sec` times a second.
    /// The interval is rounded up to a whole unit, so the rate is never exceeded.
    pub fn new(limit: &LimitConfig, units_per_sec: u64) -> Gcra {
        let period = limit.per.as_nanos() * u128::from(units_per_sec) / 1_000_000_000;
        let interval = period.div_ceil(u128::from(limit.requests)).max(1) as u64;
        Gcra {
            interval,
            tolerance: interval.saturating_mul(limit.burst.saturating_sub(1)),
        }
    }

    /// Decides a request at `now` for a key whose stored TAT is `tat` (`None`: never seen, or
    /// forgotten, which is the same thing).
    pub fn decide(&self, tat: Option<u64>, now: u64) -> Decision {
        let tat = tat.map_or(now, |t| t.max(now));
        if tat - now > self.tolerance {
            // Refused: the TAT stays where it is.
            return Decision {
                allowed: false,
                tat,
                remaining: 0,
                retry_after: tat - now - self.tolerance,
                reset: tat - now,
            };
        }
        let new_tat = tat + self.interval;
        let ahead = new_tat - now;
        let span = self.tolerance.saturating_add(self.interval);
        let remaining = if ahead > span {
            0
        } else {
            (span - ahead) / self.interval
        };
        Decision {
            allowed: true,
            tat: new_tat,
            remaining,
            retry_after: 0,
            reset: ahead,
        }
    }
}

/// Whole seconds, rounded up, of a duration in `units_per_sec` units: what `Retry-After` and
/// the `RateLimit` header's `t` carry. Never 0 for a non-zero duration, so a client that waits
/// what it was told is admitted.
pub fn ceil_secs(d: u64, units_per_sec: u64) -> u64 {
    d.div_ceil(units_per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FailureMode, LimitKey, LimitStore};
    use std::time::Duration;

    fn limit(requests: u64, per_secs: u64, burst: u64) -> LimitConfig {
        LimitConfig {
            requests,
            per: Duration::from_secs(per_secs),
            burst,
            key: vec![LimitKey::Ip],
            store: LimitStore::Local,
            failure_mode: FailureMode::Open,
        }
    }

    /// Runs requests at the given times through one key and returns how many were admitted.
    fn admitted(g: &Gcra, times: impl Iterator<Item = u64>) -> u64 {
        let mut tat = None;
        let mut n = 0;
        for t in times {
            let d = g.decide(tat, t);
            if d.allowed {
                tat = Some(d.tat);
                n += 1;
            }
        }
        n
    }

    const NS: u64 = 1_000_000_000;

    #[test]
    fn a_fresh_key_gets_its_burst_at_once_and_then_nothing() {
        let g = Gcra::new(&limit(10, 1, 5), NS);
        assert_eq!(g.interval, NS / 10);
        assert_eq!(admitted(&g, std::iter::repeat_n(1_000 * NS, 100)), 5);
        let first = g.decide(None, 0);
        assert_eq!((first.allowed, first.remaining), (true, 4));
    }

    #[test]
    fn admitted_over_time_is_burst_plus_rate_times_time() {
        // 100/s with burst 20, offered at 200/s for 10 s: 20 + 100 × 10 = 1 020.
        let g = Gcra::new(&limit(100, 1, 20), NS);
        let n = admitted(&g, (0..2_000).map(|i| i * NS / 200));
        let expected = 20 + 100 * 10;
        assert!(
            n.abs_diff(expected) <= 1,
            "admitted {n}, expected {expected}"
        );
    }

    #[test]
    fn a_client_at_exactly_the_rate_is_never_refused() {
        let g = Gcra::new(&limit(7, 1, 1), NS);
        let mut tat = None;
        for i in 0..10_000 {
            let d = g.decide(tat, i * g.interval);
            assert!(d.allowed, "request {i} refused");
            tat = Some(d.tat);
        }
    }

    #[test]
    fn refused_requests_use_no_budget_and_retry_after_is_enough() {
        let g = Gcra::new(&limit(1, 1, 2), NS);
        let mut tat = Some(g.decide(None, 0).tat);
        tat = Some(g.decide(tat, 0).tat);
        let refused = g.decide(tat, 0);
        assert!(!refused.allowed);
        // Hammering while refused does not push the time of admission back.
        for _ in 0..1_000 {
            assert_eq!(g.decide(tat, 0), refused);
        }
        let wait = ceil_secs(refused.retry_after, NS) * NS;
        assert!(g.decide(tat, wait).allowed);
        assert!(!g.decide(tat, refused.retry_after - 1).allowed);
    }

    #[test]
    fn no_boundary_burst_anywhere() {
        // Whatever the phase of the traffic, no span of one second admits more than
        // burst + rate: there is no window edge to aim at.
        let g = Gcra::new(&limit(10, 1, 10), NS);
        for phase in [0, 1, NS / 2, NS - 1, 999 * NS / 1000] {
            let n = admitted(&g, (0..10_000u64).map(|i| phase + i * NS / 10_000));
            assert!(n <= 10 + 10, "phase {phase}: {n} admitted in one second");
        }
    }

    #[test]
    fn quota_units_work_in_microseconds() {
        // 100 000 a day, as the Redis script counts it.
        let g = Gcra::new(&limit(100_000, 86_400, 100_000), 1_000_000);
        assert_eq!(g.interval, 864_000);
        assert_eq!(admitted(&g, std::iter::repeat_n(5, 200_000)), 100_000);
    }
}
