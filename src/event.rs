//! Events as the application sees them, and their stored form.

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::upcast::{RawEvent, Upcasters};

/// A domain event: anything serde can turn into `{"type": string, "data": any}` and back.
///
/// The usual way is an enum with `#[serde(tag = "type", content = "data")]`: `type` is stored
/// as `message_type`, `data` as `message_data`, exactly the shape the TypeScript packages store.
/// Implemented for every such type; `serde_json::Value` works too, for untyped access.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum CartEvent {
///     CartCreated { currency: String },
///     ItemAdded { sku: String, qty: u32 },
///     CartEmptied, // a unit variant: stored with data `{}`
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync {}
impl<T: Serialize + DeserializeOwned + Send + Sync> Event for T {}

/// An event as read back from the store, with its position and bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent<E> {
    /// The decoded event.
    pub event: E,
    /// The stored `message_type` (the serde tag).
    pub message_type: String,
    /// The stream the event belongs to.
    pub stream_id: String,
    /// 1-based position in its stream; contiguous.
    pub stream_position: u64,
    /// Position in the whole store; unique and increasing in commit order of appends.
    pub global_position: u64,
    /// Unique id of the message (UUID v7 for events this crate wrote).
    pub message_id: String,
    /// The partition (tenant) of the stream.
    pub partition: String,
    /// When the event was stored.
    pub created: DateTime<Utc>,
    /// Metadata given at append time (`{}` when none).
    pub metadata: Value,
}

impl<E> RecordedEvent<E> {
    /// The error of a projection's code (a handler, `evolve`, `extract_keys`) that failed or
    /// panicked on this event: [`Error::Handler`] naming it — except a busy database or a lost
    /// connection, which stays that so the run retries it.
    pub(crate) fn handler_failed(&self, source: Box<dyn std::error::Error + Send + Sync>) -> Error {
        if let Some(err) = source.downcast_ref::<sea_orm::DbErr>().map(|db| Error::from(db.clone()))
            && err.is_transient()
        {
            return err;
        }
        Error::Handler {
            stream: self.stream_id.clone(),
            partition: self.partition.clone(),
            position: self.stream_position,
            global_position: self.global_position,
            message_type: self.message_type.clone(),
            source,
        }
    }
}

/// An event split into the two stored columns.
pub(crate) struct EncodedEvent {
    pub message_type: String,
    pub data: Value,
}

/// A `messages` row as the store reads it: like [`messages::Model`](crate::schema::messages::Model),
/// but a row breaking the schema's rules (data or metadata that is not JSON — SQLite stores any
/// text — or no global position) still loads, so the error can name it.
#[derive(Clone)]
pub(crate) struct StoredMessage {
    pub stream_id: String,
    pub stream_position: i64,
    pub partition: String,
    pub message_type: String,
    pub message_id: String,
    pub global_position: Option<i64>,
    pub created: DateTime<Utc>,
    /// `message_schema_version`: the version of its type the event was written at.
    pub schema_version: String,
    /// `message_data`, or why it is not JSON.
    pub data: Result<Value, String>,
    /// `message_metadata`, or why it is not JSON.
    pub metadata: Result<Value, String>,
}

impl sea_orm::FromQueryResult for StoredMessage {
    fn from_query_result(row: &sea_orm::QueryResult, pre: &str) -> Result<Self, sea_orm::DbErr> {
        let json = |column: &str| -> Result<Result<Value, String>, sea_orm::DbErr> {
            let value = json_column(row, pre, column)?.unwrap_or(Ok(Value::Null));
            Ok(value.map_err(|err| format!("{column} is not JSON: {err}")))
        };
        Ok(Self {
            stream_id: row.try_get(pre, "stream_id")?,
            stream_position: row.try_get(pre, "stream_position")?,
            partition: row.try_get(pre, "partition")?,
            message_type: row.try_get(pre, "message_type")?,
            message_id: row.try_get(pre, "message_id")?,
            global_position: row.try_get(pre, "global_position")?,
            created: row.try_get(pre, "created")?,
            schema_version: row.try_get(pre, "message_schema_version")?,
            data: json("message_data")?,
            metadata: json("message_metadata")?,
        })
    }
}

/// A JSON column, `None` when NULL. Read as JSON where the database has a JSON type, parsed
/// from text where it stores text (SQLite), so a malformed value is an error of its own —
/// serde's, for the caller to name — rather than the driver's for the whole query.
pub(crate) fn json_column(
    row: &sea_orm::QueryResult,
    pre: &str,
    column: &str,
) -> Result<Option<serde_json::Result<Value>>, sea_orm::DbErr> {
    match row.try_get::<Option<Value>>(pre, column) {
        Ok(value) => Ok(value.map(Ok)),
        Err(_) => Ok(row.try_get::<Option<String>>(pre, column)?.map(|text| serde_json::from_str(&text))),
    }
}

impl StoredMessage {
    /// Rows of `messages` a raw query returned.
    pub(crate) fn from_rows(rows: &[sea_orm::QueryResult]) -> std::result::Result<Vec<Self>, sea_orm::DbErr> {
        rows.iter().map(|row| <Self as sea_orm::FromQueryResult>::from_query_result(row, "")).collect()
    }

    /// The rows this row is at the current versions of its types (see [`crate::upcast`]): itself
    /// when it is current, else one per event it becomes, each with this row's positions. A row
    /// whose data is not JSON is left as it is, for [`decode`](Self::decode) to name.
    pub(crate) fn upcast(self, upcasters: &Upcasters) -> Result<Vec<StoredMessage>> {
        if upcasters.is_empty() {
            return Ok(vec![self]);
        }
        let (Ok(data), Ok(metadata)) = (&self.data, &self.metadata) else { return Ok(vec![self]) };
        let failed = |version: Option<u32>, reason: String| Error::Upcast {
            stream: self.stream_id.clone(),
            partition: self.partition.clone(),
            position: self.stream_position as u64,
            global_position: self.global_position.unwrap_or(0) as u64,
            message_type: self.message_type.clone(),
            version,
            reason,
        };
        let version = crate::upcast::parse_version(&self.schema_version).map_err(|reason| failed(None, reason))?;
        if version == upcasters.current_version(&self.message_type) {
            return Ok(vec![self]);
        }
        let raw = RawEvent {
            message_type: self.message_type.clone(),
            version,
            data: data.clone(),
            metadata: metadata.clone(),
        };
        let events = upcasters.upcast(raw).map_err(|reason| failed(Some(version), reason))?;
        Ok(events
            .into_iter()
            .map(|e| StoredMessage {
                message_type: e.message_type,
                schema_version: e.version.to_string(),
                data: Ok(e.data),
                metadata: Ok(e.metadata),
                ..self.clone()
            })
            .collect())
    }

    /// Decodes the row into a [`RecordedEvent`], naming it precisely when it can't:
    /// [`Error::MalformedEvent`] for a row breaking the schema's rules,
    /// [`Error::UndecodableEvent`] for data that does not match `E`.
    pub(crate) fn decode<E: Event>(self) -> Result<RecordedEvent<E>> {
        let StoredMessage {
            stream_id,
            stream_position,
            partition,
            message_type,
            message_id,
            global_position,
            created,
            data,
            metadata,
            ..
        } = self;
        let position = stream_position as u64;
        let malformed = |reason: String| Error::MalformedEvent {
            stream: stream_id.clone(),
            partition: partition.clone(),
            position,
            message_type: message_type.clone(),
            reason,
        };
        let (global_position, data, metadata) = match (global_position, data, metadata) {
            (Some(global_position), Ok(data), Ok(metadata)) => (global_position, data, metadata),
            (None, _, _) => return Err(malformed("no global position".into())),
            (_, Err(reason), _) | (_, _, Err(reason)) => return Err(malformed(reason)),
        };
        let event = match decode(&message_type, data) {
            Ok(event) => event,
            Err(source) => {
                return Err(Error::UndecodableEvent {
                    stream: stream_id,
                    partition,
                    position,
                    global_position: global_position as u64,
                    message_type,
                    source,
                });
            }
        };
        Ok(RecordedEvent {
            event,
            message_type,
            stream_id,
            stream_position: position,
            global_position: global_position as u64,
            message_id,
            partition,
            created,
            metadata,
        })
    }
}

/// Splits a typed event into `message_type` and `message_data`.
pub(crate) fn encode<E: Event>(event: &E, stream: &str) -> Result<EncodedEvent> {
    let invalid = |reason: &str| Error::InvalidEvent { stream: stream.to_owned(), reason: reason.to_owned() };
    let Value::Object(mut object) = serde_json::to_value(event)? else {
        return Err(invalid("not a JSON object"));
    };
    let Some(Value::String(message_type)) = object.remove("type") else {
        return Err(invalid("no string field \"type\""));
    };
    let data = object.remove("data").unwrap_or_else(|| Value::Object(Map::new()));
    if let Some(extra) = object.keys().next() {
        return Err(invalid(&format!("unexpected field \"{extra}\" beside \"type\" and \"data\"")));
    }
    Ok(EncodedEvent { message_type, data })
}

/// Rebuilds a typed event from `message_type` and `message_data`.
pub(crate) fn decode<E: Event>(message_type: &str, data: Value) -> serde_json::Result<E> {
    let mut object = Map::with_capacity(2);
    object.insert("type".into(), Value::String(message_type.to_owned()));
    // Unit variants serialize without "data"; TypeScript writers store `{}` or `null` there.
    let empty = matches!(&data, Value::Null) || matches!(&data, Value::Object(o) if o.is_empty());
    object.insert("data".into(), data);
    serde_json::from_value(Value::Object(object.clone())).or_else(|err| {
        if empty {
            object.remove("data");
            serde_json::from_value(Value::Object(object)).map_err(|_| err)
        } else {
            Err(err)
        }
    })
}

/// Whether decoding failed because the event type (the serde tag) is not one of the enum's,
/// as opposed to data that does not match a type the enum has. serde's derive reports the
/// former as "unknown variant …".
pub(crate) fn is_unknown_type(err: &serde_json::Error) -> bool {
    err.to_string().starts_with("unknown variant")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "type", content = "data")]
    enum Ev {
        Created { id: u32 },
        Emptied,
    }

    #[test]
    fn round_trips_struct_and_unit_variants() {
        for ev in [Ev::Created { id: 7 }, Ev::Emptied] {
            let enc = encode(&ev, "s").unwrap();
            assert_eq!(decode::<Ev>(&enc.message_type, enc.data).unwrap(), ev);
        }
        assert_eq!(decode::<Ev>("Emptied", Value::Null).unwrap(), Ev::Emptied);
    }

    #[test]
    fn rejects_untagged_shapes() {
        assert!(matches!(encode(&42, "s"), Err(Error::InvalidEvent { .. })));
        assert!(matches!(encode(&serde_json::json!({"kind": "x"}), "s"), Err(Error::InvalidEvent { .. })));
        assert!(decode::<Ev>("Unknown", Value::Null).is_err());
    }

    #[test]
    fn unknown_types_are_told_from_bad_data() {
        assert!(is_unknown_type(&decode::<Ev>("Unknown", serde_json::json!({ "id": 1 })).unwrap_err()));
        assert!(is_unknown_type(&decode::<Ev>("Unknown", Value::Null).unwrap_err()));
        assert!(!is_unknown_type(&decode::<Ev>("Created", serde_json::json!({ "id": "x" })).unwrap_err()));
        assert!(!is_unknown_type(&decode::<Ev>("Created", Value::Null).unwrap_err()));
    }
}
