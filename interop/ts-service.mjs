// A TypeScript service on @wataruoguchi/emmett-event-store-kysely sharing one PostgreSQL event
// store with emmett-seaorm. Driven step by step by tests/interop.rs; prints one JSON object.
// Usage: DATABASE_URL=... TENANT=... node ts-service.mjs first|second|third
import pg from "pg";
import { Kysely, PostgresDialect } from "kysely";
import {
  getKyselyEventStore, createProjectionRunner,
  createSnapshotProjectionRegistryWithSnapshotTable,
} from "@wataruoguchi/emmett-event-store-kysely";

const tenant = process.env.TENANT;
const db = new Kysely({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: process.env.DATABASE_URL }) }) });
const logger = { info() {}, error: console.error, warn() {}, debug() {} };
const store = getKyselyEventStore({ db, logger });

// The cart domain, as in the peer benchmark: the same evolve feeds aggregates and the read model.
const initialState = () => ({ items: 0, total: 0 });
const evolve = (st, ev) => ev.type === "CartCreated" ? initialState()
  : { items: st.items + ev.data.qty, total: st.total + ev.data.qty * ev.data.price };
const registry = createSnapshotProjectionRegistryWithSnapshotTable(["CartCreated", "ItemAdded"], {
  tableName: "carts",
  extractKeys: (ev, partition) => ({ tenant_id: partition, cart_id: ev.metadata.streamId }),
  evolve, initialState,
  mapToColumns: (st) => ({ item_count: st.items, total: st.total }),
});
const runner = createProjectionRunner({ db, readStream: store.readStream, registry });
const project = async (cart) =>
  (await runner.projectEvents(`carts:${cart}`, cart, { partition: tenant })).processed;
const aggregate = async (cart) =>
  (await store.aggregateStream(cart, { evolve, initialState, read: { partition: tenant } })).state;

const steps = {
  // Reads, aggregates and projects the stream the Rust side wrote, appends to it, starts its own.
  async first() {
    const read = await store.readStream("cart-rs", { partition: tenant });
    const events = read.events.map((e) => ({
      type: e.type, data: e.data,
      streamPosition: e.metadata.streamPosition, globalPosition: e.metadata.globalPosition,
    }));
    const state = await aggregate("cart-rs");
    const processed = await project("cart-rs");
    const appended = await store.appendToStream("cart-rs", [item("sku-ts", 1, 500)],
      { partition: tenant, streamType: "cart", expectedStreamVersion: read.currentStreamVersion });
    const created = await store.appendToStream("cart-ts",
      [{ type: "CartCreated", data: { cartId: "cart-ts" } }, item("sku-1", 2, 100), item("sku-2", 1, 250)],
      { partition: tenant, streamType: "cart", expectedStreamVersion: "STREAM_DOES_NOT_EXIST" });
    return {
      events, currentStreamVersion: read.currentStreamVersion, state, processed,
      appendedVersion: appended.nextExpectedStreamVersion, createdVersion: created.nextExpectedStreamVersion,
    };
  },
  // Resumes both projections from the checkpoints and snapshots the Rust runner left.
  async second() {
    const processed = { "cart-rs": await project("cart-rs"), "cart-ts": await project("cart-ts") };
    const states = { "cart-rs": await aggregate("cart-rs"), "cart-ts": await aggregate("cart-ts") };
    // pg returns bigint columns as strings.
    const carts = (await db.selectFrom("carts").select(["cart_id", "item_count", "total"])
      .where("tenant_id", "=", tenant).orderBy("cart_id").execute())
      .map((r) => ({ cartId: r.cart_id, itemCount: Number(r.item_count), total: Number(r.total) }));
    const snapshots = (await db.selectFrom("snapshots").select(["stream_id", "last_stream_position", "snapshot"])
      .where("readmodel_table_name", "=", "carts").orderBy("stream_id").execute())
      .map((r) => ({ streamId: r.stream_id, lastStreamPosition: Number(r.last_stream_position), snapshot: r.snapshot }));
    return { processed, states, carts, snapshots };
  },
  // Appends to both carts while a projection daemon of the Rust side runs.
  async third() {
    const rs = await store.appendToStream("cart-rs", [item("sku-ts-2", 1, 7)], { partition: tenant, streamType: "cart" });
    const ts = await store.appendToStream("cart-ts", [item("sku-ts-3", 2, 3)], { partition: tenant, streamType: "cart" });
    return { lastGlobalPosition: ts.lastEventGlobalPosition ?? rs.lastEventGlobalPosition };
  },
};

function item(sku, qty, price) {
  return { type: "ItemAdded", data: { sku, qty, price } };
}

try {
  const result = await steps[process.argv[2]]();
  // Positions are bigints in the package; JSON has numbers.
  console.log(JSON.stringify(result, (_, v) => (typeof v === "bigint" ? Number(v) : v)));
} finally {
  await db.destroy();
}
