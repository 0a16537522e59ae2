/** The server's stream is not what the client holds: a server restored from a backup, whose
 * history goes another way from a seq the client holds, and an event broken on its way. */
import assert from "node:assert/strict";
import { after, test } from "node:test";
import type { CourierError } from "../src/index.js";
import { Network, Server, closeClients, synced, texts, until } from "./support.js";

const servers: Server[] = [];

async function serve(): Promise<Server> {
  const server = await Server.start();
  servers.push(server);
  return server;
}

after(async () => {
  closeClients();
  for (const server of servers) await server.dispose();
});

test("after a restore, an event at a seq the client holds with another server_msg_id replaces its copy from there, and the app is told", async () => {
  const server = await serve();
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web");
  const conv = (await alice.sendText({ toUser: "bob" }, "one")).conversation_id;
  await alice.sendText({ conversationId: conv }, "two");
  const archive = server.backup();
  for (const text of ["lost 3", "lost 4"]) await alice.sendText({ conversationId: conv }, text);
  await until("bob has all four", () => texts(bob, conv).length === 4);
  bob.markRead(conv);
  await until("alice sees the lost messages read", () => alice.statusOf(conv, 4) === "read");
  const diverged: { client: string; conversation_id: string; seq: number }[] = [];
  for (const [name, c] of [["alice", alice], ["bob", bob]] as const) {
    c.on("diverged", ({ conversation_id, seq }) => diverged.push({ client: name, conversation_id, seq }));
  }

  await server.restore(archive);
  await alice.whenSynced();
  await bob.whenSynced();
  // The restored server gives seq 3 to a new message: both devices hold another one there.
  await alice.sendText({ conversationId: conv }, "after the restore");
  await until("bob shows the server's history", () => texts(bob, conv).join() === "one,two,after the restore");
  await until("alice shows the server's history", () => texts(alice, conv).join() === "one,two,after the restore");
  // Bob's device acknowledges the new message (its acks of the lost ones were past the head).
  const cursor = async () => (await bob.http.conversations()).find((c) => c.conversation_id === conv)?.delivered_seq;
  await until("bob's device acknowledged the new message", async () => (await cursor()) === 3);
  // Bob's reading of the lost messages was lost with them: the new one is delivered, not read.
  await until("alice's new message shows delivered", () => alice.statusOf(conv, 3) === "delivered");
  assert.deepEqual(
    diverged.sort((a, b) => a.client.localeCompare(b.client)),
    [
      { client: "alice", conversation_id: conv, seq: 3 },
      { client: "bob", conversation_id: conv, seq: 3 },
    ],
  );
});

for (const [what, broken] of [
  ["without its sender", { sender: undefined }],
  ["without a conversation id it can be told by", { conversation_id: 7 }],
] as const) {
  test(`an event that comes broken (${what}) in the middle of the stream is fetched: the events after it wait for it, in order, on the same connection`, async () => {
    const server = await serve();
    const network = new Network();
    const alice = await synced(server, "alice", "web");
    const bob = await synced(server, "bob", "web", { network });
    const conv = (await alice.sendText({ toUser: "bob" }, "one")).conversation_id;
    await until("bob has the first message", () => texts(bob, conv).length === 1);
    const told: number[] = [];
    bob.on("event", (event) => told.push(event.seq));
    const errors: CourierError[] = [];
    bob.on("error", (error) => errors.push(error));
    const states: string[] = [];
    bob.on("state", (state) => states.push(state));
    // Seq 2 reaches bob broken on its way; seq 3 comes whole.
    network.mangle = (frame) => (frame.type === "event" && frame.seq === 2 ? { ...frame, ...broken } : frame);
    for (const text of ["two", "three"]) await alice.sendText({ conversationId: conv }, text);
    await until("bob has every message", () => texts(bob, conv).length === 3);
    network.mangle = undefined;
    assert.deepEqual(texts(bob, conv), ["one", "two", "three"]);
    assert.deepEqual(told, [2, 3]);
    assert.ok(errors.length > 0 && errors.every((e) => /breaks the protocol/.test(e.message)), `errors: ${errors}`);
    assert.deepEqual(states, [], "the connection stayed up");
  });
}
