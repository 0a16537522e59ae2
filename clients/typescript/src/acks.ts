/**
 * Acknowledgements of one device: cumulative `ack`s up to the end of the complete run of
 * events held from a base the device is known to have had everything through, never past a
 * hole (a reconnection would then skip the missing event). A base is what this device
 * acknowledged, where a connection's stream started (the server's cursor), or the top of a
 * page fetched up to the conversation's head on a caught-up connection (after a reload with
 * nothing to catch up, the only way to learn where the cursor is). Delivery acks are
 * coalesced: one per conversation per turn of the event loop, however many events arrived.
 *
 * What an ack already carried is counted per connection: one written into a connection whose
 * network was already gone never reached the server, and nothing says so (an `ack` has no
 * reply). So the first ack of each kind a new connection could send for a conversation goes
 * out even if an earlier connection sent the same seq; the server keeps the highest, and a
 * repeat moves nothing.
 *
 * The server limits the frames of a connection (`--connection-frames-per-sec`,
 * `--connection-frames-burst`) and refuses the others with `rate_limited`, so acks are paced:
 * a connection writes at most [`ACK_BURST`] at once and [`ACKS_PER_SECOND`] more a second,
 * and the others wait, in the order they became due, one per conversation and kind (a
 * catch-up of thousands of conversations is acknowledged over seconds, not refused). Each ack
 * carries a `ref`; one refused all the same (a server with lower limits, or `unavailable`)
 * is sent again once the server's `retry_after_ms` is over, with the conversation's latest
 * cursor of its kind then, and no ack goes out meanwhile.
 */
import type { Conversation } from "./conversation.js";
import { CourierError } from "./errors.js";
import type { Session } from "./link.js";
import type { AckKind, ErrorFrame } from "./protocol.js";

/** The acks a connection writes at once: half the server's default burst of frames per
 * connection (600), the other half left to sends, fetches and pings. */
export const ACK_BURST = 300;
/** The acks a connection writes each second past [`ACK_BURST`]: half the server's default
 * rate of frames per connection (300 a second). */
export const ACKS_PER_SECOND = 150;
/** The wait before an ack refused with no `retry_after_ms` (`unavailable`) is sent again. */
const RETRY_MS = 1_000;
/** The acks of a connection whose refusal is still told apart by its `ref`: a refusal comes
 * within a round trip, long before this many more acks are written. */
const REFS_KEPT = 4_096;

/** An ack to write: the conversation's cursor of that kind when it is written. */
interface Due {
  conversation: Conversation;
  kind: AckKind;
}

/** An ack written, as its `ref` names it. */
interface Written extends Due {
  seq: number;
}

/** What a connection's acks may still write: a token bucket. */
interface Budget {
  session: Session;
  tokens: number;
  /** `Date.now()` of the last refill. */
  at: number;
  /** No ack before this `Date.now()`: the server asked to wait. */
  notBefore: number;
}

export class Acknowledgements {
  /** Per conversation, the cursors this device decided in this process: it held every event
   * through `delivered` (a base, whether or not the ack reached the server), and the user
   * read through `read`. */
  private readonly wanted = new Map<string, { delivered: number; read: number }>();
  private readonly scheduled = new Set<string>();
  /** Per conversation, a seq through which this device has had every event (held now, or
   * delivered to it before), learned from a fetch. */
  private readonly hadThrough = new Map<string, number>();
  /** Acks due and not written yet, by `kind conversation`, oldest first. */
  private readonly waiting = new Map<string, Due>();
  /** Per connection, the acks written by `ref`, oldest first. */
  private readonly written = new WeakMap<Session, Map<number, Written>>();
  private budget: Budget | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly session: () => Session | undefined) {}

  /** Acknowledges delivery of what `conversation` holds, once the current turn is over. */
  scheduleDelivered(conversation: Conversation): void {
    if (this.scheduled.has(conversation.id)) return;
    this.scheduled.add(conversation.id);
    queueMicrotask(() => {
      this.scheduled.delete(conversation.id);
      this.acknowledge(conversation, "delivered");
    });
  }

  /** Records that this device has had every event of a conversation through `seq`: a page
   * that reached the head, fetched on a connection whose catch-up was complete (everything
   * up to where the catch-up stopped came in it or was delivered before; everything since
   * is streamed live). */
  haveThrough(conversationId: string, seq: number): void {
    this.hadThrough.set(conversationId, Math.max(this.hadThrough.get(conversationId) ?? 0, seq));
  }

  /** The server's history of a conversation is another from `seq` up (a restored server):
   * the cursors decided, learned or carried from there up are not the server's (it refuses an
   * ack past its head), and acks start again below `seq`. */
  divergedFrom(conversation: Conversation, seq: number): void {
    const below = (cursors: { delivered: number; read: number } | undefined) => {
      if (!cursors) return;
      cursors.delivered = Math.min(cursors.delivered, seq - 1);
      cursors.read = Math.min(cursors.read, seq - 1);
    };
    below(this.wanted.get(conversation.id));
    below(this.session()?.acked.get(conversation.id));
    conversation.deliveredSeq = Math.min(conversation.deliveredSeq, seq - 1);
    conversation.readSeq = Math.min(conversation.readSeq, seq - 1);
    const had = this.hadThrough.get(conversation.id);
    if (had !== undefined) this.hadThrough.set(conversation.id, Math.min(had, seq - 1));
  }

  /** Sends an `ack` of `kind` if the complete run moved past what this connection carried
   * (when the pace allows; else once it does). Offline, the cursor is decided all the same
   * and the ack waits for the next connection (`online`): a conversation read while offline
   * is acknowledged read once back, whether or not the app marks it again. */
  acknowledge(conversation: Conversation, kind: AckKind): void {
    const session = this.session();
    const wanted = this.wanted.get(conversation.id) ?? { delivered: 0, read: 0 };
    const base = Math.max(
      wanted.delivered,
      session?.streamBase.get(conversation.id) ?? 0,
      this.hadThrough.get(conversation.id) ?? 0,
    );
    const through = conversation.timeline.completeThrough(base);
    if (through < 1) return;
    // The server's read cursor never passes its delivered one: a read ack moves both.
    wanted.delivered = Math.max(wanted.delivered, through);
    conversation.deliveredSeq = Math.max(conversation.deliveredSeq, through);
    if (kind === "read") {
      wanted.read = Math.max(wanted.read, through);
      conversation.readSeq = Math.max(conversation.readSeq, through);
    }
    this.wanted.set(conversation.id, wanted);
    if (!session) {
      this.waiting.set(`${kind} ${conversation.id}`, { conversation, kind });
      return;
    }
    if (this.dueSeq(session, conversation.id, kind) === undefined) return;
    this.waiting.set(`${kind} ${conversation.id}`, { conversation, kind });
    this.writeWaiting(session);
  }

  /** A new connection is open: the acks that waited for one go out on it. */
  online(): void {
    const session = this.session();
    if (session && this.waiting.size > 0) this.writeWaiting(session);
  }

  /**
   * An `error` frame without a request: true when it refuses one of this connection's acks
   * (then taken here). One to wait out (`rate_limited`, `unavailable`) has its conversation
   * and kind sent again after `retry_after_ms`, and no ack is written before; another is
   * the caller's to report, as is an error that names no ack.
   */
  refused(session: Session, frame: ErrorFrame): boolean {
    const written = frame.ref === undefined ? undefined : this.written.get(session)?.get(frame.ref);
    if (!written) return false;
    this.written.get(session)!.delete(frame.ref!);
    const error = CourierError.fromFrame(frame);
    if (!error.retriable) return false;
    const carried = session.acked.get(written.conversation.id);
    // A later ack of the kind went out since and carries more: its own refusal, if any,
    // says so.
    if (!carried || carried[written.kind] !== written.seq) return true;
    carried[written.kind] = 0;
    const budget = this.budgetOf(session);
    budget.tokens = 0;
    budget.at = Date.now();
    budget.notBefore = Math.max(budget.notBefore, Date.now() + (error.retryAfterMs ?? RETRY_MS));
    this.waiting.set(`${written.kind} ${written.conversation.id}`, {
      conversation: written.conversation,
      kind: written.kind,
    });
    this.writeWaiting(session);
    return true;
  }

  /** The seq an ack of `kind` would carry on `session`, if it would move what this
   * connection carried. */
  private dueSeq(session: Session, conversationId: string, kind: AckKind): number | undefined {
    const seq = this.wanted.get(conversationId)?.[kind] ?? 0;
    const carried = session.acked.get(conversationId);
    return seq > (carried?.[kind] ?? 0) ? seq : undefined;
  }

  /** Writes the waiting acks, oldest first, as far as the budget goes; a timer writes the
   * rest as it refills. */
  private writeWaiting(session: Session): void {
    for (const [key, due] of this.waiting) {
      const seq = this.dueSeq(session, due.conversation.id, due.kind);
      if (seq === undefined) {
        this.waiting.delete(key);
        continue;
      }
      if (!this.spend(session)) break;
      this.waiting.delete(key);
      this.write(session, due, seq);
    }
    if (this.waiting.size > 0 && this.timer === undefined) {
      const budget = this.budgetOf(session);
      const now = Date.now();
      const refill = ((1 - budget.tokens) * 1000) / ACKS_PER_SECOND;
      this.timer = setTimeout(
        () => {
          this.timer = undefined;
          // Without a connection, the next one writes them (`online`).
          const current = this.session();
          if (current) this.writeWaiting(current);
        },
        Math.max(1, budget.notBefore - now, Math.ceil(refill)),
      );
    }
  }

  private write(session: Session, due: Due, seq: number): void {
    const { conversation, kind } = due;
    const ref = session.connection.post({ type: "ack", conversation_id: conversation.id, seq, kind });
    let written = this.written.get(session);
    if (!written) this.written.set(session, (written = new Map()));
    written.set(ref, { conversation, kind, seq });
    if (written.size > REFS_KEPT) written.delete(written.keys().next().value!);
    // What this connection carried, not what an earlier one may have lost.
    const carried = session.acked.get(conversation.id) ?? { delivered: 0, read: 0 };
    carried.delivered = Math.max(carried.delivered, seq);
    if (kind === "read") carried.read = seq;
    session.acked.set(conversation.id, carried);
  }

  /** Takes one ack from the connection's budget; false when it has none now. */
  private spend(session: Session): boolean {
    const budget = this.budgetOf(session);
    const now = Date.now();
    budget.tokens = Math.min(ACK_BURST, budget.tokens + ((now - budget.at) * ACKS_PER_SECOND) / 1000);
    budget.at = now;
    if (now < budget.notBefore || budget.tokens < 1) return false;
    budget.tokens -= 1;
    return true;
  }

  /** The connection's budget; a new connection starts with a full one, as the server's
   * bucket does. */
  private budgetOf(session: Session): Budget {
    if (this.budget?.session !== session) {
      this.budget = { session, tokens: ACK_BURST, at: Date.now(), notBefore: 0 };
    }
    return this.budget;
  }
}
