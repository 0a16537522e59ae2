/** The ticks of one's own messages: what a reload keeps of the other members' receipts (the
 * server re-sends none). */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { MemoryOutboxStorage } from "../src/index.js";
import { Network, Server, closeClients, synced, texts, until } from "./support.js";

let server: Server;

before(async () => {
  server = await Server.start();
});

after(async () => {
  closeClients();
  await server.dispose();
});

test("after a reload on the same storage, a direct conversation's ticks are the receipts seen before", async () => {
  const storage = new MemoryOutboxStorage();
  const alice = await synced(server, "alice", "web", { storage });
  const bob = await synced(server, "bob", "web");
  const first = await alice.sendText({ toUser: "bob" }, "one");
  const conv = first.conversation_id;
  const second = await alice.sendText({ conversationId: conv }, "two");
  await until("bob has both", () => texts(bob, conv).length === 2);
  bob.markRead(conv);
  await until("alice sees them read", () => alice.statusOf(conv, second.seq) === "read");
  alice.close();
  bob.close(); // bob acknowledges nothing more

  const reloaded = await synced(server, "alice", "web", { storage });
  await reloaded.loadHistory(conv);
  assert.deepEqual(texts(reloaded, conv), ["one", "two"]);
  assert.equal(reloaded.conversation(conv)?.receiptOf("bob")?.read_seq, second.seq);
  assert.equal(reloaded.statusOf(conv, first.seq), "read");
  assert.equal(reloaded.statusOf(conv, second.seq), "read");
});

test("a reconnection keeps the receipts seen before it", async () => {
  const network = new Network();
  const alice = await synced(server, "alice5", "web", { network });
  const bob = await synced(server, "bob5", "web");
  const sent = await alice.sendText({ toUser: "bob5" }, "hi");
  await until("bob has it", () => texts(bob, sent.conversation_id).length === 1);
  bob.markRead(sent.conversation_id);
  await until("alice sees it read", () => alice.statusOf(sent.conversation_id, sent.seq) === "read");
  network.cut();
  await until("alice is offline", () => alice.state !== "online");
  network.restore();
  await until("alice is online again", () => alice.state === "online");
  await alice.whenSynced();
  assert.equal(alice.statusOf(sent.conversation_id, sent.seq), "read");
});

test("after a reload on the same storage, a group's ticks are the receipts seen before", async () => {
  const storage = new MemoryOutboxStorage();
  const alice = await synced(server, "alice2", "web", { storage });
  const bob = await synced(server, "bob2", "web");
  const carol = await synced(server, "carol2", "web");
  const group = await alice.createGroup("trip", ["bob2", "carol2"]);
  const read = await alice.sendText({ conversationId: group }, "read by both");
  await until("bob and carol have it", () => texts(bob, group).length === 1 && texts(carol, group).length === 1);
  bob.markRead(group);
  carol.markRead(group);
  await until("alice sees it read", () => alice.statusOf(group, read.seq) === "read");
  const delivered = await alice.sendText({ conversationId: group }, "delivered to both");
  await until("alice sees it delivered", () => alice.statusOf(group, delivered.seq) === "delivered");
  alice.close();
  bob.close();
  carol.close();

  const reloaded = await synced(server, "alice2", "web", { storage });
  while (await reloaded.loadHistory(group));
  assert.equal(reloaded.conversation(group)?.membersComplete, true);
  assert.equal(reloaded.statusOf(group, read.seq), "read");
  assert.equal(reloaded.statusOf(group, delivered.seq), "delivered");
});
