//! The bad-input table on its own: each entry gets a tool error with
//! `invalid_input`, the field and the rule, and the SMTP server receives
//! nothing. The same table runs during a burst in `tests/reliability.rs`.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

#[path = "reliability/bad_input.rs"]
mod bad_input;
#[path = "reliability/harness.rs"]
mod harness;
#[path = "reliability/reconcile.rs"]
mod reconcile;

use std::time::Duration;

use common::{config, relay};
use mailmux::config::Sources;
use support::fault_smtp::{FaultSmtp, Script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_with_its_field_and_rule() {
    let attachments = bad_input::AttachmentsDir::create();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let mut cfg = config(vec![relay("only", smtp.port(), 1)]);
    cfg.daemon.compose = attachments.policy();
    let d = harness::InProcess::start(cfg, Sources::default()).await;

    let cases = bad_input::cases(&attachments.path());
    let mut calls = Vec::new();
    let mut problems = Vec::new();
    for case in &cases {
        // A FIFO or a slow path must not hang the call.
        let c = harness::call(
            d.peer(),
            case.name,
            "send_email",
            case.args.clone(),
            Duration::from_secs(10),
        )
        .await;
        if let Err(e) = bad_input::check(case, &c) {
            problems.push(e);
        }
        // The text an agent reads names the field.
        if let harness::Answer::Result { text, .. } = &c.answer {
            let field = case.field.split(['[', '.']).next().unwrap_or(case.field);
            if !text.contains(field) {
                problems.push(format!(
                    "{}: the text does not name {field}: {text}",
                    case.name
                ));
            }
        }
        calls.push(c);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let tally = reconcile::reconcile(&calls, &[&smtp]).await;
    assert_eq!(tally.codes.get("invalid_input"), Some(&cases.len()));
    assert!(smtp.received().is_empty());
    assert_eq!(smtp.commands(support::fault_smtp::Phase::Mail), 0);
}
