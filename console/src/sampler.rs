//! The overview's charts: lag and appends over the last minutes, sampled by the console
//! from the same status the pages show (no second source of truth).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use crate::Shared;

/// How often the console samples.
const EVERY: Duration = Duration::from_secs(5);

/// How many samples it keeps (six minutes).
const KEPT: usize = 72;

/// How many samples a lag trend looks at (a minute).
const TREND: usize = 12;

/// How long after the last request the console keeps sampling.
const WATCHED: Duration = Duration::from_secs(600);

/// One sample of every store together (taken every few seconds).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// Events behind per (store, projection).
    pub lag_by_projection: BTreeMap<(String, String), u64>,
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
    /// When the console last answered a request.
    seen: Mutex<Option<Instant>>,
}

impl Samples {
    /// Someone is looking: sample for the next [`WATCHED`].
    pub fn watch(&self) {
        *self.seen.lock().expect("not poisoned") = Some(Instant::now());
    }

    fn watched(&self) -> Option<Instant> {
        *self.seen.lock().expect("not poisoned")
    }

    pub fn all(&self) -> Vec<Sample> {
        self.kept.lock().expect("not poisoned").iter().cloned().collect()
    }

    /// How fast (events per second) the lag of `projection` in `store` fell over the last
    /// minute of samples; `None` without two samples of it.
    pub fn lag_trend(&self, store: &str, projection: &str) -> Option<f64> {
        let kept = self.kept.lock().expect("not poisoned");
        let key = (store.to_owned(), projection.to_owned());
        let recent: Vec<(Instant, u64)> =
            kept.iter().rev().take(TREND).filter_map(|s| Some((s.at, *s.lag_by_projection.get(&key)?))).collect();
        let (&(last_at, last), &(first_at, first)) = (recent.first()?, recent.last()?);
        let seconds = last_at.duration_since(first_at).as_secs_f64();
        (seconds > 0.0).then(|| (first as f64 - last as f64) / seconds)
    }
}

/// Samples the console's stores in the background until the console is dropped.
pub fn start(shared: Weak<Shared>) {
    tokio::spawn(async move {
        let mut last: Option<(Instant, u64)> = None;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else { return };
            // Nobody is looking: no status reads (at 10,000 tenants one reads ~0.35 s of the
            // database). The charts start afresh when someone comes back.
            if shared.samples.watched().is_none_or(|seen| seen.elapsed() > WATCHED) {
                shared.samples.kept.lock().expect("not poisoned").clear();
                last = None;
                continue;
            }
            let (pairs, _) = crate::view::pairs(&shared).await;
            let lag_events = pairs.iter().map(|p| p.lag_events).sum();
            let mut lag_by_projection: BTreeMap<(String, String), u64> = BTreeMap::new();
            for p in &pairs {
                *lag_by_projection.entry((p.store.clone(), p.projection.clone())).or_default() += p.lag_events;
            }
            // Each store's last global position, over the stores.
            let mut heads: BTreeMap<&str, u64> = BTreeMap::new();
            for p in &pairs {
                let head = heads.entry(p.store.as_str()).or_default();
                *head = (*head).max(p.head);
            }
            let heads: u64 = heads.values().sum();
            let at = Instant::now();
            let appended_per_second = match last {
                Some((then, before)) => heads.saturating_sub(before) as f64 / at.duration_since(then).as_secs_f64(),
                None => 0.0,
            };
            last = Some((at, heads));
            let mut kept = shared.samples.kept.lock().expect("not poisoned");
            kept.push_back(Sample { at, lag_by_projection, lag_events, appended_per_second });
            if kept.len() > KEPT {
                kept.pop_front();
            }
        }
    });
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
