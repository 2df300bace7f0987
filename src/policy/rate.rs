//! Rate limits: `rate = ["30/min", "recipients: 1000/day",
//! "per_recipient: 5/hour"]`, each a governor keyed limiter (one per
//! distinct limit, keyed by caller name, and for `per_recipient` by caller
//! and recipient), so that every caller has its own buckets. On a store
//! that several daemons share, the same buckets are kept in the store
//! instead ([`Shared`]), so that a caller has its rate once, not once per
//! daemon.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use mailmux_actors::queue::RateTake;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Messages,
    Recipients,
    /// Messages to each recipient: a bucket for every address the caller
    /// mails, so that no one person gets more than the count from it (an
    /// agent in a loop, or two agents answering each other).
    PerRecipient,
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
    /// any duration (`10s`, `2m`); `recipients:` in front counts recipients,
    /// `per_recipient:` the messages to each recipient.
    pub fn parse(text: &str) -> Result<RateRule, String> {
        let t = text.trim();
        let (unit, rest) = match t.split_once(':') {
            Some((u, rest)) if u.trim() == "recipients" => (Unit::Recipients, rest.trim()),
            Some((u, rest)) if u.trim() == "messages" => (Unit::Messages, rest.trim()),
            Some((u, rest)) if u.trim() == "per_recipient" => (Unit::PerRecipient, rest.trim()),
            Some(_) => {
                return Err(format!(
                    "{t:?}: the unit before `:` must be `messages`, `recipients` or `per_recipient`"
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

/// Past this many keys in a limiter, the buckets that have refilled are
/// forgotten; then again past twice as many as were left, so that a caller
/// mailing many people costs a scan now and then, not one a message.
const FORGET_PAST: usize = 65_536;

/// The buckets of one rule, shared by every caller that has that rule.
#[derive(Debug)]
pub struct Buckets {
    keyed: DefaultKeyedRateLimiter<Arc<str>>,
    /// The count of keys past which the full buckets are forgotten next.
    forget_past: AtomicUsize,
}

pub type Limiter = Arc<Buckets>;

pub fn limiter(rule: &RateRule) -> Limiter {
    Arc::new(Buckets {
        keyed: DefaultKeyedRateLimiter::keyed(rule.quota()),
        forget_past: AtomicUsize::new(FORGET_PAST),
    })
}

impl Buckets {
    /// Takes `n` from `key`'s bucket.
    fn take(&self, rule: &RateRule, key: &Arc<str>, n: NonZeroU32) -> Result<(), Limited> {
        match self.keyed.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Limited {
                rule: rule.text.clone(),
                // The limiter's own clock: making a clock runs CPUID,
                // which costs microseconds in a virtual machine.
                retry_after: Some(not_until.wait_time_from(self.keyed.clock().now())),
                recipient: None,
            }),
            Err(_) => Err(Limited {
                rule: rule.text.clone(),
                retry_after: None,
                recipient: None,
            }),
        }
    }

    /// Forgets the buckets that have refilled, once the keys are past the
    /// mark (which then moves to twice what is left).
    fn forget(&self) {
        if self.keyed.len() <= self.forget_past.load(Ordering::Relaxed) {
            return;
        }
        self.keyed.retain_recent();
        self.keyed.shrink_to_fit();
        let left = self.keyed.len();
        self.forget_past
            .store((left * 2).max(FORGET_PAST), Ordering::Relaxed);
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keyed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keyed.is_empty()
    }
}

/// Why a message was over a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub rule: String,
    /// When it would pass; `None` when it never can (more recipients than
    /// the limit allows at all).
    pub retry_after: Option<Duration>,
    /// For a `per_recipient` limit, the recipient (its index in the
    /// envelope) that has had its count.
    pub recipient: Option<usize>,
}

/// Takes one message to `recipients` from every limit, in order. The
/// first limit that refuses stops the check; cells taken from the limits
/// before it (and, in a `per_recipient` limit, for the recipients before
/// the one refused) are not given back (governor has no refund).
pub fn take(
    limits: &[(RateRule, Limiter)],
    key: &Arc<str>,
    recipients: &[&str],
) -> Result<(), Limited> {
    for (rule, limiter) in limits {
        let n = match rule.unit {
            Unit::Messages => 1,
            Unit::Recipients => u32::try_from(recipients.len()).unwrap_or(u32::MAX),
            Unit::PerRecipient => {
                for (i, r) in recipients.iter().enumerate() {
                    let address = crate::suppress::key(r).unwrap_or_else(|| r.to_lowercase());
                    let each: Arc<str> = Arc::from(format!("{key}\n{address}"));
                    limiter
                        .take(rule, &each, NonZeroU32::MIN)
                        .map_err(|l| Limited {
                            recipient: Some(i),
                            ..l
                        })?;
                }
                limiter.forget();
                continue;
            }
        };
        let Some(n) = NonZeroU32::new(n) else {
            continue;
        };
        limiter.take(rule, key, n)?;
    }
    Ok(())
}

/// What one message takes from a caller's limits in a store the daemons
/// share ([`mailmux_actors::queue::Store::take_rates`]): all of it or, when
/// one bucket refuses, nothing, so that a refused message takes no rate.
#[derive(Debug)]
pub struct Shared {
    /// Sorted by key, the order the store locks them in.
    pub takes: Vec<RateTake>,
    /// For each take, its limit's text, and for a `per_recipient` limit
    /// the recipient's index in the envelope.
    whose: Vec<(String, Option<usize>)>,
}

impl Shared {
    /// The refusal of `takes[i]`, due to pass in `wait`.
    pub fn refused(&self, i: usize, wait: Duration) -> Limited {
        let (rule, recipient) = self.whose.get(i).cloned().unwrap_or_default();
        Limited {
            rule,
            retry_after: Some(wait),
            recipient,
        }
    }
}

/// The takes of one message to `recipients` from the limits of caller
/// `key`: a bucket per limit, and per recipient for a `per_recipient`
/// limit (an address twice in the envelope takes twice from one bucket),
/// each costing its share of the limit's period as governor's would. A
/// `recipients` limit with fewer than the message's recipients refuses it
/// here, as it never can pass.
pub fn shared(
    limits: &[(RateRule, Limiter)],
    key: &str,
    recipients: &[&str],
) -> Result<Shared, Limited> {
    let mut takes: std::collections::BTreeMap<String, (RateTake, String, Option<usize>)> =
        std::collections::BTreeMap::new();
    let mut add = |rule: &RateRule, bucket: String, n: u64, recipient: Option<usize>| {
        let period_ns = i64::try_from(rule.period.as_nanos()).unwrap_or(i64::MAX);
        let cost = (i128::from(period_ns) * i128::from(n) / i128::from(rule.count)).max(1);
        let cost_ns = i64::try_from(cost).unwrap_or(i64::MAX);
        let entry = takes.entry(bucket.clone()).or_insert_with(|| {
            let take = RateTake {
                key: bucket,
                cost_ns: 0,
                period_ns,
            };
            (take, rule.text.clone(), recipient)
        });
        entry.0.cost_ns = entry.0.cost_ns.saturating_add(cost_ns);
    };
    for (rule, _) in limits {
        // The limit as written is part of the bucket's name: a changed
        // limit starts full, as governor's does after a reload.
        let bucket = format!("{key}\n{}", rule.text);
        match rule.unit {
            Unit::Messages => add(rule, bucket, 1, None),
            Unit::Recipients => {
                let n = recipients.len() as u64;
                if n > u64::from(rule.count) {
                    return Err(Limited {
                        rule: rule.text.clone(),
                        retry_after: None,
                        recipient: None,
                    });
                }
                if n > 0 {
                    add(rule, bucket, n, None);
                }
            }
            Unit::PerRecipient => {
                for (i, r) in recipients.iter().enumerate() {
                    let address = crate::suppress::key(r).unwrap_or_else(|| r.to_lowercase());
                    add(rule, format!("{bucket}\n{address}"), 1, Some(i));
                }
            }
        }
    }
    let (takes, whose) = takes
        .into_values()
        .map(|(take, rule, recipient)| (take, (rule, recipient)))
        .unzip();
    Ok(Shared { takes, whose })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buckets a message takes from on a shared store: one per limit,
    /// one per recipient of a `per_recipient` limit, sorted, each costing
    /// its share of the period; a refusal names the limit and recipient.
    #[test]
    fn a_shared_take_costs_each_bucket_its_share_of_the_period() {
        let rules = ["10/min", "recipients: 4/2s", "per_recipient: 3/hour"];
        let limits: Vec<_> = rules
            .iter()
            .map(|r| {
                let rule = RateRule::parse(r).unwrap();
                (rule.clone(), limiter(&rule))
            })
            .collect();
        let s = shared(
            &limits,
            "agent",
            &["Bo@Example.org", "al@example.org", "bo@example.org"],
        )
        .unwrap();
        let got: Vec<(&str, i64, i64)> = s
            .takes
            .iter()
            .map(|t| (t.key.as_str(), t.cost_ns, t.period_ns))
            .collect();
        assert_eq!(
            got,
            [
                ("agent\n10/min", 6_000_000_000, 60_000_000_000),
                (
                    "agent\nper_recipient: 3/hour\nal@example.org",
                    1_200_000_000_000,
                    3_600_000_000_000
                ),
                (
                    "agent\nper_recipient: 3/hour\nbo@example.org",
                    2_400_000_000_000,
                    3_600_000_000_000
                ),
                ("agent\nrecipients: 4/2s", 1_500_000_000, 2_000_000_000),
            ]
        );
        let refused = s.refused(2, Duration::from_secs(5));
        assert_eq!(refused.rule, "per_recipient: 3/hour");
        assert_eq!(refused.recipient, Some(0));
        assert_eq!(refused.retry_after, Some(Duration::from_secs(5)));
        let five = ["a", "b", "c", "d", "e"];
        let never = shared(&limits, "agent", &five).unwrap_err();
        assert_eq!(
            (never.rule.as_str(), never.retry_after),
            ("recipients: 4/2s", None)
        );
    }

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
            take(&limits, &a, &["x@example.org"]).unwrap();
        }
        let refused = take(&limits, &a, &["x@example.org"]).unwrap_err();
        assert!(
            refused
                .retry_after
                .is_some_and(|d| d > Duration::from_secs(60))
        );
        take(&limits, &b, &["x@example.org"]).unwrap();
    }

    /// Each recipient has its own bucket, whatever the case of its
    /// address, and so does each caller for the same recipient; the refusal
    /// names the recipient that had its count.
    #[test]
    fn per_recipient_counts_each_recipients_messages() {
        let rule = RateRule::parse("per_recipient: 2/hour").unwrap();
        assert_eq!(rule.unit, Unit::PerRecipient);
        let limits = vec![(rule.clone(), limiter(&rule))];
        let k: Arc<str> = Arc::from("k");
        take(&limits, &k, &["ada@example.org", "bob@example.org"]).unwrap();
        take(&limits, &k, &["Ada@Example.ORG"]).unwrap();
        let refused = take(&limits, &k, &["cy@example.org", "ada@example.org"]).unwrap_err();
        assert_eq!(refused.recipient, Some(1));
        assert_eq!(refused.rule, "per_recipient: 2/hour");
        assert!(refused.retry_after.is_some());
        // Cy's cell was taken before Ada's refused (no refund); Bob has one
        // left, and another caller has its own.
        take(&limits, &k, &["bob@example.org"]).unwrap();
        take(&limits, &Arc::from("other"), &["ada@example.org"]).unwrap();
        let e = RateRule::parse("per: 1/s").unwrap_err();
        assert!(e.contains("per_recipient"), "{e}");
    }

    /// Past the mark, the buckets that have refilled are forgotten and the
    /// mark moves to twice what is left.
    #[test]
    fn full_buckets_are_forgotten_past_the_mark() {
        let rule = RateRule::parse("per_recipient: 1000/1ms").unwrap();
        let l = limiter(&rule);
        l.forget_past.store(10, Ordering::Relaxed);
        let limits = vec![(rule, l.clone())];
        let k: Arc<str> = Arc::from("k");
        let many: Vec<String> = (0..11).map(|i| format!("r{i}@example.org")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        take(&limits, &k, &many[..10]).unwrap();
        assert_eq!(l.len(), 10);
        std::thread::sleep(Duration::from_millis(5));
        take(&limits, &k, &many[10..]).unwrap();
        assert!(l.len() <= 1, "{}", l.len());
        assert_eq!(l.forget_past.load(Ordering::Relaxed), FORGET_PAST);
    }

    #[test]
    fn recipients_count_per_recipient() {
        let rule = RateRule::parse("recipients: 5/hour").unwrap();
        let limits = vec![(rule.clone(), limiter(&rule))];
        let k: Arc<str> = Arc::from("k");
        let (three, two) = (["a", "b", "c"], ["a", "b"]);
        take(&limits, &k, &three).unwrap();
        assert!(take(&limits, &k, &three).is_err());
        take(&limits, &k, &two).unwrap();
        let six = ["a", "b", "c", "d", "e", "f"];
        assert_eq!(take(&limits, &k, &six).unwrap_err().retry_after, None);
    }
}
