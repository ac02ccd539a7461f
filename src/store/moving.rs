//! Moving a tenant to another database: export, import, verify, erase at the source.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use super::EventStore;
use super::export::{Line, PartitionCounts, PartitionReader};
use crate::error::{Error, Result};
use crate::projection::ReadModel;

/// A tenant's content, stream by stream, without what only one database gives (global
/// positions): equal on both sides of a move that copied everything.
#[derive(Debug, PartialEq, Eq)]
struct Digest {
    streams: u64,
    events: u64,
    /// Per stream generation (`(stream id, archived)`): a hash of its row and its events.
    hashes: BTreeMap<(String, bool), u64>,
}

impl EventStore {
    /// Moves tenant `partition` to the store `to` (any backend): exports it, imports it there
    /// in one transaction, checks that both hold the same stream rows and events (counts and a
    /// hash per stream), then erases it here with the rows of `read_models`, checking that it
    /// erases exactly what was copied. The read models there are filled by its daemon.
    ///
    /// Stop the tenant's writers first: an append here during the move fails the check
    /// ([`Error::PartitionChanged`]), the copy there is erased (with its rows of `read_models`,
    /// if its daemon projected it meanwhile), and the tenant stays here. Run
    /// again after a crash, it finishes the job: a copy there equal to the tenant here is kept
    /// and the erase runs; a different one is refused ([`Error::PartitionExists`]). The tenant is
    /// never missing on both sides.
    ///
    /// ```no_run
    /// # async fn f(here: emmett_seaorm::EventStore, there: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::projection::ReadModel;
    ///
    /// let moved = here.move_partition("acme", &there, &[ReadModel::new("carts", "tenant_id")]).await?;
    /// println!("moved {} events", moved.events);
    /// # Ok(()) }
    /// ```
    pub async fn move_partition(
        &self,
        partition: &str,
        to: &EventStore,
        read_models: &[ReadModel],
    ) -> Result<PartitionCounts> {
        let here = digest(self, partition).await?;
        let there = digest(to, partition).await?;
        if there.events + there.streams > 0 && there != here {
            return Err(Error::PartitionExists { partition: partition.into() });
        }
        if there.events + there.streams == 0 {
            let (writer, reader) = tokio::io::duplex(1 << 16);
            let export = self.export_partition(partition, writer);
            let import = to.import_partition(tokio::io::BufReader::new(reader), super::ImportOptions::default());
            let (exported, imported) = tokio::join!(export, import);
            // The import's error says why; the export then only saw its reader go.
            imported?;
            exported?;
            let copied = digest(to, partition).await?;
            if copied != digest(self, partition).await? {
                to.erase_partition(partition, read_models).await?;
                let reason = "its streams or events differ from the copy".to_owned();
                return Err(Error::PartitionChanged { partition: partition.into(), reason });
            }
        }
        let copied = digest(to, partition).await?;
        let expected = (copied.streams, copied.events);
        match self.erase_exactly(partition, read_models, expected).await {
            Err(Error::PartitionChanged { partition, reason }) => {
                to.erase_partition(&partition, read_models).await?;
                Err(Error::PartitionChanged { partition, reason })
            }
            erased => {
                erased.map(|_| PartitionCounts { partition: partition.into(), streams: expected.0, events: expected.1 })
            }
        }
    }
}

/// The digest of `partition` in `store`, read from one snapshot.
async fn digest(store: &EventStore, partition: &str) -> Result<Digest> {
    let mut reader = PartitionReader::begin(store, partition).await?;
    let mut digest = Digest { streams: 0, events: 0, hashes: BTreeMap::new() };
    let mut add = |key: (String, bool), text: String| {
        let hash = digest.hashes.entry(key).or_default();
        let mut hasher = DefaultHasher::new();
        (*hash, text).hash(&mut hasher);
        *hash = hasher.finish();
    };
    let (mut streams, mut events) = (0, 0);
    while let Some(lines) = reader.next_page().await? {
        for line in lines {
            match line {
                Line::Header(_) => {}
                Line::Stream(s) => {
                    streams += 1;
                    add((s.stream_id.clone(), s.is_archived), serde_json::to_string(&s)?);
                }
                Line::Event(mut e) => {
                    events += 1;
                    e.global_position = 0;
                    add((e.stream_id.clone(), e.is_archived), serde_json::to_string(&e)?);
                }
            }
        }
    }
    reader.finish().await?;
    (digest.streams, digest.events) = (streams, events);
    Ok(digest)
}
