//! The overview's charts: lag and appends over the last minutes, sampled by the console
//! from the same status the pages show (no second source of truth).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use emmett_seaorm::EventStore;

/// How often the console samples.
const EVERY: Duration = Duration::from_secs(5);

/// How many samples it keeps (six minutes).
const KEPT: usize = 72;

/// One sample of every store together (taken every few seconds).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Events past the checkpoints.
    pub lag_events: u64,
    /// Events appended per second since the sample before (by the stores' last global
    /// positions: a rolled-back append's position counts too).
    pub appended_per_second: f64,
}

/// The samples, newest last.
#[derive(Default)]
pub struct Samples {
    kept: Mutex<VecDeque<Sample>>,
}

impl Samples {
    pub fn all(&self) -> Vec<Sample> {
        self.kept.lock().expect("not poisoned").iter().copied().collect()
    }
}

/// Starts sampling `stores` in the background, until the samples are dropped.
pub fn start(stores: Vec<(String, EventStore)>) -> Arc<Samples> {
    let samples = Arc::new(Samples::default());
    let weak = Arc::downgrade(&samples);
    tokio::spawn(sample(stores, weak));
    samples
}

async fn sample(stores: Vec<(String, EventStore)>, samples: Weak<Samples>) {
    let mut last: Option<(Instant, u64)> = None;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        if samples.strong_count() == 0 {
            return;
        }
        let (mut lag_events, mut heads) = (0, 0);
        for (_, store) in &stores {
            if let Ok(pairs) = emmett_seaorm::admin::projections(store).await {
                lag_events += pairs.iter().map(|p| p.lag_events).sum::<u64>();
                heads += pairs.iter().map(|p| p.head).max().unwrap_or(0);
            }
        }
        let at = Instant::now();
        let appended_per_second = match last {
            Some((then, before)) => heads.saturating_sub(before) as f64 / at.duration_since(then).as_secs_f64(),
            None => 0.0,
        };
        last = Some((at, heads));
        let Some(samples) = samples.upgrade() else { return };
        let mut kept = samples.kept.lock().expect("not poisoned");
        kept.push_back(Sample { lag_events, appended_per_second });
        if kept.len() > KEPT {
            kept.pop_front();
        }
    }
}

/// An SVG line chart of `values` (oldest first), `width` × `height`, with its largest value.
pub fn chart(values: &[f64], width: f64, height: f64) -> (String, f64) {
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    if values.len() < 2 {
        return (String::new(), max);
    }
    let step = width / (KEPT - 1) as f64;
    let offset = width - step * (values.len() - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = if max > 0.0 { height - v / max * (height - 2.0) - 1.0 } else { height - 1.0 };
            format!("{:.1},{:.1}", offset + i as f64 * step, y)
        })
        .collect();
    (points.join(" "), max)
}
