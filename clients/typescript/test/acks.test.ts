/** Acknowledgements without a server: from which base they start, and that they never pass
 * a hole. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { Acknowledgements } from "../src/acks.js";
import type { Session } from "../src/link.js";
import { Conversation, type ClientFrame, type ConversationEvent } from "../src/index.js";

function message(seq: number): ConversationEvent {
  return {
    conversation_id: "d:1",
    seq,
    server_msg_id: `s${seq}`,
    sender: { user: "alice", device: "phone" },
    ts_ms: seq,
    kind: "message",
    body: { text: `m${seq}` },
  };
}

/** A session that records the frames sent on it. */
function recordingSession(): { session: Session; sent: ClientFrame[] } {
  const sent: ClientFrame[] = [];
  const session = {
    connection: { send: (frame: ClientFrame) => sent.push(frame) },
    closed: new Promise<void>(() => {}),
    streamed: new Map(),
    streamBase: new Map(),
    acked: new Map(),
    caughtUp: true,
  } as unknown as Session;
  return { session, sent };
}

/** Holds `(after, through]`, as a fetch or a stream would. */
function hold(conversation: Conversation, after: number, through: number): void {
  for (let seq = after + 1; seq <= through; seq++) conversation.applyEvent(message(seq));
  conversation.timeline.cover(after, through);
}

test("a read ack starts from the top of a page fetched up to the head, and never passes a hole above it", () => {
  const { session, sent } = recordingSession();
  const acks = new Acknowledgements(() => session);
  const conversation = new Conversation("d:1", "bob");
  hold(conversation, 10, 60); // the latest page after a reload: nothing below 11 held
  acks.acknowledge(conversation, "read");
  assert.deepEqual(sent, [], "without a base, nothing held from the start: no ack");

  acks.haveThrough("d:1", 60); // that page reached the head on a caught-up connection
  acks.acknowledge(conversation, "read");
  assert.deepEqual(sent, [{ type: "ack", conversation_id: "d:1", seq: 60, kind: "read" }]);

  hold(conversation, 61, 63); // 61 missing: streamed after a hole
  acks.acknowledge(conversation, "read");
  assert.equal(sent.length, 1, "no ack past the hole at 61");

  hold(conversation, 60, 61); // the gap is filled
  acks.acknowledge(conversation, "read");
  assert.deepEqual(sent.at(-1), { type: "ack", conversation_id: "d:1", seq: 63, kind: "read" });
});

test("a connection sends the acks an earlier one carried, once, from what the device held", () => {
  const first = recordingSession();
  let current = first.session;
  const acks = new Acknowledgements(() => current);
  const conversation = new Conversation("d:1", "bob");
  hold(conversation, 0, 5);
  acks.acknowledge(conversation, "delivered");
  acks.acknowledge(conversation, "read");
  acks.acknowledge(conversation, "read");
  assert.equal(first.sent.length, 2, "one ack of each kind on a connection");

  // The connection dropped: whether they reached the server, nothing tells.
  const second = recordingSession();
  current = second.session;
  acks.acknowledge(conversation, "read");
  acks.acknowledge(conversation, "read");
  acks.acknowledge(conversation, "delivered");
  assert.deepEqual(second.sent, [{ type: "ack", conversation_id: "d:1", seq: 5, kind: "read" }]);
});
