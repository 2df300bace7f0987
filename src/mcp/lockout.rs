//! Failed authentication per peer address (`http.auth_failures`): a wrong
//! or missing token on `/mcp`, the admin routes and `/metrics`, a wrong
//! token at the console's sign-in, or an unsubscribe link the secret did
//! not make. Each address may fail as often as the
//! rate allows (a governor keyed limiter, refilled evenly); past it every
//! request from that address but `/health` is answered 429 until one
//! failure refills, even one carrying a right token, so that a guess made
//! while refused learns nothing. IPv6 addresses count by their /64, which
//! one host usually holds whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use governor::DefaultKeyedRateLimiter;
use governor::clock::Clock;

use crate::policy::rate::RateRule;

/// Past this many addresses known to the limiter (or refused), the ones
/// that have refilled are forgotten (by the limiter, once they have been
/// refilled for a period); then again past twice as many as were
/// left, so that many addresses failing at once cost a scan now and then,
/// not one a failure.
const FORGET_PAST: usize = 4096;

#[derive(Debug)]
pub struct Lockout {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// The refill of one failure (the rule's period over its count).
    refill: Duration,
    refused: Mutex<Refused>,
    /// The limiter's size past which it next forgets.
    forget_past: AtomicUsize,
    rule: String,
}

/// Until when each address is refused. An address refused again within one
/// refill of its last refusal is the same spell of guessing: logged once,
/// when it began.
#[derive(Debug)]
struct Refused {
    until: HashMap<IpAddr, Instant>,
    /// The size past which the refusals that ended are forgotten.
    forget_past: usize,
}

impl Lockout {
    pub fn new(rule: &RateRule) -> Lockout {
        let quota = rule.quota();
        Lockout {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            refill: quota.replenish_interval(),
            refused: Mutex::new(Refused {
                until: HashMap::new(),
                forget_past: FORGET_PAST,
            }),
            forget_past: AtomicUsize::new(FORGET_PAST),
            rule: rule.text.clone(),
        }
    }

    /// How long `peer` is still refused, if it is.
    pub fn refused(&self, peer: IpAddr) -> Option<Duration> {
        let key = key(peer);
        let now = Instant::now();
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused
            .until
            .get(&key)
            .and_then(|until| until.checked_duration_since(now))
            .filter(|wait| !wait.is_zero())
    }

    /// How many addresses are refused now.
    pub fn refused_now(&self) -> usize {
        let now = Instant::now();
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.until.values().filter(|until| **until > now).count()
    }

    /// Counts one failed authentication from `peer`; the time it is now
    /// refused for when it has no failure left.
    pub fn failed(&self, peer: IpAddr) -> Option<Duration> {
        let key = key(peer);
        if self.limiter.len() > self.forget_past.load(Ordering::Relaxed) {
            self.limiter.retain_recent();
            let left = self.limiter.len();
            self.forget_past
                .store(FORGET_PAST.max(left * 2), Ordering::Relaxed);
        }
        let not_until = self.limiter.check_key(&key).err()?;
        let wait = not_until
            .wait_time_from(self.limiter.clock().now())
            .max(Duration::from_millis(1));
        let now = Instant::now();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let refill = self.refill;
        let previous = refused.until.insert(key, now + wait);
        if refused.until.len() > refused.forget_past {
            refused.until.retain(|_, until| *until + refill > now);
            refused.forget_past = FORGET_PAST.max(refused.until.len() * 2);
        }
        if previous.is_none_or(|until| until + refill <= now) {
            tracing::warn!(
                peer = %key,
                auth_failures = %self.rule,
                refused_for = %humantime::format_duration(Duration::from_secs(wait.as_secs().max(1))),
                "authentication failed too often from this address: its requests are refused (429) until a failure refills"
            );
        }
        Some(wait)
    }
}

/// The address failures count against: IPv4 (also as IPv4-mapped IPv6)
/// whole, IPv6 by its /64.
fn key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lockout(rate: &str) -> Lockout {
        Lockout::new(&RateRule::parse(rate).unwrap())
    }

    #[test]
    fn an_address_is_refused_past_its_failures_and_others_are_not() {
        let l = lockout("3/min");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.failed(a), None);
            assert_eq!(l.refused(a), None);
        }
        let wait = l.failed(a).expect("the fourth failure refuses");
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert!(l.refused(a).is_some());
        assert_eq!(l.refused(b), None);
        assert_eq!(l.failed(b), None);
        assert_eq!(l.refused_now(), 1);
    }

    #[test]
    fn a_refusal_ends_when_a_failure_refills() {
        let l = lockout("2/200ms");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        l.failed(a);
        l.failed(a);
        assert!(l.failed(a).is_some());
        assert_eq!(l.refused_now(), 1);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(l.refused(a), None);
        assert_eq!(l.refused_now(), 0);
        assert_eq!(l.failed(a), None, "one failure refilled");
        assert!(l.failed(a).is_some());
    }

    #[test]
    fn addresses_that_refilled_are_forgotten() {
        // The limiter forgets an address one period after it refilled, two
        // after its failure: 1 s here, which the first loop does not
        // outrun even in a loaded debug build.
        let l = lockout("1/500ms");
        let address = |i: u32| IpAddr::from((0x0a00_0000 + i).to_be_bytes());
        // None has refilled when the limiter first passes FORGET_PAST: it
        // keeps them all, and waits for twice as many.
        for i in 0..5000 {
            assert_eq!(l.failed(address(i)), None);
        }
        assert_eq!(l.limiter.len(), 5000);
        assert_eq!(l.forget_past.load(Ordering::Relaxed), 2 * (FORGET_PAST + 1));
        // Past that, the 5,000 that refilled meanwhile are forgotten.
        std::thread::sleep(Duration::from_millis(1100));
        for i in 5000..9000 {
            l.failed(address(i));
        }
        assert!(l.limiter.len() < 5000, "{} kept", l.limiter.len());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let l = lockout("1/min");
        let one: IpAddr = "2001:db8:1:2::10".parse().unwrap();
        let same: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::10".parse().unwrap();
        assert_eq!(l.failed(one), None);
        assert!(l.failed(same).is_some());
        assert!(l.refused(one).is_some());
        assert_eq!(l.refused(other), None);
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(l.failed(v4), None);
        assert!(l.failed(mapped).is_some());
        assert!(l.refused(v4).is_some());
    }
}
