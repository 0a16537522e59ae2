import assert from "node:assert/strict";
import { test } from "node:test";
import { Timeline, type ConversationEvent } from "../src/index.js";

function message(seq: number, text = `m${seq}`): ConversationEvent {
  return {
    conversation_id: "d:1",
    seq,
    server_msg_id: `s${seq}`,
    sender: { user: "alice", device: "phone" },
    ts_ms: seq,
    kind: "message",
    body: { text },
    client_msg_id: `c${seq}`,
    deleted: false,
  };
}

test("events are kept once, in seq order, whatever order they arrive in", () => {
  const timeline = new Timeline("d:1");
  for (const seq of [3, 1, 2, 3, 1]) timeline.add(message(seq));
  assert.deepEqual(
    timeline.list().map((e) => e.seq),
    [1, 2, 3],
  );
  assert.equal(timeline.add(message(2)), false, "a duplicate is not news");
});

test("a delete event blanks its target, and a fetched copy marked deleted wins over a held one", () => {
  const timeline = new Timeline("d:1");
  timeline.add(message(1));
  timeline.add({ ...message(2), kind: "delete", target_seq: 1, body: undefined });
  assert.equal(timeline.get(1)?.deleted, true);
  assert.equal(timeline.get(1)?.body, undefined);

  timeline.add(message(3));
  assert.equal(timeline.add({ ...message(3), deleted: true, body: undefined }), true);
  assert.equal(timeline.get(3)?.body, undefined);
});

test("a message that arrives after its delete (a page read before the delete was stored) is held deleted", () => {
  const timeline = new Timeline("d:1");
  timeline.add({ ...message(5), kind: "delete", target_seq: 2, body: undefined, client_msg_id: undefined });
  assert.equal(timeline.add(message(2)), true);
  assert.equal(timeline.get(2)?.deleted, true);
  assert.equal(timeline.get(2)?.body, undefined);
  assert.equal(timeline.add({ ...message(2), deleted: true, body: undefined }), false, "its deleted copy is no news");
});

test("the complete run from a cursor ends at the first uncovered seq", () => {
  const timeline = new Timeline("d:1");
  timeline.cover(0, 2);
  timeline.cover(4, 6);
  assert.equal(timeline.completeThrough(0), 2);
  assert.equal(timeline.completeThrough(2), 2, "3 is not covered");
  timeline.cover(2, 4);
  assert.equal(timeline.completeThrough(0), 6, "ranges merge once the hole is filled");
});

test("a gap is what lies between the highest held event and a later one, unless covered", () => {
  const timeline = new Timeline("d:1");
  assert.equal(timeline.gapBefore(5), undefined, "an empty timeline has no gap: history is loaded on demand");
  timeline.add(message(2));
  timeline.cover(1, 2);
  assert.deepEqual(timeline.gapBefore(6), { after: 2, through: 5 });
  assert.equal(timeline.gapBefore(3), undefined, "the next seq leaves no gap");
  timeline.cover(2, 5);
  assert.equal(timeline.gapBefore(6), undefined, "a covered range is no gap even if it held nothing visible");
});

test("a hole is an uncovered range between held events, not the history below them nor what is yet to come", () => {
  const timeline = new Timeline("d:1");
  assert.deepEqual(timeline.holes(), []);
  timeline.trim(3);
  for (const seq of [5, 6, 9]) {
    timeline.add(message(seq));
    timeline.cover(seq - 1, seq);
  }
  timeline.cover(9, 12);
  assert.deepEqual(timeline.holes(), [{ after: 6, through: 8 }], "3 and 4 are older history; 10 to 12 hold nothing");
  timeline.cover(6, 8);
  assert.deepEqual(timeline.holes(), []);
});

test("trimming drops the events below the floor and never asks for them again", () => {
  const timeline = new Timeline("d:1");
  for (const seq of [1, 2, 3, 7]) timeline.add(message(seq));
  timeline.trim(5);
  assert.deepEqual(
    timeline.list().map((e) => e.seq),
    [7],
  );
  assert.equal(timeline.floorSeq, 5);
  assert.equal(timeline.add(message(4)), false, "events below the floor are refused");
  assert.deepEqual(timeline.gapBefore(9), { after: 7, through: 8 });
  assert.deepEqual(timeline.gapBefore(7), undefined, "nothing below the floor is a gap");
});

test("older events may exist until the range below the oldest held is covered", () => {
  const timeline = new Timeline("d:1");
  assert.equal(timeline.mayHaveOlder, false, "an empty timeline holds nothing to be older than");
  timeline.add(message(5));
  timeline.cover(4, 5);
  assert.equal(timeline.mayHaveOlder, true);
  timeline.cover(2, 4);
  assert.equal(timeline.mayHaveOlder, true, "1 and 2 are not covered yet");
  timeline.cover(0, 2);
  assert.equal(timeline.mayHaveOlder, false, "a fetch from the start found nothing more (e.g. before a join)");
  const trimmed = new Timeline("d:2");
  trimmed.add(message(7));
  trimmed.trim(7);
  assert.equal(trimmed.mayHaveOlder, false, "nothing below the retention floor");
});

test("the lowest and highest held seqs follow adds, out-of-order events and trims", () => {
  const timeline = new Timeline("d:1");
  assert.equal(timeline.lowestSeq, undefined);
  assert.equal(timeline.highestSeq, 0);
  for (const seq of [5, 9, 7]) timeline.add(message(seq));
  assert.equal(timeline.lowestSeq, 5);
  assert.equal(timeline.highestSeq, 9);
  assert.deepEqual(timeline.gapBefore(12), { after: 9, through: 11 }, "above the highest");
  assert.deepEqual(timeline.gapBefore(7), { after: 5, through: 6 }, "below it, from the held event under it");
  timeline.trim(8);
  assert.equal(timeline.lowestSeq, 9);
  assert.equal(timeline.highestSeq, 9);
  assert.deepEqual(
    timeline.list().map((e) => e.seq),
    [9],
  );
  timeline.trim(20);
  assert.equal(timeline.lowestSeq, undefined);
  assert.equal(timeline.highestSeq, 0);
});
