//! PostgreSQL through PgBouncer, and over TLS: the store, the runners, the daemon and the CLI through a
//! transaction-mode pooler (`pooler=transaction`), and through a session-mode one as through a
//! direct connection. Test databases are made and checked over a direct connection.
//!
//! The poolers come from `EMMETT_TEST_POOLER_URL` (transaction mode, default
//! `postgres://postgres@127.0.0.1:6432`) and `EMMETT_TEST_SESSION_POOLER_URL` (session mode,
//! default port 6433): server URLs without a database, in front of the server of
//! `EMMETT_TEST_POSTGRES_URL`. `scripts/services` starts both as the README sets them up.
#![cfg(all(feature = "postgres", feature = "cli"))]

mod common;

use std::time::{Duration, Instant};

use common::{Ev, balances};
use emmett_seaorm::daemon::{Daemon, WakeUps};
use emmett_seaorm::projection::{ProjectionRunner, RunOptions};
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, ReadOptions};
use sea_orm::{ConnectionTrait, DatabaseConnection};

/// A fresh database: its direct connection and its URL through the pooler of `var`.
async fn through(var: &str, default: &str, params: &str) -> (DatabaseConnection, String) {
    let direct_url = common::empty_postgres().await;
    let name = direct_url.rsplit('/').next().expect("a database name");
    let pooler = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let direct = common::connect(&direct_url).await.expect("direct connection");
    (direct, format!("{pooler}/{name}{params}"))
}

/// Drops the test database `url` (through a pooler or not) names, once its test passed.
async fn drop_database(url: &str) {
    let name = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    common::drop_database(&common::postgres_database(name)).await;
}

/// A fresh database behind the transaction-mode pooler, migrated through it.
async fn transaction_pooled() -> (DatabaseConnection, EventStore, String) {
    let (direct, url) =
        through("EMMETT_TEST_POOLER_URL", "postgres://postgres@127.0.0.1:6432", "?pooler=transaction").await;
    let pooled = common::reach_pooler(&url).await;
    emmett_seaorm::migrate(&pooled).await.expect("migrate through the pooler");
    balances::create_table(&direct).await;
    (direct, EventStore::new(pooled), url)
}

/// Appends race through the pooler: one stream with expected versions (every winner takes its
/// own version, the losers get the typed conflict), sessions, inline projections, reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_works_through_a_transaction_pooler() {
    let (direct, store, url) = transaction_pooled().await;
    let store = store.inline("balances", balances::registry());
    // 12 writers race for the versions of one stream.
    let racers = (0..12).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut won = Vec::new();
            for _ in 0..10 {
                let version = store.read_stream::<Ev>("acc-0", ReadOptions::default().partition("t1")).await.unwrap();
                let options = AppendOptions::default()
                    .partition("t1")
                    .expected(ExpectedVersion::Exact(version.current_stream_version));
                match store.append_to_stream("acc-0", [Ev::Deposited { amount: 1 }], options).await {
                    Ok(done) => won.push(done.next_expected_stream_version),
                    Err(Error::ExpectedVersionConflict { .. }) => {}
                    Err(other) => panic!("through the pooler: {other}"),
                }
            }
            won
        })
    });
    let mut versions: Vec<u64> = Vec::new();
    for racer in racers.collect::<Vec<_>>() {
        versions.extend(racer.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>(), "each winner took its own version");
    // Plain appends from many tasks, and a session writing two streams at once.
    let writers = (0..8).map(|w| {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..25 {
                balances::deposit(&store, w * 25 + i, 10).await;
            }
        })
    });
    for writer in writers.collect::<Vec<_>>() {
        writer.await.unwrap();
    }
    store
        .with_session(|s| async move {
            for account in ["acc-1", "acc-2"] {
                s.append_to_stream(account, [Ev::Deposited { amount: 5 }], AppendOptions::default().partition("t2"))
                    .await?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await, "the inline read model is the fold");
    let acc0 = balances::rows(&direct).await.into_iter().find(|r| r.0 == "t1" && r.1 == "acc-0").unwrap();
    // `deposit(i)` writes t1/acc-0 for every i divisible by 3 and 7.
    let deposits = versions.len() + (0..200).filter(|i| i % 21 == 0).count();
    assert_eq!(acc0.3 as usize, deposits, "no deposit lost or doubled");
    drop_database(&url).await;
}

/// The partition runner catches up and rebuilds through the pooler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_catches_up_and_rebuilds_through_a_transaction_pooler() {
    let (direct, store, url) = transaction_pooled().await;
    for i in 0..60 {
        balances::deposit(&store, i, i as i64).await;
    }
    let runner = ProjectionRunner::new(store.clone(), balances::registry());
    for tenant in ["t1", "t2", "t3"] {
        runner.catch_up("balances", RunOptions::default().partition(tenant).batch_size(7), |_| {}).await.unwrap();
    }
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await);
    balances::corrupt(&direct).await;
    runner.rebuild("balances", RunOptions::default().batch_size(7), |_| {}).await.unwrap();
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await, "rebuilt");
    drop_database(&url).await;
}

/// Two daemons share the tenants through the pooler, polling (no `LISTEN` there); one that
/// stops renewing (its task aborted, as a killed process would) loses its segments to the other
/// within the TTL and a second, and every event is projected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_through_a_transaction_pooler_and_a_killed_one_is_replaced_within_the_ttl() {
    let (direct, store, url) = transaction_pooled().await;
    let ttl = Duration::from_secs(2);
    let start = |owner: &str| {
        Daemon::new(store.clone())
            .projection("balances", balances::registry())
            .owner(owner)
            .lease_ttl(ttl)
            .renew_every(Duration::from_millis(400))
            .poll_interval(Duration::from_millis(10), Duration::from_millis(200))
            .start()
    };
    let (first, second) = (start("first").await.unwrap(), start("second").await.unwrap());
    let mut last = 0;
    for i in 0..90 {
        last = balances::deposit(&store, i, 3).await;
    }
    first.caught_up(last).await.unwrap();
    assert_eq!(first.status().await.unwrap().wake_ups, WakeUps::Polling, "no LISTEN through a transaction pooler");
    // The second takes its share within a few rounds (every 200 ms here) of starting.
    let started = Instant::now();
    loop {
        // (A segment given up by one is free until the other's next round claims it.)
        let status = first.status().await.unwrap();
        let held = status.segments.values().sum::<usize>();
        assert!(held <= 64, "a segment held twice: {:?}", status.segments);
        if status.segments.len() == 2 && held == 64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "both instances hold segments: {:?}", status.segments);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    drop(second);
    let killed = Instant::now();
    loop {
        let status = first.status().await.unwrap();
        if status.segments.get("first") == Some(&64) {
            break;
        }
        assert!(killed.elapsed() < ttl + Duration::from_secs(1), "not taken over: {:?}", status.segments);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 90..150 {
        last = balances::deposit(&store, i, 3).await;
    }
    first.caught_up(last).await.unwrap();
    first.stop().await.unwrap();
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await);
    drop_database(&url).await;
}

/// Given a direct URL for its listening connection, a daemon behind the pooler wakes on
/// another process's append at once instead of at its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_behind_a_transaction_pooler_listens_on_its_listen_url() {
    let (direct, store, url) = transaction_pooled().await;
    let direct_url = common::direct_url(&url);
    let daemon = Daemon::new(store.clone())
        .projection("balances", balances::registry())
        .listen_url(direct_url)
        .poll_interval(Duration::from_millis(10), Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    assert_eq!(daemon.status().await.unwrap().wake_ups, WakeUps::Listening);
    // Idle long enough for its poll interval to have grown past what the test waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Another process's append: a store of its own, so nothing wakes the daemon in-process.
    let other = EventStore::new(direct.clone());
    let appended = Instant::now();
    let last = balances::deposit(&other, 0, 42).await;
    tokio::time::timeout(Duration::from_secs(2), daemon.caught_up(last))
        .await
        .expect("woken by the notification, not by its 30 s poll")
        .unwrap();
    assert!(appended.elapsed() < Duration::from_secs(2));
    daemon.stop().await.unwrap();
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await);
    drop_database(&url).await;
}

/// A transaction pooler the URL doesn't mention fails the store's statements with the typed
/// error that says what to do (`configure`'s pools and pools made without it alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_pooler_the_url_does_not_mention_fails_with_what_to_do() {
    let (_, store, url) = transaction_pooled().await;
    let unaware_url = url.replace("?pooler=transaction", "");
    let pools =
        [emmett_seaorm::connect(&unaware_url).await.unwrap(), sea_orm::Database::connect(&unaware_url).await.unwrap()];
    for pool in pools {
        let unaware = EventStore::new(pool);
        let appended = unaware.append_to_stream("acc", [Ev::Deposited { amount: 1 }], AppendOptions::default()).await;
        match appended {
            Err(error @ Error::Pooler { .. }) => assert!(error.to_string().contains("pooler=transaction"), "{error}"),
            other => panic!("expected Error::Pooler, got {other:?}"),
        }
        let read = unaware.read_stream::<Ev>("acc", ReadOptions::default()).await;
        assert!(matches!(read, Err(Error::Pooler { .. })), "{read:?}");
    }
    // Told, the same pooler works.
    store.append_to_stream("acc", [Ev::Deposited { amount: 1 }], AppendOptions::default()).await.unwrap();
    drop_database(&url).await;
}

/// The operator's CLI through the pooler: migrate, status, streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_works_through_a_transaction_pooler() {
    let (_, store, url) = transaction_pooled().await;
    balances::deposit(&store, 0, 5).await;
    for args in [
        &["migrate", "status"][..],
        &["migrate", "up"],
        &["streams", "list", "--partition", "t1"],
        &["projections", "status", "--json"],
        &["leases", "list"],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_emmett-seaorm"))
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .expect("run the binary");
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{args:?} through the pooler: {stderr}{stdout}");
    }
    drop_database(&url).await;
}

/// A session-mode pooler is a direct connection as far as the store knows: the daemon listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_and_daemon_work_through_a_session_pooler() {
    let (direct, url) = through("EMMETT_TEST_SESSION_POOLER_URL", "postgres://postgres@127.0.0.1:6433", "").await;
    let pooled = common::reach_pooler(&url).await;
    emmett_seaorm::migrate(&pooled).await.unwrap();
    balances::create_table(&direct).await;
    let store = EventStore::new(pooled);
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    assert_eq!(daemon.status().await.unwrap().wake_ups, WakeUps::Listening);
    let mut last = 0;
    for i in 0..40 {
        last = balances::deposit(&store, i, 2).await;
    }
    daemon.caught_up(last).await.unwrap();
    daemon.stop().await.unwrap();
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await);
    drop_database(&url).await;
}

/// `sslmode=verify-full` with a certificate this test makes (its own CA, a server certificate
/// for `localhost`), served by a PgBouncer of its own in front of the test server: the store
/// works over it, and a client that trusts another CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_verify_full_with_a_certificate_the_test_makes() {
    let (_, name, dir) = own_setup().await;
    let (ca, other_ca) = (authority(&dir, "ca"), authority(&dir, "other"));
    server_certificate(&dir, "ca");
    let port = free_port();
    let tls = format!(
        "pool_mode = session\nclient_tls_sslmode = require\nclient_tls_key_file = {0}/server.key\n\
         client_tls_cert_file = {0}/server.crt",
        dir.display()
    );
    let _bouncer = OwnBouncer::start(&dir, port, &tls);
    let url = |ca: &std::path::Path| {
        format!("postgres://postgres@localhost:{port}/{name}?sslmode=verify-full&sslrootcert={}", ca.display())
    };
    // (`OwnBouncer::start` returns once it accepts connections.)
    let db = emmett_seaorm::connect(url(&ca)).await.expect("connect with verify-full");
    emmett_seaorm::migrate(&db).await.unwrap();
    let store = EventStore::new(db);
    store.append_to_stream("acc", [Ev::Deposited { amount: 7 }], AppendOptions::default()).await.unwrap();
    assert_eq!(store.read_stream::<Ev>("acc", ReadOptions::default()).await.unwrap().events.len(), 1);
    let refused = emmett_seaorm::connect(url(&other_ca)).await.expect_err("a CA the server's certificate is not from");
    assert!(refused.to_string().to_lowercase().contains("certificate"), "{refused}");
    std::fs::remove_dir_all(&dir).ok();
    drop_database(&name).await;
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let done = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(done.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&done.stderr));
}

/// A certificate authority `<name>.crt` / `<name>.key` in `dir`; the certificate's path.
fn authority(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let (crt, key, subject) = (format!("{name}.crt"), format!("{name}.key"), format!("/CN=emmett test {name}"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject, "-keyout", &key, "-out",
            &crt,
        ],
    );
    dir.join(crt)
}

/// `server.crt` / `server.key` in `dir` for `localhost` and 127.0.0.1, signed by authority `ca`.
fn server_certificate(dir: &std::path::Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let (crt, key) = (format!("{ca}.crt"), format!("{ca}.key"));
    let sign = ["x509", "-req", "-in", "server.csr", "-CA", &crt, "-CAkey", &key, "-CAcreateserial", "-days", "2"];
    openssl(dir, &[&sign[..], &["-extfile", "san.ext", "-out", "server.crt"]].concat());
}

/// A PgBouncer of the test's own on `port`, in front of the test server, with `settings` (lines
/// of its `[pgbouncer]` section) and its files in `dir`; killed when dropped.
struct OwnBouncer {
    child: std::process::Child,
    config: std::path::PathBuf,
}

impl OwnBouncer {
    fn start(dir: &std::path::Path, port: u16, settings: &str) -> Self {
        let target = common::postgres_server().rsplit('@').next().unwrap().replace(':', " port=");
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let config = format!(
            "[databases]\n* = host={target}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {}/users.txt\n\
             ignore_startup_parameters = extra_float_digits\n{settings}\n",
            dir.display()
        );
        let path = dir.join(format!("pgbouncer-{port}.ini"));
        std::fs::write(&path, config).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::fs::PermissionsExt;
            for entry in std::fs::read_dir(dir).unwrap() {
                std::fs::set_permissions(entry.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut bouncer = OwnBouncer { child: Self::spawn(&path), config: path };
        bouncer.wait_for(port);
        bouncer
    }

    fn spawn(config: &std::path::Path) -> std::process::Child {
        let binary =
            ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().find(|p| std::path::Path::new(p).exists());
        let mut command = std::process::Command::new(binary.unwrap_or("pgbouncer"));
        // PgBouncer refuses to run as root: then as the server's user.
        if unsafe { libc::geteuid() } == 0 {
            command.args(["-u", "postgres"]);
        }
        command
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| common::unavailable("pgbouncer", e, "run scripts/services, which installs it"))
    }

    /// Waits until it accepts connections on `port`.
    fn wait_for(&mut self, port: u16) {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the test's PgBouncer did not start on port {port}");
    }

    /// Kills it (SIGKILL: every client connection breaks) and starts it again on `port`.
    fn restart(&mut self, port: u16) {
        self.child.kill().ok();
        self.child.wait().ok();
        self.child = Self::spawn(&self.config);
        self.wait_for(port);
    }
}

impl Drop for OwnBouncer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A free local port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh database's direct connection and name, and a temporary directory.
async fn own_setup() -> (DatabaseConnection, String, std::path::PathBuf) {
    let direct_url = common::empty_postgres().await;
    let name = direct_url.rsplit('/').next().unwrap().to_owned();
    let dir = std::env::temp_dir().join(format!("emmett-bouncer-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    (common::connect(&direct_url).await.unwrap(), name, dir)
}

/// PgBouncer's settings for transaction mode, as the README gives them.
const TRANSACTION_MODE: &str = "pool_mode = transaction\nserver_reset_query = DEALLOCATE ALL\nserver_reset_query_always = 1\nserver_login_retry = 1";

/// A pooler with 2 server connections under an app pool of 16: statements queue at the pooler
/// (each transaction is short) and all complete; nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pooler_with_fewer_servers_than_the_pool_queues_and_nothing_hangs() {
    let (direct, name, dir) = own_setup().await;
    let port = free_port();
    let _bouncer = OwnBouncer::start(&dir, port, &format!("{TRANSACTION_MODE}\ndefault_pool_size = 2"));
    let mut options =
        emmett_seaorm::connect_options(&format!("postgres://postgres@127.0.0.1:{port}/{name}?pooler=transaction"));
    options.max_connections(16).acquire_timeout(Duration::from_secs(10));
    let db = sea_orm::Database::connect(emmett_seaorm::configure(options)).await.unwrap();
    emmett_seaorm::migrate(&db).await.unwrap();
    balances::create_recorded_tables(&direct).await;
    let store = EventStore::new(db).inline("balances", balances::registry());
    // A daemon through the same two servers, its batches' transactions among the appends'.
    let seen = Daemon::new(store.clone()).projection("seen", balances::seen_registry()).start().await.unwrap();
    let writers = (0..16).map(|w| {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..15 {
                balances::deposit(&store, w * 15 + i, 1).await;
            }
        })
    });
    let all = futures::future::join_all(writers);
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no append hangs")
        .into_iter()
        .for_each(|w| w.unwrap());
    assert_eq!(balances::rows(&direct).await, balances::folded(&store).await);
    let head = balances::deposit(&store, 0, 1).await;
    tokio::time::timeout(Duration::from_secs(60), seen.caught_up(head))
        .await
        .expect("the daemon does not hang")
        .unwrap();
    seen.stop().await.unwrap();
    let (seen, stored) = balances::seen_and_stored(&direct).await;
    assert_eq!(seen, stored, "every event seen once");
    std::fs::remove_dir_all(&dir).ok();
    drop_database(&name).await;
}

/// The pooler killed and restarted under load: appends that fail say so with a typed error
/// (`ConnectionLost`), none reported done is missing, and a daemon running through it catches up
/// by itself to a read model equal to the fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pooler_restarting_under_load_loses_nothing_and_the_daemon_recovers() {
    let (direct, name, dir) = own_setup().await;
    let port = free_port();
    let mut bouncer = OwnBouncer::start(&dir, port, TRANSACTION_MODE);
    let db = emmett_seaorm::connect(format!("postgres://postgres@127.0.0.1:{port}/{name}?pooler=transaction"))
        .await
        .unwrap();
    emmett_seaorm::migrate(&db).await.unwrap();
    balances::create_table(&direct).await;
    let store = EventStore::new(db);
    let daemon = Daemon::new(store.clone())
        .projection("balances", balances::registry())
        .poll_interval(Duration::from_millis(10), Duration::from_millis(200))
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers = (0..4).map(|w| {
        let (store, writing) = (store.clone(), writing.clone());
        tokio::spawn(async move {
            let (mut done, mut lost) = (Vec::new(), 0);
            let mut i = 0;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                let account = format!("w{w}-{}", i % 5);
                match store.append_to_stream(&account, [Ev::Deposited { amount: i }], AppendOptions::default()).await {
                    Ok(_) => done.push((account, i)),
                    Err(Error::ConnectionLost { .. }) => lost += 1,
                    Err(other) => panic!("not a typed outcome of a lost pooler: {other}"),
                }
                i += 1;
            }
            (done, lost)
        })
    });
    let writers: Vec<_> = writers.collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarter = tokio::task::spawn_blocking(move || {
        bouncer.restart(port);
        bouncer
    });
    let _bouncer = restarter.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut acknowledged = 0;
    for writer in writers {
        let (done, _lost) = writer.await.unwrap();
        acknowledged += done.len();
        for (account, amount) in done {
            let stream = store.read_stream::<Ev>(&account, ReadOptions::default()).await.unwrap();
            assert!(
                stream.events.iter().any(|e| e.event == Ev::Deposited { amount }),
                "{account}: acknowledged deposit {amount} is missing"
            );
        }
    }
    assert!(acknowledged > 0);
    let head: i64 = direct
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT max(global_position) FROM messages",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head as u64))
        .await
        .expect("the daemon recovers")
        .unwrap();
    daemon.stop().await.unwrap();
    let folded = {
        let mut expected = Vec::new();
        for account in (0..4).flat_map(|w| (0..5).map(move |a| format!("w{w}-{a}"))) {
            let stream = store.read_stream::<Ev>(&account, ReadOptions::default()).await.unwrap();
            if stream.stream_exists {
                let total: i64 = stream
                    .events
                    .iter()
                    .map(|e| match e.event {
                        Ev::Deposited { amount } => amount,
                        _ => 0,
                    })
                    .sum();
                expected.push((
                    emmett_seaorm::DEFAULT_PARTITION.to_owned(),
                    account,
                    total,
                    stream.events.len() as i64,
                ));
            }
        }
        expected.sort();
        expected
    };
    assert_eq!(balances::rows(&direct).await, folded);
    std::fs::remove_dir_all(&dir).ok();
    drop_database(&name).await;
}
