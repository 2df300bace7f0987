//! Self-tests of the fault-injecting SMTP test server.
mod support;

#[tokio::test]
async fn starts() {
    let s = support::fault_smtp::FaultSmtp::start(support::fault_smtp::Script::ok()).await;
    assert!(s.port() > 0);
}
