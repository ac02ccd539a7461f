//! The console in a real headless Chromium (driven through chromedriver): an operator finds the
//! parked tenant on the overview, reads its error and the event on the parked page (an XSS
//! probe in the event's data stays text), fixes the handler, clicks resume and confirms, and
//! watches the overview refresh itself to caught up. Screenshots go to `target/console/`.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use emmett_seaorm::EventStore;
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm_console::Console;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const XSS: &str = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">";

/// chromedriver on a free port, killed when dropped.
struct Driver(Child, u16);

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("\n!!! chromedriver is unavailable ({e}): run scripts/services (it installs chromium and chromium-driver)\n"));
        let driver = Driver(child, port);
        common::eventually(20, "chromedriver listening", async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        driver
    }

    async fn client(&self) -> Client {
        let chromium =
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| std::path::Path::new(p).exists());
        let mut options = json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,800"] });
        if let Some(binary) = chromium {
            options["binary"] = binary.into();
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        // Two TLS providers are linked in (only plain HTTP to chromedriver is used): pick one.
        rustls::crypto::ring::default_provider().install_default().ok();
        ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.1))
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Saves a screenshot as `target/console/<name>.png`.
async fn screenshot(client: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), client.screenshot().await.unwrap()).unwrap();
}

/// The state the overview shows for `tenant`.
async fn state_of(client: &Client, tenant: &str) -> Option<String> {
    let row = client.find(Locator::Css(&format!("tr[data-tenant=\"{tenant}\"]"))).await.ok()?;
    row.attr("data-state").await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_finds_the_parked_tenant_and_resumes_it() {
    let url = common::postgres().await;
    let store = EventStore::new(common::connect(&url).await);
    for tenant in ["acme", "globex", "initech"] {
        common::append(&store, tenant, "acc", vec![common::deposit(5, "fine"), common::deposit(7, "fine")]).await;
    }
    common::append(&store, "poisoned", "acc", vec![common::deposit(13, XSS), common::deposit(1, "after")]).await;
    let (ledger, broken) = common::ledger();
    let daemon = Daemon::new(store.clone())
        .projection("ledger", ledger)
        .backoff(Duration::from_millis(10), Duration::from_secs(120))
        .start()
        .await
        .unwrap();
    common::eventually(20, "the poisoned tenant parked", async || {
        let pairs = emmett_seaorm::admin::projections(&store).await.unwrap();
        pairs.iter().any(|p| p.tenant == "poisoned" && p.parked)
    })
    .await;
    let address = common::serve(Console::new().store("main", store.clone()).actions(true).into_router()).await;
    let base = format!("http://{address}");
    let driver = Driver::start().await;
    let client = driver.client().await;

    // The overview: the parked tenant first.
    client.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(state_of(&client, "poisoned").await.as_deref(), Some("parked"));
    let first = client.find(Locator::Css("table.pairs tbody tr")).await.unwrap();
    assert_eq!(first.attr("data-tenant").await.unwrap().as_deref(), Some("poisoned"), "the worst first");
    screenshot(&client, "overview").await;

    // Why: the error and the event, its data as text.
    client.find(Locator::Css("tr[data-tenant=\"poisoned\"] a[href*=\"parked\"]")).await.unwrap().click().await.unwrap();
    let failure = client.find(Locator::Css("article[data-tenant=\"poisoned\"]")).await.unwrap();
    let text = failure.text().await.unwrap();
    let shown = "\"note\": \"<script>window.__xss = 1</script><img src=x onerror=\\\"window.__xss = 2\\\">\"";
    assert!(text.contains("ledger refuses event 1 of acc") && text.contains(shown), "{text}");
    let probe = client
        .execute("return window.__xss === undefined && document.querySelectorAll('pre img').length === 0", vec![]);
    assert_eq!(probe.await.unwrap(), json!(true), "the event's data ran as HTML");
    screenshot(&client, "parked").await;

    // The fix is deployed; resume, confirmed in the dialog.
    broken.store(false, Ordering::SeqCst);
    failure.find(Locator::Css("form[action$=\"/actions/resume\"] button")).await.unwrap().click().await.unwrap();
    assert!(client.get_alert_text().await.unwrap().contains("Run this tenant again now?"));
    client.accept_alert().await.unwrap();
    let done = client.wait().for_element(Locator::Css("p.done")).await.unwrap();
    assert!(done.text().await.unwrap().contains("ledger / poisoned: resumed"));

    // The overview refreshes itself (no reload) until the tenant is caught up.
    client.goto(&format!("{base}/")).await.unwrap();
    common::eventually(30, "the overview showing the tenant caught up", async || {
        state_of(&client, "poisoned").await.as_deref() == Some("caught-up")
    })
    .await;
    let lag = client.find(Locator::Css("tr[data-tenant=\"poisoned\"] td.num")).await.unwrap().text().await.unwrap();
    assert_eq!(lag, "0");
    screenshot(&client, "caught-up").await;

    client.close().await.unwrap();
    daemon.stop().await.unwrap();
    common::drop_database(&url).await;
}
