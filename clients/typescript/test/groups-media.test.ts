/** Groups (create, add, remove, ticks that wait for every member) and media (upload, send,
 * download whole and by `Range`) through the SDK against a real server. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, test } from "node:test";
import { MemoryOutboxStorage, type CourierError } from "../src/index.js";
import { Network, Server, client, closeClients, synced, texts, until } from "./support.js";

let server: Server;

before(async () => {
  server = await Server.start();
});

after(async () => {
  closeClients();
  await server.dispose();
});

test("a group message is read only when every other member has read it", async () => {
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web");
  const carol = await synced(server, "carol", "web");
  const group = await alice.createGroup("trip", ["bob", "carol"]);
  assert.equal(alice.conversation(group)?.kind, "group");
  assert.equal(alice.conversation(group)?.name, "trip");
  assert.deepEqual(alice.conversation(group)?.others().sort(), ["bob", "carol"]);

  const sent = await alice.sendText({ conversationId: group }, "who is in?");
  await until("bob and carol have it", () => texts(bob, group).length === 1 && texts(carol, group).length === 1);
  await until("delivered to both", () => alice.statusOf(group, sent.seq) === "delivered");
  bob.markRead(group);
  await until("alice has bob's read receipt", () => alice.conversation(group)?.receiptOf("bob")?.read_seq === sent.seq);
  assert.equal(alice.statusOf(group, sent.seq), "delivered", "carol has not read it yet");
  carol.markRead(group);
  await until("read by both", () => alice.statusOf(group, sent.seq) === "read");
});

test("members added and removed: the removed one receives nothing after its removal", async () => {
  const admin = await synced(server, "dana", "web");
  const eve = await synced(server, "eve", "web");
  const finn = await synced(server, "finn", "web");
  const group = await admin.createGroup("club", ["eve"]);
  await admin.addMembers(group, ["finn"]);
  await admin.sendText({ conversationId: group }, "welcome finn");
  await until("finn has the welcome", () => texts(finn, group).includes("welcome finn"));
  await admin.removeMember(group, "eve");
  await admin.sendText({ conversationId: group }, "eve is gone");
  await until("finn has the second message", () => texts(finn, group).includes("eve is gone"));
  await eve.loadHistory(group);
  assert.deepEqual(texts(eve, group), ["welcome finn"]);
  await assert.rejects(
    eve.sendText({ conversationId: group }, "let me back"),
    (e: CourierError) => e.code === "forbidden",
  );
  await assert.rejects(eve.addMembers(group, ["eve"]), (e: CourierError) => e.code === "forbidden" && e.status === 403);
});

test("a member removed from a group sends no typing there, and hears of no refusal", async () => {
  const admin = await synced(server, "ken", "web");
  const lea = await synced(server, "lea", "web");
  const errors: string[] = [];
  lea.on("error", (error) => errors.push(error.message));
  const group = await admin.createGroup("book club", ["lea"]);
  await until("lea has the group", () => lea.conversation(group)?.kind === "group");
  assert.equal(lea.conversation(group)!.left, false);
  await admin.removeMember(group, "lea");
  await until("lea was told of her removal", () => lea.conversation(group)!.left);
  lea.typing(group, true);
  // A frame written after the typing notice is answered after any refusal of it.
  await lea.loadHistory(group);
  const direct = (await lea.sendText({ toUser: "ken" }, "why?")).conversation_id;
  lea.typing(direct, true);
  await until("ken's device sees lea typing in their direct conversation", () =>
    (admin.conversation(direct)?.typing(Date.now()) ?? []).includes("lea"),
  );
  assert.deepEqual(errors, []);
});

test("a photo is uploaded, shared, and downloaded whole and by range", async () => {
  const gina = await synced(server, "gina", "web");
  const hal = await synced(server, "hal", "web");
  const photo = new Uint8Array(4096).map((_, i) => (i * 31) % 251);
  const sent = await gina.sendMedia({ toUser: "hal" }, photo, "image/png", { name: "cat.png", caption: "look" });
  const conv = sent.conversation_id;
  await until("hal has the photo message", () => hal.conversation(conv)?.timeline.get(sent.seq) !== undefined);
  const body = hal.conversation(conv)!.timeline.get(sent.seq)!.body!;
  assert.ok("media" in body);
  assert.equal(body.media.mime, "image/png");
  assert.equal(body.media.size, photo.length);
  assert.equal(body.media.name, "cat.png");
  assert.equal(body.media.caption, "look");
  assert.equal(body.media.sha256, createHash("sha256").update(photo).digest("hex"));

  const whole = await hal.downloadMedia(body.media.media_id);
  assert.equal(whole.status, 200);
  assert.deepEqual(whole.bytes, photo);
  const part = await hal.downloadMedia(body.media.media_id, { start: 100, end: 199 });
  assert.equal(part.status, 206);
  assert.equal(part.totalSize, photo.length);
  assert.deepEqual(part.bytes, photo.slice(100, 200));
  const tail = await hal.downloadMedia(body.media.media_id, { start: 4000 });
  assert.deepEqual(tail.bytes, photo.slice(4000));

  const stranger = await synced(server, "ivan", "web");
  await assert.rejects(stranger.downloadMedia(body.media.media_id), (e: CourierError) => e.status === 404);
  await assert.rejects(gina.http.uploadMedia(photo, "not a type"), /not a media type/);
});

/** A network whose HTTP requests fail as the WebSocket's do while it is cut, counting the
 * uploads that reached the server. */
function offlineable() {
  const network = new Network();
  const state = { online: true, uploads: 0 };
  const fetchThrough: typeof fetch = async (input, init) => {
    if (!state.online) throw new TypeError("fetch failed");
    if (String(input).endsWith("/v1/media") && init?.method === "POST") state.uploads++;
    return fetch(input, init);
  };
  const cut = () => {
    state.online = false;
    network.cut();
  };
  const restore = () => {
    state.online = true;
    network.restore();
  };
  return { network, fetch: fetchThrough, state, cut, restore };
}

test("a photo sent offline waits in the outbox with its bytes, then is uploaded and sent once, in the order written", async () => {
  const net = offlineable();
  const jo = await synced(server, "jo", "web", { network: net.network, fetch: net.fetch });
  const kim = await synced(server, "kim", "web");
  const conv = (await jo.sendText({ toUser: "kim" }, "before")).conversation_id;
  net.cut();
  await until("jo is offline", () => jo.state !== "online");

  const photo = new Uint8Array(3000).map((_, i) => (i * 7) % 251);
  const sending = jo.sendMedia({ conversationId: conv }, photo, "image/png", { name: "dog.png", caption: "new" });
  const after = jo.sendText({ conversationId: conv }, "after the photo");
  await until("both wait in the outbox", () => jo.pending(conv).length === 2);
  const waiting = jo.pending(conv)[0]!;
  assert.ok("media" in waiting.body && waiting.body.media.name === "dog.png", "the photo's entry says what it is");
  assert.equal(net.state.uploads, 0);

  net.restore();
  const sent = await sending;
  await after;
  await until("kim has all three", () => texts(kim, conv).length === 3);
  assert.deepEqual(texts(kim, conv), ["before", "(media)", "after the photo"]);
  assert.equal(net.state.uploads, 1, "uploaded once");
  const body = kim.conversation(conv)!.timeline.get(sent.seq)!.body!;
  assert.ok("media" in body);
  assert.equal(body.media.name, "dog.png");
  assert.equal(body.media.caption, "new");
  assert.equal(body.media.sha256, createHash("sha256").update(photo).digest("hex"));
  assert.deepEqual((await kim.downloadMedia(body.media.media_id)).bytes, photo);
  assert.deepEqual(jo.outboxEntries(), []);
});

test("a photo written offline survives a reload and is sent by the next client of the device", async () => {
  const storage = new MemoryOutboxStorage();
  const net = offlineable();
  net.cut();
  const away = await client(server, "lee", "web", { network: net.network, fetch: net.fetch, storage });
  const photo = new Uint8Array(2048).map((_, i) => i % 199);
  const lost = away.sendMedia({ toUser: "max" }, new Blob([photo]), "image/jpeg", { name: "tree.jpg" });
  lost.catch(() => {});
  await until("the photo waits in the outbox", () => away.outboxEntries().length === 1);
  away.close();

  const max = await synced(server, "max", "web");
  const reloaded = await synced(server, "lee", "web", { storage });
  await until("the outbox is empty", () => reloaded.outboxEntries().length === 0);
  const photos = () => max.conversations().flatMap((c) => c.timeline.list());
  await until("max has the photo", () => photos().length === 1);
  const event = photos()[0]!;
  assert.ok(event.body && "media" in event.body);
  assert.equal(event.body.media.name, "tree.jpg");
  assert.deepEqual((await max.downloadMedia(event.body.media.media_id)).bytes, photo);
});

test("the files waiting for their upload are bounded, and an upload over the server's limit leaves its entry failed", async () => {
  const net = offlineable();
  net.cut();
  const away = await client(server, "ned", "web", { network: net.network, fetch: net.fetch, maxQueuedUploadBytes: 1000 });
  const bytes = new Uint8Array(600);
  const first = away.sendMedia({ toUser: "ola" }, bytes, "image/png");
  const second = away.sendMedia({ toUser: "ola" }, bytes, "image/png");
  first.catch(() => {});
  second.catch(() => {});
  await until("two wait", () => away.outboxEntries().length === 2);
  await assert.rejects(away.sendMedia({ toUser: "ola" }, bytes, "image/png"), (e: CourierError) => e.code === "unavailable");
  assert.equal(away.outboxEntries().length, 2, "the refused one is not kept");
  away.close();

  // A server that takes no upload this large: the entry is failed, the next message goes.
  const refusing: typeof fetch = async (input, init) => {
    if (!String(input).endsWith("/v1/media")) return fetch(input, init);
    const body = { code: "too_large", message: "over the upload limit" };
    return new Response(JSON.stringify(body), { status: 413, headers: { "content-type": "application/json" } });
  };
  const pia = await synced(server, "pia", "web", { fetch: refusing });
  await assert.rejects(pia.sendMedia({ toUser: "ola" }, bytes, "image/png"), (e: CourierError) => e.code === "too_large");
  assert.deepEqual(pia.outboxEntries()[0]?.failed, { code: "too_large", message: "too_large: over the upload limit" });
  await pia.sendText({ toUser: "ola" }, "the text after it");

  // An upload refused unauthorized (a token that expired while the connection stayed up)
  // waits, and goes once the server takes the token again.
  let refusals = 1;
  const expiredOnce: typeof fetch = async (input, init) => {
    if (!String(input).endsWith("/v1/media") || refusals-- <= 0) return fetch(input, init);
    const body = { code: "unauthorized", message: "the token expired" };
    return new Response(JSON.stringify(body), { status: 401, headers: { "content-type": "application/json" } });
  };
  const quy = await synced(server, "quy", "web", { fetch: expiredOnce });
  const sent = await quy.sendMedia({ toUser: "ola" }, bytes, "image/png");
  assert.ok(sent.seq >= 1);
});

test("an upload that hangs is given up with its connection and made again on the next, the messages after it waiting", async () => {
  const network = new Network();
  let uploads = 0;
  // The first upload never answers (its network went without a word); it ends only if aborted.
  const hangsOnce: typeof fetch = (input, init) => {
    if (!(String(input).endsWith("/v1/media") && init?.method === "POST") || ++uploads > 1) return fetch(input, init);
    return new Promise<Response>((_, fail) => {
      init.signal?.addEventListener("abort", () => fail(new DOMException("aborted", "AbortError")));
    });
  };
  const rae = await synced(server, "rae", "web", { network, fetch: hangsOnce });
  const sam = await synced(server, "sam", "web");
  const conv = (await rae.sendText({ toUser: "sam" }, "before")).conversation_id;
  const photo = rae.sendMedia({ conversationId: conv }, new Uint8Array(1000), "image/png", { name: "a.png" });
  const after = rae.sendText({ conversationId: conv }, "after the photo");
  await until("the upload is under way", () => uploads === 1);
  network.cut();
  await until("rae is offline", () => rae.state !== "online");
  network.restore();
  await photo;
  await after;
  await until("sam has all three", () => texts(sam, conv).length === 3);
  assert.deepEqual(texts(sam, conv), ["before", "(media)", "after the photo"]);
  assert.equal(uploads, 2);
});

test("a group's ticks stay sent while its member set is not known complete (after a reload that holds only the latest page)", async () => {
  const alice = await synced(server, "alice2", "web");
  const bob = await synced(server, "bob2", "web");
  const carol = await synced(server, "carol2", "web");
  const group = await alice.createGroup("trip", ["bob2", "carol2"]);
  let last = 0;
  for (let i = 1; i <= 60; i++) last = (await alice.sendText({ conversationId: group }, `m${i}`)).seq;
  await until("bob and carol have it", () => texts(bob, group).length === 60 && texts(carol, group).length === 60);
  alice.close();
  const reloaded = await synced(server, "alice2", "web");
  await reloaded.loadHistory(group);
  assert.equal(reloaded.conversation(group)?.membersComplete, false, "group_created is not held");
  bob.markRead(group); // carol does not
  await until("alice has bob's read receipt", () => reloaded.conversation(group)?.receiptOf("bob2")?.read_seq === last);
  assert.equal(reloaded.statusOf(group, last), "sent", "carol2 has not read it, and alice cannot know who else is in");
  // Back to group_created: the set is complete again, and the ticks say what it knows.
  while (await reloaded.loadHistory(group));
  assert.equal(reloaded.conversation(group)?.membersComplete, true);
  assert.deepEqual(reloaded.conversation(group)?.others().sort(), ["bob2", "carol2"]);
  assert.notEqual(reloaded.statusOf(group, last), "read", "carol2 has not read it");
  carol.markRead(group);
  await until("read by both", () => reloaded.statusOf(group, last) === "read");
});

test("a member added later never sees group_created, so its own group messages stay sent", async () => {
  const admin = await synced(server, "erin", "web");
  const frank = await synced(server, "frank", "web");
  const group = await admin.createGroup("later", []);
  await admin.addMembers(group, ["frank"]);
  await until("frank has his member_added", () => (frank.conversation(group)?.timeline.list().length ?? 0) > 0);
  const sent = await frank.sendText({ conversationId: group }, "hi");
  await until("erin has it", () => texts(admin, group).includes("hi"));
  admin.markRead(group);
  await until("frank has erin's receipt", () => frank.conversation(group)?.receiptOf("erin")?.read_seq === sent.seq);
  assert.equal(frank.conversation(group)?.membersComplete, false);
  assert.equal(frank.statusOf(group, sent.seq), "sent");
});
