//! An operator's web console for [emmett-seaorm](emmett_seaorm): every projection of every
//! tenant (lag, state, owner; the worst first), parked and failing tenants with the event they
//! failed on, the daemon instances and their leases, and a stream browser — from what the
//! database records, so it needs none of the app's projections. Actions (resume, skip an
//! event) are off unless enabled, and go through [`emmett_seaorm::admin`], as the command line does.
//!
//! Mount it in an app's axum server, under a path of its own and behind the app's own auth:
//!
//! ```no_run
//! # async fn f(store: emmett_seaorm::EventStore) -> std::io::Result<()> {
//! use emmett_seaorm_console::Console;
//!
//! let console = Console::new().store("main", store).actions(true).into_router();
//! let app = axum::Router::new().nest("/ops/console", console); // .layer(your_auth)
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! Or run it alone: `emmett-seaorm-console ui --database-url postgres://… --listen 127.0.0.1:8089`.
//!
//! Pages: `/` (overview), `/parked`, `/instances`, `/streams`, `/stream`, `/rebuilds`; JSON
//! behind them: `/api/status`, `/api/parked`, `/api/instances`, `/api/streams`, `/api/stream`,
//! `/api/rebuilds`; Prometheus text at `/metrics`.

mod actions;
mod api;
mod pages;
mod rebuilds;
mod sampler;
mod view;

use std::sync::Arc;

use axum::Router;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use emmett_seaorm::cli::Projections;
use emmett_seaorm::{EventStore, StoreRouter};

/// The console's settings; [`into_router`](Console::into_router) makes the axum router.
#[derive(Clone, Default)]
pub struct Console {
    stores: Vec<(String, EventStore)>,
    actions: bool,
    token: Option<String>,
    projections: Option<Arc<Projections>>,
}

/// What every handler shares.
struct Shared {
    stores: Vec<(String, EventStore)>,
    actions: bool,
    token: Option<String>,
    /// The token every action's form carries (a page of this console is the only place it is
    /// written): a request forged by another site can't know it.
    csrf: String,
    samples: sampler::Samples,
    /// The app's projections, to rebuild in place.
    projections: Option<Arc<Projections>>,
    rebuilds: rebuilds::Rebuilds,
    /// The last status read, shared by the requests (and the sampler) of the next second.
    status: tokio::sync::Mutex<Option<view::Status>>,
}

type AppState = Arc<Shared>;

/// The path the console is mounted at (`""` at the root), for the links of its pages.
#[derive(Clone)]
struct Base(String);

impl Console {
    /// A console with no stores yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Shows the store `name` (a [`StoreRouter`]'s store, or the one store of an app).
    pub fn store(mut self, name: impl Into<String>, store: EventStore) -> Self {
        self.stores.push((name.into(), store));
        self
    }

    /// Shows every store of `router` (those it has now).
    pub fn stores(mut self, router: &StoreRouter) -> Self {
        self.stores.extend(router.stores());
        self
    }

    /// Lets the pages resume parked tenants and skip the event a tenant failed on (off by
    /// default: the console is read-only).
    pub fn actions(mut self, enabled: bool) -> Self {
        self.actions = enabled;
        self
    }

    /// The app's projections (the registries its daemon runs), so that the rebuilds page can
    /// rebuild them in place (with [`actions`](Self::actions) on), with progress and ETA.
    pub fn projections(mut self, projections: Projections) -> Self {
        self.projections = Some(Arc::new(projections));
        self
    }

    /// Answers only requests carrying `token` (`Authorization: Bearer <token>`, or the cookie
    /// that opening `/login?token=<token>` sets).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The axum router: nest it under a path of your own. Call it in a tokio runtime: it
    /// samples lag and appends every 5 s for the overview's charts while anyone has made a
    /// request in the last 10 minutes (until the router is dropped).
    pub fn into_router(self) -> Router {
        let shared = Shared {
            stores: self.stores,
            actions: self.actions,
            token: self.token,
            csrf: uuid::Uuid::new_v4().simple().to_string(),
            samples: sampler::Samples::default(),
            projections: self.projections,
            rebuilds: rebuilds::Rebuilds::default(),
            status: tokio::sync::Mutex::default(),
        };
        let state = Arc::new(shared);
        sampler::start(Arc::downgrade(&state));
        Router::new()
            .route("/", get(pages::overview))
            .route("/parked", get(pages::parked))
            .route("/instances", get(pages::instances))
            .route("/streams", get(pages::streams))
            .route("/stream", get(pages::stream))
            .route("/rebuilds", get(rebuilds::page_of))
            .route("/assets/console.css", get(|| asset("text/css", include_str!("../assets/console.css"))))
            .route("/assets/console.js", get(|| asset("text/javascript", include_str!("../assets/console.js"))))
            .route("/api/status", get(api::status))
            .route("/api/parked", get(api::parked))
            .route("/api/instances", get(api::instances))
            .route("/api/streams", get(api::streams))
            .route("/api/stream", get(api::stream))
            .route("/api/rebuilds", get(rebuilds::api))
            .route("/metrics", get(api::metrics))
            .route("/actions/resume", post(actions::resume))
            .route("/actions/skip", post(actions::skip))
            .route("/actions/rebuild", post(rebuilds::start))
            .route("/login", get(login))
            .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
            .layer(middleware::from_fn(base))
            .with_state(state)
    }
}

/// Finds the path the console is mounted at.
async fn base(OriginalUri(original): OriginalUri, mut request: Request, next: Next) -> Response {
    let inner = request.uri().path();
    let outer = original.path();
    let base = outer.strip_suffix(inner).unwrap_or(if inner == "/" { outer } else { "" });
    request.extensions_mut().insert(Base(base.trim_end_matches('/').to_owned()));
    next.run(request).await
}

/// The cookie `/login` sets.
const COOKIE: &str = "emt_console_token";

/// Lets through requests with the bearer token (when one is set), and `/login`; notes that
/// someone is looking.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let allowed = match &state.token {
        None => true,
        Some(token) => request.uri().path() == "/login" || presented(request.headers()).is_some_and(|t| t == token),
    };
    if !allowed {
        let body = "this console needs its token: open /login?token=… or send Authorization: Bearer …";
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
    }
    state.samples.watch();
    next.run(request).await
}

/// The token a request presents, by header or cookie.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let cookie = || {
        let cookies = headers.get_all(header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
        cookies.flat_map(|c| c.split(';')).find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
    };
    bearer.or_else(cookie)
}

/// `/login?token=…`: sets the cookie when the token is right, and goes to the overview.
async fn login(
    State(state): State<AppState>,
    axum::Extension(Base(base)): axum::Extension<Base>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    match (&state.token, q.get("token")) {
        (Some(token), Some(given)) if given == token => {
            let cookie = format!("{COOKIE}={token}; Path={}/; HttpOnly; SameSite=Strict", base);
            (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, format!("{base}/"))])
                .into_response()
        }
        (None, _) => (StatusCode::SEE_OTHER, [(header::LOCATION, format!("{base}/"))]).into_response(),
        _ => (StatusCode::UNAUTHORIZED, "wrong token").into_response(),
    }
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=3600")], body)
}

/// An error shown to the operator: what failed, as text (escaped in pages).
struct Failure(StatusCode, String);

impl From<emmett_seaorm::Error> for Failure {
    fn from(error: emmett_seaorm::Error) -> Self {
        use emmett_seaorm::Error as E;
        let status = match &error {
            E::UnknownPair { .. } | E::NothingToSkip { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, error.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl Shared {
    /// The store named `name`, or the first when none is named.
    fn store(&self, name: Option<&str>) -> Result<&(String, EventStore), Failure> {
        match name {
            None | Some("") => self.stores.first(),
            Some(name) => self.stores.iter().find(|(n, _)| n == name),
        }
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no store named '{}'", name.unwrap_or_default())))
    }
}
