// Appends and reads events with the TypeScript package, for tests/reliability.rs.
// Usage: DATABASE_URL=... node events.mjs write|read, with JSON on stdin:
//   write: [{ stream, partition, events: [{ type, data }] }]   prints []
//   read:  [{ stream, partition }]                              prints [[{ type, data }]]
import pg from "pg";
import { Kysely, PostgresDialect } from "kysely";
import { getKyselyEventStore } from "@wataruoguchi/emmett-event-store-kysely";

const db = new Kysely({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: process.env.DATABASE_URL }) }) });
const logger = { info() {}, error: console.error, warn() {}, debug() {} };
const store = getKyselyEventStore({ db, logger });

// Decoded once at the end: a character split across two chunks would decode as U+FFFD.
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));

try {
  const output = [];
  for (const { stream, partition, events } of input) {
    if (process.argv[2] === "write") {
      await store.appendToStream(stream, events, { partition });
    } else {
      const read = await store.readStream(stream, { partition });
      output.push(read.events.map((e) => ({ type: e.type, data: e.data })));
    }
  }
  console.log(JSON.stringify(output));
} finally {
  await db.destroy();
}
