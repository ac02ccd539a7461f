//! The JSON behind the pages, for other tools, and Prometheus text at `/metrics`.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use emmett_seaorm::admin;
use serde_json::{Value, json};

use crate::pages::{StreamQuery, StreamsQuery, read_stream};
use std::collections::BTreeMap;

use crate::view::{self, OverviewQuery, Pair, PairState};
use crate::{AppState, Failure};

/// `/api/status`: the overview's pairs (same filters and order; `page=0`: all of them).
pub async fn status(State(shared): State<AppState>, Query(query): Query<OverviewQuery>) -> Json<Value> {
    let (pairs, down) = view::pairs(&shared).await;
    let down: Vec<Value> = down.into_iter().map(|(store, error)| json!({ "store": store, "error": error })).collect();
    if query.page == 0 {
        let all = query.select_all(pairs);
        return Json(json!({ "pairs": all, "matching": all.len(), "stores_down": down }));
    }
    let selection = query.select(pairs);
    Json(json!({
        "pairs": selection.rows, "matching": selection.matching, "page": selection.page, "pages": selection.pages,
        "stores_down": down,
    }))
}

/// `/api/parked`: the pairs that failed, worst first.
pub async fn parked(State(shared): State<AppState>) -> Json<Value> {
    let (pairs, down) = view::pairs(&shared).await;
    let down: Vec<Value> = down.into_iter().map(|(store, error)| json!({ "store": store, "error": error })).collect();
    Json(json!({ "pairs": view::failing(pairs), "stores_down": down }))
}

/// `/api/instances`: each store's instances and segments.
pub async fn instances(State(shared): State<AppState>) -> Result<Json<Value>, Failure> {
    let mut stores = Vec::new();
    for (name, store) in &shared.stores {
        let (instances, segments) = admin::instances(store).await?;
        stores.push(json!({ "store": name, "instances": instances, "segments": segments }));
    }
    Ok(Json(json!({ "stores": stores })))
}

/// `/api/streams`: a page of streams.
pub async fn streams(State(shared): State<AppState>, Query(q): Query<StreamsQuery>) -> Result<Json<Value>, Failure> {
    let (name, store) = shared.store(q.store.as_deref())?;
    let limit = view::PAGE as u64;
    let (rows, total) = admin::streams(store, &q.filter(), (q.page.unwrap_or(1).max(1) - 1) * limit, limit).await?;
    let streams: Vec<Value> = rows
        .into_iter()
        .map(|s| {
            json!({ "tenant": s.partition, "stream": s.stream_id, "type": s.stream_type,
                    "version": s.stream_position, "archived": s.is_archived })
        })
        .collect();
    Ok(Json(json!({ "store": name, "streams": streams, "total": total })))
}

/// `/api/stream`: a page of a stream's events, its generations and snapshots.
pub async fn stream(State(shared): State<AppState>, Query(q): Query<StreamQuery>) -> Result<Json<Value>, Failure> {
    let page = read_stream(&shared, &q).await?;
    let events: Vec<Value> = page
        .events
        .iter()
        .map(|e| {
            json!({ "stream_position": e.stream_position, "global_position": e.global_position, "type": e.message_type,
                    "created": e.created.to_rfc3339(), "data": e.event.get("data"), "metadata": e.metadata,
                    "message_id": e.message_id })
        })
        .collect();
    let generations: Vec<Value> = page
        .generations
        .iter()
        .map(|g| json!({ "type": g.stream_type, "version": g.stream_position, "archived": g.is_archived }))
        .collect();
    let snapshots: Vec<Value> = page
        .snapshots
        .iter()
        .map(|s| {
            json!({ "read_model": s.readmodel_table_name, "key": s.stream_id, "snapshot": s.snapshot,
                         "last_stream_position": s.last_stream_position })
        })
        .collect();
    Ok(Json(json!({ "store": page.store, "version": page.version, "events": events, "generations": generations,
                    "snapshots": snapshots })))
}

/// `/metrics`: per projection and store, pairs by state, events behind and the oldest
/// unprojected event's age (per projection, not per tenant: 10,000 tenants are not 10,000
/// series); the same status as the pages.
pub async fn metrics(State(shared): State<AppState>) -> impl IntoResponse {
    let (pairs, down) = view::pairs(&shared).await;
    let mut out = String::new();
    out.push_str(
        "# HELP emt_projection_pairs (projection, tenant) pairs by state.\n# TYPE emt_projection_pairs gauge\n",
    );
    let mut groups: BTreeMap<(&str, &str), Vec<&Pair>> = BTreeMap::new();
    for p in &pairs {
        groups.entry((p.store.as_str(), p.projection.as_str())).or_default().push(p);
    }
    for ((store, projection), group) in &groups {
        for state in PairState::ALL {
            let n = group.iter().filter(|p| p.state == state).count();
            out.push_str(&format!(
                "emt_projection_pairs{{{},state=\"{}\"}} {n}\n",
                labels(store, projection),
                state.key()
            ));
        }
    }
    out.push_str("# HELP emt_projection_lag_events Events past the checkpoints, over the projection's tenants.\n# TYPE emt_projection_lag_events gauge\n");
    for ((store, projection), group) in &groups {
        let lag: u64 = group.iter().map(|p| p.lag_events).sum();
        out.push_str(&format!("emt_projection_lag_events{{{}}} {lag}\n", labels(store, projection)));
    }
    out.push_str("# HELP emt_projection_lag_seconds Age of the oldest unprojected event, over the projection's tenants.\n# TYPE emt_projection_lag_seconds gauge\n");
    for ((store, projection), group) in &groups {
        let age = group.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
        out.push_str(&format!("emt_projection_lag_seconds{{{}}} {age:.3}\n", labels(store, projection)));
    }
    out.push_str("# HELP emt_store_up Whether the store answered.\n# TYPE emt_store_up gauge\n");
    for (name, _) in &shared.stores {
        let up = u8::from(!down.iter().any(|(n, _)| n == name));
        out.push_str(&format!("emt_store_up{{store=\"{}\"}} {up}\n", escape(name)));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn labels(store: &str, projection: &str) -> String {
    format!("store=\"{}\",projection=\"{}\"", escape(store), escape(projection))
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
