//! The cost of a caller's policy and rate checks per message, in process:
//! composing a 1 KiB message with and without `Caller::check` and
//! `Caller::take_rate` (an allowlist of four rules, two rates), so that the
//! difference is the checks alone; then the same with five content checks
//! (`content_checks`), on the 1 KiB message and on one with a 100 KiB
//! attachment, which every check reads, and with that attachment zipped
//! and a gzip that unpacks to 8 MiB (the most one attachment is unpacked
//! to), which the checks unpack. Run by hand: `cargo bench --bench policy`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use mailmux::compose::{AttachmentInput, ComposePolicy, Draft, Recipients, compose};
use mailmux::policy::content::{Action, Check, ContentChecks};
use mailmux::policy::rate::RateRule;
use mailmux::policy::rules::AddressRule;
use mailmux::policy::{CallerSettings, Gate, Policy, SafetySettings};

const N: usize = 200_000;

fn main() {
    let policy = Policy {
        allowed_senders: vec![AddressRule::parse("@example.org", false).unwrap()],
        allowed_recipients: [
            "ops@example.net",
            "@example.com",
            "@*.example.org",
            "@example.org",
        ]
        .iter()
        .map(|r| AddressRule::parse(r, true).unwrap())
        .collect(),
        allow_bcc: false,
        max_recipients: Some(10),
        rate: vec![
            RateRule::parse("100000000/min").unwrap(),
            RateRule::parse("recipients: 100000000/day").unwrap(),
        ],
        ..Policy::default()
    };
    let gate = gate(policy);
    let compose_policy = ComposePolicy {
        default_from: Some("sender@example.org".into()),
        ..ComposePolicy::default()
    };
    let draft = Draft {
        to: Recipients::List(vec!["rcpt@example.org".into()]),
        subject: "bench".into(),
        body: "x".repeat(1024),
        ..Draft::default()
    };

    let mut best = [Duration::MAX; 2];
    for _ in 0..3 {
        for (k, checked) in [false, true].into_iter().enumerate() {
            let started = Instant::now();
            for _ in 0..N {
                let c = compose(black_box(&draft), &compose_policy).expect("composes");
                if checked {
                    let caller = gate.stdio_caller();
                    black_box(caller.check(&c, None, false).expect("allowed"));
                    let to: Vec<&str> = c.recipients.iter().map(AsRef::as_ref).collect();
                    caller.take_rate(&to).expect("within rate");
                }
                black_box(c);
            }
            best[k] = best[k].min(started.elapsed());
        }
    }
    // The checks alone, on one composed message.
    let c = compose(&draft, &compose_policy).expect("composes");
    let mut alone = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for _ in 0..N {
            let caller = gate.stdio_caller();
            black_box(caller.check(black_box(&c), None, false).expect("allowed"));
            let to: Vec<&str> = c.recipients.iter().map(AsRef::as_ref).collect();
            caller.take_rate(&to).expect("within rate");
        }
        alone = alone.min(started.elapsed());
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    println!("policy and rate alone:   {:.3} µs/msg", per(alone));
    println!("compose only:            {:.2} µs/msg", per(best[0]));
    println!("compose + policy + rate: {:.2} µs/msg", per(best[1]));
    println!(
        "policy and rate checks:  {:.2} µs/msg (best of 3 runs of {N})",
        per(best[1]) - per(best[0])
    );
    content_checks(&compose_policy, &draft);
}

/// Compose and check with no content checks, then with five typical ones
/// (which none of the messages matches, so each reads every part).
fn content_checks(compose_policy: &ComposePolicy, draft: &Draft) {
    use base64::Engine as _;
    let checks = [
        ("private key", "-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        ("aws key", r"\bAKIA[0-9A-Z]{16}\b"),
        ("stripe key", r"\bsk_live_[0-9a-zA-Z]{16,}"),
        ("card", r"\b(?:\d[ -]?){13,16}\b"),
        ("invoice", r"(?i)\binvoice\b"),
    ];
    let with = Policy {
        content_checks: ContentChecks::new(
            checks
                .iter()
                .map(|(name, pattern)| Check {
                    name: (*name).into(),
                    pattern: (*pattern).into(),
                    action: Action::Reject,
                })
                .collect(),
        )
        .expect("the patterns compile"),
        ..Policy::default()
    };
    let (plain, checked) = (gate(Policy::default()), gate(with));
    let mut attached = draft.clone();
    let data: Vec<u8> = (0..100 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    attached.attachments = vec![AttachmentInput::Inline {
        filename: "report.txt".into(),
        content_base64: base64::engine::general_purpose::STANDARD.encode(&data),
        content_type: None,
        content_id: None,
    }];
    let archived = |filename: &str, bytes: Vec<u8>| {
        let mut d = draft.clone();
        d.attachments = vec![AttachmentInput::Inline {
            filename: filename.into(),
            content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            content_type: None,
            content_id: None,
        }];
        d
    };
    let zipped = archived("report.zip", {
        use std::io::Write as _;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file("report.txt", deflated).expect("a zip entry");
        w.write_all(&data).expect("written");
        w.finish().expect("a zip").into_inner()
    });
    let bomb = archived("data.gz", {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![b'a'; mailmux::policy::archive::MAX_UNPACKED])
            .expect("written");
        e.finish().expect("a gzip")
    });
    for (what, draft, n) in [
        ("1 KiB", draft, N),
        ("100 KiB attached", &attached, N / 50),
        ("100 KiB zipped", &zipped, N / 50),
        ("8 MiB gzipped", &bomb, 20),
    ] {
        let mut best = [Duration::MAX; 2];
        for _ in 0..3 {
            for (k, gate) in [&plain, &checked].into_iter().enumerate() {
                let caller = gate.stdio_caller();
                let checks = &caller.policy.content_checks;
                let started = Instant::now();
                for _ in 0..n {
                    let c = if checks.is_empty() {
                        compose(black_box(draft), compose_policy)
                    } else {
                        mailmux::compose::compose_scanned(
                            black_box(draft),
                            compose_policy,
                            None,
                            &|d| checks.scan(d),
                        )
                    }
                    .expect("composes");
                    black_box(caller.check(&c, None, false).expect("allowed"));
                }
                best[k] = best[k].min(started.elapsed());
            }
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "{what}: compose + check {:.2} µs/msg; with 5 content checks {:.2} (+{:.2}; best of 3 runs of {n})",
            per(best[0]),
            per(best[1]),
            per(best[1]) - per(best[0])
        );
    }
}

/// The gate of a daemon whose stdio caller has `policy`.
fn gate(policy: Policy) -> Gate {
    let settings = SafetySettings {
        stdio: CallerSettings {
            name: "bench".into(),
            token: None,
            policy,
        },
        ..SafetySettings::default()
    };
    Gate::new(&settings, None, None)
}
