import assert from "node:assert/strict";
import { test } from "node:test";
import { CourierError, identityOf } from "../src/index.js";

test("a token's user and device come from its claims; anything else is refused clearly", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "alice", dev: "phone", exp: 1 })).toString("base64url");
  assert.deepEqual(identityOf(`e30.${payload}.sig`), { user: "alice", device: "phone" });
  assert.throws(() => identityOf("not-a-jwt"), (e: CourierError) => e.code === "bad_request" && /not a JWT/.test(e.message));
  const noDevice = Buffer.from(JSON.stringify({ sub: "alice" })).toString("base64url");
  assert.throws(() => identityOf(`e30.${noDevice}.sig`), /`dev`/);
});
