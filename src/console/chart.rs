//! The overview's charts: the last hour of samples of the dispatcher, and
//! their drawing as small server-rendered SVG line charts.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use mailmux_actors::Snapshot;
use maud::{Markup, html};

/// How often the dispatcher is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
const KEPT: usize = 360;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    /// Messages the relays finished (delivered or refused) since the last
    /// sample, per minute.
    per_minute: f64,
    /// The slowest relay's median and 99th percentile, in milliseconds.
    p50_ms: f64,
    p99_ms: f64,
}

/// The last hour of samples.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    points: VecDeque<Point>,
    /// The relays' finished count at the last sample.
    last_total: Option<u64>,
}

impl History {
    pub fn sample(&self, s: &Snapshot) {
        let total: u64 = s
            .relays
            .iter()
            .map(|r| {
                r.counters.sent + r.counters.partial + r.counters.permanent + r.counters.unknown
            })
            .sum();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let p50_ms = s
            .relays
            .iter()
            .map(|r| ms(r.latency.p50))
            .fold(0.0, f64::max);
        let p99_ms = s
            .relays
            .iter()
            .map(|r| ms(r.latency.p99))
            .fold(0.0, f64::max);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Counters restart with a relay: a drop counts from zero.
        let delta = match inner.last_total {
            Some(last) if total >= last => total - last,
            Some(_) => total,
            None => 0,
        };
        inner.last_total = Some(total);
        let per_minute = delta as f64 * 60.0 / SAMPLE_EVERY.as_secs_f64();
        if inner.points.len() == KEPT {
            inner.points.pop_front();
        }
        inner.points.push_back(Point {
            per_minute,
            p50_ms,
            p99_ms,
        });
    }

    /// Messages per minute, as a chart.
    pub fn throughput(&self) -> Markup {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let series: Vec<f64> = inner.points.iter().map(|p| p.per_minute).collect();
        chart(
            "messages per minute",
            &[("finished", "#2563eb", &series)],
            "",
        )
    }

    /// Delivery latency p50 and p99, as a chart.
    pub fn latency(&self) -> Markup {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let p50: Vec<f64> = inner.points.iter().map(|p| p.p50_ms).collect();
        let p99: Vec<f64> = inner.points.iter().map(|p| p.p99_ms).collect();
        chart(
            "delivery latency",
            &[("p50", "#059669", &p50), ("p99", "#d97706", &p99)],
            " ms",
        )
    }
}

const W: f64 = 480.0;
const H: f64 = 120.0;

/// A line chart of the last hour: one polyline a series, the newest sample
/// at the right edge, the scale from 0 to the largest value.
fn chart(title: &str, series: &[(&str, &str, &[f64])], unit: &str) -> Markup {
    let max = series
        .iter()
        .flat_map(|(_, _, s)| s.iter().copied())
        .fold(0.0, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let step = W / (KEPT - 1) as f64;
    let points = |s: &[f64]| -> String {
        let start = KEPT - s.len().min(KEPT);
        s.iter()
            .enumerate()
            .map(|(i, v)| {
                let x = (start + i) as f64 * step;
                let y = H - (v / top) * H;
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let empty = series.iter().all(|(_, _, s)| s.len() < 2);
    html! {
        figure.chart {
            figcaption {
                (title) " · last hour"
                @for (name, color, s) in series {
                    span.legend style={ "color:" (color) } {
                        " ● " (name) " " (format!("{:.0}", s.last().copied().unwrap_or(0.0))) (unit)
                    }
                }
            }
            svg viewBox={ "0 0 " (W) " " (H + 14.0) } width="100%" role="img" aria-label=(title) {
                line x1="0" y1=(H) x2=(W) y2=(H) stroke="#cbd5e1" {}
                line x1="0" y1="0" x2=(W) y2="0" stroke="#eef2f7" {}
                text x="2" y="11" font-size="10" fill="#64748b" { (format!("{max:.0}")) (unit) }
                text x="2" y=(H + 12.0) font-size="10" fill="#64748b" { "−60 min" }
                text x=(W - 2.0) y=(H + 12.0) font-size="10" fill="#64748b" text-anchor="end" { "now" }
                @if empty {
                    text x=(W / 2.0) y=(H / 2.0) font-size="11" fill="#94a3b8" text-anchor="middle" {
                        "collecting samples (every 10 s)"
                    }
                } @else {
                    @for (_, color, s) in series {
                        polyline fill="none" stroke=(color) stroke-width="1.5" points=(points(s)) {}
                    }
                }
            }
        }
    }
}
