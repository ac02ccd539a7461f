// The TypeScript package's own constructStreamId over key sets read from stdin (a JSON array of
// objects); prints the ids as a JSON array. Driven by tests/reliability.rs.
import { constructStreamId } from "./node_modules/@wataruoguchi/emmett-event-store-kysely/dist/projections/snapshot-projection.js";

// Decoded once at the end: a character split across two chunks would decode as U+FFFD.
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const keySets = JSON.parse(Buffer.concat(chunks).toString("utf8"));
process.stdout.write(JSON.stringify(keySets.map((keys) => constructStreamId(keys))));
