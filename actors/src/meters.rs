//! What a relay records through the `metrics` facade: attempts by class,
//! failovers and delivery latency. The handles are made once per relay, so
//! recording costs an atomic add. With no recorder installed (the library
//! used alone, its tests) every handle does nothing.

use std::time::Duration;

use metrics::{Counter, Histogram};

use crate::mail::FailureClass;

/// Delivery attempts, by relay and class (`sent`, `partial`, or a failure
/// class).
pub const ATTEMPTS: &str = "mailmux_attempts_total";
/// Messages a relay could not take that went on to another relay.
pub const FAILOVERS: &str = "mailmux_failovers_total";
/// Time from handing a message to a relay to its final reply, connection
/// wait included, of messages the relay delivered.
pub const DELIVERY_SECONDS: &str = "mailmux_delivery_seconds";

/// The classes of an attempt, as the `class` label spells them.
const CLASSES: [&str; 8] = [
    "sent",
    "partial",
    "relay_fault",
    "transient",
    "permanent",
    "unknown",
    "busy",
    "unsupported",
];

/// One relay's handles.
#[derive(Debug)]
pub(crate) struct RelayMeters {
    attempts: [Counter; CLASSES.len()],
    failovers: Counter,
    latency: Histogram,
}

impl RelayMeters {
    pub(crate) fn new(relay: &str) -> Self {
        let relay = relay.to_owned();
        RelayMeters {
            attempts: CLASSES.map(
                |class| metrics::counter!(ATTEMPTS, "relay" => relay.clone(), "class" => class),
            ),
            failovers: metrics::counter!(FAILOVERS, "relay" => relay.clone()),
            latency: metrics::histogram!(DELIVERY_SECONDS, "relay" => relay),
        }
    }

    /// A delivery: `partial` when some recipients were refused.
    pub(crate) fn delivered(&self, partial: bool, latency: Duration) {
        self.attempts[usize::from(partial)].increment(1);
        self.latency.record(latency.as_secs_f64());
    }

    pub(crate) fn failed(&self, class: FailureClass) {
        let at = match class {
            FailureClass::RelayFault => 2,
            FailureClass::Transient => 3,
            FailureClass::Permanent => 4,
            FailureClass::Unknown => 5,
            FailureClass::Busy => 6,
            FailureClass::Unsupported => 7,
        };
        debug_assert_eq!(CLASSES[at], class.as_str());
        self.attempts[at].increment(1);
    }

    pub(crate) fn failed_over(&self) {
        self.failovers.increment(1);
    }
}
