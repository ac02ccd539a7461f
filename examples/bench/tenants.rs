//! `tenant-transfer`: one tenant of `--tenant-events` events (its own partitions on PostgreSQL)
//! exported to memory (`tenant-export`), imported under another id (`tenant-import`), then the
//! original erased (`tenant-erase`).

use std::time::Instant;

use emmett_seaorm::{AppendOptions, EventStore, ImportOptions};

use super::{cart_event, report};

pub async fn transfer(store: &EventStore, partition: &str, events: u64) -> Result<(), Box<dyn std::error::Error>> {
    const PER_STREAM: u64 = 1_000;
    let tenant = format!("{partition}-transfer");
    store.create_partition(&tenant).await?;
    for s in 0..events.div_ceil(PER_STREAM) {
        let batch = (0..PER_STREAM.min(events - s * PER_STREAM)).map(|e| cart_event(s, e));
        store.append_to_stream(&format!("cart-{s}"), batch, AppendOptions::default().partition(&tenant)).await?;
    }
    let mut file = Vec::new();
    let started = Instant::now();
    let written = store.export_partition(&tenant, &mut file).await?;
    report("tenant-export", written.events, started);
    let started = Instant::now();
    let copy = ImportOptions::default().partition(format!("{tenant}-copy"));
    let read = store.import_partition(&file[..], copy).await?;
    report("tenant-import", read.events, started);
    let started = Instant::now();
    store.erase_partition(&tenant, &[]).await?;
    report("tenant-erase", written.events, started);
    store.erase_partition(&format!("{tenant}-copy"), &[]).await?;
    Ok(())
}
