// unstorage (Node.js) on both sides of the HTTP protocol, for tests/test_unstorage_interop.py.
//
//   node unstorage_interop.mjs client <url> <token>
//     unstorage's http driver against a kvstorage server: writes js:* items, reads the py:*
//     items the test wrote, prints one JSON object with what it saw.
//   node unstorage_interop.mjs server
//     unstorage's createStorageServer over a memory storage holding js:* items; prints
//     {"port": N}, then answers each "dump" line on stdin with every key and value.
import { createServer } from "node:http";
import { createInterface } from "node:readline";
import { createStorage } from "unstorage";
import httpDriver from "unstorage/drivers/http";
import memoryDriver from "unstorage/drivers/memory";
import { createStorageServer } from "unstorage/server";

const [mode, url, token] = process.argv.slice(2);
const bytes = (buffer) => Array.from(new Uint8Array(buffer));

if (mode === "client") {
  const headers = { authorization: `Bearer ${token}` };
  const storage = createStorage({ driver: httpDriver({ base: url, headers }) });
  storage.mount("tmp", httpDriver({ base: `${url}/py/tmp`, headers }));
  await storage.setItem("js:obj", { a: 1, list: [1, "two", null, 2.5] });
  await storage.setItem("js:str", "hello world");
  await storage.setItem("js:num", 42);
  await storage.setItemRaw("js:raw", new Uint8Array([0, 1, 2, 127, 128, 254, 255]));
  await storage.setItem("js:ttl", { t: true }, { ttl: 60 });
  await storage.setItem("js:gone", 1);
  await storage.removeItem("js:gone");
  const seen = {
    keys: (await storage.getKeys("py")).sort(),
    obj: await storage.getItem("py:obj"),
    str: await storage.getItem("py:str"),
    raw: bytes(await storage.getItemRaw("py:raw")),
    has: await storage.hasItem("py:obj"),
    hasMissing: await storage.hasItem("py:missing"),
    missing: await storage.getItem("py:missing"),
    meta: await storage.getMeta("py:ttl"),
  };
  await storage.clear("tmp"); // DELETE <url>/py/tmp/: -- a clear by base on the server
  seen.afterClear = (await storage.getKeys("py")).sort();
  console.log(JSON.stringify(seen));
} else if (mode === "server") {
  const storage = createStorage({ driver: memoryDriver() });
  await storage.setItem("js:obj", { a: 1, list: [1, "two", null] });
  await storage.setItem("js:str", "hello world");
  await storage.setItemRaw("js:raw", new Uint8Array([0, 1, 2, 254, 255]));
  const server = createServer(createStorageServer(storage).handle);
  server.listen(0, "127.0.0.1", () => console.log(JSON.stringify({ port: server.address().port })));
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() !== "dump") continue;
    const items = {};
    for (const key of (await storage.getKeys()).sort()) {
      const raw = await storage.getItemRaw(key);
      items[key] = {
        value: await storage.getItem(key),
        raw: Buffer.from(typeof raw === "string" ? Buffer.from(raw) : raw).toString("base64"),
      };
    }
    console.log(JSON.stringify(items));
  }
  server.close();
} else {
  throw new Error(`unknown mode ${mode}`);
}
