//! What the pages and the JSON show of a (projection, tenant) pair, and the overview's
//! filters, order and pages.

use std::time::{Duration, Instant};

use emmett_seaorm::daemon::LeaseStatus;
use serde::{Deserialize, Serialize};

use crate::Shared;

/// A pair's state, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairState {
    /// Failed its retries in a row: waits for a fix (resume) or a skip.
    Parked,
    /// Failed, retried after a pause.
    BackingOff,
    /// Behind, and no live instance holds it.
    Waiting,
    /// Behind, held by a live instance.
    Running,
    /// Nothing to project.
    CaughtUp,
}

impl PairState {
    /// The state of a pair with this status.
    pub fn of(lease: &LeaseStatus) -> Self {
        match lease {
            l if l.parked => PairState::Parked,
            l if l.failures > 0 => PairState::BackingOff,
            l if l.lag_events == 0 => PairState::CaughtUp,
            l if l.owner.is_none() || l.free => PairState::Waiting,
            _ => PairState::Running,
        }
    }

    /// Its name in URLs and JSON.
    pub fn key(self) -> &'static str {
        match self {
            PairState::Parked => "parked",
            PairState::BackingOff => "backing-off",
            PairState::Waiting => "waiting",
            PairState::Running => "running",
            PairState::CaughtUp => "caught-up",
        }
    }

    /// Every state, worst first.
    pub const ALL: [PairState; 5] =
        [PairState::Parked, PairState::BackingOff, PairState::Waiting, PairState::Running, PairState::CaughtUp];

    /// Its name on pages.
    pub fn label(self) -> &'static str {
        match self {
            PairState::Parked => "parked",
            PairState::BackingOff => "backing off",
            PairState::Waiting => "waiting",
            PairState::Running => "running",
            PairState::CaughtUp => "caught up",
        }
    }
}

/// A (projection, tenant) pair of one store.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub store: String,
    pub projection: String,
    pub tenant: String,
    pub state: PairState,
    pub checkpoint: u64,
    pub head: u64,
    pub lag_events: u64,
    pub lag_seconds: f64,
    pub owner: Option<String>,
    pub failures: u64,
    pub retry_in_seconds: f64,
    pub error: Option<String>,
    pub error_position: Option<u64>,
}

impl Pair {
    fn new(store: &str, l: LeaseStatus) -> Self {
        let (error, error_position) = l.last_error.clone().unzip();
        Pair {
            store: store.to_owned(),
            state: PairState::of(&l),
            checkpoint: l.checkpoint,
            head: l.head,
            lag_events: l.lag_events,
            lag_seconds: l.lag.as_secs_f64(),
            owner: l.owner,
            failures: l.failures,
            retry_in_seconds: l.retry_in.as_secs_f64(),
            error,
            error_position,
            projection: l.subscription,
            tenant: l.tenant,
        }
    }
}

/// What every store said, when.
pub struct Status {
    read: Instant,
    pairs: Vec<Pair>,
    down: Vec<(String, String)>,
}

/// How long a status read serves other requests: one status query a second however many
/// pages refresh (at 10,000 tenants the query reads for about a third of a second).
const FRESH: Duration = Duration::from_secs(1);

/// Every pair of every store (a store that fails: its error, by name), read at most a second ago.
pub async fn pairs(shared: &Shared) -> (Vec<Pair>, Vec<(String, String)>) {
    let mut status = shared.status.lock().await;
    if let Some(fresh) = status.as_ref().filter(|s| s.read.elapsed() < FRESH) {
        return (fresh.pairs.clone(), fresh.down.clone());
    }
    let read = Instant::now();
    let (mut pairs, mut down) = (Vec::new(), Vec::new());
    for (name, store) in &shared.stores {
        match emmett_seaorm::admin::projections(store).await {
            Ok(leases) => pairs.extend(leases.into_iter().map(|l| Pair::new(name, l))),
            Err(error) => down.push((name.clone(), error.to_string())),
        }
    }
    *status = Some(Status { read, pairs: pairs.clone(), down: down.clone() });
    (pairs, down)
}

/// Forgets the last status read (an action changed it).
pub async fn forget(shared: &Shared) {
    *shared.status.lock().await = None;
}

/// The overview's query: filters, order, page.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct OverviewQuery {
    /// Tenants whose id contains this.
    pub tenant: String,
    /// Only this projection.
    pub projection: String,
    /// Only pairs in this state.
    pub state: Option<PairState>,
    /// `worst` (default), `lag`, `age`, `tenant`, `projection`.
    pub sort: String,
    /// From 1.
    pub page: usize,
}

/// Rows per page.
pub const PAGE: usize = 50;

/// What the overview shows: the page's pairs, how many match, the number of pages.
pub struct Selection {
    pub rows: Vec<Pair>,
    pub matching: usize,
    pub pages: usize,
    pub page: usize,
}

impl OverviewQuery {
    /// The page of `pairs` this query asks for.
    pub fn select(&self, pairs: Vec<Pair>) -> Selection {
        let pairs = self.select_all(pairs);
        let matching = pairs.len();
        let pages = matching.div_ceil(PAGE).max(1);
        let page = self.page.clamp(1, pages);
        let rows = pairs.into_iter().skip((page - 1) * PAGE).take(PAGE).collect();
        Selection { rows, matching, pages, page }
    }

    /// Every pair matching the filters, in the query's order.
    pub fn select_all(&self, mut pairs: Vec<Pair>) -> Vec<Pair> {
        pairs.retain(|p| {
            (self.tenant.is_empty() || p.tenant.contains(&self.tenant))
                && (self.projection.is_empty() || p.projection == self.projection)
                && self.state.is_none_or(|s| p.state == s)
        });
        let by_lag = |a: &Pair, b: &Pair| b.lag_events.cmp(&a.lag_events);
        let by_age = |a: &Pair, b: &Pair| b.lag_seconds.total_cmp(&a.lag_seconds);
        let by_name =
            |a: &Pair, b: &Pair| (&a.projection, &a.tenant, &a.store).cmp(&(&b.projection, &b.tenant, &b.store));
        match self.sort.as_str() {
            "lag" => pairs.sort_by(|a, b| by_lag(a, b).then_with(|| by_name(a, b))),
            "age" => pairs.sort_by(|a, b| by_age(a, b).then_with(|| by_name(a, b))),
            "tenant" => pairs.sort_by(|a, b| (&a.tenant, &a.projection).cmp(&(&b.tenant, &b.projection))),
            "projection" => pairs.sort_by(by_name),
            _ => pairs.sort_by(|a, b| a.state.cmp(&b.state).then_with(|| by_lag(a, b)).then_with(|| by_name(a, b))),
        }
        pairs
    }

    /// This query's URL parameters with `page` (and `sort`) replaced.
    pub fn with(&self, page: usize, sort: Option<&str>) -> String {
        let mut query = self.clone();
        query.page = page;
        if let Some(sort) = sort {
            query.sort = sort.to_owned();
        }
        query_string(&query)
    }
}

/// `key=value&…` of a query, leaving out empty values.
fn query_string(query: &OverviewQuery) -> String {
    let mut parts = Vec::new();
    let mut push = |key: &str, value: &str| {
        if !value.is_empty() {
            parts.push(format!("{key}={}", encode(value)));
        }
    };
    push("tenant", &query.tenant);
    push("projection", &query.projection);
    if let Some(state) = query.state {
        push("state", state.key());
    }
    push("sort", &query.sort);
    push("page", &query.page.to_string());
    parts.join("&")
}

/// A value for a URL's query: every byte but unreserved ones percent-encoded.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Seconds as the pages show them: `0.4 s`, `12 s`, `3 min`, `2.5 h`.
pub fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 10.0 => format!("{s:.1} s"),
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// The pairs that failed at least once, worst first.
pub fn failing(mut pairs: Vec<Pair>) -> Vec<Pair> {
    pairs.retain(|p| p.failures > 0);
    pairs.sort_by(|a, b| (a.state, &a.projection, &a.tenant).cmp(&(b.state, &b.projection, &b.tenant)));
    pairs
}
