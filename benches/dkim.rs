//! The cost of DKIM signing per message, in process: composing a 1 KiB
//! message with no key, with an RSA-2048 key and with an Ed25519 key (the
//! default signed fields), so that each difference is the signature alone.
//! The keys are made by `tests/dkim_verify.py keys` (Python's
//! `cryptography`). Run by hand: `cargo bench --bench dkim`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailmux::compose::dkim::{DEFAULT_HEADERS, Signer, Signers};
use mailmux::compose::{ComposePolicy, Draft, Recipients, compose};

const N: usize = 2_000;

fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let status = std::process::Command::new("python3")
        .arg("tests/dkim_verify.py")
        .arg("keys")
        .arg(dir.path())
        .status()
        .expect("python3 runs");
    assert!(status.success(), "keys made");
    let headers: Vec<String> = DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect();
    let signed_by = |file: &str| {
        let key = Signer::read(
            "example.org",
            "bench",
            &dir.path().join(file),
            headers.clone(),
        )
        .expect("the key reads");
        Signers(vec![Arc::new(key)])
    };
    let draft = Draft {
        to: Recipients::List(vec!["rcpt@example.org".into()]),
        subject: "bench".into(),
        body: "x".repeat(1024),
        ..Draft::default()
    };
    let cases = [
        ("unsigned", Signers::default()),
        ("RSA-2048", signed_by("rsa.pem")),
        ("Ed25519", signed_by("ed.pem")),
    ];
    let mut best = [Duration::MAX; 3];
    for _ in 0..3 {
        for (k, (_, dkim)) in cases.iter().enumerate() {
            let policy = ComposePolicy {
                default_from: Some("sender@example.org".into()),
                dkim: dkim.clone(),
                ..ComposePolicy::default()
            };
            let started = Instant::now();
            for _ in 0..N {
                black_box(compose(black_box(&draft), &policy).expect("composes"));
            }
            best[k] = best[k].min(started.elapsed());
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    for (k, (name, _)) in cases.iter().enumerate() {
        println!(
            "compose, {name:<8}: {:>7.1} µs/msg, signing {:>6.1} µs (best of 3 runs of {N})",
            per(best[k]),
            per(best[k]) - per(best[0])
        );
    }
}
