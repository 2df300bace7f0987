//! What the queue asks of a message's caller before each of its rounds
//! (`queue::Screen`): whether a recipient may still get its mail (the
//! suppression list, which an `unsubscribed` entry leaves open for a
//! `transactional` caller), and how long its mail may wait for delivery
//! (the caller's `max_age`). The answers follow the configuration in force
//! when the round comes: [`Rounds::set`] at start and at each reload.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::Gate;
use crate::suppress::Suppressions;

/// The policy of one caller that a round reads, for the callers whose
/// policy says anything of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    transactional: bool,
    max_age: Option<Duration>,
}

#[derive(Debug)]
pub struct Rounds {
    suppressions: Arc<Suppressions>,
    /// By caller name; empty when no caller's policy says anything of it.
    callers: RwLock<HashMap<String, Rules>>,
}

impl Rounds {
    pub fn new(suppressions: Arc<Suppressions>, gate: &Gate) -> Arc<Rounds> {
        let rounds = Arc::new(Rounds {
            suppressions,
            callers: RwLock::default(),
        });
        rounds.set(gate);
        rounds
    }

    /// Takes the callers' policies of a new configuration.
    pub fn set(&self, gate: &Gate) {
        let callers = gate
            .policies()
            .filter(|(_, p)| p.transactional || p.max_age.is_some())
            .map(|(name, p)| {
                let rules = Rules {
                    transactional: p.transactional,
                    max_age: p.max_age,
                };
                (name.to_owned(), rules)
            })
            .collect();
        *self.callers.write().unwrap_or_else(|e| e.into_inner()) = callers;
    }

    fn rules(&self, caller: Option<&str>) -> Option<Rules> {
        let callers = self.callers.read().unwrap_or_else(|e| e.into_inner());
        if callers.is_empty() {
            return None;
        }
        callers.get(caller?).copied()
    }
}

impl mailmux_actors::queue::Screen for Rounds {
    /// A message accepted before one of its recipients was listed is
    /// cancelled, not sent; whether an `unsubscribed` entry counts is its
    /// caller's policy as it is now.
    fn refused(&self, caller: Option<&str>, to: &[String]) -> Option<String> {
        let transactional = self.rules(caller).is_some_and(|r| r.transactional);
        self.suppressions
            .check(to.iter().map(String::as_str), transactional)
            .map(|(_, address, _)| address)
    }

    fn max_age(&self, caller: Option<&str>) -> Option<Duration> {
        self.rules(caller).and_then(|r| r.max_age)
    }
}
