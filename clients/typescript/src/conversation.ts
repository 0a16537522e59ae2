/**
 * What a device knows of one conversation: its summary (kind, name, head), its timeline,
 * the members seen in its events, the other members' receipts and who is typing; and from
 * them the status of this user's own messages (the ticks).
 *
 * The protocol lists no group's members: a device knows them from the group's events, and
 * knows them all only while it holds `group_created` and every event after it without a
 * hole. Otherwise (after a reload that fetched only the latest page, for a member added
 * later, who never gets `group_created`, or after retention trimmed it) a group's own
 * messages show `sent`, never `delivered` or `read` on a partial set.
 */
import type { ConversationSummary } from "./http.js";
import type { ConversationEvent, Receipt } from "./protocol.js";
import { Timeline } from "./timeline.js";

/** The ticks of one's own message: `pending` (in the outbox), `failed` (refused by the
 * server), `sent` (stored), `delivered` (on a device of every other member), `read`. */
export type MessageStatus = "pending" | "failed" | "sent" | "delivered" | "read";

export interface ReceiptState {
  delivered_seq: number;
  read_seq: number;
}

/** How long a `typing` notice holds without being repeated. */
export const TYPING_EXPIRES_MS = 6_000;

export class Conversation {
  readonly timeline: Timeline;
  kind: "direct" | "group" | undefined;
  name: string | undefined;
  headSeq = 0;
  /** This device's own cursors as last acknowledged. */
  deliveredSeq = 0;
  readSeq = 0;
  private readonly receipts = new Map<string, ReceiptState>();
  /** A direct conversation's other user (from the summary). */
  private peer: string | undefined;
  /** A group's members as its held events say, for the timeline's `version`. */
  private membersCache: { version: number; membership: Membership } | undefined;
  private readonly typingUntil = new Map<string, number>();

  constructor(
    readonly id: string,
    private readonly me: string,
  ) {
    this.timeline = new Timeline(id);
  }

  applySummary(summary: ConversationSummary): void {
    this.kind = summary.kind;
    this.name = summary.name;
    this.headSeq = Math.max(this.headSeq, summary.head_seq);
    this.deliveredSeq = Math.max(this.deliveredSeq, summary.delivered_seq);
    this.readSeq = Math.max(this.readSeq, summary.read_seq);
    if (summary.kind === "direct") this.peer = summary.name;
  }

  /** Adds an event to the timeline and learns from it; false when it was known. */
  applyEvent(event: ConversationEvent): boolean {
    this.headSeq = Math.max(this.headSeq, event.seq);
    if (!this.timeline.add(event)) return false;
    if (event.kind === "group_created") {
      this.kind = "group";
      this.name = event.name;
    }
    return true;
  }

  /** Takes a member's cursors (from a `receipt`, or saved from an earlier client); false when
   * they moved neither. */
  applyReceipt(receipt: Pick<Receipt, "user" | "delivered_seq" | "read_seq">): boolean {
    const held = this.receipts.get(receipt.user) ?? { delivered_seq: 0, read_seq: 0 };
    const next = {
      delivered_seq: Math.max(held.delivered_seq, receipt.delivered_seq),
      read_seq: Math.max(held.read_seq, receipt.read_seq),
    };
    const moved = next.delivered_seq !== held.delivered_seq || next.read_seq !== held.read_seq;
    if (this.receipts.has(receipt.user) && !moved) return false;
    this.receipts.set(receipt.user, next);
    return true;
  }

  receiptOf(user: string): ReceiptState | undefined {
    return this.receipts.get(user);
  }

  /** The other members, as far as this device has seen them: a direct conversation's peer
   * (else the user who sent receipts), a group's members from its held events in seq order
   * (all of them only when `membersComplete`). */
  others(): string[] {
    let known: Iterable<string>;
    if (this.kind === "group") known = this.membership().members;
    else if (this.peer !== undefined) known = [this.peer];
    else if (this.kind === "direct") known = this.receipts.keys();
    else known = [];
    return [...known].filter((user) => user !== this.me);
  }

  /** Whether `others()` is every other member: always for a direct conversation; for a
   * group, when this device holds `group_created` and every event since without a hole, and
   * was never removed in between (while away it sees no membership change). */
  get membersComplete(): boolean {
    if (this.kind === "direct") return this.peer !== undefined || this.receipts.size > 0;
    if (this.kind !== "group") return false;
    const { createdSeq, complete } = this.membership();
    return complete && this.timeline.completeThrough(createdSeq - 1) >= this.timeline.highestSeq;
  }

  /** The ticks of this user's message at `seq`: `delivered` and `read` only when every
   * other member is known (`membersComplete`) and has it; otherwise `sent`. */
  statusOf(seq: number): Exclude<MessageStatus, "pending" | "failed"> {
    if (!this.membersComplete) return "sent";
    const others = this.others();
    if (others.length === 0) return "sent";
    const states = others.map((user) => this.receipts.get(user) ?? { delivered_seq: 0, read_seq: 0 });
    if (states.every((s) => s.read_seq >= seq)) return "read";
    if (states.every((s) => s.delivered_seq >= seq || s.read_seq >= seq)) return "delivered";
    return "sent";
  }

  private membership(): Membership {
    const version = this.timeline.version;
    if (this.membersCache?.version !== version) {
      this.membersCache = { version, membership: membershipOf(this.timeline.list(), this.me) };
    }
    return this.membersCache.membership;
  }

  setTyping(user: string, active: boolean, now: number): void {
    if (active) this.typingUntil.set(user, now + TYPING_EXPIRES_MS);
    else this.typingUntil.delete(user);
  }

  /** Users typing at `now`. */
  typing(now: number): string[] {
    return [...this.typingUntil].filter(([, until]) => until > now).map(([user]) => user);
  }
}

/** A group's members from its held events: `complete` when they start at `group_created`
 * and this user was not removed since. */
interface Membership {
  members: Set<string>;
  createdSeq: number;
  complete: boolean;
}

function membershipOf(events: ConversationEvent[], me: string): Membership {
  const membership: Membership = { members: new Set(), createdSeq: 0, complete: false };
  for (const event of events) {
    if (event.kind === "group_created") {
      membership.members = new Set(event.members ?? []);
      membership.createdSeq = event.seq;
      membership.complete = true;
    } else if (event.kind === "member_added") {
      usersOf(event).forEach((m) => membership.members.add(m));
    } else if (event.kind === "member_removed") {
      const removed = usersOf(event);
      removed.forEach((m) => membership.members.delete(m));
      if (removed.includes(me)) membership.complete = false;
    }
  }
  return membership;
}

function usersOf(event: ConversationEvent): string[] {
  return event.users ?? (event.user ? [event.user] : []);
}
