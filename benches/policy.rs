//! The cost of a caller's policy and rate checks per message, in process:
//! composing a 1 KiB message with and without `Caller::check` and
//! `Caller::take_rate` (an allowlist of four rules, two rates), so that the
//! difference is the checks alone. Run by hand:
//! `cargo bench --bench policy`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use mailmux::compose::{ComposePolicy, Draft, Recipients, compose};
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
    let settings = SafetySettings {
        stdio: CallerSettings {
            name: "bench".into(),
            token: None,
            policy,
        },
        ..SafetySettings::default()
    };
    let gate = Gate::new(&settings, None, None);
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
                    caller.take_rate(c.recipients.len()).expect("within rate");
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
            caller.take_rate(c.recipients.len()).expect("within rate");
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
}
