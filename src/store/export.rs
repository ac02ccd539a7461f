//! A tenant as a portable file: JSON Lines written from one database and read into another of
//! any backend — a header, the stream rows, then every stored event in global order.
//!
//! ```text
//! {"header":{"format":"emmett-seaorm/partition","version":1,"partition":"acme","streams":2,"events":3}}
//! {"stream":{"stream_id":"cart-1","stream_position":2,"stream_type":"cart","stream_metadata":{},"is_archived":false}}
//! {"event":{"stream_id":"cart-1","stream_position":1,"is_archived":false,"message_kind":"E","message_type":"CartCreated",…}}
//! ```

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use super::EventStore;
use crate::backend::{self, ImportedMessage, ImportedStream};
use crate::error::{Error, Result};
use crate::event::StoredMessage;
use crate::limits::{self, MAX_IDENTIFIER_CHARS};
use crate::projection::ReadModel;
use crate::schema::{messages, streams};

/// The `format` of the header line.
const FORMAT: &str = "emmett-seaorm/partition";
/// The version of the file format this crate writes and reads.
const VERSION: u32 = 1;
/// Rows read, or inserted, per statement.
const PAGE: u64 = 1_000;

/// How many streams and events of a tenant an export wrote or an import read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionCounts {
    /// The tenant.
    pub partition: String,
    /// Stream rows (every generation).
    pub streams: u64,
    /// Stored events (archived ones included).
    pub events: u64,
}

/// How [`EventStore::import_partition`] treats the target database.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    partition: Option<String>,
    replace: bool,
    read_models: Vec<ReadModel>,
}

impl ImportOptions {
    /// Import under this tenant id instead of the one in the file.
    pub fn partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }

    /// Replace the tenant if the database has it (erased first, in the same transaction, with
    /// the rows of `read_models`) instead of refusing with [`Error::PartitionExists`].
    pub fn replace(mut self, read_models: &[ReadModel]) -> Self {
        self.replace = true;
        self.read_models = read_models.to_vec();
        self
    }
}

/// One line of the file.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Line {
    Header(Header),
    Stream(StreamLine),
    Event(EventLine),
}

#[derive(Serialize, Deserialize)]
pub(super) struct Header {
    format: String,
    version: u32,
    partition: String,
    streams: u64,
    events: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct StreamLine {
    pub(super) stream_id: String,
    pub(super) stream_position: i64,
    pub(super) stream_type: String,
    pub(super) stream_metadata: Value,
    pub(super) is_archived: bool,
}

#[derive(Serialize, Deserialize)]
pub(super) struct EventLine {
    pub(super) stream_id: String,
    pub(super) stream_position: i64,
    pub(super) is_archived: bool,
    pub(super) message_kind: String,
    pub(super) message_type: String,
    pub(super) message_schema_version: String,
    pub(super) message_id: String,
    pub(super) message_data: Value,
    pub(super) message_metadata: Value,
    pub(super) created: DateTime<Utc>,
    /// Its position in the exporting database (informative: the import numbers events anew,
    /// in this order).
    pub(super) global_position: i64,
}

impl EventStore {
    /// Writes tenant `partition` to `out` as JSON Lines (see the module): a header with the
    /// counts, every stream row, then every stored event with all its columns in global order
    /// — archived generations included, as stored (no upcasting). Read in pages from one
    /// consistent snapshot, in constant memory.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// let file = tokio::fs::File::create("acme.jsonl").await.expect("create");
    /// let written = store.export_partition("acme", file).await?;
    /// println!("{} streams, {} events", written.streams, written.events);
    /// # Ok(()) }
    /// ```
    pub async fn export_partition(&self, partition: &str, out: impl AsyncWrite + Unpin) -> Result<PartitionCounts> {
        self.partition(Some(partition))?;
        let mut out = tokio::io::BufWriter::new(out);
        let mut reader = PartitionReader::begin(self, partition).await?;
        let mut written = PartitionCounts { partition: partition.into(), streams: 0, events: 0 };
        while let Some(lines) = reader.next_page().await? {
            for line in &lines {
                match line {
                    Line::Stream(_) => written.streams += 1,
                    Line::Event(_) => written.events += 1,
                    Line::Header(_) => {}
                }
                let mut text = serde_json::to_vec(line)?;
                text.push(b'\n');
                out.write_all(&text).await?;
            }
        }
        reader.finish().await?;
        out.flush().await?;
        Ok(written)
    }

    /// Reads a file [`export_partition`](Self::export_partition) wrote into this database, in
    /// one transaction: the stream rows as they were, and the events in the file's order with
    /// new global positions here (in that order), every other column kept. Projections are not
    /// imported: the daemon projects the new events like any others.
    ///
    /// All or nothing: a file that is not an export, a malformed or truncated line (fewer rows
    /// than its header counts) or a row the database refuses fails with [`Error::Import`]
    /// naming the line, and nothing is imported. A tenant the database already holds is
    /// refused ([`Error::PartitionExists`]) unless [`ImportOptions::replace`] asks to erase it
    /// first.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::ImportOptions;
    ///
    /// let file = tokio::io::BufReader::new(tokio::fs::File::open("acme.jsonl").await.expect("open"));
    /// let read = store.import_partition(file, ImportOptions::default()).await?;
    /// println!("{}: {} events", read.partition, read.events);
    /// # Ok(()) }
    /// ```
    pub async fn import_partition(
        &self,
        input: impl AsyncBufRead + Unpin,
        options: ImportOptions,
    ) -> Result<PartitionCounts> {
        let mut file = Reader { lines: input.lines(), number: 0 };
        let failed = |line: u64, reason: String| Error::Import { line, reason };
        let header = match file.next().await? {
            Some((_, Line::Header(header))) if header.format == FORMAT && header.version == VERSION => header,
            Some((_, Line::Header(header))) => {
                let reason = format!(
                    "format {} version {}; this crate reads {FORMAT} version {VERSION}",
                    header.format, header.version
                );
                return Err(failed(1, reason));
            }
            _ => return Err(failed(1, format!("no header: not a {FORMAT} file"))),
        };
        let partition = options.partition.clone().unwrap_or_else(|| header.partition.clone());
        self.partition(Some(&partition))?;
        limits::check_identifier("partition", &partition, MAX_IDENTIFIER_CHARS)?;
        let txn = backend::begin_write(self.executor()).await?;
        if backend::begin_import(&txn, &partition).await? {
            if !options.replace {
                return Err(Error::PartitionExists { partition });
            }
            let read_models = super::erase::tenant_rows(&options.read_models, &partition);
            backend::partition_rows(&txn, &partition, &read_models, true).await?;
        }
        let mut read = PartitionCounts { partition: partition.clone(), streams: 0, events: 0 };
        let (mut streams, mut events) = (Vec::new(), Vec::new());
        // The first line of each buffer, to name when the database refuses it.
        let (mut streams_from, mut events_from) = (0, 0);
        let mut last = 1;
        // Each stream generation's version and the events of it read so far.
        let mut versions: HashMap<(String, bool), (i64, i64)> = HashMap::new();
        while let Some((line, parsed)) = file.next().await? {
            last = line;
            match parsed {
                Line::Header(_) => return Err(failed(line, "a second header".into())),
                Line::Stream(s) => {
                    check_stream(&s.stream_id, s.stream_position).map_err(|reason| failed(line, reason))?;
                    let key = (s.stream_id.clone(), s.is_archived);
                    if versions.insert(key, (s.stream_position, 0)).is_some() {
                        return Err(failed(line, format!("stream '{}' listed twice", s.stream_id)));
                    }
                    streams_from = if streams.is_empty() { line } else { streams_from };
                    streams.push(ImportedStream {
                        stream_id: s.stream_id,
                        stream_position: s.stream_position,
                        stream_type: s.stream_type,
                        metadata: s.stream_metadata,
                        is_archived: s.is_archived,
                    });
                }
                Line::Event(e) => {
                    check_stream(&e.stream_id, e.stream_position).map_err(|reason| failed(line, reason))?;
                    // A stream's events follow its row, numbered 1, 2, … up to its version.
                    let Some((version, seen)) = versions.get_mut(&(e.stream_id.clone(), e.is_archived)) else {
                        return Err(failed(
                            line,
                            format!("an event of stream '{}' without its stream row", e.stream_id),
                        ));
                    };
                    if e.stream_position != *seen + 1 || e.stream_position > *version {
                        let reason = format!(
                            "position {} of stream '{}' follows position {seen} (its version is {version})",
                            e.stream_position, e.stream_id
                        );
                        return Err(failed(line, reason));
                    }
                    *seen += 1;
                    limits::check_identifier("event type", &e.message_type, MAX_IDENTIFIER_CHARS)
                        .map_err(|err| failed(line, err.to_string()))?;
                    events_from = if events.is_empty() { line } else { events_from };
                    events.push(ImportedMessage {
                        stream_id: e.stream_id,
                        stream_position: e.stream_position,
                        is_archived: e.is_archived,
                        kind: e.message_kind,
                        message_type: e.message_type,
                        schema_version: e.message_schema_version,
                        message_id: e.message_id,
                        data: e.message_data,
                        metadata: e.message_metadata,
                        created: e.created,
                    });
                }
            }
            if streams.len() as u64 == PAGE {
                read.streams += flush_streams(&txn, &partition, &mut streams, streams_from).await?;
            }
            if events.len() as u64 == PAGE {
                read.events += flush_events(&txn, &partition, &mut events, events_from).await?;
            }
        }
        read.streams += flush_streams(&txn, &partition, &mut streams, streams_from).await?;
        read.events += flush_events(&txn, &partition, &mut events, events_from).await?;
        if let Some(((stream, _), (version, seen))) = versions.iter().find(|(_, (version, seen))| version != seen) {
            return Err(failed(last + 1, format!("stream '{stream}' has {seen} of its {version} events")));
        }
        if (read.streams, read.events) != (header.streams, header.events) {
            let reason = format!(
                "truncated or altered: the header counts {} streams and {} events, the file holds {} and {}",
                header.streams, header.events, read.streams, read.events
            );
            return Err(failed(last + 1, reason));
        }
        backend::announce_import(&txn, &partition).await?;
        txn.commit().await?;
        Ok(read)
    }
}

/// A tenant's lines read page by page from one consistent snapshot: the header, the stream
/// rows, then the events in global order.
pub(super) struct PartitionReader {
    txn: DatabaseTransaction,
    partition: String,
    /// `None`: the header is next.
    stage: Option<Stage>,
}

enum Stage {
    /// Stream rows after this key (`None`: from the first).
    Streams(Option<(String, bool)>),
    /// Events after this global position.
    Events(i64),
    Done,
}

impl PartitionReader {
    pub(super) async fn begin(store: &EventStore, partition: &str) -> Result<Self> {
        limits::check_identifier("partition", partition, MAX_IDENTIFIER_CHARS)?;
        let txn = match store.executor().get_database_backend() {
            DbBackend::Sqlite => store.executor().begin().await?,
            _ => {
                let level = sea_orm::IsolationLevel::RepeatableRead;
                store.executor().begin_with_config(Some(level), Some(sea_orm::AccessMode::ReadOnly)).await?
            }
        };
        Ok(Self { txn, partition: partition.into(), stage: None })
    }

    /// Ends the read.
    pub(super) async fn finish(self) -> Result<()> {
        Ok(self.txn.commit().await?)
    }

    /// The next lines, `None` after the last.
    pub(super) async fn next_page(&mut self) -> Result<Option<Vec<Line>>> {
        let partition = self.partition.as_str();
        let of_tenant = || streams::Entity::find().filter(streams::Column::Partition.eq(partition));
        let Some(stage) = &self.stage else {
            let events = messages::Entity::find().filter(messages::Column::Partition.eq(partition));
            let header = Header {
                format: FORMAT.into(),
                version: VERSION,
                partition: partition.into(),
                streams: of_tenant().count(&self.txn).await?,
                events: events.count(&self.txn).await?,
            };
            self.stage = Some(Stage::Streams(None));
            return Ok(Some(vec![Line::Header(header)]));
        };
        match stage {
            Stage::Streams(after) => {
                let mut page = of_tenant()
                    .order_by_asc(streams::Column::StreamId)
                    .order_by_asc(streams::Column::IsArchived)
                    .limit(PAGE);
                if let Some((last_id, last_archived)) = after {
                    let id = || Expr::col(streams::Column::StreamId);
                    let archived = Expr::col(streams::Column::IsArchived).gt(*last_archived);
                    page = page.filter(id().gt(last_id.as_str()).or(id().eq(last_id.as_str()).and(archived)));
                }
                let rows = page.all(&self.txn).await?;
                self.stage = Some(match rows.last() {
                    Some(last) if rows.len() as u64 == PAGE => {
                        Stage::Streams(Some((last.stream_id.clone(), last.is_archived)))
                    }
                    _ => Stage::Events(i64::MIN),
                });
                let lines = rows.into_iter().map(|s| {
                    Line::Stream(StreamLine {
                        stream_id: s.stream_id,
                        stream_position: s.stream_position,
                        stream_type: s.stream_type,
                        stream_metadata: s.stream_metadata,
                        is_archived: s.is_archived,
                    })
                });
                Ok(Some(lines.collect()))
            }
            Stage::Events(after) => {
                let rows = event_page(&self.txn, partition, *after).await?;
                let mut lines = Vec::with_capacity(rows.len());
                let mut last = *after;
                for (row, (is_archived, kind)) in rows {
                    let malformed = |reason: &str| Error::MalformedEvent {
                        stream: row.stream_id.clone(),
                        partition: partition.into(),
                        position: row.stream_position as u64,
                        message_type: row.message_type.clone(),
                        reason: reason.into(),
                    };
                    let json = |column: &Result<Value, String>| column.clone().map_err(|reason| malformed(&reason));
                    last = row.global_position.ok_or_else(|| malformed("no global position"))?;
                    lines.push(Line::Event(EventLine {
                        message_data: json(&row.data)?,
                        message_metadata: json(&row.metadata)?,
                        stream_id: row.stream_id,
                        stream_position: row.stream_position,
                        is_archived,
                        message_kind: kind,
                        message_type: row.message_type,
                        message_schema_version: row.schema_version,
                        message_id: row.message_id,
                        created: row.created,
                        global_position: last,
                    }));
                }
                self.stage = Some(if lines.len() as u64 == PAGE { Stage::Events(last) } else { Stage::Done });
                Ok(Some(lines))
            }
            Stage::Done => Ok(None),
        }
    }
}

/// The lines of a file, numbered.
struct Reader<R> {
    lines: tokio::io::Lines<R>,
    number: u64,
}

impl<R: AsyncBufRead + Unpin> Reader<R> {
    /// The next line and its number, parsed; `None` at the end.
    async fn next(&mut self) -> Result<Option<(u64, Line)>> {
        let failed = |line, reason| Error::Import { line, reason };
        let Some(text) = self.lines.next_line().await.map_err(|e| failed(self.number + 1, e.to_string()))? else {
            return Ok(None);
        };
        self.number += 1;
        let line =
            serde_json::from_str(&text).map_err(|e| failed(self.number, format!("not a line of an export: {e}")))?;
        Ok(Some((self.number, line)))
    }
}

/// A page of the tenant's stored events after global position `after`, with `is_archived` and
/// `message_kind` of each.
async fn event_page(
    txn: &DatabaseTransaction,
    partition: &str,
    after: i64,
) -> Result<Vec<(StoredMessage, (bool, String))>> {
    let page = Query::select()
        .columns([
            messages::Column::StreamId,
            messages::Column::StreamPosition,
            messages::Column::Partition,
            messages::Column::MessageType,
            messages::Column::MessageId,
            messages::Column::GlobalPosition,
            messages::Column::Created,
            messages::Column::MessageData,
            messages::Column::MessageMetadata,
            messages::Column::MessageSchemaVersion,
            messages::Column::IsArchived,
            messages::Column::MessageKind,
        ])
        .from(messages::Entity)
        .and_where(Expr::col(messages::Column::Partition).eq(partition))
        .and_where(Expr::col(messages::Column::GlobalPosition).gt(after))
        .order_by(messages::Column::GlobalPosition, sea_orm::Order::Asc)
        .limit(PAGE)
        .to_owned();
    let rows = txn.query_all(&page).await?;
    let mut page = Vec::with_capacity(rows.len());
    for row in &rows {
        let stored = <StoredMessage as sea_orm::FromQueryResult>::from_query_result(row, "")?;
        let kind: String = row.try_get("", "message_kind")?;
        page.push((stored, (row.try_get("", "is_archived")?, kind.trim_end().to_owned())));
    }
    Ok(page)
}

/// Why a stream row or event of the file can't be stored, if it can't.
fn check_stream(stream_id: &str, position: i64) -> std::result::Result<(), String> {
    limits::check_identifier("stream id", stream_id, MAX_IDENTIFIER_CHARS).map_err(|e| e.to_string())?;
    match position >= 1 {
        true => Ok(()),
        false => Err(format!("stream '{stream_id}': position {position} is not a stream position (1 or more)")),
    }
}

async fn flush_streams(
    txn: &DatabaseTransaction,
    partition: &str,
    rows: &mut Vec<ImportedStream>,
    from: u64,
) -> Result<u64> {
    let refused =
        |e: sea_orm::DbErr| Error::Import { line: from, reason: format!("the database refused a stream row: {e}") };
    backend::insert_streams(txn, partition, rows).await.map_err(refused)?;
    Ok(std::mem::take(rows).len() as u64)
}

async fn flush_events(
    txn: &DatabaseTransaction,
    partition: &str,
    rows: &mut Vec<ImportedMessage>,
    from: u64,
) -> Result<u64> {
    let refused =
        |e: sea_orm::DbErr| Error::Import { line: from, reason: format!("the database refused an event: {e}") };
    backend::insert_messages(txn, partition, rows).await.map_err(refused)?;
    Ok(std::mem::take(rows).len() as u64)
}
