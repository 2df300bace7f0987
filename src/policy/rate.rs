//! Rate limits: `rate = ["30/min", "recipients: 1000/day"]`, each a
//! governor keyed limiter (one per distinct limit, keyed by caller name), so
//! that every caller has its own buckets.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Messages,
    Recipients,
}

/// One limit: `count` per `period`, refilled evenly (GCRA), with a burst of
/// the whole count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateRule {
    pub unit: Unit,
    pub count: u32,
    pub period: Duration,
    /// As written, for errors and status.
    pub text: String,
}

impl RateRule {
    /// `N/period` where period is `s`, `sec`, `min`, `h`, `hour`, `day`, or
    /// any duration (`10s`, `2m`); `recipients:` in front counts recipients.
    pub fn parse(text: &str) -> Result<RateRule, String> {
        let t = text.trim();
        let (unit, rest) = match t.split_once(':') {
            Some((u, rest)) if u.trim() == "recipients" => (Unit::Recipients, rest.trim()),
            Some((u, rest)) if u.trim() == "messages" => (Unit::Messages, rest.trim()),
            Some(_) => {
                return Err(format!(
                    "{t:?}: the unit before `:` must be `messages` or `recipients`"
                ));
            }
            None => (Unit::Messages, t),
        };
        let (count, period) = rest.split_once('/').ok_or_else(|| {
            format!("{t:?} is not a rate; write e.g. \"30/min\" or \"recipients: 1000/day\"")
        })?;
        let count: u32 = count
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{t:?}: the count must be a whole number above 0"))?
            .try_into()
            .map_err(|_| format!("{t:?}: the count must be at most {}", u32::MAX))?;
        let period = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other)
                .map_err(|e| format!("{t:?}: the period {other:?} is not a duration: {e}"))?,
        };
        if period.is_zero() {
            return Err(format!("{t:?}: the period must not be zero"));
        }
        if period > crate::config::MAX_DURATION {
            return Err(format!("{t:?}: the period must be at most 100 years"));
        }
        Ok(RateRule {
            unit,
            count,
            period,
            text: t.to_owned(),
        })
    }

    pub(crate) fn quota(&self) -> Quota {
        let burst = NonZeroU32::new(self.count).unwrap_or(NonZeroU32::MIN);
        let each = (self.period / self.count).max(Duration::from_nanos(1));
        Quota::with_period(each)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst)
    }
}

/// A limiter of one rule, shared by every caller that has that rule.
pub type Limiter = Arc<DefaultKeyedRateLimiter<Arc<str>>>;

pub fn limiter(rule: &RateRule) -> Limiter {
    Arc::new(DefaultKeyedRateLimiter::keyed(rule.quota()))
}

/// Why a message was over a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub rule: String,
    /// When it would pass; `None` when it never can (more recipients than
    /// the limit allows at all).
    pub retry_after: Option<Duration>,
}

/// Takes one message with `recipients` from every limit, in order. The
/// first limit that refuses stops the check; cells taken from the limits
/// before it are not given back (governor has no refund).
pub fn take(
    limits: &[(RateRule, Limiter)],
    key: &Arc<str>,
    recipients: usize,
) -> Result<(), Limited> {
    for (rule, limiter) in limits {
        let n = match rule.unit {
            Unit::Messages => 1,
            Unit::Recipients => u32::try_from(recipients).unwrap_or(u32::MAX),
        };
        let Some(n) = NonZeroU32::new(n) else {
            continue;
        };
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                return Err(Limited {
                    rule: rule.text.clone(),
                    // The limiter's own clock: making a clock runs CPUID,
                    // which costs microseconds in a virtual machine.
                    retry_after: Some(not_until.wait_time_from(limiter.clock().now())),
                });
            }
            Err(_) => {
                return Err(Limited {
                    rule: rule.text.clone(),
                    retry_after: None,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_written_forms() {
        let r = RateRule::parse("30/min").unwrap();
        assert_eq!(
            (r.unit, r.count, r.period),
            (Unit::Messages, 30, Duration::from_secs(60))
        );
        let r = RateRule::parse("recipients: 1000/day").unwrap();
        assert_eq!(
            (r.unit, r.count, r.period),
            (Unit::Recipients, 1000, Duration::from_secs(86_400))
        );
        let r = RateRule::parse("10/2s").unwrap();
        assert_eq!(r.period, Duration::from_secs(2));
        for bad in [
            "30",
            "0/min",
            "x/min",
            "30/never",
            "bytes: 1/s",
            "5/0s",
            "1/101y",
            "1/500000000000years",
        ] {
            assert!(RateRule::parse(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(RateRule::parse("4294967295/s").unwrap().count, u32::MAX);
        let e = RateRule::parse("4294967296/s").unwrap_err();
        assert!(e.contains("at most 4294967295"), "{e}");
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let rule = RateRule::parse("3/hour").unwrap();
        let limits = vec![(rule.clone(), limiter(&rule))];
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        for _ in 0..3 {
            take(&limits, &a, 1).unwrap();
        }
        let refused = take(&limits, &a, 1).unwrap_err();
        assert!(
            refused
                .retry_after
                .is_some_and(|d| d > Duration::from_secs(60))
        );
        take(&limits, &b, 1).unwrap();
    }

    #[test]
    fn recipients_count_per_recipient() {
        let rule = RateRule::parse("recipients: 5/hour").unwrap();
        let limits = vec![(rule.clone(), limiter(&rule))];
        let k: Arc<str> = Arc::from("k");
        take(&limits, &k, 3).unwrap();
        assert!(take(&limits, &k, 3).is_err());
        take(&limits, &k, 2).unwrap();
        assert_eq!(take(&limits, &k, 6).unwrap_err().retry_after, None);
    }
}
