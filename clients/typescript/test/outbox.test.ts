/** The outbox: messages written while offline survive a restart of the client (its storage
 * outlives it, as IndexedDB outlives a page) and are stored exactly once. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  CourierClient,
  MemoryOutboxStorage,
  type CourierError,
  type OutboxStorage,
  type Sent,
  type WebSocketConstructor,
} from "../src/index.js";
import { Network, Server, client, closeClients, synced, texts, until } from "./support.js";
import WebSocket from "ws";

let server: Server;

before(async () => {
  server = await Server.start();
});

after(async () => {
  closeClients();
  await server.dispose();

});

test("messages written offline are sent by the next client on the same storage, once each", async () => {
  const storage = new MemoryOutboxStorage();
  const network = new Network();
  network.cut();
  const offline = await client(server, "alice", "laptop", { storage, network });
  const phone = await synced(server, "alice", "phone");
  const conversation = (await phone.sendText({ toUser: "bob" }, "from the phone")).conversation_id;
  phone.close();
  const pending = [
    offline.sendText({ conversationId: conversation }, "written offline 1"),
    offline.sendText({ conversationId: conversation }, "written offline 2"),
  ];
  pending.forEach((p) => p.catch(() => {}));
  await until("both are in the outbox", () => offline.pending(conversation).length === 2);
  assert.notEqual(offline.state, "online");
  offline.close(); // the page is closed before the network comes back

  const bob = await synced(server, "bob", "web");
  const reopened = await client(server, "alice", "laptop", { storage });
  assert.equal(reopened.pending(conversation).length, 2, "the outbox came back from storage");
  await until("the outbox is empty", () => reopened.outboxEntries().length === 0);
  await until("bob has all three", () => texts(bob, conversation).length === 3);
  assert.deepEqual(texts(bob, conversation), ["from the phone", "written offline 1", "written offline 2"]);
  reopened.close();
  bob.close();
});

test("an entry whose first attempt got through is answered as a duplicate, not stored twice", async () => {
  const storage = new MemoryOutboxStorage();
  const carol = await synced(server, "carol", "web", { storage });
  const sent = await carol.send({ toUser: "dave" }, { text: "once" }, { clientMsgId: "carol-once" });
  carol.close();
  // As if the page had closed between the server storing it and the `sent` arriving.
  await storage.put("carol/web", {
    client_msg_id: "carol-once",
    to_user: "dave",
    body: { text: "once" },
    created_ms: 1,
    position: 1,
  });

  const again = await client(server, "carol", "web", { storage });
  await until("the outbox is empty", () => again.outboxEntries().length === 0);
  const dave = await synced(server, "dave", "web");
  await dave.loadHistory(sent.conversation_id);
  assert.deepEqual(texts(dave, sent.conversation_id), ["once"]);
  again.close();
  dave.close();
});

test("without a WebSocket (Node 20 has no global one) the client says what to pass", async () => {
  const token = server.token("erin", "web");
  const noWebSocket = (globalThis as { WebSocket?: unknown }).WebSocket;
  assert.equal(noWebSocket, undefined, "Node 20 has no global WebSocket");
  await assert.rejects(
    CourierClient.open({ url: server.url, token, storage: new MemoryOutboxStorage() }),
    /pass one, e\.g\. `WebSocket` from the `ws` package/,
  );
  const withWs = await CourierClient.open({
    url: server.url,
    token,
    storage: new MemoryOutboxStorage(),
    WebSocket: WebSocket as unknown as WebSocketConstructor,
  });
  await withWs.whenSynced();
  withWs.close();
});

test("an entry already stored is taken out of the outbox when its event shows up in history", async () => {
  const storage = new MemoryOutboxStorage();
  const gina = await synced(server, "gina", "web", { storage });
  const sent = await gina.send({ toUser: "hal" }, { text: "stored before the reload" }, { clientMsgId: "gina-1" });
  gina.close();
  await storage.put("gina/web", {
    client_msg_id: "gina-1",
    to_user: "hal",
    body: { text: "stored before the reload" },
    created_ms: 1,
    position: 1,
  });
  const network = new Network();
  network.cut();
  const reloaded = await client(server, "gina", "web", { storage, network });
  assert.equal(reloaded.outboxEntries().length, 1);
  await reloaded.refreshConversations();
  await reloaded.loadHistory(sent.conversation_id);
  await until("the entry left the outbox", () => reloaded.outboxEntries().length === 0);
  assert.deepEqual(texts(reloaded, sent.conversation_id), ["stored before the reload"]);
});

test("sends refused as rate_limited are retried with the same id until stored, in order, once each", async () => {
  const limited = await Server.start(["--user-sends-per-sec", "2", "--user-sends-burst", "1"]);
  try {
    const errors: string[] = [];
    const fast = await synced(limited, "fast", "web");
    fast.on("error", (e) => errors.push(e.code));
    const written = ["r1", "r2", "r3", "r4"];
    const sends = written.map((text) => fast.sendText({ toUser: "slow" }, text));
    const sent = await Promise.all(sends);
    assert.deepEqual(
      sent.map((s) => s.seq),
      [1, 2, 3, 4],
      "stored in the order written",
    );
    const slow = await synced(limited, "slow", "web");
    assert.deepEqual(texts(slow, sent[0]!.conversation_id), written, "each stored once");
    assert.deepEqual(errors, [], "a retried send is no error to the caller");
    const metrics = await (await fetch(`${limited.url}/metrics`)).text();
    const refused = /courier_chat_rate_limited_total\{[^}]*\} (\d+)/.exec(metrics);
    assert.ok(refused && Number(refused[1]) > 0, `the server did refuse some sends:\n${refused?.[0]}`);
  } finally {
    closeClients();
    await limited.dispose();
  }
});

test("a send refused with a wait too long for a timer, or with no number for one, is not retried at once in a loop", async () => {
  for (const retryAfterMs of [2 ** 32, "soon"]) {
    const network = new Network();
    const sender = await synced(server, "hal", `web-${typeof retryAfterMs}`, { network, heartbeatMs: 10 });
    let refused = 0;
    let pings = 0;
    network.answer = (frame) => {
      if (frame.type === "ping") pings++;
      if (frame.type !== "send") return undefined;
      refused++;
      return { type: "error", ref: frame.ref, code: "rate_limited", message: "slow down", retry_after_ms: retryAfterMs };
    };
    sender.sendText({ toUser: "ida" }, "wait for it").catch(() => {});
    // Twenty heartbeats later the send has been tried a few times at most (its backoff), not
    // again at once after each refusal (thousands of times).
    await until("twenty pings went out", () => pings >= 20);
    assert.ok(refused < 10, `retry_after_ms ${retryAfterMs}: the send was tried ${refused} times`);
    sender.close();
  }
});

test("messages go out in the order written even when their local writes finish out of order", async () => {
  // Storage whose first write waits until the test lets it finish.
  let finishFirstWrite!: () => void;
  const firstWriteDone = new Promise<void>((r) => (finishFirstWrite = r));
  const memory = new MemoryOutboxStorage();
  let writes = 0;
  const slowFirst: OutboxStorage = {
    load: (scope) => memory.load(scope),
    delete: (scope, id) => memory.delete(scope, id),
    put: async (scope, entry) => {
      if (writes++ === 0) await firstWriteDone;
      await memory.put(scope, entry);
    },
  };
  const ivy = await synced(server, "ivy", "web", { storage: slowFirst });
  const first = ivy.sendText({ toUser: "jim" }, "first");
  const second = ivy.sendText({ toUser: "jim" }, "second");
  await until("the second is written locally", () => writes === 2);
  finishFirstWrite();
  const [a, b] = await Promise.all([first, second]);
  assert.deepEqual([a.seq, b.seq], [1, 2]);
});

test("a message written after one whose local write fails is sent without waiting for another send", async () => {
  // Storage whose first write fails once the test says so, after the second has finished.
  let failFirstWrite!: (error: Error) => void;
  const firstWriteFailed = new Promise<void>((_, reject) => (failFirstWrite = reject));
  const memory = new MemoryOutboxStorage();
  let writes = 0;
  const failingFirst: OutboxStorage = {
    load: (scope) => memory.load(scope),
    delete: (scope, id) => memory.delete(scope, id),
    put: async (scope, entry) => {
      if (writes++ === 0) await firstWriteFailed;
      await memory.put(scope, entry);
    },
  };
  const kim = await synced(server, "kim", "web", { storage: failingFirst });
  const shown: string[][] = [];
  kim.on("outbox", () => shown.push(kim.outboxEntries().map((e) => ("text" in e.body ? e.body.text : ""))));
  const lost = kim.sendText({ toUser: "lou" }, "lost");
  const second = kim.sendText({ toUser: "lou" }, "second");
  // Its flush finds the first still being written, ahead of it.
  await until("the second is written locally", async () => (await memory.load("kim/web")).length === 1);
  failFirstWrite(new Error("QuotaExceededError"));
  await assert.rejects(lost, /QuotaExceededError/);
  assert.ok(!shown.at(-1)?.includes("lost"), `the app is told the entry is gone: ${JSON.stringify(shown)}`);
  let sent: Sent | undefined;
  void second.then((s) => (sent = s));
  await until("the second is stored by the server", () => sent !== undefined);
  assert.equal(sent!.seq, 1);
  assert.deepEqual(kim.outboxEntries(), []);
});

test("a message refused for good whose failed mark cannot be written rejects its send, and the next one is sent", async () => {
  // Storage that cannot write an entry marked failed (e.g. the quota is reached).
  const memory = new MemoryOutboxStorage();
  const cannotMark: OutboxStorage = {
    load: (scope) => memory.load(scope),
    delete: (scope, id) => memory.delete(scope, id),
    put: async (scope, entry) => {
      if (entry.failed) throw new Error("QuotaExceededError");
      await memory.put(scope, entry);
    },
  };
  const admin = await synced(server, "ann6", "web");
  await synced(server, "ben6", "phone");
  const group = await admin.createGroup("club", ["ben6"]);
  await admin.removeMember(group, "ben6");
  const network = new Network();
  network.cut();
  const ben = await client(server, "ben6", "web", { storage: cannotMark, network });
  const errors: string[] = [];
  ben.on("error", (e) => errors.push(e.message));
  const shown: string[][] = [];
  ben.on("outbox", () => shown.push(ben.outboxEntries().map((e) => e.failed?.code ?? "pending")));
  const refused = ben.sendText({ conversationId: group }, "to a group ben left");
  const next = ben.sendText({ toUser: "ann6" }, "after the refused one");
  let refusal: string | undefined;
  refused.catch((e: CourierError) => (refusal = e.code));
  let sent: Sent | undefined;
  void next.then((s) => (sent = s));
  await until("both are in the outbox", () => ben.outboxEntries().length === 2);

  network.restore();
  await until("the refused send rejects", () => refusal !== undefined);
  assert.equal(refusal, "forbidden");
  assert.deepEqual(shown.at(-1)?.[0], "forbidden", `the app is told it failed: ${JSON.stringify(shown)}`);
  assert.ok(
    errors.some((e) => e.includes("QuotaExceededError")),
    `the failed write is reported: ${JSON.stringify(errors)}`,
  );
  await until("the next one is stored by the server, without another send", () => sent !== undefined);
  assert.deepEqual(
    ben.outboxEntries().map((e) => e.failed?.code),
    ["forbidden"],
  );
});

test("a message stored by the server whose local delete fails resolves its send, leaves the outbox and is not sent again", async () => {
  // Storage whose deletes fail until the test says otherwise.
  const memory = new MemoryOutboxStorage();
  let deletesFail = true;
  const cannotDelete: OutboxStorage = {
    load: (scope) => memory.load(scope),
    put: (scope, entry) => memory.put(scope, entry),
    delete: async (scope, id) => {
      if (deletesFail) throw new Error("the disk went away");
      await memory.delete(scope, id);
    },
  };
  const network = new Network();
  const written: string[] = [];
  network.lose = (frame) => {
    if (frame.type === "send") written.push(frame.client_msg_id!);
    return false;
  };
  const cal = await synced(server, "cal6", "web", { storage: cannotDelete, network });
  const errors: string[] = [];
  cal.on("error", (e) => errors.push(e.message));
  let first: Sent | undefined;
  void cal.sendText({ toUser: "dan6" }, "first").then((s) => (first = s));
  await until("the first send resolves", () => first !== undefined);
  assert.deepEqual(cal.outboxEntries(), [], "it left the outbox");
  assert.ok(
    errors.some((e) => e.includes("the disk went away")),
    `the failed delete is reported: ${JSON.stringify(errors)}`,
  );
  assert.equal((await memory.load("cal6/web")).length, 1, "the storage still holds it");

  deletesFail = false;
  const second = await cal.sendText({ toUser: "dan6" }, "second");
  assert.equal(second.seq, first!.seq + 1);
  await until("the storage holds neither", async () => (await memory.load("cal6/web")).length === 0);
  assert.deepEqual(written, [first!.client_msg_id, second.client_msg_id], "each was sent once");
});

test("forget deletes an entry the server stored whose local delete failed", async () => {
  const memory = new MemoryOutboxStorage();
  let deletesFail = true;
  const storage: OutboxStorage = {
    load: (scope) => memory.load(scope),
    put: (scope, entry) => memory.put(scope, entry),
    delete: async (scope, id) => {
      if (deletesFail) throw new Error("the disk went away");
      await memory.delete(scope, id);
    },
  };
  const eli = await synced(server, "eli6", "web", { storage });
  eli.on("error", () => {});
  let sent: Sent | undefined;
  void eli.sendText({ toUser: "fay6" }, "stored").then((s) => (sent = s));
  await until("the send resolves", () => sent !== undefined);
  deletesFail = false;
  await eli.forget();
  assert.deepEqual(await memory.load("eli6/web"), [], "nothing of the device is left to send");
});

test("a failed message retried while the storage cannot write is sent all the same", async () => {
  const memory = new MemoryOutboxStorage();
  let putsFail = false;
  const storage: OutboxStorage = {
    load: (scope) => memory.load(scope),
    delete: (scope, id) => memory.delete(scope, id),
    put: async (scope, entry) => {
      if (putsFail) throw new Error("QuotaExceededError");
      await memory.put(scope, entry);
    },
  };
  const admin = await synced(server, "ann7", "web");
  const gus = await synced(server, "gus7", "web", { storage });
  const errors: string[] = [];
  gus.on("error", (e) => errors.push(e.message));
  const group = await admin.createGroup("club", ["gus7"]);
  await admin.removeMember(group, "gus7");
  await assert.rejects(
    gus.send({ conversationId: group }, { text: "again" }, { clientMsgId: "gus-1" }),
    (e: CourierError) => e.code === "forbidden",
  );
  await admin.addMembers(group, ["gus7"]);

  putsFail = true;
  const sent = await gus.retry("gus-1");
  assert.equal(sent.client_msg_id, "gus-1");
  assert.deepEqual(gus.outboxEntries(), []);
  assert.ok(
    errors.some((e) => e.includes("QuotaExceededError")),
    `the failed write is reported: ${JSON.stringify(errors)}`,
  );
});

/** A storage without `clear`, as one of an app's own may be. */
function withoutClear(memory: MemoryOutboxStorage): OutboxStorage {
  return {
    load: (scope) => memory.load(scope),
    put: (scope, entry) => memory.put(scope, entry),
    delete: (scope, id) => memory.delete(scope, id),
    loadReceipts: (scope) => memory.loadReceipts(scope),
    putReceipts: (scope, receipts) => memory.putReceipts(scope, receipts),
    deleteReceipts: (scope, ids) => memory.deleteReceipts(scope, ids),
  };
}

for (const [name, own] of [["its clear", false], ["entry by entry", true]] as const) {
  test(`forget closes the client and deletes the device's outbox and receipts (${name}): a later client of the device sends nothing`, async () => {
    const memory = new MemoryOutboxStorage();
    const storage = own ? withoutClear(memory) : memory;
    const user = own ? "pat2" : "pat";
    await memory.putReceipts(`${user}/web`, [{ conversation_id: "d:x", user: "quin", delivered_seq: 1, read_seq: 1 }]);
    await memory.put(`${user}/phone`, { client_msg_id: "other", to_user: "quin", body: { text: "x" }, created_ms: 0, position: 1 });
    const network = new Network();
    network.cut();
    const pat = await client(server, user, "web", { storage, network });
    const unsent = ["unsent 1", "unsent 2"].map((text) => pat.sendText({ toUser: "quin" }, text));
    await until("both are in the outbox", () => pat.outboxEntries().length === 2);

    await pat.forget();
    assert.equal(pat.state, "closed");
    assert.deepEqual(pat.outboxEntries(), []);
    for (const send of unsent) await assert.rejects(send, (e: CourierError) => e.code === "closed");
    assert.deepEqual(await memory.load(`${user}/web`), []);
    assert.deepEqual(await memory.loadReceipts(`${user}/web`), []);
    assert.equal((await memory.load(`${user}/phone`)).length, 1, "another device's outbox is left alone");

    network.restore();
    const again = await synced(server, user, "web", { storage });
    assert.deepEqual(again.outboxEntries(), []);
  });
}

test("a send refused before it enters the outbox (its client_msg_id is already there) leaves no promise to reject unhandled", async () => {
  const unhandled: unknown[] = [];
  const record = (reason: unknown) => unhandled.push(reason);
  process.on("unhandledRejection", record);
  try {
    const admin = await synced(server, "dana3", "web");
    const eve = await synced(server, "eve3", "web");
    const group = await admin.createGroup("club", ["eve3"]);
    await admin.removeMember(group, "eve3");
    const target = { conversationId: group };
    await assert.rejects(eve.send(target, { text: "hi" }, { clientMsgId: "retry-1" }), (e: CourierError) => e.code === "forbidden");
    // The app retries with the same client_msg_id, as PROTOCOL.md says retries do; the SDK refuses it
    // (the entry is still in the outbox, failed)...
    await assert.rejects(eve.send(target, { text: "hi" }, { clientMsgId: "retry-1" }), (e: CourierError) => e.code === "bad_request");
    // ...and discarding the failed entry rejects no promise that nobody holds.
    await eve.discard("retry-1");
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(unhandled.map(String), []);
  } finally {
    process.off("unhandledRejection", record);
  }
});

test("a message over the frame limit is refused as too_large before it enters the outbox, and the next one goes", async () => {
  const alice = await synced(server, "alice4", "web");
  const bob = await synced(server, "bob4", "web");
  const conv = (await alice.sendText({ toUser: "bob4" }, "hello")).conversation_id;
  const states: string[] = [];
  alice.on("state", (s) => states.push(s));
  // 65 536 bytes of UTF-8 in 21 846 characters: the limit counts bytes, not characters.
  const big = alice.sendText({ conversationId: conv }, "€".repeat(21_846));
  big.catch(() => {});
  const next = alice.sendText({ conversationId: conv }, "after the big one");
  next.catch(() => {});
  const outcome = await Promise.race([
    big.then(() => "stored", (e: CourierError) => `refused: ${e.code}`),
    new Promise<string>((r) => setTimeout(() => r("still pending after 5 s"), 5000)),
  ]);
  assert.equal(outcome, "refused: too_large");
  await until("bob has the next message", () => texts(bob, conv).includes("after the big one"));
  assert.deepEqual(states, [], "the connection stayed up");
  assert.deepEqual(alice.outboxEntries(), [], "the big one never entered the outbox");
  // Just under the limit is sent.
  const fits = await alice.sendText({ conversationId: conv }, "x".repeat(65_536 - 200));
  assert.ok(fits.seq > 0);
});

test("a message the server closes the connection over (1009) is marked failed as too_large, not sent again after each reconnection", async () => {
  const strict = await Server.start(["--max-frame-bytes", "2048"]);
  try {
    const alice = await synced(strict, "alice5", "web"); // thinks the limit is 64 KiB
    const bob = await synced(strict, "bob5", "web");
    const conv = (await alice.sendText({ toUser: "bob5" }, "hello")).conversation_id;
    let reconnections = 0;
    alice.on("state", (s) => s === "connecting" && reconnections++);
    const big = alice.sendText({ conversationId: conv }, "x".repeat(4000));
    const next = alice.sendText({ conversationId: conv }, "after the big one");
    await assert.rejects(big, (e: CourierError) => e.code === "too_large");
    await next;
    await until("bob has the next message", () => texts(bob, conv).includes("after the big one"));
    assert.deepEqual(texts(bob, conv), ["hello", "after the big one"]);
    assert.equal(reconnections, 1, "one reconnection, after the close over the big frame");
    const failed = alice.outboxEntries();
    assert.equal(failed.length, 1);
    assert.equal(failed[0]!.failed?.code, "too_large");
  } finally {
    closeClients();
    await strict.dispose();
  }
});

test("a message the server stored is never listed both in the timeline and in the outbox", async () => {
  // Storage whose deletes wait for the test: the moment between the `sent` and the delete.
  const memory = new MemoryOutboxStorage();
  const deletes: (() => void)[] = [];
  const slowDelete: OutboxStorage = {
    load: (scope) => memory.load(scope),
    put: (scope, entry) => memory.put(scope, entry),
    delete: async (scope, id) => {
      await new Promise<void>((go) => deletes.push(go));
      await memory.delete(scope, id);
    },
  };
  const eve = await synced(server, "eve7", "web", { storage: slowDelete });
  const first = eve.sendText({ toUser: "fay7" }, "first");
  await until("the first's delete is under way", () => deletes.length === 1);
  deletes.splice(0).forEach((go) => go());
  const conversationId = (await first).conversation_id;
  const twice: string[] = [];
  eve.on("timeline", (conversationId) => {
    const pending = new Set(eve.pending(conversationId).map((entry) => entry.client_msg_id));
    for (const event of eve.conversation(conversationId)?.timeline.list() ?? []) {
      if (event.client_msg_id && pending.has(event.client_msg_id)) twice.push(event.client_msg_id);
    }
  });
  let stored: Sent | undefined;
  const sending = eve.sendText({ conversationId }, "once").then((sent) => (stored = sent));
  await until("its delete is under way", () => deletes.length === 1);
  assert.deepEqual(texts(eve, conversationId), ["first", "once"], "it is in the timeline");
  assert.deepEqual(eve.pending(conversationId), [], "and no longer in the outbox");
  deletes.splice(0).forEach((go) => go());
  await sending;
  assert.ok(stored);
  assert.deepEqual(twice, []);
});
