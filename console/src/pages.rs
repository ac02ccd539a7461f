//! The HTML pages, rendered on the server (maud escapes every value: an event's data is text).

use std::collections::HashMap;
use std::time::Instant;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use emmett_seaorm::admin::{self, StreamFilter};
use emmett_seaorm::{ReadOptions, RecordedEvent};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use crate::sampler;
use crate::view::{self, OverviewQuery, PAGE, Pair, PairState, duration, encode};
use crate::{AppState, Base, Failure, Shared};

/// A page: the navigation, `main`, and the script that refreshes `main` every few seconds
/// (pages with forms don't refresh).
pub(crate) fn page(base: &str, title: &str, refresh: bool, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · emmett-seaorm" }
                link rel="stylesheet" href={ (base) "/assets/console.css" };
                script src={ (base) "/assets/console.js" } defer {}
            }
            body {
                nav {
                    strong { "emmett-seaorm" }
                    a href={ (base) "/" } { "Overview" }
                    a href={ (base) "/parked" } { "Parked / failing" }
                    a href={ (base) "/instances" } { "Instances & leases" }
                    a href={ (base) "/streams" } { "Streams" }
                    a href={ (base) "/rebuilds" } { "Rebuilds" }
                }
                main id="main" data-refresh=[refresh.then_some("5000")] { (main) }
            }
        }
    }
}

/// Store errors, shown above a page.
fn down(stores: &[(String, String)]) -> Markup {
    html! {
        @for (name, error) in stores {
            p.error { "store " strong { (name) } " does not answer: " (error) }
        }
    }
}

fn state_badge(state: PairState) -> Markup {
    html! { span class={ "state " (state.key()) } { (state.label()) } }
}

/// `/`: every (projection, tenant) pair, the worst first, filtered and paginated.
pub async fn overview(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Query(query): Query<OverviewQuery>,
) -> Response {
    let started = Instant::now();
    let (pairs, stores_down) = view::pairs(&shared).await;
    let counts = |state| pairs.iter().filter(|p| p.state == state).count();
    let (parked, backing_off) = (counts(PairState::Parked), counts(PairState::BackingOff));
    let behind = pairs.iter().filter(|p| p.lag_events > 0).count();
    let worst = pairs.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
    let mut projections: Vec<&str> = pairs.iter().map(|p| p.projection.as_str()).collect();
    projections.sort_unstable();
    projections.dedup();
    let projections: Vec<String> = projections.into_iter().map(str::to_owned).collect();
    let total = pairs.len();
    let selection = query.select(pairs);
    let many_stores = shared.stores.len() > 1;
    let sort_link = |key: &str| format!("{base}/?{}", query.with(1, Some(key)));
    let main = html! {
        (down(&stores_down))
        section.cards {
            div.card { span.big { (total) } " pairs (projection × tenant)" }
            div.card.bad[parked > 0] { span.big { (parked) } " parked" }
            div.card.warn[backing_off > 0] { span.big { (backing_off) } " backing off" }
            div.card { span.big { (behind) } " behind" }
            div.card { span.big { (duration(worst)) } " oldest unprojected event" }
        }
        (charts(&shared))
        form.filters method="get" action={ (base) "/" } {
            input type="search" name="tenant" placeholder="tenant contains…" value=(query.tenant);
            select name="projection" {
                option value="" { "every projection" }
                @for p in &projections { option value=(p) selected[*p == query.projection] { (p) } }
            }
            select name="state" {
                option value="" { "every state" }
                @for s in PairState::ALL {
                    option value=(s.key()) selected[query.state == Some(s)] { (s.label()) }
                }
            }
            input type="hidden" name="sort" value=(query.sort);
            button type="submit" { "Filter" }
        }
        p.count { (selection.matching) " matching · page " (selection.page) " of " (selection.pages) }
        table.pairs {
            thead { tr {
                @if many_stores { th { "store" } }
                th { a href=(sort_link("projection")) { "projection" } }
                th { a href=(sort_link("tenant")) { "tenant" } }
                th { a href=(sort_link("worst")) { "state" } }
                th.num { a href=(sort_link("lag")) { "lag (events)" } }
                th.num { a href=(sort_link("age")) { "lag (time)" } }
                th { "owner" }
                th.num { "checkpoint / head" }
            } }
            tbody {
                @for p in &selection.rows {
                    tr data-state=(p.state.key()) data-tenant=(p.tenant) {
                        @if many_stores { td { (p.store) } }
                        td { (p.projection) }
                        td.tenant { a href={ (base) "/streams?store=" (encode(&p.store)) "&tenant=" (encode(&p.tenant)) } { (p.tenant) } }
                        td { (state_badge(p.state))
                            @if p.failures > 0 { " " a href={ (base) "/parked#" (anchor(p)) } { "why?" } } }
                        td.num { (p.lag_events) }
                        td.num { (duration(p.lag_seconds)) }
                        td { (p.owner.as_deref().unwrap_or("-")) }
                        td.num { (p.checkpoint) " / " (p.head) }
                    }
                }
            }
        }
        (pager(&base, &query, selection.page, selection.pages))
    };
    let took = started.elapsed().as_secs_f64() * 1000.0;
    let timing = format!("render;dur={took:.1}");
    ([(header::HeaderName::from_static("server-timing"), timing)], page(&base, "Overview", true, main)).into_response()
}

/// The two charts of the overview, when there are samples.
fn charts(shared: &Shared) -> Markup {
    let samples = shared.samples.all();
    let lag: Vec<f64> = samples.iter().map(|s| s.lag_events as f64).collect();
    let appended: Vec<f64> = samples.iter().map(|s| s.appended_per_second).collect();
    let chart = |title: &str, values: &[f64]| {
        let (points, max) = sampler::chart(values, 300.0, 60.0);
        html! {
            figure.chart {
                svg viewBox="0 0 300 60" width="300" height="60" role="img" aria-label=(title) {
                    polyline points=(points) fill="none" stroke="currentColor" stroke-width="1.5" {}
                }
                figcaption { (title) " — now " (values.last().map_or(0.0, |v| *v).round()) ", max " (max.round()) }
            }
        }
    };
    html! {
        @if samples.len() >= 2 {
            section.charts {
                (chart("events behind, last minutes", &lag))
                (chart("events appended per second", &appended))
            }
        }
    }
}

fn pager(base: &str, query: &OverviewQuery, page: usize, pages: usize) -> Markup {
    html! {
        nav.pager {
            @if page > 1 { a href={ (base) "/?" (query.with(page - 1, None)) } { "← previous" } }
            @if page < pages { a href={ (base) "/?" (query.with(page + 1, None)) } { "next →" } }
        }
    }
}

/// The id of a pair's entry on the parked page.
fn anchor(p: &Pair) -> String {
    format!("{}-{}-{}", encode(&p.store), encode(&p.projection), encode(&p.tenant)).replace('%', "_")
}

/// `/parked`: the failing pairs, with the error, the event it names, and the actions.
pub async fn parked(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let (pairs, stores_down) = view::pairs(&shared).await;
    let failing = view::failing(pairs);
    let mut entries = Vec::new();
    for p in failing {
        let (_, store) = shared.store(Some(&p.store))?;
        let event = match p.error_position {
            Some(position) if position > p.checkpoint => admin::event_at(store, &p.tenant, position).await?,
            _ => None,
        };
        entries.push((p, event));
    }
    let main = html! {
        (down(&stores_down))
        @if let Some(done) = q.get("done") { p.done { (done) } }
        @if let Some(error) = q.get("error") { p.error { (error) } }
        h1 { "Parked and failing" }
        @if entries.is_empty() { p { "Nothing is failing." } }
        @if !shared.actions && !entries.is_empty() {
            p.note { "Read-only: start the console with actions enabled to resume or skip from here." }
        }
        @for (p, event) in &entries {
            article.failure id=(anchor(p)) data-tenant=(p.tenant) {
                h2 { (p.projection) " · tenant " (p.tenant) " " (state_badge(p.state)) }
                dl {
                    @if shared.stores.len() > 1 { dt { "store" } dd { (p.store) } }
                    dt { "attempts" } dd { (p.failures) }
                    dt { "next retry" } dd { @if p.retry_in_seconds > 0.0 { "in " (duration(p.retry_in_seconds)) } @else { "now" } }
                    dt { "checkpoint / head" } dd { (p.checkpoint) " / " (p.head) " (" (p.lag_events) " behind)" }
                    dt { "owner" } dd { (p.owner.as_deref().unwrap_or("-")) }
                }
                pre.error-text { (p.error.as_deref().unwrap_or("")) }
                @if let Some(e) = event {
                    h3 { "The event" }
                    dl {
                        dt { "stream" } dd { a href={ (base) "/stream?store=" (encode(&p.store)) "&tenant=" (encode(&p.tenant)) "&id=" (encode(&e.stream_id)) } { (e.stream_id) } }
                        dt { "position" } dd { (e.stream_position) " (global " (e.global_position) ")" }
                        dt { "type" } dd { (e.message_type) " v" (e.message_schema_version) }
                        dt { "created" } dd { (e.created.to_rfc3339()) }
                    }
                    pre.json { (pretty(&e.message_data)) }
                }
                @if shared.actions {
                    div.actions {
                        (action(&base, &shared.csrf, "resume", p, "Resume now",
                            "Run this tenant again now? (deploy the fix first)"))
                        @if event.is_some() {
                            (action(&base, &shared.csrf, "skip", p, "Skip this event",
                                "Go past this event for good? It is recorded in emt_skipped_events; the projection never sees it."))
                        }
                    }
                }
            }
        }
    };
    Ok(page(&base, "Parked", false, main).into_response())
}

/// A POST form for an action on a pair, confirmed in the browser first.
fn action(base: &str, csrf: &str, name: &str, p: &Pair, label: &str, confirm: &str) -> Markup {
    html! {
        form method="post" action={ (base) "/actions/" (name) } data-confirm=(confirm) {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="store" value=(p.store);
            input type="hidden" name="projection" value=(p.projection);
            input type="hidden" name="tenant" value=(p.tenant);
            button type="submit" name="action" value=(name) { (label) }
        }
    }
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// `/instances`: live daemon instances, and the segments they hold.
pub async fn instances(State(shared): State<AppState>, Extension(Base(base)): Extension<Base>) -> Response {
    let mut sections = Vec::new();
    for (name, store) in &shared.stores {
        sections.push((name, admin::instances(store).await));
    }
    let main = html! {
        h1 { "Instances and leases" }
        @for (name, found) in &sections {
            @if shared.stores.len() > 1 { h2 { "store " (name) } }
            @match found {
                Err(error) => p.error { "store " (name) " does not answer: " (error) },
                Ok((instances, segments)) => {
                    table {
                        thead { tr { th { "instance" } th { "live" } th.num { "registration expires in" } th { "segments held" } } }
                        tbody {
                            @for i in instances {
                                tr {
                                    td { (i.owner) }
                                    td { @if i.live { "yes" } @else { "no" } }
                                    td.num { (duration(i.expires_in.as_secs_f64())) }
                                    td { @for (projection, n) in &i.segments { (projection) ": " (n) " " } }
                                }
                            }
                        }
                    }
                    details {
                        summary { (segments.len()) " segments (a projection's tenants hashed into 64; each claim bumps the epoch, which fences the holder before)" }
                        table {
                            thead { tr { th { "projection" } th.num { "segment" } th { "owner" } th.num { "epoch" } th { "free" } } }
                            tbody {
                                @for s in segments {
                                    tr { td { (s.subscription) } td.num { (s.segment) } td { (s.owner.as_deref().unwrap_or("-")) }
                                         td.num { (s.epoch) } td { @if s.free { "yes" } @else { "no" } } }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&base, "Instances", true, main).into_response()
}

/// `/streams` and `/api/streams`: which streams.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamsQuery {
    pub store: Option<String>,
    pub tenant: Option<String>,
    #[serde(rename = "type")]
    pub stream_type: Option<String>,
    pub archived: bool,
    pub page: Option<u64>,
}

impl StreamsQuery {
    pub fn filter(&self) -> StreamFilter {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        StreamFilter {
            partition: given(&self.tenant),
            stream_type: given(&self.stream_type),
            stream: None,
            archived: self.archived,
        }
    }
}

/// `/streams`: a store's streams, a tenant's when one is named, paged.
pub async fn streams(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Query(q): Query<StreamsQuery>,
) -> Result<Response, Failure> {
    let (name, store) = shared.store(q.store.as_deref())?;
    let page_no = q.page.unwrap_or(1).max(1);
    let (rows, total) = admin::streams(store, &q.filter(), (page_no - 1) * PAGE as u64, PAGE as u64).await?;
    let pages = total.div_ceil(PAGE as u64).max(1);
    let tenant = q.tenant.clone().unwrap_or_default();
    let link = |page: u64| {
        format!(
            "{base}/streams?store={}&tenant={}&type={}&archived={}&page={page}",
            encode(name),
            encode(&tenant),
            encode(q.stream_type.as_deref().unwrap_or("")),
            q.archived
        )
    };
    let main = html! {
        h1 { "Streams" }
        form.filters method="get" action={ (base) "/streams" } {
            @if shared.stores.len() > 1 {
                select name="store" { @for (n, _) in &shared.stores { option value=(n) selected[n == name] { (n) } } }
            } @else { input type="hidden" name="store" value=(name); }
            input type="search" name="tenant" placeholder="tenant" value=(tenant);
            input type="search" name="type" placeholder="stream type" value=(q.stream_type.as_deref().unwrap_or(""));
            label { input type="checkbox" name="archived" value="true" checked[q.archived]; " archived generations" }
            button type="submit" { "Show" }
        }
        p.count { (total) " streams · page " (page_no.min(pages)) " of " (pages) }
        table {
            thead { tr { th { "tenant" } th { "stream" } th { "type" } th.num { "version" } th { "archived" } } }
            tbody {
                @for s in &rows {
                    tr {
                        td { (s.partition) }
                        td { a href={ (base) "/stream?store=" (encode(name)) "&tenant=" (encode(&s.partition)) "&id=" (encode(&s.stream_id)) } { (s.stream_id) } }
                        td { (s.stream_type) }
                        td.num { (s.stream_position) }
                        td { @if s.is_archived { "yes" } }
                    }
                }
            }
        }
        nav.pager {
            @if page_no > 1 { a href=(link(page_no - 1)) { "← previous" } }
            @if page_no < pages { a href=(link(page_no + 1)) { "next →" } }
        }
    };
    Ok(page(&base, "Streams", false, main).into_response())
}

/// `/stream` and `/api/stream`: one stream's events from a position.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamQuery {
    pub store: Option<String>,
    pub tenant: String,
    pub id: String,
    pub from: Option<u64>,
}

/// A page of a stream's events (as stored: no upcasting), its generations and its snapshots.
pub struct StreamPage {
    pub store: String,
    pub events: Vec<RecordedEvent<serde_json::Value>>,
    pub version: u64,
    pub generations: Vec<emmett_seaorm::schema::streams::Model>,
    pub snapshots: Vec<emmett_seaorm::schema::snapshots::Model>,
}

pub async fn read_stream(shared: &Shared, q: &StreamQuery) -> Result<StreamPage, Failure> {
    let (name, store) = shared.store(q.store.as_deref())?;
    let from = q.from.unwrap_or(1).max(1);
    let options = ReadOptions::default().partition(&q.tenant).from(from).max_count(PAGE as u64);
    let read = store.read_stream::<serde_json::Value>(&q.id, options).await?;
    let filter = StreamFilter {
        partition: Some(q.tenant.clone()),
        stream: Some(q.id.clone()),
        archived: true,
        ..Default::default()
    };
    let (generations, _) = admin::streams(store, &filter, 0, 100).await?;
    let snapshots = admin::snapshots_of(store, &q.tenant, &q.id).await?;
    Ok(StreamPage {
        store: name.clone(),
        events: read.events,
        version: read.current_stream_version,
        generations,
        snapshots,
    })
}

/// `/stream`: a stream's events (JSON, paged), archived generations, snapshots made from it.
pub async fn stream(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Query(q): Query<StreamQuery>,
) -> Result<Response, Failure> {
    let page_data = read_stream(&shared, &q).await?;
    let from = q.from.unwrap_or(1).max(1);
    let link = |from: u64| {
        format!(
            "{base}/stream?store={}&tenant={}&id={}&from={from}",
            encode(&page_data.store),
            encode(&q.tenant),
            encode(&q.id)
        )
    };
    let main = html! {
        h1 { "Stream " (q.id) }
        p { "tenant " strong { (q.tenant) } " · version " (page_data.version) }
        @if page_data.generations.len() > 1 {
            h2 { "Generations" }
            ul { @for g in &page_data.generations {
                li { (g.stream_type) " · version " (g.stream_position) @if g.is_archived { " · archived" } }
            } }
        }
        h2 { "Events from " (from) }
        @if page_data.events.is_empty() { p { "No events." } }
        @for e in &page_data.events {
            article.event {
                header { strong { "#" (e.stream_position) } " " (e.message_type) " · global " (e.global_position) " · " (e.created.to_rfc3339()) }
                pre.json { (pretty(e.event.get("data").unwrap_or(&serde_json::Value::Null))) }
                @if !e.metadata.is_null() { details { summary { "metadata" } pre.json { (pretty(&e.metadata)) } } }
            }
        }
        nav.pager {
            @if from > 1 { a href=(link(from.saturating_sub(PAGE as u64).max(1))) { "← previous" } }
            @if page_data.events.len() == PAGE { a href=(link(from + PAGE as u64)) { "next →" } }
        }
        @if !page_data.snapshots.is_empty() {
            h2 { "Read-model snapshots made from it" }
            @for s in &page_data.snapshots {
                article.snapshot {
                    header { strong { (s.readmodel_table_name) } " · " (s.stream_id) " · at stream position " (s.last_stream_position) }
                    pre.json { (pretty(&s.snapshot)) }
                }
            }
        }
    };
    Ok(page(&base, "Stream", false, main).into_response())
}
