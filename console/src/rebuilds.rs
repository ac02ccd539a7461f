//! Rebuilds: in place (started here, with the app's projections: progress and ETA), and new
//! versions filling up beside the serving one (their lag and ETA from the sampled trend).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::Json;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use emmett_seaorm::projection::{Progress, RunOptions};
use maud::html;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::actions::{allowed, back};
use crate::pages::page;
use crate::view::{self, PairState, duration};
use crate::{AppState, Base, Failure, Shared};

/// A rebuild started from the console.
#[derive(Debug, Clone, Serialize)]
pub struct Rebuild {
    pub store: String,
    pub projection: String,
    /// The last batch's tenant.
    pub tenant: Option<String>,
    pub processed: u64,
    /// Events to read in all, as counted when it started.
    pub total: u64,
    pub seconds: f64,
    /// Seconds left at the rate so far, while it runs.
    pub eta_seconds: Option<f64>,
    /// `running`, `done` or the error.
    pub outcome: String,
    #[serde(skip)]
    started: Instant,
    #[serde(skip)]
    finished: Option<Instant>,
}

impl Rebuild {
    fn running(&self) -> bool {
        self.finished.is_none()
    }

    /// Its figures now.
    fn now(&self) -> Rebuild {
        let mut now = self.clone();
        now.seconds = self.finished.unwrap_or_else(Instant::now).duration_since(self.started).as_secs_f64();
        let rate = self.processed as f64 / now.seconds.max(0.001);
        now.eta_seconds =
            (self.running() && rate > 0.0).then(|| self.total.saturating_sub(self.processed) as f64 / rate);
        now
    }
}

/// The rebuilds started here, by (store, projection).
pub type Rebuilds = std::sync::Mutex<BTreeMap<(String, String), Rebuild>>;

/// A new version filling up (or any projection behind on many tenants): how far, and when done.
#[derive(Debug, Clone, Serialize)]
pub struct Filling {
    pub store: String,
    pub projection: String,
    pub tenants: usize,
    pub caught_up: usize,
    pub lag_events: u64,
    /// At the rate its lag fell over the sampled minutes, if it fell.
    pub eta_seconds: Option<f64>,
}

async fn filling(shared: &Shared) -> Vec<Filling> {
    let (pairs, _) = view::pairs(shared).await;
    let mut by: BTreeMap<(String, String), Filling> = BTreeMap::new();
    for p in &pairs {
        let entry = by.entry((p.store.clone(), p.projection.clone())).or_insert_with(|| Filling {
            store: p.store.clone(),
            projection: p.projection.clone(),
            tenants: 0,
            caught_up: 0,
            lag_events: 0,
            eta_seconds: None,
        });
        entry.tenants += 1;
        entry.caught_up += usize::from(p.state == PairState::CaughtUp);
        entry.lag_events += p.lag_events;
    }
    let mut filling: Vec<Filling> = by.into_values().collect();
    for f in &mut filling {
        let falling = shared.samples.lag_trend(&f.store, &f.projection);
        f.eta_seconds = falling.filter(|rate| *rate > 0.0).map(|rate| f.lag_events as f64 / rate);
    }
    filling
}

/// `/rebuilds`.
pub async fn page_of(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let filling = filling(&shared).await;
    let rebuilds = current(&shared);
    let names: Vec<String> =
        shared.projections.as_ref().map(|p| p.names().map(str::to_owned).collect()).unwrap_or_default();
    let main = html! {
        @if let Some(done) = q.get("done") { p.done { (done) } }
        @if let Some(error) = q.get("error") { p.error { (error) } }
        h1 { "Rebuilds" }
        h2 { "Projections and versions filling up" }
        p.note { "A new version is a projection of its own beside the serving one: its lag falls as the daemon fills it." }
        table {
            thead { tr { @if shared.stores.len() > 1 { th { "store" } } th { "projection" } th.num { "tenants caught up" }
                         th.num { "events behind" } th.num { "ETA" } } }
            tbody { @for f in &filling {
                tr data-projection=(f.projection) {
                    @if shared.stores.len() > 1 { td { (f.store) } }
                    td { (f.projection) }
                    td.num { (f.caught_up) " / " (f.tenants) }
                    td.num { (f.lag_events) }
                    td.num { @if f.lag_events == 0 { "done" } @else { (f.eta_seconds.map_or("-".to_owned(), duration)) } }
                }
            } }
        }
        h2 { "In place" }
        @if rebuilds.is_empty() { p { "No rebuild started here." } }
        @for r in &rebuilds {
            article.rebuild data-projection=(r.projection) data-outcome=(r.outcome) {
                header { strong { (r.projection) } @if shared.stores.len() > 1 { " · store " (r.store) } " · " (r.outcome) }
                progress max=(r.total.max(1)) value=(r.processed.min(r.total.max(1))) {}
                p { (r.processed) " of " (r.total) " events · " (duration(r.seconds))
                    @if let Some(eta) = r.eta_seconds { " · about " (duration(eta)) " left" }
                    @if let Some(t) = &r.tenant { " · tenant " (t) } }
            }
        }
        @if names.is_empty() {
            p.note { "Starting a rebuild needs the app's projections: mount the console with Console::projections." }
        } @else if !shared.actions {
            p.note { "Read-only: enable actions to start a rebuild." }
        } @else {
            @for (store, _) in &shared.stores { @for name in &names {
                form method="post" action={ (base) "/actions/rebuild" }
                    data-confirm={ "Rebuild " (name) " in place, tenant by tenant? Each tenant's rows are replaced in one transaction." } {
                    input type="hidden" name="csrf" value=(shared.csrf);
                    input type="hidden" name="store" value=(store);
                    input type="hidden" name="projection" value=(name);
                    button type="submit" { "Rebuild " (name) @if shared.stores.len() > 1 { " in " (store) } }
                }
            } }
        }
    };
    page(&base, "Rebuilds", true, main).into_response()
}

/// `/api/rebuilds`.
pub async fn api(State(shared): State<AppState>) -> Json<Value> {
    Json(json!({ "filling": filling(&shared).await, "rebuilds": current(&shared) }))
}

fn current(shared: &Shared) -> Vec<Rebuild> {
    shared.rebuilds.lock().expect("not poisoned").values().map(Rebuild::now).collect()
}

/// The rebuild action's form.
#[derive(Debug, Deserialize)]
pub struct RebuildForm {
    csrf: String,
    store: String,
    projection: String,
}

/// `POST /actions/rebuild`: starts a rebuild in the background.
pub async fn start(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Form(form): Form<RebuildForm>,
) -> Result<Response, Failure> {
    allowed(&shared, &form.csrf)?;
    let (name, store) = shared.store(Some(&form.store))?;
    let projections = shared.projections.clone().ok_or_else(|| {
        Failure(StatusCode::CONFLICT, "this console has no projections to rebuild (Console::projections)".into())
    })?;
    if !projections.names().any(|n| n == form.projection) {
        return Err(Failure(StatusCode::NOT_FOUND, format!("no projection '{}' to rebuild", form.projection)));
    }
    let key = (name.clone(), form.projection.clone());
    {
        let mut rebuilds = shared.rebuilds.lock().expect("not poisoned");
        if rebuilds.get(&key).is_some_and(Rebuild::running) {
            let message = format!("{} is being rebuilt already", form.projection);
            return Ok(back(&base, "rebuilds", Err(message)));
        }
        let started = Instant::now();
        let rebuild = Rebuild {
            store: key.0.clone(),
            projection: key.1.clone(),
            tenant: None,
            processed: 0,
            total: 0,
            seconds: 0.0,
            eta_seconds: None,
            outcome: "running".into(),
            started,
            finished: None,
        };
        rebuilds.insert(key.clone(), rebuild);
    }
    let (store, shared_weak) = (store.clone(), Arc::downgrade(&shared));
    tokio::spawn(async move {
        let update = |f: &mut dyn FnMut(&mut Rebuild)| {
            if let Some(shared) = shared_weak.upgrade()
                && let Some(r) = shared.rebuilds.lock().expect("not poisoned").get_mut(&key)
            {
                f(r);
            }
        };
        let mut progress = |p: &Progress| {
            update(&mut |r| (r.processed, r.total, r.tenant) = (p.processed, p.total, Some(p.partition.clone())));
        };
        let outcome = projections.rebuild(store, &key.1, RunOptions::default(), &mut progress).await;
        update(&mut |r| {
            r.finished = Some(Instant::now());
            r.outcome = outcome.as_ref().map_or_else(ToString::to_string, |_| "done".into());
        });
        if let Some(shared) = shared_weak.upgrade() {
            view::forget(&shared).await;
        }
    });
    Ok(back(&base, "rebuilds", Ok(format!("{}: rebuild started", form.projection))))
}
