//! How the command line prints: tables (bold headers on a terminal) or JSON lines, progress
//! bars, one-line errors.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::daemon::LeaseStatus;
use crate::projection::Progress;

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
            for record in self.records {
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
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    /// The first report (time, events): the rate is measured from there, past the setup.
    first: Option<(Instant, u64)>,
    last_line: Instant,
}

impl ProgressBar {
    pub fn new(name: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style =
                indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {human_pos}/{human_len} events  {msg}")
                    .expect("a valid template")
                    .progress_chars("=> ");
            indicatif::ProgressBar::new(0).with_style(style).with_prefix(name.to_owned())
        });
        Self { name: name.to_owned(), bar, started: Instant::now(), first: None, last_line: Instant::now() }
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
            bar.set_message(format!("{rate:.0} events/s  ETA {eta:.0}s"));
            return;
        }
        if self.last_line.elapsed() >= Duration::from_secs(1) {
            self.last_line = Instant::now();
            eprintln!(
                "{}: {}/{} events ({}), {rate:.0} events/s, ETA {eta:.0}s",
                self.name, progress.processed, total, progress.partition
            );
        }
    }

    pub fn finish(self, processed: u64) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        let took = self.started.elapsed().as_secs_f64().max(1e-3);
        println!("{}: {processed} events in {took:.1}s ({:.0} events/s)", self.name, processed as f64 / took);
    }
}
