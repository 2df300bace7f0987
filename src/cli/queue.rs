//! `mailmux queue`: acts on the configured store directly, so it works
//! whether or not a daemon runs (a running daemon's poll delivers what is
//! released here). Approving and rejecting need an operator, named by the
//! token in `MAILMUX_OPERATOR_TOKEN`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use mailmux_actors::queue::{
    self, Action, Decided, Decision, Event, Observer, StoreKind, sqlite::SqliteStore,
};

use crate::audit::Audit;
use crate::config::Config;
use crate::policy::Gate;

/// The variable holding the operator's token.
pub const OPERATOR_TOKEN_VAR: &str = "MAILMUX_OPERATOR_TOKEN";

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Release a held message for delivery.
    Approve(IdArgs),
    /// Refuse a held message; it is never sent.
    Reject(IdArgs),
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// The message_id the send answered with.
    pub id: String,
}

/// Exit code when the message's state does not allow the action.
const EXIT_REFUSED: u8 = 1;
/// Exit code of a usage, configuration or permission error.
const EXIT_USAGE: u8 = 2;

pub async fn run(config: Config, cmd: QueueCommand) -> ExitCode {
    let (id, approve) = match &cmd {
        QueueCommand::Approve(a) => (a.id.clone(), true),
        QueueCommand::Reject(a) => (a.id.clone(), false),
    };
    if config.safety.operators.is_empty() {
        eprintln!(
            "mailmux: no [[operators]] are configured; only an operator may approve or reject"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let token = std::env::var(OPERATOR_TOKEN_VAR).ok();
    let gate = Gate::new(&config.safety, None, None);
    let Some(operator) = gate.operator(token.as_deref()) else {
        eprintln!("mailmux: {OPERATOR_TOKEN_VAR} does not hold the token of a configured operator");
        return ExitCode::from(EXIT_USAGE);
    };
    let store: Arc<dyn queue::Store> = match &config.queue.store {
        // Shared: the daemon that owns the store may be running.
        StoreKind::Sqlite { path } => match SqliteStore::open_shared(path) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                eprintln!("mailmux: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        StoreKind::Memory => {
            eprintln!(
                "mailmux: the memory store lives inside the daemon; use its POST /admin/messages/{{id}}/approve"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let decision = Decision {
        approve,
        by: format!("operator {operator}"),
        hash: None,
    };
    match store.decide(&id, decision).await {
        Ok(Decided::Released(state)) => {
            audit(&config, store.as_ref(), &id, Action::Approved).await;
            println!("{id}: approved; now {}", state.as_str());
            ExitCode::SUCCESS
        }
        Ok(Decided::Rejected) => {
            audit(&config, store.as_ref(), &id, Action::Rejected).await;
            println!("{id}: rejected; it will not be sent");
            ExitCode::SUCCESS
        }
        Ok(Decided::NotHeld(state)) => {
            eprintln!(
                "mailmux: {id} is {}, not held; only a held message can be {}",
                state.as_str(),
                if approve { "approved" } else { "rejected" }
            );
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Decided::HashMismatch) => {
            eprintln!("mailmux: {id}: the approval was for other content");
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Decided::NotFound) => {
            eprintln!("mailmux: no message {id:?}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("mailmux: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Appends the decision to the audit log, as the daemon would.
async fn audit(config: &Config, store: &dyn queue::Store, id: &str, action: Action) {
    if config.safety.audit.path.is_none() {
        return;
    }
    let log = match Audit::open(config.safety.audit.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mailmux: cannot open the audit log: {e}");
            return;
        }
    };
    let Ok(Some(r)) = store.get(id).await else {
        return;
    };
    log.event(&Event {
        action,
        message_id: &r.message_id,
        caller: r.caller.as_deref(),
        meta: r.meta.as_deref(),
        from: r.from.as_deref(),
        to: &r.to,
        size: r.size,
        relay: None,
        code: None,
        reason: r.reason.as_deref(),
        decided_by: r.decided_by.as_deref(),
    });
}
