import assert from "node:assert/strict";
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
