//! Every page and endpoint over HTTP, on SQLite and PostgreSQL: a daemon with a tenant parked
//! on a poison event (whose data is an XSS probe), the actions and their guards, a bearer
//! token, a console mounted under a path, and 10,000 tenants paginated in under a second.

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use emmett_seaorm::EventStore;
use emmett_seaorm::daemon::{Daemon, DaemonHandle};
use emmett_seaorm_console::Console;
use serde_json::Value;
use tower::ServiceExt;

const XSS: &str = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">";

struct Response {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(app: &Router, request: Request<Body>) -> Response {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    Response { status: parts.status, headers: parts.headers, body: String::from_utf8(body.to_vec()).unwrap() }
}

async fn get(app: &Router, uri: &str) -> Response {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post(app: &Router, uri: &str, form: &str) -> Response {
    let request = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap();
    send(app, request).await
}

fn json(response: &Response) -> Value {
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    serde_json::from_str(&response.body).unwrap()
}

/// Three healthy tenants and `poisoned`, parked by a daemon on its first event.
async fn parked_daemon(store: &EventStore) -> (DaemonHandle, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    for tenant in ["t1", "t2", "t3"] {
        common::append(store, tenant, "acc", vec![common::deposit(5, "fine")]).await;
    }
    common::append(store, "poisoned", "acc", vec![common::deposit(13, XSS), common::deposit(1, "after")]).await;
    let (ledger, broken) = common::ledger();
    let daemon = Daemon::new(store.clone())
        .projection("ledger", ledger)
        // Parked after the default 3 failures in a row (the console reads that count), then
        // retried after pauses that soon grow long.
        .backoff(Duration::from_millis(10), Duration::from_secs(60))
        .poll_interval(Duration::from_millis(50), Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    common::eventually(20, "the poisoned tenant parked, the others caught up", async || {
        let pairs = emmett_seaorm::admin::projections(store).await.unwrap();
        pairs.len() == 4 && pairs.iter().all(|p| if p.tenant == "poisoned" { p.parked } else { p.lag_events == 0 })
    })
    .await;
    (daemon, broken)
}

/// The CSRF token of the actions' forms on the parked page.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("an action form") + "name=\"csrf\" value=\"".len();
    page[at..at + 32].to_owned()
}

async fn every_page_and_endpoint(url: &str) {
    let store = EventStore::new(common::connect(url).await);
    let (daemon, _broken) = parked_daemon(&store).await;
    let app = Console::new().store("main", store.clone()).actions(true).into_router();

    let overview = get(&app, "/").await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(overview.headers["server-timing"].to_str().unwrap().starts_with("render;dur="));
    let row = overview.body.split("<tr").find(|r| r.contains("data-tenant=\"poisoned\"")).expect("a row");
    assert!(row.contains("data-state=\"parked\"") && row.contains(daemon.owner()), "{row}");
    let filtered = get(&app, "/?state=parked").await.body;
    assert!(filtered.contains("1 matching") && !filtered.contains("data-tenant=\"t1\""), "{filtered}");
    assert!(get(&app, "/?tenant=t&sort=tenant&page=9").await.body.contains("3 matching · page 1 of 1"));

    // The parked page: the error, the event (escaped: the probe is text), the actions.
    let parked = get(&app, "/parked").await.body;
    assert!(parked.contains("ledger refuses event 1 of acc"), "{parked}");
    assert!(parked.contains("&lt;script&gt;window.__xss = 1&lt;/script&gt;") && !parked.contains("<script>window"));
    assert!(parked.contains("&lt;img src=x") && !parked.contains("<img"));
    let token = csrf(&parked);

    assert!(get(&app, "/instances").await.body.contains(daemon.owner()));
    assert!(
        get(&app, "/streams?tenant=poisoned").await.body.contains("/stream?store=main&amp;tenant=poisoned&amp;id=acc")
    );
    let stream = get(&app, "/stream?tenant=poisoned&id=acc").await.body;
    assert!(stream.contains("Deposited") && stream.contains("&lt;script&gt;") && !stream.contains("<script>window"));

    // The JSON behind them.
    let status = json(&get(&app, "/api/status?state=parked").await);
    assert_eq!(status["pairs"][0]["tenant"], "poisoned");
    let (at, checkpoint) = (status["pairs"][0]["error_position"].as_u64(), status["pairs"][0]["checkpoint"].as_u64());
    assert!(at > checkpoint && status["pairs"][0]["state"] == "parked", "{status}");
    assert_eq!(json(&get(&app, "/api/status?page=0").await)["pairs"].as_array().unwrap().len(), 4);
    assert_eq!(json(&get(&app, "/api/parked").await)["pairs"].as_array().unwrap().len(), 1);
    let instances = json(&get(&app, "/api/instances").await);
    assert_eq!(instances["stores"][0]["instances"][0]["owner"], daemon.owner());
    assert_eq!(instances["stores"][0]["segments"].as_array().unwrap().len(), 64);
    assert_eq!(json(&get(&app, "/api/streams?tenant=poisoned").await)["total"], 1);
    let events = json(&get(&app, "/api/stream?tenant=poisoned&id=acc").await);
    assert_eq!(events["events"][0]["data"]["note"], XSS);
    let metrics = get(&app, "/metrics").await.body;
    assert!(
        metrics.contains("emt_projection_pairs{store=\"main\",projection=\"ledger\",state=\"parked\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("emt_projection_pairs{store=\"main\",projection=\"ledger\",state=\"caught-up\"} 3"));
    assert!(metrics.contains("emt_store_up{store=\"main\"} 1"));
    assert_eq!(get(&app, "/assets/console.js").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/streams?store=nowhere").await.status, StatusCode::NOT_FOUND);

    // Actions: refused without this console's token, and on a read-only console.
    let form = |token: &str| format!("csrf={token}&store=main&projection=ledger&tenant=poisoned");
    assert_eq!(post(&app, "/actions/skip", &form("forged")).await.status, StatusCode::FORBIDDEN);
    let read_only = Console::new().store("main", store.clone()).into_router();
    let read_only_token =
        csrf(&get(&Console::new().store("main", store.clone()).actions(true).into_router(), "/parked").await.body);
    assert_eq!(post(&read_only, "/actions/skip", &form(&read_only_token)).await.status, StatusCode::FORBIDDEN);
    assert!(!get(&read_only, "/parked").await.body.contains("name=\"csrf\""), "no forms when read-only");
    // Skip: recorded, and the tenant goes on with the next event.
    let skipped = post(&app, "/actions/skip", &form(&token)).await;
    assert_eq!(skipped.status, StatusCode::SEE_OTHER);
    let location = skipped.headers[header::LOCATION].to_str().unwrap();
    assert!(location.starts_with("/parked?done=") && location.contains("skipped%20event%201"), "{location}");
    common::eventually(10, "the skipped tenant caught up", async || {
        let status = json(&get(&app, "/api/status?tenant=poisoned").await);
        status["pairs"][0]["lag_events"] == 0 && status["pairs"][0]["failures"] == 0
    })
    .await;
    assert!(json(&get(&app, "/api/parked").await)["pairs"].as_array().unwrap().is_empty());
    // Nothing left to skip: said, not done.
    let again = post(&app, "/actions/skip", &form(&token)).await;
    assert!(again.headers[header::LOCATION].to_str().unwrap().contains("error="), "{:?}", again.headers);

    // Mounted under a path: its links and redirects stay under it.
    let nested = Router::new().nest("/ops/console", Console::new().store("main", store.clone()).into_router());
    let page = get(&nested, "/ops/console").await.body;
    assert!(
        page.contains("href=\"/ops/console/parked\"") && page.contains("/ops/console/assets/console.css"),
        "{page}"
    );
    assert!(get(&nested, "/ops/console/streams").await.body.contains("action=\"/ops/console/streams\""));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_page_and_endpoint_on_postgres() {
    let url = common::postgres().await;
    every_page_and_endpoint(&url).await;
    common::drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_page_and_endpoint_on_sqlite() {
    let url = common::sqlite().await;
    every_page_and_endpoint(&url).await;
    common::drop_database(&url).await;
}

#[tokio::test]
async fn a_token_guards_every_page() {
    let url = common::sqlite().await;
    let store = EventStore::new(common::connect(&url).await);
    let app = Console::new().store("main", store).bearer_token("s3cret").into_router();
    for path in ["/", "/parked", "/api/status", "/metrics", "/stream?tenant=a&id=b"] {
        assert_eq!(get(&app, path).await.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let with = |value: &str, name: header::HeaderName| {
        Request::get("/api/status").header(name, value).body(Body::empty()).unwrap()
    };
    assert_eq!(send(&app, with("Bearer s3cret", header::AUTHORIZATION)).await.status, StatusCode::OK);
    assert_eq!(send(&app, with("Bearer wrong", header::AUTHORIZATION)).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/login?token=wrong").await.status, StatusCode::UNAUTHORIZED);
    let login = get(&app, "/login?token=s3cret").await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let cookie = login.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();
    assert_eq!(send(&app, with(&pair, header::COOKIE)).await.status, StatusCode::OK);
    common::drop_database(&url).await;
}

/// 10,000 tenants: the overview's first page, a later one and a filtered one each render in
/// under a second of server time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_tenants_render_in_under_a_second() {
    const TENANTS: usize = 10_000;
    let url = common::postgres().await;
    let store = EventStore::new(common::connect(&url).await);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in (w..TENANTS).step_by(8) {
                    common::append(&store, &format!("tenant-{i:05}"), "acc", vec![common::deposit(1, "")]).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let (ledger, _) = common::ledger();
    let daemon = Daemon::new(store.clone()).projection("ledger", ledger).start().await.unwrap();
    common::eventually(120, "10,000 tenants projected", async || {
        let pairs = emmett_seaorm::admin::projections(&store).await.unwrap();
        pairs.len() == TENANTS && pairs.iter().all(|p| p.lag_events == 0)
    })
    .await;
    let started = std::time::Instant::now();
    emmett_seaorm::admin::projections(&store).await.unwrap();
    println!("the status query alone: {:.0} ms", started.elapsed().as_secs_f64() * 1000.0);
    let app = Console::new().store("main", store.clone()).into_router();
    for (path, says) in [
        ("/", "10000 matching · page 1 of 200"),
        ("/?page=200&sort=tenant", "10000 matching · page 200 of 200"),
        ("/?tenant=tenant-0999", "10 matching · page 1 of 1"),
    ] {
        let page = get(&app, path).await;
        let took: f64 =
            page.headers["server-timing"].to_str().unwrap().trim_start_matches("render;dur=").parse().unwrap();
        println!("{path}: {took:.0} ms of server time");
        assert!(took < 1000.0, "{path}: {took} ms");
        assert!(page.body.contains(says), "{path}: {}", &page.body[..2000.min(page.body.len())]);
        let rows = page.body.matches("<tr data-state=").count();
        assert_eq!(rows, if path.contains("tenant=") { 10 } else { 50 }, "{path}");
    }
    assert!(get(&app, "/?page=200&sort=tenant").await.body.contains("data-tenant=\"tenant-09999\""));
    daemon.stop().await.unwrap();
    common::drop_database(&url).await;
}

/// A GET over a real socket, with an optional bearer token: the status line and the body.
async fn fetch(address: &str, path: &str, token: Option<&str>) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// `emmett-seaorm-console ui --stores FILE`: one console over a PostgreSQL and a SQLite store,
/// behind its token; the operator's commands answer beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standalone_console_serves_every_store_of_a_stores_file() {
    let urls = [common::postgres().await, common::sqlite().await];
    for (url, tenant) in urls.iter().zip(["on-postgres", "on-sqlite"]) {
        let store = EventStore::new(common::connect(url).await);
        common::append(&store, tenant, "acc", vec![common::deposit(3, "")]).await;
        let (ledger, _) = common::ledger();
        let daemon = Daemon::new(store.clone()).projection("ledger", ledger).start().await.unwrap();
        common::eventually(20, "projected", async || {
            emmett_seaorm::admin::projections(&store).await.unwrap().iter().any(|p| p.lag_events == 0)
        })
        .await;
        daemon.stop().await.unwrap();
    }
    let file = std::env::temp_dir().join(format!("console-stores-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, format!("default = \"pg\"\n[stores]\npg = \"{}\"\nlite = \"{}\"\n", urls[0], urls[1]))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let mut console = std::process::Command::new(env!("CARGO_BIN_EXE_emmett-seaorm-console"))
        .args(["ui", "--listen", &address, "--token", "t0ken"])
        .env("EMMETT_STORES", &file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::eventually(20, "the console listening", async || tokio::net::TcpStream::connect(&address).await.is_ok())
        .await;
    assert!(fetch(&address, "/", None).await.0.contains("401"));
    let (status, body) = fetch(&address, "/api/status", Some("t0ken")).await;
    assert!(status.contains("200"), "{status}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let mut seen: Vec<(String, String)> = body["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["store"].as_str().unwrap().to_owned(), p["tenant"].as_str().unwrap().to_owned()))
        .collect();
    seen.sort();
    assert_eq!(seen, [("lite".to_owned(), "on-sqlite".to_owned()), ("pg".to_owned(), "on-postgres".to_owned())]);
    let page = fetch(&address, "/streams?store=lite", Some("t0ken")).await.1;
    assert!(page.contains("on-sqlite") && !page.contains("on-postgres"), "{page}");
    console.kill().ok();
    console.wait().ok();
    // The operator's commands, across the same stores.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_emmett-seaorm-console"))
        .args(["partitions", "list", "--json"])
        .env("EMMETT_STORES", &file)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("\"store\":\"lite\"") && listed.contains("on-postgres"), "{listed}");
    std::fs::remove_file(file).ok();
    for url in &urls {
        common::drop_database(url).await;
    }
}

/// A rebuild started from the rebuilds page: refused without actions or for an unknown
/// projection; one the new code fails on names the tenant and keeps going; fixed, it ends done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_started_from_the_console_reports_its_progress_and_outcome() {
    let url = common::postgres().await;
    let store = EventStore::new(common::connect(&url).await);
    for tenant in ["t1", "t2", "poisoned"] {
        common::append(&store, tenant, "acc", (0..40).map(|i| common::deposit(i, "")).collect()).await;
    }
    let (ledger, broken) = common::ledger();
    let projections = emmett_seaorm::cli::Projections::new().projection("ledger", ledger);
    let app = Console::new().store("main", store.clone()).projections(projections).actions(true).into_router();
    let page = get(&app, "/rebuilds").await.body;
    assert!(page.contains("Rebuild ledger") && page.contains("No rebuild started here"), "{page}");
    let token = csrf(&page);
    let rebuild = |projection: &str| format!("csrf={token}&store=main&projection={projection}");
    assert_eq!(post(&app, "/actions/rebuild", &rebuild("nothing")).await.status, StatusCode::NOT_FOUND);
    let read_only = Console::new().store("main", store.clone()).into_router();
    assert!(get(&read_only, "/rebuilds").await.body.contains("mount the console with Console::projections"));

    let outcome = async || {
        let mut outcome = Value::Null;
        common::eventually(30, "the rebuild to end", async || {
            outcome = json(&get(&app, "/api/rebuilds").await)["rebuilds"][0].clone();
            outcome["outcome"] != "running"
        })
        .await;
        outcome
    };
    let started = post(&app, "/actions/rebuild", &rebuild("ledger")).await;
    assert_eq!(started.status, StatusCode::SEE_OTHER);
    assert!(started.headers[header::LOCATION].to_str().unwrap().contains("rebuild%20started"));
    let failed = outcome().await;
    assert!(failed["outcome"].as_str().unwrap().contains("'poisoned'"), "{failed}");
    assert_eq!(failed["total"], 120, "{failed}");

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    post(&app, "/actions/rebuild", &rebuild("ledger")).await;
    let done = outcome().await;
    assert_eq!((done["outcome"].as_str(), done["processed"].as_u64()), (Some("done"), Some(120)), "{done}");
    let page = get(&app, "/rebuilds").await.body;
    assert!(page.contains("data-outcome=\"done\"") && page.contains("120 of 120 events"), "{page}");
    let filling = json(&get(&app, "/api/rebuilds").await)["filling"].clone();
    assert_eq!(
        (filling[0]["projection"].as_str(), filling[0]["caught_up"].as_u64()),
        (Some("ledger"), Some(3)),
        "{filling}"
    );
    common::drop_database(&url).await;
}

/// While someone looks, the console samples every 5 s: the overview draws its charts from the
/// second sample on, and the rebuilds page's lag trend comes from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_overview_charts_lag_and_appends_sampled_while_watched() {
    let url = common::sqlite().await;
    let store = EventStore::new(common::connect(&url).await);
    common::append(&store, "t1", "acc", vec![common::deposit(1, "")]).await;
    let app = Console::new().store("main", store.clone()).into_router();
    assert!(!get(&app, "/").await.body.contains("<figure class=\"chart\""), "no samples yet");
    let (ledger, _) = common::ledger();
    let projections = emmett_seaorm::cli::Projections::new().projection("ledger", ledger);
    let mut progress = |_: &emmett_seaorm::projection::Progress| {};
    projections.rebuild(store.clone(), "ledger", Default::default(), &mut progress).await.unwrap();
    for i in 0..20 {
        common::append(&store, "t1", "acc", vec![common::deposit(i, "")]).await;
    }
    common::eventually(30, "two samples", async || get(&app, "/").await.body.contains("<figure class=\"chart\"")).await;
    let page = get(&app, "/").await.body;
    assert_eq!(page.matches("<figure class=\"chart\"").count(), 2, "{page}");
    assert!(page.contains("events behind, last minutes — now 20"), "{page}");
    common::drop_database(&url).await;
}
