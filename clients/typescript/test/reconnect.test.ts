/** Losing the connection: catch-up after the network comes back, gaps filled by fetches,
 * a draining server's `reconnect`, retention's `trimmed`, and a refused token. */
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { CourierError, type WebSocketConstructor } from "../src/index.js";
import WebSocket from "ws";
import { Network, Server, client, closeClients, synced, texts, until } from "./support.js";

const servers: Server[] = [];

async function serve(args: string[] = []): Promise<Server> {
  const server = await Server.start(args);
  servers.push(server);
  return server;
}

after(async () => {
  closeClients();
  for (const server of servers) await server.dispose();
});

test("a client cut off catches up in order after the network returns, and its sends go out", async () => {
  const server = await serve();
  const network = new Network();
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web", { network });
  const conv = (await alice.sendText({ toUser: "bob" }, "before")).conversation_id;
  await until("bob has the first message", () => texts(bob, conv).length === 1);

  const states: string[] = [];
  bob.on("state", (s) => states.push(s));
  network.cut();
  await until("bob notices he is offline", () => bob.state !== "online");
  for (const text of ["while away 1", "while away 2"]) await alice.sendText({ conversationId: conv }, text);
  const reply = bob.sendText({ conversationId: conv }, "written while away");
  network.restore();
  await reply;
  await until("bob caught up", () => texts(bob, conv).length === 4);
  assert.deepEqual(texts(bob, conv), ["before", "while away 1", "while away 2", "written while away"]);
  assert.ok(states.includes("offline") && states.at(-1) === "online", `states: ${states}`);
  await until("alice has bob's reply", () => texts(alice, conv).length === 4);
});

test("a stream that resumes past what this client holds is filled by a fetch", async () => {
  const server = await serve();
  const network = new Network();
  const alice = await synced(server, "alice", "web");
  const tab = await synced(server, "bob", "web", { network });
  const conv = (await alice.sendText({ toUser: "bob" }, "m1")).conversation_id;
  await until("the tab has m1", () => texts(tab, conv).length === 1);
  network.cut();
  await until("the tab is offline", () => tab.state !== "online");
  for (const text of ["m2", "m3"]) await alice.sendText({ conversationId: conv }, text);
  // Another tab of the same device takes the catch-up and moves the device's cursor on.
  const otherTab = await synced(server, "bob", "web");
  await until("the other tab has m3", () => texts(otherTab, conv).includes("m3"));
  otherTab.close();

  network.restore();
  await tab.whenSynced();
  await until("the tab is online", () => tab.state === "online");
  await alice.sendText({ conversationId: conv }, "m4");
  await until("the tab has every message", () => texts(tab, conv).length === 4);
  assert.deepEqual(texts(tab, conv), ["m1", "m2", "m3", "m4"]);
});

/** A tab of bob's that holds m1 of a conversation with alice and is offline while another
 * tab of the same device takes m2 and m3 (and moves the device's cursor past them). */
async function tabBehindItsDevice(network: Network) {
  const server = await serve();
  const alice = await synced(server, "alice", "web");
  const tab = await synced(server, "bob", "web", { network });
  const conv = (await alice.sendText({ toUser: "bob" }, "m1")).conversation_id;
  await until("the tab has m1", () => texts(tab, conv).length === 1);
  network.cut();
  await until("the tab is offline", () => tab.state !== "online");
  for (const text of ["m2", "m3"]) await alice.sendText({ conversationId: conv }, text);
  const otherTab = await synced(server, "bob", "web");
  await until("the other tab has m3", () => texts(otherTab, conv).includes("m3"));
  const cursor = async () => (await otherTab.http.conversations()).find((c) => c.conversation_id === conv);
  await until("the device's cursor is past m3", async () => (await cursor())?.delivered_seq === 3);
  otherTab.close();
  return { alice, tab, conv };
}

test("the events of a conversation reach the app in seq order when a gap fill and live events interleave", async () => {
  const network = new Network();
  const { alice, tab, conv } = await tabBehindItsDevice(network);
  const told: number[] = [];
  tab.on("event", (event) => event.conversation_id === conv && told.push(event.seq));
  network.restore();
  await tab.whenSynced();
  await alice.sendText({ conversationId: conv }, "m4");
  await until("the tab has every message", () => texts(tab, conv).length === 4);
  await until("the app was told of every message", () => told.length === 3);
  assert.deepEqual(told, [2, 3, 4]);
});

test("a gap fill the server refuses as unavailable is fetched again after the wait", async () => {
  const network = new Network();
  const { alice, tab, conv } = await tabBehindItsDevice(network);
  const errors: string[] = [];
  tab.on("error", (error) => errors.push(error.code));
  let refused = 0;
  network.answer = (frame) => {
    if (frame.type !== "fetch" || refused > 0) return undefined;
    refused++;
    return { type: "error", ref: frame.ref, code: "unavailable", message: "storage slow", retry_after_ms: 50 };
  };
  network.restore();
  await tab.whenSynced();
  await alice.sendText({ conversationId: conv }, "m4");
  await until("the tab has every message", () => texts(tab, conv).length === 4);
  assert.deepEqual(texts(tab, conv), ["m1", "m2", "m3", "m4"]);
  assert.equal(refused, 1);
  assert.deepEqual(errors, [], "a refusal to wait out is not the app's error");
});

test("a gap fill cut off with its connection is fetched on the next one", async () => {
  const network = new Network();
  const { alice, tab, conv } = await tabBehindItsDevice(network);
  // The gap's fetch is written into a connection whose network is gone.
  let lost = 0;
  network.lose = (frame) => frame.type === "fetch" && ++lost > 0;
  network.restore();
  await tab.whenSynced();
  await alice.sendText({ conversationId: conv }, "m4");
  await until("the tab has m4 and asked for the gap below it", () => texts(tab, conv).includes("m4") && lost > 0);
  network.cut();
  await until("the tab is offline", () => tab.state !== "online");
  network.lose = undefined;
  network.restore();
  await until("the tab has every message", () => texts(tab, conv).length === 4);
  assert.deepEqual(texts(tab, conv), ["m1", "m2", "m3", "m4"]);
});

test("a ping the server refuses (rate_limited) keeps the connection: the refusal is an answer", async () => {
  const server = await serve();
  const network = new Network();
  const bob = await synced(server, "bob", "web", { network, heartbeatMs: 20 });
  const states: string[] = [];
  bob.on("state", (state) => states.push(state));
  let refused = 0;
  network.answer = (frame) => {
    if (frame.type !== "ping") return undefined;
    refused++;
    return { type: "error", ref: frame.ref, code: "rate_limited", message: "slow down", retry_after_ms: 10 };
  };
  await until("five pings were refused", () => refused >= 5);
  network.answer = undefined;
  assert.deepEqual(states, [], "the connection was never given up");
  assert.equal(bob.state, "online");
});

test("a draining server's reconnect is honoured: the client comes back to the restarted server", async () => {
  const server = await serve();
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web");
  const conv = (await alice.sendText({ toUser: "bob" }, "before the restart")).conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);

  await server.stop();
  await until("both are disconnected", () => alice.state !== "online" && bob.state !== "online");
  const queued = alice.sendText({ conversationId: conv }, "after the restart");
  await server.restart();
  await queued;
  await until("bob got the message sent across the restart", () => texts(bob, conv).length === 2);
  assert.deepEqual(texts(bob, conv), ["before the restart", "after the restart"]);
});

test("retention's trimmed floor is respected: history stops there", async () => {
  const server = await serve(["--retention", "0s", "--retention-interval", "50ms"]);
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web");
  let conv = "";
  for (const text of ["a", "b", "c"]) conv = (await alice.sendText({ toUser: "bob" }, text)).conversation_id;
  // Both devices acknowledge what they hold (alice her own sends from seq 1 on), so
  // retention may clear all three.
  await until("bob has all three", () => texts(bob, conv).length === 3);
  await until("retention cleared all three", async () => (await bob.http.messages(conv)).floor_seq === 4);

  const late = await client(server, "bob", "laptop");
  await until("the late device learns the floor", () => (late.conversation(conv)?.timeline.floorSeq ?? 1) > 1);
  assert.equal(late.conversation(conv)!.timeline.floorSeq, 4);
  assert.equal(await late.loadHistory(conv), false, "nothing below the floor is asked for");
  assert.deepEqual(texts(late, conv), []);
});

test("a token the server refuses stops the client with an unauthorized error", async () => {
  const server = await serve();
  const other = await serve();
  const errors: CourierError[] = [];
  const stranger = await client(server, "mallory", "web", { token: other.token("mallory", "web") });
  stranger.on("error", (e) => errors.push(e));
  await until("the client gives up", () => stranger.state === "closed");
  assert.equal(errors[0]?.code, "unauthorized");
});

test("waiting for the catch-up ends with the refusal when the token is refused, and with closed on close", async () => {
  const server = await serve();
  const other = await serve();
  const stranger = await client(server, "mallory", "web", { token: other.token("mallory", "web") });
  let outcome: unknown;
  stranger.whenSynced().then(
    () => (outcome = "synced"),
    (error: unknown) => (outcome = error),
  );
  await until("the wait ends", () => outcome !== undefined);
  assert.equal((outcome as CourierError).code, "unauthorized");
  await assert.rejects(stranger.whenSynced(), (e: CourierError) => e.code === "unauthorized");

  const network = new Network();
  network.cut();
  const unreachable = await client(server, "nina", "web", { network });
  const waiting = unreachable.whenSynced();
  unreachable.close();
  await assert.rejects(waiting, (e: CourierError) => e.code === "closed");
  await assert.rejects(unreachable.whenSynced(), (e: CourierError) => e.code === "closed");
});

test("the catch-up is waited for until the client is online, also when it comes in the same read as hello", async () => {
  const server = await serve();
  // The server's `hello` and `sync_done` read at once, as a fresh device's often are: the
  // frames after `hello` are handled before the connection's opening returns.
  class OneRead extends WebSocket {
    private held: unknown[] | undefined;
    override emit(name: string | symbol, ...args: unknown[]): boolean {
      if (name !== "message") return super.emit(name, ...args);
      if (this.held === undefined && /"hello"/.test(String(args[0]))) {
        this.held = args;
        return true;
      }
      const held = this.held;
      if (held && held.length > 0) {
        this.held = [];
        super.emit("message", ...held);
      }
      return super.emit("message", ...args);
    }
  }
  const alice = await client(server, "alice", "web", { WebSocket: OneRead as unknown as WebSocketConstructor });
  const statesWhenSynced: string[] = [];
  alice.on("synced", () => statesWhenSynced.push(alice.state));
  await alice.whenSynced();
  assert.equal(alice.state, "online", "whenSynced resolved while the client was not online");
  assert.deepEqual(statesWhenSynced, ["online"]);
});

test("a paused client stays offline, keeps its sends, and catches up when resumed", async () => {
  const server = await serve();
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web");
  const conv = (await alice.sendText({ toUser: "bob" }, "first")).conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);

  bob.pause();
  assert.equal(bob.state, "offline");
  await alice.sendText({ conversationId: conv }, "while bob is paused");
  const reply = bob.sendText({ conversationId: conv }, "written while paused");
  await until("the reply waits in bob's outbox", () => bob.pending(conv).length === 1);
  assert.equal(bob.state, "offline", "a paused client does not reconnect by itself");
  assert.deepEqual(texts(bob, conv), ["first"]);

  bob.resume();
  await reply;
  await until("bob caught up", () => texts(bob, conv).length === 3);
  assert.deepEqual(texts(bob, conv), ["first", "while bob is paused", "written while paused"]);
});

test("a read ack lost with its connection is sent again on the next one", async () => {
  const server = await serve();
  const network = new Network();
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web", { network });
  const conv = (await alice.sendText({ toUser: "bob" }, "read me")).conversation_id;
  const cursors = async () => (await bob.http.conversations()).find((c) => c.conversation_id === conv);
  await until("bob's delivered cursor is on the message", async () => (await cursors())?.delivered_seq === 1);

  // Bob reads it as his network goes: the read ack never reaches the server.
  network.lose = (frame) => frame.type === "ack";
  bob.markRead(conv);
  network.cut();
  await until("bob notices he is offline", () => bob.state !== "online");
  network.lose = undefined;
  network.restore();
  await bob.whenSynced();
  // The app marks the open conversation read again once it is back.
  bob.markRead(conv);
  await until("bob's read cursor is on the message", async () => (await cursors())?.read_seq === 1);
  await until("alice sees it read", () => alice.statusOf(conv, 1) === "read");
});

test("a catch-up of more conversations than the connection's frame limit lets through at once moves every cursor to its head", async () => {
  // Ten frames at once, twenty a second: most of the catch-up's acks are refused at first.
  const server = await serve(["--connection-frames-per-sec", "20", "--connection-frames-burst", "10"]);
  const alice = await client(server, "alice", "web");
  const groups = 80;
  for (let i = 0; i < groups; i++) await alice.http.createGroup(`group ${i}`, ["bob"]);

  const bob = await synced(server, "bob", "web");
  const behind = async () =>
    (await bob.http.conversations()).filter((c) => c.head_seq === 0 || c.delivered_seq < c.head_seq).length;
  assert.equal((await bob.http.conversations()).length, groups);
  await until("every conversation's delivered cursor is at its head", async () => (await behind()) === 0);
});

test("a device past its user's limit of devices is told forbidden once, not retried for ever", async () => {
  const server = await serve(["--max-devices-per-user", "1"]);
  await synced(server, "alice", "phone");
  const laptop = await client(server, "alice", "laptop");
  const errors: CourierError[] = [];
  laptop.on("error", (error) => errors.push(error as CourierError));
  await until("the laptop is refused", () => laptop.state === "closed");
  assert.deepEqual(
    errors.map((e) => e.code),
    ["forbidden"],
  );
  assert.match(errors[0].message, /unlink/);
});

test("a client cut off from the server asks whether its token is refused once per outage, not after every attempt", async () => {
  const server = await serve();
  let probes = 0;
  const counted: typeof fetch = (input, init) => {
    if (String(input).endsWith("/v1/devices")) probes++;
    return fetch(input, init);
  };
  const network = new Network();
  let attempts = 0;
  const Counting = function (url: string, protocols?: string | string[]) {
    attempts++;
    return new network.WebSocket(url, protocols);
  } as unknown as WebSocketConstructor;
  const alice = await synced(server, "alice", "web", { WebSocket: Counting, fetch: counted });

  for (const outage of [1, 2]) {
    network.cut();
    const before = attempts;
    await until("eight attempts failed", () => attempts >= before + 8);
    // The server answers HTTP throughout (only the WebSocket is cut): one probe found the
    // token taken, and the failures after it are not the token's.
    assert.equal(probes, outage, `probes after outage ${outage}`);
    network.restore();
    await until("alice is online again", () => alice.state === "online");
  }
});

test("a device's 17th connection stops the oldest, which says so and stays offline instead of taking one back", async () => {
  const server = await serve();
  const token = server.token("alice", "web");
  const tabs = [];
  for (let i = 0; i < 16; i++) tabs.push(await synced(server, "alice", "web", { token }));
  const oldest = tabs[0]!;
  const errors: CourierError[] = [];
  oldest.on("error", (error) => errors.push(error));
  const newest = await synced(server, "alice", "web", { token });
  const states: string[] = [];
  for (const tab of [newest, ...tabs.slice(1)]) tab.on("state", (state) => states.push(state));

  await until("the oldest is told it was replaced", () => errors.length > 0);
  assert.deepEqual(
    errors.map((e) => e.code),
    ["replaced"],
  );
  assert.equal(oldest.state, "offline");
  // A round trip on every other tab: none was displaced in turn.
  for (const tab of [newest, ...tabs.slice(1)]) await tab.sendText({ toUser: "bob" }, "still here");
  assert.deepEqual(states, [], "the other connections stayed up");
  assert.equal(oldest.state, "offline", "the replaced tab did not come back by itself");

  // Once another tab is closed, resuming takes a connection again.
  newest.close();
  oldest.resume();
  await oldest.whenSynced();
  await until("the oldest is online again", () => oldest.state === "online");
});

test("a device unlinked while connected stops with an unauthorized error, not as a replaced connection", async () => {
  const server = await serve();
  const phone = await synced(server, "alice", "phone");
  const laptop = await synced(server, "alice", "laptop");
  const errors: CourierError[] = [];
  laptop.on("error", (error) => errors.push(error));
  await phone.http.unlinkDevice("laptop");
  await until("the laptop is stopped", () => laptop.state === "closed");
  assert.deepEqual(
    errors.map((e) => e.code),
    ["unauthorized"],
  );
});

test("a device unlinked during an outage, after a probe found its token taken, stops with unauthorized", async () => {
  const server = await serve();
  let probes = 0;
  const counted: typeof fetch = (input, init) => {
    if (String(input).endsWith("/v1/devices")) probes++;
    return fetch(input, init);
  };
  const network = new Network();
  let attempts = 0;
  const Counting = function (url: string, protocols?: string | string[]) {
    attempts++;
    return new network.WebSocket(url, protocols);
  } as unknown as WebSocketConstructor;
  const phone = await synced(server, "alice", "phone");
  const laptop = await synced(server, "alice", "laptop", { WebSocket: Counting, fetch: counted });
  const errors: CourierError[] = [];
  laptop.on("error", (error) => errors.push(error));
  network.cut();
  // The server answers HTTP throughout (only the WebSocket is cut): the probe finds the
  // token taken, and the attempt after it is made.
  await until("the laptop probed its token", () => probes > 0);
  const probedAfter = attempts;
  await until("the laptop tried again after the probe", () => attempts > probedAfter);
  await phone.http.unlinkDevice("laptop");
  // The laptop's upgrades are refused now (401), which a browser sees as a failed attempt.
  network.restore();
  await until("the laptop is stopped", () => laptop.state === "closed");
  assert.deepEqual(
    errors.map((e) => e.code),
    ["unauthorized"],
  );
});

test("a token probe the server never answers does not keep the client from reconnecting", async () => {
  const server = await serve();
  // The devices request hangs, as behind a proxy whose backend stopped answering.
  const hanging: typeof fetch = (input, init) => {
    if (!String(input).endsWith("/v1/devices")) return fetch(input, init);
    return new Promise<Response>((_, fail) => {
      init?.signal?.addEventListener("abort", () => fail(new DOMException("timed out", "TimeoutError")));
    });
  };
  const network = new Network();
  let attempts = 0;
  const Counting = function (url: string, protocols?: string | string[]) {
    attempts++;
    return new network.WebSocket(url, protocols);
  } as unknown as WebSocketConstructor;
  const alice = await synced(server, "alice", "web", { WebSocket: Counting, fetch: hanging, replyTimeoutMs: 500 });
  network.cut();
  const before = attempts;
  await until("an attempt failed", () => attempts > before);
  network.restore();
  await until("alice is online again", () => alice.state === "online");
});

test("a conversation marked read while offline is acknowledged read once back online", async () => {
  const server = await serve();
  const network = new Network();
  const alice = await synced(server, "alice", "web");
  const bob = await synced(server, "bob", "web", { network });
  const sent = await alice.sendText({ toUser: "bob" }, "read me later");
  const conv = sent.conversation_id;
  await until("bob has it", () => texts(bob, conv).length === 1);
  await until("alice sees it delivered", () => alice.statusOf(conv, sent.seq) === "delivered");
  network.cut();
  await until("bob is offline", () => bob.state !== "online");
  bob.markRead(conv); // bob reads it on the train
  network.restore();
  await until("bob is online again", () => bob.state === "online");
  await until("alice sees it read", () => alice.statusOf(conv, sent.seq) === "read");
});
