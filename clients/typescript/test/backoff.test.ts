import assert from "node:assert/strict";
import { test } from "node:test";
import { Backoff } from "../src/index.js";

test("backoff windows double up to the cap, jitter spreads within them, reset starts over", () => {
  const ceilings: number[] = [];
  const highest = new Backoff({ baseMs: 100, maxMs: 1000, random: () => 0.999999 });
  for (let i = 0; i < 6; i++) ceilings.push(highest.next());
  assert.deepEqual(ceilings, [99, 199, 399, 799, 999, 999]);
  highest.reset();
  assert.equal(highest.next(), 99);

  const lowest = new Backoff({ baseMs: 100, maxMs: 1000, random: () => 0 });
  assert.equal(lowest.next(), 0, "full jitter: a delay may be anything from zero");
  assert.throws(() => new Backoff({ baseMs: 0 }), RangeError);
});
