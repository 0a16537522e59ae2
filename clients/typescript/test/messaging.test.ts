/** Two users chatting through the SDK against a real server: order, ticks, retries with
 * the same id, delete for everyone, typing, and the errors a caller gets. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { CourierError, type CourierClient } from "../src/index.js";
import { Network, Server, client, closeClients, synced, texts, until } from "./support.js";

let server: Server;

before(async () => {
  server = await Server.start();
});

after(async () => {
  closeClients();
  await server.dispose();
});

function user(name: string, device = "web"): Promise<CourierClient> {
  return synced(server, name, device);
}

test("messages arrive in order and the ticks go from sent to delivered to read", async () => {
  const alice = await user("alice");
  const bob = await user("bob");
  const first = await alice.sendText({ toUser: "bob" }, "hello bob");
  assert.equal(first.seq, 1);
  assert.equal(first.duplicate, false);
  const conv = first.conversation_id;
  for (const text of ["two", "three"]) await alice.sendText({ conversationId: conv }, text);

  await until("bob has the three messages", () => texts(bob, conv).length === 3);
  assert.deepEqual(texts(bob, conv), ["hello bob", "two", "three"]);
  assert.deepEqual(texts(alice, conv), ["hello bob", "two", "three"], "the sender's timeline has its own messages");

  // Bob's client acknowledges delivery by itself; reading is the app's call.
  await until("alice sees her message delivered", () => alice.statusOf(conv, 3) === "delivered");
  bob.markRead(conv);
  await until("alice sees her messages read", () => alice.statusOf(conv, 3) === "read");
  assert.equal(alice.statusOf(conv, 1), "read");
  assert.equal(alice.conversation(conv)?.receiptOf("bob")?.read_seq, 3);
});

test("a retry with the same client_msg_id is the same message, stored once", async () => {
  const carol = await user("carol");
  const dave = await user("dave");
  const first = await carol.send({ toUser: "dave" }, { text: "only once" }, { clientMsgId: "carol-1" });
  const again = await carol.send({ toUser: "dave" }, { text: "only once" }, { clientMsgId: "carol-1" });
  assert.equal(again.seq, first.seq);
  assert.equal(again.server_msg_id, first.server_msg_id);
  assert.equal(again.duplicate, true);
  await carol.sendText({ conversationId: first.conversation_id }, "next");
  await until("dave has both messages", () => texts(dave, first.conversation_id).length === 2);
  assert.deepEqual(texts(dave, first.conversation_id), ["only once", "next"]);
});

test("delete for everyone blanks the message on both sides", async () => {
  const erin = await user("erin");
  const frank = await user("frank");
  const sent = await erin.sendText({ toUser: "frank" }, "oops");
  const conv = sent.conversation_id;
  await until("frank has the message", () => texts(frank, conv).includes("oops"));
  await erin.delete(conv, sent.seq);
  await until("the message is gone for frank", () => texts(frank, conv)[0] === "(deleted)");
  assert.deepEqual(texts(erin, conv), ["(deleted)"]);
  await assert.rejects(frank.delete(conv, sent.seq), (e: CourierError) => e.code === "forbidden" || e.code === "bad_request");
});

test("typing notices reach the other member and expire when stopped", async () => {
  const gina = await user("gina");
  const hal = await user("hal");
  const conv = (await gina.sendText({ toUser: "hal" }, "hi")).conversation_id;
  await until("hal has the conversation", () => texts(hal, conv).length === 1);
  gina.typing(conv, true);
  await until("hal sees gina typing", () => hal.conversation(conv)!.typing(Date.now()).includes("gina"));
  gina.typing(conv, false);
  await until("hal sees gina stop", () => hal.conversation(conv)!.typing(Date.now()).length === 0);
});

test("bad input is refused before sending, and a refused send stays failed in the outbox", async () => {
  const ivan = await user("ivan");
  await assert.rejects(ivan.sendText({ conversationId: "no spaces/allowed" }, "x"), /not a conversation id/);
  await assert.rejects(ivan.sendText({ toUser: "bob" }, ""), /needs text/);
  await assert.rejects(ivan.send({ toUser: "bob" }, { text: "x" }, { clientMsgId: "x".repeat(65) }), /1 to 64/);

  const refused = ivan.sendText({ conversationId: "d:not-a-conversation-of-ivan" }, "hello?");
  await assert.rejects(refused, (e: CourierError) => e.code === "not_found" || e.code === "forbidden");
  const [entry] = ivan.outboxEntries();
  assert.ok(entry?.failed, "the entry is kept, marked failed");
  await ivan.discard(entry.client_msg_id);
  assert.deepEqual(ivan.outboxEntries(), []);
});

test("a send the protocol would refuse is refused before it enters the outbox, and ids count characters as the protocol does", async () => {
  const kim = await user("kim");
  const conv = (await kim.sendText({ toUser: "bob" }, "first")).conversation_id;
  const target = { conversationId: conv };
  const media = { media_id: "m1", mime: "image/png", size: 3, sha256: "ab" };
  const refusals: [string, Promise<unknown>][] = [
    ["reply_to 0", kim.send(target, { text: "x" }, { replyTo: 0 })],
    ["reply_to 1.5", kim.send(target, { text: "x" }, { replyTo: 1.5 })],
    ["reply_to as a string", kim.send(target, { text: "x" }, { replyTo: "1" as unknown as number })],
    ["both text and media", kim.send(target, { text: "x", media } as never)],
    ["media without a mime", kim.send(target, { media: { ...media, mime: undefined } } as never)],
    ["media of size -1", kim.send(target, { media: { ...media, size: -1 } })],
    ["media without sha256", kim.send(target, { media: { ...media, sha256: undefined } } as never)],
    ["media named by a number", kim.send(target, { media: { ...media, name: 7 } } as never)],
  ];
  for (const [what, refused] of refusals) {
    await assert.rejects(refused, (e: CourierError) => e.code === "bad_request", what);
  }
  assert.deepEqual(kim.outboxEntries(), [], "nothing refused entered the outbox");

  // 64 characters of the protocol (Unicode scalar values), 128 UTF-16 code units.
  const emoji = "\u{1F600}".repeat(64);
  const sent = await kim.send(target, { text: "smile" }, { clientMsgId: emoji });
  assert.equal(sent.client_msg_id, emoji);
  await assert.rejects(kim.send(target, { text: "x" }, { clientMsgId: `${emoji}a` }), /1 to 64/);
});

test("events a device has had in its catch-up are not delivered to it again", async () => {
  const jo = await user("jo");
  let conv = "";
  for (const text of ["one", "two", "three"]) conv = (await jo.sendText({ toUser: "kim" }, text)).conversation_id;
  const first = await user("kim", "phone");
  assert.deepEqual(texts(first, conv), ["one", "two", "three"], "the catch-up brought them");
  first.close();
  const again = await user("kim", "phone");
  assert.deepEqual(texts(again, conv), [], "the next catch-up starts after what the device acknowledged");
  await jo.sendText({ conversationId: conv }, "four");
  await until("the live message arrives", () => texts(again, conv).length === 1);
  assert.deepEqual(texts(again, conv), ["four"]);
});

test("a history page size or a byte range that is no whole count is refused as bad input", async () => {
  const nia = await user("nia");
  const conv = (await nia.sendText({ toUser: "max" }, "n1")).conversation_id;
  for (const limit of [0, -1, 1.5, Number.NaN]) {
    await assert.rejects(nia.loadHistory(conv, limit), (e: CourierError) => e.code === "bad_request", `limit ${limit}`);
  }
  for (const range of [{ start: 1.5 }, { start: 0, end: 2.5 }, { start: -1 }]) {
    const what = JSON.stringify(range);
    await assert.rejects(nia.downloadMedia("m1", range), (e: CourierError) => e.code === "bad_request", what);
  }
});

test("history loads page by page back to the start, and then says there is no more", async () => {
  const lee = await user("lee");
  let conv = "";
  for (const text of ["h1", "h2", "h3", "h4", "h5"]) conv = (await lee.sendText({ toUser: "max" }, text)).conversation_id;
  (await user("max", "phone")).close(); // has them all: the next catch-up brings none
  const max = await user("max", "phone");
  assert.deepEqual(texts(max, conv), []);
  assert.equal(await max.loadHistory(conv, 2), true);
  assert.deepEqual(texts(max, conv), ["h4", "h5"]);
  assert.equal(max.conversation(conv)!.timeline.mayHaveOlder, true);
  await max.loadHistory(conv, 2);
  assert.deepEqual(texts(max, conv), ["h2", "h3", "h4", "h5"]);
  await max.loadHistory(conv, 2);
  assert.deepEqual(texts(max, conv), ["h1", "h2", "h3", "h4", "h5"]);
  assert.equal(max.conversation(conv)!.timeline.mayHaveOlder, false);
  assert.equal(await max.loadHistory(conv, 2), false);
});

test("after a reload, opening a conversation with more than a page of history marks it read through its latest message", async () => {
  const alice = await synced(server, "alice1", "web");
  const bob = await synced(server, "bob1", "web");
  const conv = (await alice.sendText({ toUser: "bob1" }, "m1")).conversation_id;
  for (let i = 2; i <= 60; i++) await alice.sendText({ conversationId: conv }, `m${i}`);
  await until("bob has everything, delivered", () => alice.statusOf(conv, 60) === "delivered");
  bob.close();
  // The page reloads (same device, nothing to catch up) and the person opens the
  // conversation, as the web app does: its latest page, not its start.
  const reloaded = await synced(server, "bob1", "web");
  await reloaded.loadHistory(conv);
  assert.equal(texts(reloaded, conv).at(-1), "m60");
  assert.equal(reloaded.conversation(conv)?.timeline.lowestSeq, 11);
  reloaded.markRead(conv);
  await until("alice sees her messages read", () => alice.statusOf(conv, 60) === "read");
});

test("a listener that throws (here on a deleted message, which has no body) neither stops the client nor the other listeners", async () => {
  const ada = await user("ada");
  const oops = await ada.sendText({ toUser: "lin" }, "oops");
  const conv = oops.conversation_id;
  await ada.delete(conv, oops.seq);
  await ada.sendText({ conversationId: conv }, "hello");

  const lin = await client(server, "lin", "web");
  const texts_: string[] = [];
  const kinds: string[] = [];
  const errors: CourierError[] = [];
  // An app's oversight: every message taken to have a body.
  lin.on("event", (event) => {
    if (event.kind === "message") texts_.push((event.body as { text: string }).text);
  });
  lin.on("event", (event) => kinds.push(event.kind));
  lin.on("error", (error) => errors.push(error));
  await lin.whenSynced();
  await until("lin has every event", () => kinds.length === 3);
  assert.deepEqual(kinds, ["message", "delete", "message"]);
  assert.deepEqual(texts_, ["hello"]);
  assert.ok(errors.some((e) => /"event" listener threw/.test(e.message)), `errors: ${errors}`);
  const cursors = async () => (await lin.http.conversations()).find((c) => c.conversation_id === conv);
  await until("lin's device acknowledged everything", async () => (await cursors())?.delivered_seq === 3);
});

test("a frame whose fields break the protocol is passed over and told as an error, and the client goes on", async () => {
  const trent = await user("trent");
  const network = new Network();
  const uma = await synced(server, "uma", "web", { network });
  const conv = (await trent.sendText({ toUser: "uma" }, "hello")).conversation_id;
  await until("uma has it", () => texts(uma, conv).length === 1);
  const errors: CourierError[] = [];
  uma.on("error", (error) => errors.push(error));
  const event = {
    type: "event",
    conversation_id: conv,
    server_msg_id: "forged",
    sender: { user: "trent", device: "web" },
    ts_ms: 1,
    kind: "message",
    client_msg_id: "forged",
  };
  // Frames a hostile (or broken) server sends, read as the answer to uma's typing notices.
  const broken = [
    { ...event, seq: "2", body: { text: "a seq that is text" } },
    { ...event, seq: 2, sender: undefined, body: { text: "no sender" } },
    { ...event, seq: 2, body: { media: null } },
    { type: "receipt", conversation_id: conv, user: "trent", delivered_seq: "all", read_seq: 1 },
    { type: "typing", conversation_id: { id: conv }, user: "trent", active: true },
  ];
  const injected = [...broken];
  network.answer = (frame) => (frame.type === "typing" ? injected.shift() : undefined);
  for (let i = 0; i < broken.length; i++) {
    uma.typing(conv, true);
    await until(`broken frame ${i} was told`, () => errors.length > i);
  }
  network.answer = undefined;
  assert.ok(
    errors.every((e) => e.code === "internal" && /breaks the protocol/.test(e.message)),
    `errors: ${errors.map((e) => e.message)}`,
  );
  await trent.sendText({ conversationId: conv }, "after");
  await until("uma has the next message", () => texts(uma, conv).length === 2);
  assert.deepEqual(texts(uma, conv), ["hello", "after"]);
  assert.deepEqual(
    uma.conversations().map((c) => c.id),
    [conv],
    "no conversation made up of a frame's fields",
  );
});

test("a reply to a send that names another message settles neither: each is stored once, as written", async () => {
  const vic = await user("vic");
  const network = new Network();
  const walt = await synced(server, "walt", "web", { network });
  const conv = (await walt.sendText({ toUser: "vic" }, "hello")).conversation_id;
  const errors: CourierError[] = [];
  walt.on("error", (error) => errors.push(error));
  // A forged (or cross-wired) `sent` for the first send, naming the second message, and then
  // one that matches no request at all, naming the second again.
  const forged = { type: "sent", conversation_id: conv, seq: 99, server_msg_id: "forged", ts_ms: 1, duplicate: false };
  network.answer = (frame) => {
    if (frame.type !== "send") return undefined;
    network.answer = undefined;
    return { ...forged, ref: frame.ref, client_msg_id: "walt-second" };
  };
  const first = walt.send({ conversationId: conv }, { text: "first" }, { clientMsgId: "walt-first" });
  const second = walt.send({ conversationId: conv }, { text: "second" }, { clientMsgId: "walt-second" });
  const firstRefused = await first.then(
    () => assert.fail("the first send was settled by a reply naming another message"),
    (error: CourierError) => error,
  );
  assert.equal(firstRefused.code, "internal");
  assert.match(firstRefused.message, /breaks the protocol \(its client_msg_id/);
  const failed = () => walt.pending(conv).find((e) => e.client_msg_id === "walt-first")?.failed?.code;
  assert.equal(failed(), "internal", "the first stays in the outbox, failed, for a retry");
  // A `sent` that answers no request (no ref) is passed over: it settles no entry either.
  const told = errors.length;
  const unasked = [{ ...forged, client_msg_id: "walt-first" }, { type: "typing", conversation_id: conv }];
  network.answer = (frame) => (frame.type === "typing" ? unasked.shift() : undefined);
  walt.typing(conv, true);
  walt.typing(conv, true);
  await until("the broken typing notice after it was told", () => errors.length > told);
  network.answer = undefined;
  assert.equal(failed(), "internal", "the unasked sent settled the first");
  const stored = await second;
  assert.notEqual(stored.server_msg_id, "forged", "the second was stored by the server, not by the forged reply");
  await walt.retry("walt-first");
  await until("vic has every message", () => texts(vic, conv).length === 3);
  assert.deepEqual(texts(vic, conv), ["hello", "second", "first"]);
  assert.deepEqual(texts(walt, conv), ["hello", "second", "first"]);
  assert.equal(walt.pending(conv).length, 0);
});

test("typing notices and receipts of a conversation the client does not know add no conversation", async () => {
  const xena = await user("xena");
  const network = new Network();
  const yuri = await synced(server, "yuri", "web", { network });
  const conv = (await xena.sendText({ toUser: "yuri" }, "hello")).conversation_id;
  await until("yuri has it", () => texts(yuri, conv).length === 1);
  // The list's reload that the new conversation started is over before the count begins.
  await yuri.refreshConversations();
  const errors: CourierError[] = [];
  yuri.on("error", (error) => errors.push(error));
  let listChanges = 0;
  yuri.on("conversations", () => listChanges++);
  const typingIn: string[] = [];
  yuri.on("typing", (id) => typingIn.push(id));
  // What a server relays of a conversation yuri holds nothing of, read as the answers to his
  // typing notices; a broken frame last, whose error says the others were read.
  const unknown = "no-such-conversation";
  const frames = [
    { type: "typing", conversation_id: unknown, user: "xena", active: true },
    { type: "receipt", conversation_id: unknown, user: "xena", delivered_seq: 5, read_seq: 5 },
    { type: "typing", conversation_id: conv, user: "xena", active: true },
    { type: "typing", conversation_id: conv },
  ];
  network.answer = (frame) => (frame.type === "typing" ? frames.shift() : undefined);
  for (let i = 0; i < 4; i++) yuri.typing(conv, true);
  await until("the frames were read", () => errors.length > 0);
  network.answer = undefined;
  assert.deepEqual(
    yuri.conversations().map((c) => c.id),
    [conv],
    "no conversation made up of a typing notice or a receipt",
  );
  assert.equal(listChanges, 0, "the list of conversations did not change");
  assert.deepEqual(typingIn, [conv], "only the known conversation's typing is told");
  assert.deepEqual(yuri.conversation(conv)?.typing(Date.now()), ["xena"]);
});

test("a trimmed frame of a conversation the user does not have adds no conversation", async () => {
  const zoe = await user("zoe");
  const network = new Network();
  const abe = await synced(server, "abe", "web", { network });
  const conv = (await zoe.sendText({ toUser: "abe" }, "hello")).conversation_id;
  await until("abe has it", () => texts(abe, conv).length === 1);
  const errors: CourierError[] = [];
  abe.on("error", (error) => errors.push(error));
  // A retention floor of a conversation abe is no member of, read as the answer to his typing
  // notice; a broken frame after it, whose error says it was read.
  const frames = [
    { type: "trimmed", conversation_id: "no-such-conversation", floor_seq: 5 },
    { type: "typing", conversation_id: conv },
  ];
  network.answer = (frame) => (frame.type === "typing" ? frames.shift() : undefined);
  for (let i = 0; i < 2; i++) abe.typing(conv, true);
  await until("the frames were read", () => errors.length > 0);
  network.answer = undefined;
  await abe.refreshConversations();
  assert.deepEqual(
    abe.conversations().map((c) => c.id),
    [conv],
    "no conversation made up of a trimmed frame",
  );
});
