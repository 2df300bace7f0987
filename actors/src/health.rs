//! Health of one relay: its state, backoff with jitter, the circuit breaker,
//! counters and latency.
//!
//! Pure bookkeeping driven by the relay actor: no I/O, no timers. Time comes
//! in as an argument so the rules can be tested without waiting.

use std::collections::VecDeque;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::mail::FailureClass;
use crate::settings::HealthSettings;
use crate::status::{Counters, Latency, RelayState};

/// The relay's state, with absolute times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Healthy,
    BackingOff { until: Instant },
    CircuitOpen { until: Instant },
    Disabled,
}

impl State {
    /// Whether the router may send live traffic now. A relay whose backoff
    /// has run out takes traffic again (its next failure backs off longer);
    /// an open circuit waits for a successful probe.
    pub(crate) fn available(&self, now: Instant) -> bool {
        match *self {
            State::Healthy => true,
            State::BackingOff { until } => now >= until,
            State::CircuitOpen { .. } | State::Disabled => false,
        }
    }

    pub(crate) fn view(&self, now: Instant) -> RelayState {
        match *self {
            State::Healthy => RelayState::Healthy,
            State::BackingOff { until } => RelayState::BackingOff {
                retry_in: until.saturating_duration_since(now),
            },
            State::CircuitOpen { until } => RelayState::CircuitOpen {
                retry_in: until.saturating_duration_since(now),
            },
            State::Disabled => RelayState::Disabled,
        }
    }
}

/// How many latencies are kept for percentiles.
const LATENCY_WINDOW: usize = 1024;

#[derive(Debug)]
pub(crate) struct Health {
    settings: HealthSettings,
    pub(crate) state: State,
    pub(crate) consecutive_failures: u32,
    /// A probe passed while the relay was down, and no delivery has ended
    /// since: the next one tells whether the probe can be trusted.
    on_probation: bool,
    /// Times in a row the relay passed a probe and then failed the next
    /// delivery, as one that answers NOOP but hangs at MAIL does. Each
    /// doubles the backoff, which a passed probe would otherwise bring back
    /// to `backoff_base` every time; a delivery resets it.
    pub(crate) relapses: u32,
    failures_in_window: VecDeque<Instant>,
    pub(crate) counters: Counters,
    latencies: VecDeque<Duration>,
    latency_count: u64,
    pub(crate) last_error: Option<String>,
}

impl Health {
    pub(crate) fn new(settings: HealthSettings) -> Self {
        Self {
            settings,
            state: State::Healthy,
            consecutive_failures: 0,
            on_probation: false,
            relapses: 0,
            failures_in_window: VecDeque::new(),
            counters: Counters::default(),
            latencies: VecDeque::with_capacity(LATENCY_WINDOW),
            latency_count: 0,
            last_error: None,
        }
    }

    /// A message was delivered (or refused for reasons of its own): the relay
    /// itself works.
    pub(crate) fn on_success(&mut self, latency: Duration) {
        self.record_latency(latency);
        self.on_probation = false;
        self.relapses = 0;
        self.healthy();
    }

    /// A probe succeeded: the relay takes traffic again, and when it was
    /// down, its next delivery is on probation.
    pub(crate) fn recover(&mut self) {
        if self.state != State::Healthy || self.consecutive_failures > 0 {
            self.on_probation = true;
        }
        self.healthy();
    }

    fn healthy(&mut self) {
        if self.state != State::Disabled {
            self.state = State::Healthy;
        }
        self.consecutive_failures = 0;
    }

    /// An attempt failed. Only failures that say something about the relay
    /// (relay faults, 4xx replies, lost connections) move it towards backoff.
    pub(crate) fn on_failure(
        &mut self,
        now: Instant,
        class: FailureClass,
        detail: &str,
        rng: &mut impl Rng,
    ) {
        self.counters.count_failure(class);
        if matches!(
            class,
            FailureClass::RelayFault | FailureClass::Transient | FailureClass::Unknown
        ) {
            if self.on_probation {
                self.on_probation = false;
                self.relapses = self.relapses.saturating_add(1);
            }
            self.record_failure(now, detail, rng);
        }
    }

    /// A probe failed: stay down, and wait longer before the next one.
    pub(crate) fn on_probe_failure(&mut self, now: Instant, detail: &str, rng: &mut impl Rng) {
        self.record_failure(now, detail, rng);
    }

    /// Backs off for longer with each consecutive failure (and each
    /// relapse), and opens the circuit when `circuit_failures` fall within
    /// `circuit_window`.
    fn record_failure(&mut self, now: Instant, detail: &str, rng: &mut impl Rng) {
        self.last_error = Some(detail.to_owned());
        if self.state == State::Disabled {
            return;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.failures_in_window.push_back(now);
        while let Some(&t) = self.failures_in_window.front() {
            if now.duration_since(t) > self.settings.circuit_window {
                self.failures_in_window.pop_front();
            } else {
                break;
            }
        }
        let delay = self.backoff(self.consecutive_failures.saturating_add(self.relapses), rng);
        let open = self.failures_in_window.len() as u32 >= self.settings.circuit_failures;
        self.state = if open || matches!(self.state, State::CircuitOpen { .. }) {
            State::CircuitOpen { until: now + delay }
        } else {
            State::BackingOff { until: now + delay }
        };
    }

    /// Exponential backoff with "equal jitter": half the delay is fixed, the
    /// other half random, so that relays that failed together do not all
    /// retry at the same instant.
    pub(crate) fn backoff(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let base = self.settings.backoff_base.as_secs_f64() * f64::from(1u32 << exp);
        let capped = base.min(self.settings.backoff_max.as_secs_f64());
        let half = capped / 2.0;
        Duration::from_secs_f64(half + rng.random_range(0.0..=half))
    }

    /// Back to a clean slate: healthy, no failures (counters are kept).
    pub(crate) fn reset(&mut self) {
        self.state = State::Healthy;
        self.consecutive_failures = 0;
        self.on_probation = false;
        self.relapses = 0;
        self.failures_in_window.clear();
    }

    fn record_latency(&mut self, latency: Duration) {
        if self.latencies.len() == LATENCY_WINDOW {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
        self.latency_count += 1;
    }

    /// Percentiles over the last deliveries.
    pub(crate) fn latency(&self) -> Latency {
        if self.latencies.is_empty() {
            return Latency::default();
        }
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Latency {
            count: self.latency_count,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn settings() -> HealthSettings {
        HealthSettings {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            circuit_failures: 3,
            circuit_window: Duration::from_secs(60),
            probe_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let h = Health::new(settings());
        let mut rng = StdRng::seed_from_u64(7);
        for (failures, full) in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)] {
            for _ in 0..50 {
                let d = h.backoff(failures, &mut rng).as_secs_f64();
                assert!(d >= full / 2.0 && d <= full, "{failures} failures: {d}s");
            }
        }
    }

    #[test]
    fn backoff_has_jitter() {
        let h = Health::new(settings());
        let mut rng = StdRng::seed_from_u64(1);
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| h.backoff(3, &mut rng)).collect();
        assert!(samples.len() > 10, "expected spread, got {samples:?}");
    }

    #[test]
    fn failures_back_off_then_open_the_circuit() {
        let mut h = Health::new(settings());
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        h.on_failure(now, FailureClass::RelayFault, "refused", &mut rng);
        assert!(matches!(h.state, State::BackingOff { .. }));
        assert!(!h.state.available(now));
        assert!(h.state.available(now + Duration::from_secs(2)));
        h.on_failure(now, FailureClass::Transient, "451", &mut rng);
        h.on_failure(now, FailureClass::RelayFault, "refused", &mut rng);
        assert!(matches!(h.state, State::CircuitOpen { .. }));
        assert!(!h.state.available(now + Duration::from_secs(3600)));
        assert_eq!(h.consecutive_failures, 3);
        h.recover();
        assert_eq!(h.state, State::Healthy);
    }

    #[test]
    fn failures_outside_the_window_do_not_open_the_circuit() {
        let mut h = Health::new(settings());
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        h.on_failure(t0, FailureClass::RelayFault, "x", &mut rng);
        h.on_failure(
            t0 + Duration::from_secs(61),
            FailureClass::RelayFault,
            "x",
            &mut rng,
        );
        h.on_failure(
            t0 + Duration::from_secs(122),
            FailureClass::RelayFault,
            "x",
            &mut rng,
        );
        assert!(matches!(h.state, State::BackingOff { .. }));
    }

    /// A relay whose circuit never opens, with room to double its backoff
    /// six times.
    fn without_circuit() -> Health {
        Health::new(HealthSettings {
            backoff_max: Duration::from_secs(64),
            circuit_failures: 1000,
            ..settings()
        })
    }

    /// The backoff of a failure at `now`, in seconds (`backoff_base` is 1 s).
    fn backed_off(h: &mut Health, now: Instant, rng: &mut StdRng) -> f64 {
        h.on_failure(now, FailureClass::RelayFault, "timed out at MAIL", rng);
        match h.state {
            State::BackingOff { until } | State::CircuitOpen { until } => {
                (until - now).as_secs_f64()
            }
            other => panic!("not backing off: {other:?}"),
        }
    }

    #[test]
    fn a_relay_that_passes_probes_but_fails_deliveries_backs_off_longer_each_time() {
        let mut h = without_circuit();
        let mut rng = StdRng::seed_from_u64(5);
        let now = Instant::now();
        // Fails, passes its probe, fails the next delivery: the backoff
        // doubles with each round, though the probe said it was healthy.
        for full in [1.0, 2.0, 4.0, 8.0, 16.0] {
            let d = backed_off(&mut h, now, &mut rng);
            assert!(d >= full / 2.0 && d <= full, "{d}s, expected up to {full}s");
            h.recover();
            assert_eq!(h.state, State::Healthy);
        }
        assert_eq!(h.relapses, 4);
        // One delivery that works: back to the first backoff.
        h.on_success(Duration::from_millis(5));
        assert_eq!(h.relapses, 0);
        let d = backed_off(&mut h, now, &mut rng);
        assert!(d <= 1.0, "{d}s");
    }

    #[test]
    fn one_failure_after_a_long_outage_is_one_relapse_not_the_outage() {
        let mut h = without_circuit();
        let mut rng = StdRng::seed_from_u64(9);
        let now = Instant::now();
        backed_off(&mut h, now, &mut rng);
        for _ in 0..10 {
            h.on_probe_failure(now, "connection refused", &mut rng);
        }
        h.recover();
        let d = backed_off(&mut h, now, &mut rng);
        assert!(d <= 2.0, "{d}s");
        // A probe of a relay that was never down puts nothing on probation.
        let mut fresh = Health::new(settings());
        fresh.recover();
        let d = backed_off(&mut fresh, now, &mut rng);
        assert!(d <= 1.0, "{d}s");
        assert_eq!(fresh.relapses, 0);
    }

    #[test]
    fn permanent_failures_do_not_hurt_health() {
        let mut h = Health::new(settings());
        let mut rng = StdRng::seed_from_u64(3);
        h.on_failure(Instant::now(), FailureClass::Permanent, "550", &mut rng);
        assert_eq!(h.state, State::Healthy);
        assert_eq!(h.counters.permanent, 1);
    }

    #[test]
    fn latency_percentiles() {
        let mut h = Health::new(settings());
        for ms in 1..=100 {
            h.on_success(Duration::from_millis(ms));
        }
        let l = h.latency();
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, Duration::from_millis(51));
        assert_eq!(l.max, Duration::from_millis(100));
    }
}
