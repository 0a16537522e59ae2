/** The two storages keep the same things: an outbox per scope, oldest first, and the other
 * members' receipts per scope, one per conversation and user, deleted a conversation at a time.
 * IndexedDB is the browsers' (here from `fake-indexeddb`, which implements the standard). */
import assert from "node:assert/strict";
import { test } from "node:test";
import "fake-indexeddb/auto"; // IDBKeyRange, as a browser has it
import { IDBFactory } from "fake-indexeddb";
import {
  IndexedDbOutboxStorage,
  MemoryOutboxStorage,
  type OutboxEntry,
  type OutboxStorage,
  type StoredReceipt,
} from "../src/index.js";

const storages: [string, () => OutboxStorage][] = [
  ["memory", () => new MemoryOutboxStorage()],
  ["IndexedDB", () => new IndexedDbOutboxStorage("courier", new IDBFactory())],
];

function entry(clientMsgId: string, position: number): OutboxEntry {
  return { client_msg_id: clientMsgId, to_user: "bob", body: { text: clientMsgId }, created_ms: 0, position };
}

function receipt(conversationId: string, user: string, seq: number): StoredReceipt {
  return { conversation_id: conversationId, user, delivered_seq: seq, read_seq: seq };
}

const byKey = (a: StoredReceipt, b: StoredReceipt) =>
  `${a.conversation_id} ${a.user}`.localeCompare(`${b.conversation_id} ${b.user}`);

for (const [name, open] of storages) {
  test(`${name}: an outbox is kept per scope, oldest first, and an entry deleted is gone`, async () => {
    const storage = open();
    await storage.put("alice/web", entry("b", 2));
    await storage.put("alice/web", entry("a", 1));
    await storage.put("alice/phone", entry("c", 1));
    assert.deepEqual((await storage.load("alice/web")).map((e) => e.client_msg_id), ["a", "b"]);
    await storage.delete("alice/web", "a");
    assert.deepEqual((await storage.load("alice/web")).map((e) => e.client_msg_id), ["b"]);
    assert.deepEqual((await storage.load("alice/phone")).map((e) => e.client_msg_id), ["c"]);
  });

  test(`${name}: receipts replace their conversation's and user's, and go a conversation at a time`, async () => {
    const storage = open();
    await storage.putReceipts!("alice/web", [receipt("g1", "bob", 1), receipt("g1", "carol", 1)]);
    await storage.putReceipts!("alice/web", [receipt("g1", "bob", 2), receipt("g10", "bob", 3), receipt("d:x", "bob", 4)]);
    await storage.putReceipts!("alice/phone", [receipt("g1", "bob", 5)]);
    assert.deepEqual((await storage.loadReceipts!("alice/web")).sort(byKey), [
      receipt("d:x", "bob", 4),
      receipt("g1", "bob", 2),
      receipt("g1", "carol", 1),
      receipt("g10", "bob", 3),
    ]);
    // `g1`'s receipts only: not those of `g10` (whose id starts with it), nor another scope's.
    await storage.deleteReceipts!("alice/web", ["g1", "d:x"]);
    assert.deepEqual(await storage.loadReceipts!("alice/web"), [receipt("g10", "bob", 3)]);
    assert.deepEqual(await storage.loadReceipts!("alice/phone"), [receipt("g1", "bob", 5)]);
    // The receipts share IndexedDB's object store with the outbox, which they leave alone.
    await storage.put("alice/web", entry("a", 1));
    await storage.deleteReceipts!("alice/web", ["g10"]);
    assert.deepEqual(await storage.loadReceipts!("alice/web"), []);
    assert.equal((await storage.load("alice/web")).length, 1);
  });

  test(`${name}: clearing a scope deletes its outbox and receipts, and nothing of another scope`, async () => {
    const storage = open();
    for (const scope of ["alice/web", "alice/phone", "alice/web2"]) {
      await storage.put(scope, entry("a", 1));
      await storage.putReceipts!(scope, [receipt("g1", "bob", 1)]);
    }
    await storage.clear!("alice/web");
    assert.deepEqual(await storage.load("alice/web"), []);
    assert.deepEqual(await storage.loadReceipts!("alice/web"), []);
    for (const scope of ["alice/phone", "alice/web2"]) {
      assert.equal((await storage.load(scope)).length, 1, scope);
      assert.deepEqual(await storage.loadReceipts!(scope), [receipt("g1", "bob", 1)], scope);
    }
  });
}
