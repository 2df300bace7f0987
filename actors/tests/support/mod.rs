//! Test servers and helpers shared by every mailmux test binary: a scriptable
//! fault-injecting SMTP server, Python's aiosmtpd and Postfix's smtp-sink, each on
//! its own loopback port, and a TCP proxy that loses an answer. Test-only code: it panics on setup failures so that a
//! broken fixture fails the test loudly; it never talks to anything but 127.0.0.1.
//!
//! Use it from `actors/tests/*.rs` with `mod support;` and from the root crate's
//! `tests/*.rs` with `#[path = "../actors/tests/support/mod.rs"] mod support;`.

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

pub mod aiosmtpd;
pub mod cut_proxy;
pub mod fault_smtp;
pub mod postgres;
pub mod smtp_sink;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before this returns, so another program may take it in
/// between; callers that hand it to a child process retry on a bind failure.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`], for a condition that has to await (a status call).
pub async fn wait_until_async<F, Fut>(mut cond: F, timeout: Duration) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A message that a real SMTP server (aiosmtpd, smtp-sink) received and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The MAIL FROM address, without angle brackets (empty for the null sender).
    pub mail_from: String,
    /// The RCPT TO addresses, in order.
    pub rcpt_to: Vec<String>,
    /// The message data as the server stored it.
    pub data: Vec<u8>,
    /// The Message-ID header's value, with angle brackets.
    pub message_id: Option<String>,
}

/// The value of the first `Message-ID` header of a raw message, trimmed, with its
/// angle brackets (for example `<abc@example.com>`); folded headers are unfolded.
pub fn message_id(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.eq_ignore_ascii_case("message-id") {
            continue;
        }
        let mut value = value.trim().to_string();
        // A folded header continues on lines that start with white space.
        for next in lines.by_ref() {
            if next.starts_with([' ', '\t']) {
                value.push_str(next.trim());
            } else {
                break;
            }
        }
        return Some(value);
    }
    None
}

/// The effective uid, from `id -u` (the crates forbid unsafe code).
pub fn euid() -> u32 {
    let o = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id -u");
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// Gives `path` and everything under it to `uid:gid` (a server the tests
/// run as `nobody` must own its files).
pub fn chown_all(path: &std::path::Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_all(&e.unwrap().path(), uid, gid);
        }
    }
}
