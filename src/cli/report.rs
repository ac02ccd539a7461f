//! How the command line prints: tables (bold headers on a terminal) or JSON lines, progress
//! bars, one-line errors.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::daemon::LeaseStatus;
use crate::projection::Progress;

tokio::task_local! {
    /// The store a command runs on when it runs on every store of a `--stores` file: JSON
    /// records name it.
    pub(super) static STORE: String;
}

/// Records printed as an aligned table, or as one JSON object per line.
pub(super) struct Table {
    keys: Vec<&'static str>,
    records: Vec<Map<String, Value>>,
    json: bool,
}

impl Table {
    /// A table of the records' `keys` (headers: the keys in capitals).
    pub fn new<const N: usize>(keys: [&'static str; N]) -> Self {
        Self { keys: keys.to_vec(), records: Vec::new(), json: false }
    }

    pub fn json(mut self, json: bool) -> Self {
        self.json = json;
        self
    }

    /// Adds a record (a JSON object); as JSON it is printed whole, in a table by its keys.
    pub fn record(&mut self, record: Value) {
        if let Value::Object(map) = record {
            self.records.push(map);
        }
    }

    pub fn print(self) {
        if self.json {
            let store = STORE.try_with(Clone::clone).ok();
            for mut record in self.records {
                if let Some(store) = &store {
                    record.insert("store".into(), store.clone().into());
                }
                println!("{}", Value::Object(record));
            }
            return;
        }
        let headers: Vec<String> = self.keys.iter().map(|k| k.replace('_', " ").to_uppercase()).collect();
        let cells: Vec<Vec<String>> =
            self.records.iter().map(|r| self.keys.iter().map(|k| cell(r.get(*k))).collect()).collect();
        let widths: Vec<usize> = (0..headers.len())
            .map(|i| cells.iter().map(|row| row[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
            .collect();
        let line = |row: &[String]| {
            let padded: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            padded.join("  ").trim_end().to_owned()
        };
        match std::io::stdout().is_terminal() {
            true => println!("\x1b[1m{}\x1b[0m", line(&headers)),
            false => println!("{}", line(&headers)),
        }
        for row in &cells {
            println!("{}", line(row));
        }
    }
}

/// A JSON value as a table cell: strings bare — quoted and escaped when bare would hide
/// something (empty, leading or trailing spaces, control characters: tenant ids that differ
/// only so) — nothing as `-`.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) if s.is_empty() || s.trim() != s || s.chars().any(char::is_control) => {
            Value::String(s.clone()).to_string()
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Seconds with one decimal, for lags and waits.
pub(super) fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// A lease's expiry as an operator reads it.
pub(super) fn expiry(lease: &LeaseStatus) -> String {
    match (&lease.owner, lease.free) {
        (None, _) => "-".to_owned(),
        (Some(_), true) => "gone".to_owned(),
        (Some(_), false) if lease.expires_in.is_zero() => "held (connected)".to_owned(),
        (Some(_), false) => seconds(lease.expires_in),
    }
}

/// Prints `err` as one line on stderr; the exit code of a failed command.
pub(super) fn failed(err: &dyn std::error::Error) -> ExitCode {
    let message = err.to_string().replace('\n', " ");
    match std::io::stderr().is_terminal() {
        true => eprintln!("\x1b[31merror:\x1b[0m {message}"),
        false => eprintln!("error: {message}"),
    }
    ExitCode::FAILURE
}

/// `url` with its password replaced by `***`.
pub(super) fn without_password(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.split_once('@')?))) {
        Some((scheme, (credentials, host))) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Progress of a rebuild or catch-up: a bar with events/s and ETA on a terminal, a line a
/// second otherwise (logs), and a summary line at the end.
pub(super) struct ProgressBar {
    name: String,
    /// What is counted (`events`, `lines`).
    unit: &'static str,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    /// The first report (time, events): the rate is measured from there, past the setup.
    first: Option<(Instant, u64)>,
    last_line: Instant,
}

impl ProgressBar {
    pub fn new(name: &str, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = format!("{{prefix}} [{{bar:40}}] {{human_pos}}/{{human_len}} {unit}  {{msg}}");
            let style =
                indicatif::ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> ");
            indicatif::ProgressBar::new(0).with_style(style).with_prefix(name.to_owned())
        });
        Self { name: name.to_owned(), unit, bar, started: Instant::now(), first: None, last_line: Instant::now() }
    }

    pub fn update(&mut self, progress: &Progress) {
        let total = progress.total.max(progress.processed);
        // The rate since the first batch: steadier than a window while batches vary in cost.
        let (since, base) = *self.first.get_or_insert((Instant::now(), progress.processed));
        let rate = (progress.processed - base) as f64 / since.elapsed().as_secs_f64().max(1e-3);
        let eta = (total - progress.processed) as f64 / rate.max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(progress.processed);
            bar.set_message(format!("{rate:.0} {}/s  ETA {eta:.0}s", self.unit));
            return;
        }
        if self.last_line.elapsed() >= Duration::from_secs(1) {
            self.last_line = Instant::now();
            eprintln!(
                "{}: {}/{} {unit} ({}), {rate:.0} {unit}/s, ETA {eta:.0}s",
                self.name,
                progress.processed,
                total,
                progress.partition,
                unit = self.unit
            );
        }
    }

    /// Takes the bar off the terminal, without a summary.
    pub fn clear(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }

    pub fn finish(self, processed: u64) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        let took = self.started.elapsed().as_secs_f64().max(1e-3);
        let unit = self.unit;
        eprintln!("{}: {processed} {unit} in {took:.1}s ({:.0} {unit}/s)", self.name, processed as f64 / took);
    }
}

/// A file being written or read, counting the lines that pass (for a progress bar).
pub(super) struct Lines<T> {
    inner: T,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<T> Lines<T> {
    pub fn new(inner: T) -> (Self, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let count = std::sync::Arc::default();
        (Self { inner, count: std::sync::Arc::clone(&count) }, count)
    }

    fn counted(&self, bytes: &[u8]) {
        let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
        self.count.fetch_add(lines, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Lines<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written {
            self.counted(&buf[..n]);
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Lines<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = read {
            self.counted(&buf.filled()[before..]);
        }
        read
    }
}

/// Runs `work` with a progress bar of the lines `count` says passed, out of `total`, and a
/// summary line if it succeeds.
pub(super) async fn with_progress<T, E>(
    name: &str,
    total: u64,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let mut bar = ProgressBar::new(name, "lines");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => {
                match &done {
                    Ok(_) => bar.finish(count.load(std::sync::atomic::Ordering::Relaxed)),
                    Err(_) => bar.clear(),
                }
                return done;
            }
            _ = tick.tick() => {
                let processed = count.load(std::sync::atomic::Ordering::Relaxed);
                bar.update(&Progress { partition: name.to_owned(), processed, total });
            }
        }
    }
}
