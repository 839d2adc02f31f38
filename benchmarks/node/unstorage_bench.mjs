// The standard workload on unstorage (Node.js), for `python -m benchmarks`.
// Usage: node unstorage_bench.mjs <driver: memory|fs|redis|http> <n> [fs-dir|redis-url|server-url]
// Prints one JSON object {operation: ops_per_second}.
import { createStorage } from "unstorage";

const [driverName, nArg, where] = process.argv.slice(2);
const n = Number(nArg);

async function makeDriver() {
  if (driverName === "memory") return (await import("unstorage/drivers/memory")).default();
  if (driverName === "fs") return (await import("unstorage/drivers/fs")).default({ base: where });
  if (driverName === "redis") return (await import("unstorage/drivers/redis")).default({ url: where, base: "unstorage-bench" });
  if (driverName === "http") return (await import("unstorage/drivers/http")).default({ base: where });
  throw new Error(`unknown driver ${driverName}`);
}

const storage = createStorage({ driver: await makeDriver() });
const keys = Array.from({ length: n }, (_, i) => `bench:item:${i}`);
const value = (i) => ({ n: i, s: "x".repeat(100) });
const result = {};

async function timed(operation, count, fn) {
  const started = process.hrtime.bigint();
  await fn();
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  result[operation] = count / seconds;
}

await storage.setItem("bench:warmup", value(-1));
await storage.getItem("bench:warmup");
await storage.removeItem("bench:warmup");
await timed("set_item", n, async () => { for (let i = 0; i < n; i++) await storage.setItem(keys[i], value(i)); });
await timed("get_item", n, async () => { for (const k of keys) await storage.getItem(k); });
let listed = [];
await timed("get_keys", n, async () => { listed = await storage.getKeys("bench"); });
if (listed.length !== n) throw new Error(`listed ${listed.length} keys, expected ${n}`);
await timed("get_items x100", n, async () => {
  for (let s = 0; s < n; s += 100) await storage.getItems(keys.slice(s, s + 100));
});
await timed("100 concurrent get_item", n, async () => {
  for (let s = 0; s < n; s += 100) await Promise.all(keys.slice(s, s + 100).map((k) => storage.getItem(k)));
});
await timed("remove_item", n, async () => { for (const k of keys) await storage.removeItem(k); });
await storage.dispose();
console.log(JSON.stringify(result));
