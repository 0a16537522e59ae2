import assert from "node:assert/strict";
import { createServer, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";
import { CourierError, HttpApi } from "../src/index.js";

/** An API whose every request is answered with `status`, `body` and `headers`. */
function answering(status: number, body: string, headers: Record<string, string> = {}): HttpApi {
  const fetchImpl = (async () => new Response(body, { status, headers })) as typeof fetch;
  return new HttpApi("http://courier.invalid", async () => "token", fetchImpl);
}

test("an HTTP error says how long to wait, from its body or else its Retry-After", async () => {
  const fromBody = answering(429, JSON.stringify({ code: "rate_limited", message: "slow down", retry_after_ms: 1500 }), {
    "retry-after": "2",
  });
  await assert.rejects(fromBody.conversations(), (e: CourierError) => e.code === "rate_limited" && e.retryAfterMs === 1500);

  const fromHeader = answering(503, JSON.stringify({ code: "unavailable", message: "draining" }), { "retry-after": "3" });
  await assert.rejects(fromHeader.conversations(), (e: CourierError) => e.code === "unavailable" && e.retryAfterMs === 3000);

  const none = answering(403, JSON.stringify({ code: "forbidden", message: "not a member" }));
  await assert.rejects(none.conversations(), (e: CourierError) => e.code === "forbidden" && e.retryAfterMs === undefined);
});

test("an answer that is not JSON (a captive portal's page) is unavailable, to try again, not a parse error", async () => {
  const portal = answering(200, "<!DOCTYPE html><p>Accept the terms of this Wi-Fi</p>", { "content-type": "text/html" });
  for (const [what, call] of [
    ["conversations", () => portal.conversations()],
    ["upload", () => portal.uploadMedia(new Uint8Array(1), "image/png")],
  ] as const) {
    await assert.rejects(
      call(),
      (e: CourierError) => e instanceof CourierError && e.code === "unavailable" && /not JSON/.test(e.message),
      what,
    );
  }
});

/** An HTTP server on 127.0.0.1 whose media downloads (`GET /v1/media/{id}`) `answer` writes. */
async function mediaServer(answer: (id: string, response: ServerResponse) => void): Promise<{ url: string; close(): void }> {
  const server = createServer((request, response) => answer(request.url!.split("/").at(-1)!, response));
  await new Promise<void>((listening) => server.listen(0, "127.0.0.1", listening));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

test("a media download the server stops sending fails with a timeout; one that keeps moving is not cut", async () => {
  const timeoutMs = 1_000;
  const server = await mediaServer((id, response) => {
    if (id === "silent") return; // never answers
    response.writeHead(200, { "content-type": "image/png", "content-length": "40" });
    if (id === "stalled") return void response.write(new Uint8Array(10)); // 10 bytes of 40, then nothing
    // "slow": a byte every 50 ms, 40 in all: 2 s, longer than the timeout, never silent that long.
    let sent = 0;
    const timer = setInterval(() => {
      response.write(new Uint8Array([sent]));
      if (++sent === 40) {
        clearInterval(timer);
        response.end();
      }
    }, 50);
  });
  try {
    const api = new HttpApi(server.url, async () => "token", undefined, timeoutMs);
    for (const id of ["silent", "stalled"]) {
      await assert.rejects(api.downloadMedia(id), (e: CourierError) => e.code === "timeout", id);
    }
    const slow = await api.downloadMedia("slow");
    assert.equal(slow.bytes.length, 40);
    assert.equal(slow.bytes[39], 39);
  } finally {
    server.close();
  }
});

test("an answer whose fields break the protocol is refused as internal, not taken into what the client holds", async () => {
  const json = (body: unknown) => answering(200, JSON.stringify(body));
  const summary = { conversation_id: "c1", kind: "direct", name: "bob", head_seq: 1, delivered_seq: 0, read_seq: 0 };
  const event = {
    conversation_id: "c1",
    seq: 1,
    server_msg_id: "m1",
    sender: { user: "bob", device: "web" },
    ts_ms: 1,
    kind: "message",
    body: { text: "hi" },
  };
  const receipt = { user: "bob", delivered_seq: 1, read_seq: 0 };
  const upload = { media_id: "media-1", mime: "image/png", size: 1, sha256: "00" };
  const device = { device: "web", last_seen_ms: 1, push: false };
  const broken: [string, () => Promise<unknown>][] = [
    ["no list of conversations", () => json({}).conversations()],
    ["a summary whose head is text", () => json({ conversations: [{ ...summary, head_seq: "1" }] }).conversations()],
    ["a summary whose id is no id", () => json({ conversations: [{ ...summary, conversation_id: "../x" }] }).conversations()],
    ["a summary whose name is no text", () => json({ conversations: [{ ...summary, name: { html: "<b>" } }] }).conversations()],
    ["an event whose body is text", () => json({ events: [{ ...event, body: "hi" }], head_seq: 1 }).messages("c1")],
    ["an event without its sender", () => json({ events: [{ ...event, sender: null }], head_seq: 1 }).messages("c1")],
    ["a page whose head is missing", () => json({ events: [event] }).messages("c1")],
    ["a receipt whose cursor is text", () => json({ receipts: [{ ...receipt, read_seq: "all" }] }).receipts("c1")],
    ["an upload without its media id", () => json({ ...upload, media_id: undefined }).uploadMedia(new Uint8Array(1), "image/png")],
    ["an upload whose size is text", () => json({ ...upload, size: "1" }).uploadMedia(new Uint8Array(1), "image/png")],
    ["a group without its conversation id", () => json({}).createGroup("g", ["bob"])],
    ["a group whose id is no id", () => json({ conversation_id: "../x" }).createGroup("g", ["bob"])],
    ["no list of devices", () => json({}).devices()],
    ["a device whose push is text", () => json({ devices: [{ ...device, push: "yes" }] }).devices()],
    ["a device without its id", () => json({ devices: [{ ...device, device: undefined }] }).devices()],
  ];
  for (const [what, call] of broken) {
    await assert.rejects(
      call(),
      (e: CourierError) => e instanceof CourierError && e.code === "internal" && /breaks the protocol/.test(e.message),
      what,
    );
  }
  // The same answers, whole, are taken.
  assert.deepEqual(await json({ conversations: [summary] }).conversations(), [summary]);
  assert.deepEqual((await json({ events: [event], head_seq: 1, floor_seq: 1 }).messages("c1")).events, [event]);
  assert.deepEqual(await json({ receipts: [receipt] }).receipts("c1"), [receipt]);
  assert.deepEqual(await json(upload).uploadMedia(new Uint8Array(1), "image/png"), upload);
  assert.equal(await json({ conversation_id: "g1" }).createGroup("g", ["bob"]), "g1");
  assert.deepEqual(await json({ devices: [device] }).devices(), [device]);
});

test("a media download over maxDownloadBytes is refused as too_large, whether or not it says its length first", async () => {
  const server = await mediaServer((id, response) => {
    if (id === "told") {
      response.writeHead(200, { "content-type": "image/png", "content-length": "40" });
      return void response.end(new Uint8Array(40));
    }
    // Chunked: no length said; "untold" sends 40 bytes, "fits" 16.
    response.writeHead(200, { "content-type": "image/png" });
    response.write(new Uint8Array(8));
    response.end(new Uint8Array(id === "fits" ? 8 : 32));
  });
  try {
    const api = new HttpApi(server.url, async () => "token", undefined, 5_000, 16);
    for (const id of ["told", "untold"]) {
      await assert.rejects(
        api.downloadMedia(id),
        (e: CourierError) => e.code === "too_large" && /more than 16 bytes/.test(e.message),
        id,
      );
    }
    assert.equal((await api.downloadMedia("fits")).bytes.length, 16);
  } finally {
    server.close();
  }
});
