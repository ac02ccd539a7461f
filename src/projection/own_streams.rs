//! Telling a renamed or removed event type of the projection's own aggregate from another
//! aggregate's event: both reach the runner as a type the event enum doesn't know.
//!
//! A tenant's history mixes aggregates, and a projection over one of them passes the others'
//! events over. But an unknown type in a stream that also holds types the enum knows is the
//! aggregate's own history that the code can no longer read (a variant renamed or removed):
//! folding it away would silently change the read model, so it fails like any undecodable
//! event — what `aggregate_stream` does on the same data.

use std::collections::HashMap;
use std::sync::Mutex;

use sea_orm::{ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QuerySelect};

use crate::error::{Error, Result};
use crate::schema::messages;

/// Streams remembered before the memory is cleared and starts again.
const REMEMBERED: usize = 100_000;

/// Which streams are the projection's own aggregate's, remembered per (partition, stream): a
/// stream never changes aggregate.
#[derive(Default)]
pub(crate) struct OwnStreams(Mutex<HashMap<(String, String), bool>>);

impl OwnStreams {
    /// Whether the stream of `error` (an [`Error::UndecodableEvent`] for a type the enum doesn't
    /// know) holds an event of a type the enum knows.
    pub async fn holds(&self, txn: &DatabaseTransaction, error: &Error) -> Result<bool> {
        let Error::UndecodableEvent { stream, partition, source, .. } = error else { return Ok(false) };
        let key = (partition.clone(), stream.clone());
        if let Some(&own) = self.0.lock().expect("not poisoned").get(&key) {
            return Ok(own);
        }
        let known = known_types(&source.to_string());
        let own = !known.is_empty()
            && messages::Entity::find()
                .select_only()
                .column(messages::Column::GlobalPosition)
                .filter(messages::Column::StreamId.eq(stream.as_str()))
                .filter(messages::Column::Partition.eq(partition.as_str()))
                .filter(messages::Column::MessageType.is_in(known))
                .limit(1)
                .into_tuple::<Option<i64>>()
                .one(txn)
                .await?
                .is_some();
        let mut remembered = self.0.lock().expect("not poisoned");
        if remembered.len() >= REMEMBERED {
            remembered.clear();
        }
        remembered.insert(key, own);
        Ok(own)
    }
}

/// The variants serde's "unknown variant `X`, expected one of `A`, `B`" (or "expected `A` or
/// `B`", "expected `A`") lists: the types the enum knows.
fn known_types(message: &str) -> Vec<String> {
    let Some((_, expected)) = message.split_once("expected") else { return Vec::new() };
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::known_types;

    #[test]
    fn reads_the_variants_serde_expected() {
        assert_eq!(known_types("unknown variant `X`, expected one of `A`, `B`, `C`"), ["A", "B", "C"]);
        assert_eq!(known_types("unknown variant `X`, expected `A` or `B` at line 1"), ["A", "B"]);
        assert_eq!(known_types("unknown variant `X`, expected `A`"), ["A"]);
        assert!(known_types("unknown variant `X`, there are no variants").is_empty());
    }
}
