/** The ticks of one's own messages: what a reload keeps of the other members' receipts (the
 * server re-sends none), and a group message counting only the members it was sequenced
 * among. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  Conversation,
  MAX_RECEIPT_USERS,
  MAX_TYPING_USERS,
  MemoryOutboxStorage,
  TYPING_EXPIRES_MS,
  type ConversationEvent,
} from "../src/index.js";
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

test("receipts that moved while no client of the device was connected are read back", async () => {
  const alice = await synced(server, "alice6", "web");
  const bob = await synced(server, "bob6", "web");
  const sent = await alice.sendText({ toUser: "bob6" }, "hi");
  const conv = sent.conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);
  alice.close();
  bob.markRead(conv);
  await until("bob's read is stored", async () => (await bob.http.receipts(conv)).some((r) => r.read_seq === sent.seq));

  // A new client on a new storage: no receipt saved, none sent on the catch-up.
  const reloaded = await synced(server, "alice6", "web");
  await reloaded.loadHistory(conv);
  await until("alice sees it read", () => reloaded.statusOf(conv, sent.seq) === "read");

  // A reconnection: bob reads the next one while alice's client is cut off.
  const network = new Network();
  const online = await synced(server, "alice6", "phone", { network });
  const next = await online.sendText({ conversationId: conv }, "again");
  await until("bob has the next one", () => texts(bob, conv).length === 2);
  network.cut();
  await until("alice's phone is offline", () => online.state !== "online");
  bob.markRead(conv);
  await until("bob's read is stored", async () => (await bob.http.receipts(conv)).some((r) => r.read_seq === next.seq));
  network.restore();
  await until("alice's phone sees it read", () => online.statusOf(conv, next.seq) === "read");
});

test("a group this user was removed from while away keeps no other conversation's receipts from being read back", async () => {
  const network = new Network();
  const alice = await synced(server, "alice7", "web", { network });
  const bob = await synced(server, "bob7", "web");
  const group = await bob.createGroup("g", ["alice7"]);
  await until("alice has the group", () => alice.conversation(group) !== undefined);
  await alice.sendText({ conversationId: group }, "to the group");
  const sent = await alice.sendText({ toUser: "bob7" }, "hi");
  const conv = sent.conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);
  network.cut();
  await until("alice is offline", () => alice.state !== "online");
  // While away, alice is removed from the group (her message there is not read: it awaits
  // receipts, and she may no longer read them back) and bob reads her direct message.
  await bob.http.removeMember(group, "alice7");
  bob.markRead(conv);
  await until("bob's read is stored", async () => (await bob.http.receipts(conv)).some((r) => r.read_seq === sent.seq));
  const errors: unknown[] = [];
  alice.on("error", (error) => errors.push(error));
  network.restore();
  await until("alice sees it read", () => alice.statusOf(conv, sent.seq) === "read");
  assert.deepEqual(errors, [], "a former member asks for no receipts");
});

test("a reconnection while receipts are read back starts no second read-back beside it", async () => {
  // While `held` is set, each receipts request waits for the test to let it go.
  let held: (() => void)[] | undefined = [];
  let inFlight = 0;
  let most = 0;
  const counted: typeof fetch = async (input, init) => {
    if (!String(input).endsWith("/receipts")) return fetch(input, init);
    most = Math.max(most, ++inFlight);
    try {
      if (held) await new Promise<void>((go) => held!.push(go));
      return await fetch(input, init);
    } finally {
      inFlight--;
    }
  };
  const network = new Network();
  const alice = await synced(server, "alice8", "web", { network, fetch: counted });
  const bob = await synced(server, "bob8", "web");
  const carol = await synced(server, "carol8", "web");
  const toBob = await alice.sendText({ toUser: "bob8" }, "hi bob");
  const toCarol = await alice.sendText({ toUser: "carol8" }, "hi carol");
  await until(
    "both have theirs",
    () => texts(bob, toBob.conversation_id).length === 1 && texts(carol, toCarol.conversation_id).length === 1,
  );
  const reconnected = async (away: () => Promise<void>) => {
    network.cut();
    await until("alice is offline", () => alice.state !== "online");
    await away();
    network.restore();
    await until("alice is online again", () => alice.state === "online");
    await alice.whenSynced();
  };
  await reconnected(async () => {});
  await until("a read-back waits", () => held!.length === 1);
  await reconnected(async () => {
    bob.markRead(toBob.conversation_id);
    carol.markRead(toCarol.conversation_id);
    for (const [reader, sent] of [
      [bob, toBob],
      [carol, toCarol],
    ] as const) {
      await until("the read is stored", async () =>
        (await reader.http.receipts(sent.conversation_id)).some((r) => r.read_seq === sent.seq),
      );
    }
  });
  // An HTTP request made after the catch-up: a read-back it started has asked by now.
  await alice.http.conversations();
  const waiting = held!;
  held = undefined;
  waiting.forEach((go) => go());
  await until("alice sees both read", () =>
    [toBob, toCarol].every((sent) => alice.statusOf(sent.conversation_id, sent.seq) === "read"),
  );
  assert.equal(most, 1, "one receipts request at a time");
});

test("a read-back of receipts the server answers rate_limited is asked again after its wait, and no error is told", async () => {
  // The first two receipts requests are refused as a server past its rate refuses them.
  let refusals = 2;
  let asked = 0;
  const limited: typeof fetch = async (input, init) => {
    if (!String(input).endsWith("/receipts")) return fetch(input, init);
    asked++;
    if (refusals-- <= 0) return fetch(input, init);
    const body = { code: "rate_limited", message: "too many requests", retry_after_ms: 50 };
    return new Response(JSON.stringify(body), { status: 429, headers: { "content-type": "application/json" } });
  };
  const alice = await synced(server, "alice10", "web");
  const bob = await synced(server, "bob10", "web");
  const sent = await alice.sendText({ toUser: "bob10" }, "hi");
  const conv = sent.conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);
  alice.close();
  bob.markRead(conv);
  await until("bob's read is stored", async () => (await bob.http.receipts(conv)).some((r) => r.read_seq === sent.seq));

  // A new client: it holds alice's message once it loads the latest page, and reads back.
  const reloaded = await synced(server, "alice10", "web", { fetch: limited });
  const errors: unknown[] = [];
  reloaded.on("error", (error) => errors.push(error));
  await reloaded.loadHistory(conv);
  await until("alice sees it read", () => reloaded.statusOf(conv, sent.seq) === "read");
  assert.ok(asked >= 3, `asked ${asked} times`);
  assert.deepEqual(errors, [], "a refusal to wait out is no error");
});

test("a receipts request the server never answers is given up after replyTimeoutMs and asked again", async () => {
  let asked = 0;
  // The first receipts request hangs, as behind a proxy whose backend stopped answering.
  const hangsOnce: typeof fetch = (input, init) => {
    if (!String(input).endsWith("/receipts") || ++asked > 1) return fetch(input, init);
    return new Promise<Response>((_, fail) => {
      init?.signal?.addEventListener("abort", () => fail(new DOMException("timed out", "TimeoutError")));
    });
  };
  const alice = await synced(server, "alice11", "web");
  const bob = await synced(server, "bob11", "web");
  const sent = await alice.sendText({ toUser: "bob11" }, "hi");
  const conv = sent.conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);
  alice.close();
  bob.markRead(conv);
  await until("bob's read is stored", async () => (await bob.http.receipts(conv)).some((r) => r.read_seq === sent.seq));

  const reloaded = await synced(server, "alice11", "web", { fetch: hangsOnce, replyTimeoutMs: 500 });
  const errors: unknown[] = [];
  reloaded.on("error", (error) => errors.push(error));
  await reloaded.loadHistory(conv);
  await until("alice sees it read", () => reloaded.statusOf(conv, sent.seq) === "read");
  assert.ok(asked >= 2, `asked ${asked} times`);
  assert.deepEqual(errors, []);
});

test("a group whose receipts the server does not list is asked once, not at every reconnection", async () => {
  const small = await Server.start(["--receipt-coalesce-above", "2"]);
  try {
    let asked = 0;
    const counted: typeof fetch = (input, init) => {
      if (String(input).endsWith("/receipts")) asked++;
      return fetch(input, init);
    };
    const network = new Network();
    const alice = await synced(small, "alice9", "web", { network, fetch: counted });
    const group = await alice.createGroup("three", ["bob9", "carol9"]);
    const sent = await alice.sendText({ conversationId: group }, "hi");
    await until("alice holds the group from its creation", () => alice.conversation(group)?.membersComplete === true);
    assert.equal(alice.statusOf(group, sent.seq), "sent");
    for (let round = 1; round <= 3; round++) {
      network.cut();
      await until("alice is offline", () => alice.state !== "online");
      network.restore();
      await until("alice is online again", () => alice.state === "online");
      await alice.whenSynced();
      // An HTTP request made after the catch-up: a read-back it started has asked by now.
      await alice.http.conversations();
      await until("the read-back is over", () => asked >= 1);
    }
    assert.equal(asked, 1, "asked once, answered too_large, never again");
  } finally {
    await small.dispose();
  }
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

test("the saved receipts of a group this user left are deleted once the list of conversations drops it", async () => {
  const storage = new MemoryOutboxStorage();
  const alice = await synced(server, "alice9", "web", { storage });
  const bob = await synced(server, "bob9", "web");
  const group = await bob.createGroup("left", ["alice9"]);
  await until("alice has the group", () => alice.conversation(group) !== undefined);
  const inGroup = await alice.sendText({ conversationId: group }, "to the group");
  const direct = await alice.sendText({ toUser: "bob9" }, "hi");
  await until("bob has both", () => texts(bob, group).length === 1 && texts(bob, direct.conversation_id).length === 1);
  bob.markRead(group);
  bob.markRead(direct.conversation_id);
  await until("alice sees both read", () =>
    alice.statusOf(group, inGroup.seq) === "read" && alice.statusOf(direct.conversation_id, direct.seq) === "read",
  );
  const stored = async () => new Set((await storage.loadReceipts("alice9/web")).map((r) => r.conversation_id));
  await until("both receipts are saved", async () => (await stored()).size === 2);

  await alice.removeMember(group, "alice9");
  await alice.refreshConversations();
  await until("the group's receipts are deleted", async () => !(await stored()).has(group));
  assert.deepEqual([...(await stored())], [direct.conversation_id], "the direct conversation's stay");
});

test("a group message sent before a member was added does not wait for that member", async () => {
  const alice = await synced(server, "alice3", "web");
  const bob = await synced(server, "bob3", "web");
  const group = await alice.createGroup("before", ["bob3"]);
  const early = await alice.sendText({ conversationId: group }, "before carol");
  await until("bob has it", () => texts(bob, group).length === 1);
  bob.markRead(group);
  await until("alice sees it read", () => alice.statusOf(group, early.seq) === "read");

  // carol3 never connects: she acknowledges nothing, ever.
  await alice.addMembers(group, ["carol3"]);
  await until("alice has carol's member_added", () => alice.conversation(group)?.others().includes("carol3") === true);
  assert.equal(alice.statusOf(group, early.seq), "read", "carol3 was not a member when it was sent");

  const late = await alice.sendText({ conversationId: group }, "after carol");
  await until("bob has it", () => texts(bob, group).length === 2);
  bob.markRead(group);
  await until("alice has bob's receipt", () => alice.conversation(group)?.receiptOf("bob3")?.read_seq === late.seq);
  assert.equal(alice.statusOf(group, late.seq), "sent", "carol3 is a member now and has not had it");
});

test("a group message sent before a member was removed still counts that member", async () => {
  const alice = await synced(server, "alice4", "web");
  const bob = await synced(server, "bob4", "web");
  // carol4 never connects: she acknowledges nothing, ever.
  const group = await alice.createGroup("removed", ["bob4", "carol4"]);
  const sent = await alice.sendText({ conversationId: group }, "before carol leaves");
  await until("bob has it", () => texts(bob, group).length === 1);
  bob.markRead(group);
  await until("alice has bob's receipt", () => alice.conversation(group)?.receiptOf("bob4")?.read_seq === sent.seq);
  assert.equal(alice.statusOf(group, sent.seq), "sent", "carol4 has not had it");

  await alice.removeMember(group, "carol4");
  await until("alice has carol's member_removed", () => !alice.conversation(group)?.others().includes("carol4"));
  assert.equal(alice.statusOf(group, sent.seq), "sent", "carol4 was a member when it was sent and never had it");
  const after = await alice.sendText({ conversationId: group }, "after carol left");
  await until("bob has it", () => texts(bob, group).length === 2);
  bob.markRead(group);
  await until("read by bob, the only other member now", () => alice.statusOf(group, after.seq) === "read");
  assert.equal(alice.statusOf(group, sent.seq), "sent");
});

function groupEvent(
  seq: number,
  kind: ConversationEvent["kind"],
  fields: Partial<ConversationEvent> = {},
): ConversationEvent {
  return {
    conversation_id: "g:1",
    seq,
    server_msg_id: `s${seq}`,
    sender: { user: "alice", device: "phone" },
    ts_ms: seq,
    kind,
    ...fields,
  };
}

test("a group message's other members are those between their added and removed events", () => {
  const group = new Conversation("g:1", "alice");
  const events = [
    groupEvent(1, "group_created", { name: "g", members: ["alice", "bob"] }),
    groupEvent(2, "message", { body: { text: "to bob" } }),
    groupEvent(3, "member_added", { users: ["carol", "dan"] }),
    groupEvent(4, "message", { body: { text: "to bob, carol, dan" } }),
    groupEvent(5, "member_removed", { users: ["bob"], user: "bob" }),
    groupEvent(6, "message", { body: { text: "to carol, dan" } }),
    groupEvent(7, "member_added", { users: ["bob"], user: "bob" }),
    groupEvent(8, "message", { body: { text: "to carol, dan, bob" } }),
    groupEvent(9, "member_removed", { users: ["alice"], user: "alice" }),
    groupEvent(12, "member_added", { users: ["alice"], user: "alice" }),
    groupEvent(13, "message", { body: { text: "who is here?" } }),
  ];
  for (const event of events) group.applyEvent(event);
  group.timeline.cover(0, 13);
  assert.equal(group.kind, "group");
  assert.equal(group.othersAt(1), undefined, "group_created is no message");
  assert.deepEqual(group.othersAt(2)?.sort(), ["bob"]);
  assert.deepEqual(group.othersAt(4)?.sort(), ["bob", "carol", "dan"]);
  assert.deepEqual(group.othersAt(6)?.sort(), ["carol", "dan"]);
  assert.deepEqual(group.othersAt(8)?.sort(), ["bob", "carol", "dan"]);
  assert.equal(group.othersAt(13), undefined, "alice was away in between: whoever joined then is unknown");
  assert.equal(group.membersComplete, false);

  group.applyReceipt({ user: "bob", delivered_seq: 4, read_seq: 4 });
  group.applyReceipt({ user: "carol", delivered_seq: 6, read_seq: 0 });
  group.applyReceipt({ user: "dan", delivered_seq: 8, read_seq: 8 });
  assert.equal(group.statusOf(2), "read", "only bob was there");
  assert.equal(group.statusOf(4), "delivered", "carol has not read it");
  assert.equal(group.statusOf(6), "delivered", "bob had left");
  assert.equal(group.statusOf(8), "sent", "bob and carol do not have it");
  assert.equal(group.statusOf(13), "sent");
});

test("a group's members at a seq are unknown above a hole", () => {
  const group = new Conversation("g:2", "alice");
  group.applyEvent(groupEvent(1, "group_created", { name: "g", members: ["alice", "bob"] }));
  group.applyEvent(groupEvent(2, "message", { body: { text: "one" } }));
  group.applyEvent(groupEvent(5, "message", { body: { text: "after a hole" } }));
  group.timeline.cover(0, 2);
  group.timeline.cover(4, 5);
  group.applyReceipt({ user: "bob", delivered_seq: 5, read_seq: 5 });
  assert.equal(group.statusOf(2), "read");
  assert.equal(group.statusOf(5), "sent", "seqs 3 and 4 may have added someone");
  group.timeline.cover(2, 4);
  assert.equal(group.statusOf(5), "read");
});

/** How many users' entries a conversation holds in one of its maps (what it keeps in memory). */
function held(conversation: Conversation, map: "typingUntil" | "receipts"): number {
  return (conversation as unknown as Record<typeof map, Map<string, unknown>>)[map].size;
}

test("who is typing is bounded: expired notices are forgotten, and past the limit the earliest to expire gives way", () => {
  const conversation = new Conversation("g:1", "alice");
  // A long session: each notice expires before the next (no stop ever came).
  for (let i = 0; i < 5_000; i++) conversation.setTyping(`user${i}`, true, i * TYPING_EXPIRES_MS);
  assert.equal(held(conversation, "typingUntil"), 1, "expired notices are forgotten");
  // A burst at one moment: the latest are shown, the limit is held.
  const now = 5_000 * TYPING_EXPIRES_MS;
  for (let i = 0; i < 5_000; i++) conversation.setTyping(`burst${i}`, true, now + i);
  assert.equal(held(conversation, "typingUntil"), MAX_TYPING_USERS);
  const typing = conversation.typing(now + 5_000);
  assert.equal(typing.length, MAX_TYPING_USERS);
  assert.ok(typing.includes("burst4999"), "the latest notice is shown");
});

test("receipts are bounded: a direct conversation keeps its other user's, a group at most MAX_RECEIPT_USERS users'", () => {
  const direct = new Conversation("d:1", "alice");
  direct.applySummary({ conversation_id: "d:1", kind: "direct", name: "bob", head_seq: 1, delivered_seq: 0, read_seq: 0 });
  assert.equal(direct.applyReceipt({ user: "bob", delivered_seq: 1, read_seq: 0 }), true);
  for (let i = 0; i < 1_000; i++) direct.applyReceipt({ user: `stranger${i}`, delivered_seq: 1, read_seq: 1 });
  assert.equal(held(direct, "receipts"), 1, "only bob's receipts are kept");
  assert.equal(direct.receiptOf("stranger0"), undefined);

  const group = new Conversation("g:1", "alice");
  group.applyEvent(groupEvent(1, "group_created", { name: "g", members: ["alice"] }));
  for (let i = 0; i < MAX_RECEIPT_USERS + 10; i++) group.applyReceipt({ user: `member${i}`, delivered_seq: 1, read_seq: 0 });
  assert.equal(held(group, "receipts"), MAX_RECEIPT_USERS);
  assert.equal(group.applyReceipt({ user: "member0", delivered_seq: 1, read_seq: 1 }), true, "a held user's receipts still move");
});
