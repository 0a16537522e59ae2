/** Acknowledgements without a server: from which base they start, that they never pass a
 * hole, their pace, and what a refusal sends again. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ACK_BURST, Acknowledgements } from "../src/acks.js";
import type { Session } from "../src/link.js";
import { Conversation, type ClientFrame, type ConversationEvent } from "../src/index.js";
import { until } from "./support.js";

function message(seq: number, conversationId = "d:1"): ConversationEvent {
  return {
    conversation_id: conversationId,
    seq,
    server_msg_id: `s${seq}`,
    sender: { user: "alice", device: "phone" },
    ts_ms: seq,
    kind: "message",
    body: { text: `m${seq}` },
  };
}

/** A session that records the frames sent on it (without the `ref` it gives each, kept in
 * `refs`). */
function recordingSession(): { session: Session; sent: ClientFrame[]; refs: number[] } {
  const sent: ClientFrame[] = [];
  const refs: number[] = [];
  const session = {
    connection: {
      send: (frame: ClientFrame) => sent.push(frame),
      post: (frame: ClientFrame) => {
        sent.push(frame);
        refs.push(refs.length + 1);
        return refs.length;
      },
    },
    closed: new Promise<void>(() => {}),
    streamed: new Map(),
    streamBase: new Map(),
    acked: new Map(),
    caughtUp: true,
  } as unknown as Session;
  return { session, sent, refs };
}

/** Holds `(after, through]`, as a fetch or a stream would. */
function hold(conversation: Conversation, after: number, through: number): void {
  for (let seq = after + 1; seq <= through; seq++) conversation.applyEvent(message(seq, conversation.id));
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

test("a catch-up of more conversations than the budget allows is acknowledged at a pace, each once", async () => {
  const { session, sent } = recordingSession();
  const acks = new Acknowledgements(() => session);
  const count = ACK_BURST * 2;
  for (let i = 0; i < count; i++) {
    const conversation = new Conversation(`g:${i}`, "bob");
    hold(conversation, 0, 2);
    session.streamBase.set(conversation.id, 0);
    acks.acknowledge(conversation, "delivered");
  }
  // The budget refills as the loop runs: a little more than the burst, far from all of them.
  assert.ok(sent.length >= ACK_BURST && sent.length < count, `${sent.length} acks at once`);
  await until("every conversation acknowledged", () => sent.length >= count);
  const ids = sent.map((frame) => (frame.type === "ack" ? frame.conversation_id : ""));
  assert.equal(new Set(ids).size, count, "one ack per conversation");
});

test("an ack refused as rate limited is sent again after the wait, with the latest cursor, once", async () => {
  const { session, sent, refs } = recordingSession();
  const acks = new Acknowledgements(() => session);
  const conversation = new Conversation("d:1", "bob");
  session.streamBase.set("d:1", 0);
  hold(conversation, 0, 3);
  acks.acknowledge(conversation, "delivered");
  hold(conversation, 3, 5);
  acks.acknowledge(conversation, "delivered");
  assert.deepEqual(sent.map((f) => f.type === "ack" && f.seq), [3, 5]);
  const [first, second] = refs as [number, number];
  const refusal = { type: "error", code: "rate_limited", message: "slow down", retry_after_ms: 30 } as const;

  // The older one's refusal: the newer carries more.
  assert.equal(acks.refused(session, { ...refusal, ref: first }), true, "an ack's refusal is taken");
  assert.equal(sent.length, 2, "nothing sent again for an ack a later one covers");

  assert.equal(acks.refused(session, { ...refusal, ref: second }), true);
  hold(conversation, 5, 6); // arrives during the wait
  acks.acknowledge(conversation, "delivered");
  assert.equal(sent.length, 2, "no ack during the server's wait");
  await until("the refused ack is sent again", () => sent.length > 2);
  assert.deepEqual(sent.slice(2), [{ type: "ack", conversation_id: "d:1", seq: 6, kind: "delivered" }]);

  const other = { type: "error", code: "forbidden", message: "not a member", ref: 99 } as const;
  assert.equal(acks.refused(session, other), false, "an error of no ack is the client's to report");
});
