//! The supervisor actor: it spawns the router and one actor per relay,
//! linked, and restarts them on purpose when they fail.
//!
//! A failed child is rebuilt from its settings after a pause, at most
//! `max_restarts` times within `restart_window`; past that a relay is
//! disabled (and the router stops using it) and a crashing router stops the
//! dispatcher. Reloads are applied as a diff. The supervisor does no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::time::Instant;

use crate::dispatcher::ControlError;
use crate::health::State;
use crate::relay::{RelayActor, RelayArgs, RelayMsg, RelayShared};
use crate::router::{Pin, RelayEntry, RouterActor, RouterArgs, RouterCell, RouterMsg};
use crate::settings::{RelaySettings, Settings, SupervisorSettings};
use crate::status::ReloadDiff;

/// How long a reload waits for the router to install the new relay table.
/// The router's handlers are short, so this only runs out when the router is
/// crashing; a restarted router starts from the new table anyway.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The reason the daemon's shutdown stops the actors with: a child that
/// stops for it is not restarted (nor logged as if it had failed).
pub(crate) const SHUTDOWN: &str = "shutdown";

/// A relay as the supervisor keeps it.
#[derive(Debug)]
struct RelaySlot {
    shared: Arc<RelayShared>,
    actor: Option<ActorRef<RelayMsg>>,
    restarts: Restarts,
}

/// Restart bookkeeping of one child.
#[derive(Debug, Default)]
struct Restarts {
    recent: VecDeque<Instant>,
    total: u32,
}

impl Restarts {
    /// Records a failure; false when the budget is spent.
    fn allow(&mut self, policy: &SupervisorSettings, now: Instant) -> bool {
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) > policy.restart_window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() as u32 >= policy.max_restarts {
            return false;
        }
        self.recent.push_back(now);
        self.total += 1;
        true
    }
}

/// Which child to restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Child {
    Router,
    Relay(String),
}

/// What the dispatcher needs to fan out status, probes and reconnects.
#[derive(Debug, Clone)]
pub(crate) struct View {
    pub relays: Vec<(Arc<RelayShared>, Option<ActorRef<RelayMsg>>, u32)>,
    pub router_restarts: u32,
    pub settings: Settings,
}

#[derive(Debug)]
pub(crate) enum SupMsg {
    View(RpcReplyPort<View>),
    Reload(Settings, RpcReplyPort<Result<ReloadDiff, ControlError>>),
    Restart(Child),
}

#[derive(Debug)]
pub(crate) struct SupervisorArgs {
    pub settings: Settings,
    pub router: RouterCell,
    pub pin: Pin,
    pub share: crate::relay::RateShare,
    pub fleet: crate::relay::Fleet,
}

#[derive(Debug)]
pub(crate) struct Supervisor;

#[derive(Debug)]
pub(crate) struct SupState {
    settings: Settings,
    relays: Vec<RelaySlot>,
    router: Option<ActorRef<RouterMsg>>,
    router_restarts: Restarts,
    router_cell: RouterCell,
    pin: Pin,
    /// Relay actors that were removed or replaced and are draining: their
    /// exit is expected and not restarted.
    draining: HashMap<ActorId, String>,
    share: crate::relay::RateShare,
    /// The current relays, for the dispatcher's [`Dispatcher::any_relay_available`].
    ///
    /// [`Dispatcher::any_relay_available`]: crate::Dispatcher::any_relay_available
    fleet: crate::relay::Fleet,
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupMsg>,
        args: SupervisorArgs,
    ) -> Result<SupState, ActorProcessingErr> {
        let mut state = SupState {
            relays: Vec::new(),
            router: None,
            router_restarts: Restarts::default(),
            router_cell: args.router,
            pin: args.pin,
            draining: HashMap::new(),
            settings: args.settings.clone(),
            share: args.share.clone(),
            fleet: args.fleet.clone(),
        };
        for settings in args.settings.relays {
            let slot = state
                .start_relay(&myself, RelayShared::new(settings, state.share.clone()), 0)
                .await?;
            state.relays.push(slot);
        }
        state.publish_fleet();
        state.start_router(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupMsg>,
        msg: SupMsg,
        state: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::View(reply) => {
                let _ = reply.send(View {
                    relays: state
                        .relays
                        .iter()
                        .map(|s| (s.shared.clone(), s.actor.clone(), s.restarts.total))
                        .collect(),
                    router_restarts: state.router_restarts.total,
                    settings: state.settings.clone(),
                });
            }
            SupMsg::Reload(settings, reply) => {
                let diff = state.reload(&myself, settings).await;
                let _ = reply.send(diff);
            }
            SupMsg::Restart(Child::Router) => state.start_router(&myself).await?,
            SupMsg::Restart(Child::Relay(name)) => {
                if let Some(i) = state.relays.iter().position(|s| s.shared.name() == name) {
                    let shared = state.relays[i].shared.clone();
                    let restarts = state.relays[i].restarts.total;
                    match state.start_relay(&myself, shared, restarts).await {
                        Ok(slot) => {
                            state.relays[i].actor = slot.actor;
                            state.publish_table();
                        }
                        Err(e) => {
                            tracing::error!(relay = %name, error = %e, "relay restart failed");
                            state.on_child_exit(&myself, Child::Relay(name), "restart failed");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        state: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match &evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            // Stopped by the daemon's shutdown: nothing to restart.
            SupervisionEvent::ActorTerminated(_, _, Some(reason)) if reason == SHUTDOWN => {
                return Ok(());
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.clone().unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if let Some(child) = state.identify(cell) {
            state.on_child_exit(&myself, child, &why);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupMsg>,
        state: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        for slot in &state.relays {
            slot.shared.close_idle();
        }
        Ok(())
    }
}

impl SupState {
    async fn start_relay(
        &self,
        myself: &ActorRef<SupMsg>,
        shared: Arc<RelayShared>,
        restarts: u32,
    ) -> Result<RelaySlot, ActorProcessingErr> {
        let args = RelayArgs {
            shared: shared.clone(),
            router: self.router_cell.clone(),
            restarts,
        };
        let (actor, _) = Actor::spawn_linked(None, RelayActor, args, myself.get_cell()).await?;
        Ok(RelaySlot {
            shared,
            actor: Some(actor),
            restarts: Restarts::default(),
        })
    }

    async fn start_router(&mut self, myself: &ActorRef<SupMsg>) -> Result<(), ActorProcessingErr> {
        let args = RouterArgs {
            table: self.table(),
            settings: self.settings.router.clone(),
            pin: self.pin.clone(),
        };
        let (router, _) = Actor::spawn_linked(None, RouterActor, args, myself.get_cell()).await?;
        self.router_cell.set(router.clone());
        self.router = Some(router);
        Ok(())
    }

    /// Shows the current relays to the dispatcher.
    fn publish_fleet(&self) {
        let relays = self.relays.iter().map(|r| r.shared.clone()).collect();
        *self.fleet.lock().unwrap_or_else(|e| e.into_inner()) = relays;
    }

    fn table(&self) -> Vec<RelayEntry> {
        self.relays
            .iter()
            .map(|s| RelayEntry {
                shared: s.shared.clone(),
                actor: s.actor.clone(),
            })
            .collect()
    }

    fn publish_table(&self) {
        if let Some(router) = &self.router {
            let _ = router.cast(RouterMsg::Table(self.table()));
        }
    }

    fn identify(&mut self, cell: &ActorCell) -> Option<Child> {
        let id = cell.get_id();
        if self.draining.remove(&id).is_some() {
            return None;
        }
        if self.router.as_ref().is_some_and(|r| r.get_id() == id) {
            return Some(Child::Router);
        }
        self.relays
            .iter()
            .find(|s| s.actor.as_ref().is_some_and(|a| a.get_id() == id))
            .map(|s| Child::Relay(s.shared.name().to_owned()))
    }

    /// One place for every child exit: check the budget, then schedule the
    /// restart after the pause, or give up.
    fn on_child_exit(&mut self, myself: &ActorRef<SupMsg>, child: Child, why: &str) {
        let policy = self.settings.supervisor.clone();
        let now = Instant::now();
        let allowed = match &child {
            Child::Router => {
                self.router = None;
                self.router_restarts.allow(&policy, now)
            }
            Child::Relay(name) => {
                let Some(slot) = self.relays.iter_mut().find(|s| s.shared.name() == name) else {
                    return;
                };
                slot.actor = None;
                let allowed = slot.restarts.allow(&policy, now);
                if !allowed {
                    slot.shared.set_state(State::Disabled);
                    slot.shared.stop_accepting();
                }
                self.publish_table();
                allowed
            }
        };
        if allowed {
            tracing::warn!(child = ?child, reason = %why, pause = ?policy.restart_pause, "actor exited; restarting");
            myself.send_after(policy.restart_pause, move || SupMsg::Restart(child));
        } else {
            tracing::error!(child = ?child, reason = %why, "actor exceeded its restart limit");
            if child == Child::Router {
                myself.stop(Some("the router exceeded its restart limit".into()));
            }
        }
    }

    async fn reload(
        &mut self,
        myself: &ActorRef<SupMsg>,
        new: Settings,
    ) -> Result<ReloadDiff, ControlError> {
        let mut diff = ReloadDiff::default();
        let old: HashMap<String, RelaySettings> = self
            .relays
            .iter()
            .map(|s| (s.shared.name().to_owned(), s.shared.settings.clone()))
            .collect();

        let mut next = Vec::with_capacity(new.relays.len());
        let mut retired = Vec::new();
        let mut current: HashMap<String, RelaySlot> = self
            .relays
            .drain(..)
            .map(|s| (s.shared.name().to_owned(), s))
            .collect();
        for settings in &new.relays {
            match (old.get(&settings.name), current.remove(&settings.name)) {
                (Some(prev), Some(slot)) if prev == settings => next.push(slot),
                (_, previous) => {
                    if let Some(slot) = previous {
                        diff.changed.push(settings.name.clone());
                        retired.push(slot);
                    } else {
                        diff.added.push(settings.name.clone());
                    }
                    let slot = self
                        .start_relay(
                            myself,
                            RelayShared::new(settings.clone(), self.share.clone()),
                            0,
                        )
                        .await
                        .map_err(|e| {
                            ControlError::Invalid(format!("relay {}: {e}", settings.name))
                        })?;
                    next.push(slot);
                }
            }
        }
        for (name, slot) in current {
            diff.removed.push(name);
            retired.push(slot);
        }
        diff.removed.sort();
        self.relays = next;
        self.publish_fleet();
        diff.router_changed = self.settings.router != new.router;
        self.settings = new;

        // The router stops sending to retired relays first; then they drain.
        // It must have installed the new table before a retired relay stops
        // accepting: messages queued in its mailbox would otherwise be routed
        // against the old table, find every relay there closed, and fail.
        if let Some(router) = &self.router {
            let _ = router.cast(RouterMsg::Settings(self.settings.router.clone()));
            let installed = ractor::call_t!(
                router,
                RouterMsg::Install,
                INSTALL_TIMEOUT.as_millis() as u64,
                self.table()
            );
            if installed.is_err() {
                tracing::warn!(
                    "the router did not confirm the new relay table; retiring relays anyway"
                );
            }
        }
        for slot in retired {
            slot.shared.stop_accepting();
            if let Some(actor) = slot.actor {
                self.draining
                    .insert(actor.get_id(), slot.shared.name().to_owned());
                let _ = actor.cast(RelayMsg::Drain);
            }
        }
        Ok(diff)
    }
}
