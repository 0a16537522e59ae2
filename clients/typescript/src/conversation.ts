/**
 * What a device knows of one conversation: its summary (kind, name, head), its timeline,
 * the members seen in its events, the other members' receipts and who is typing; and from
 * them the status of this user's own messages (the ticks).
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
  private readonly members = new Set<string>();
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
    if (summary.kind === "direct") this.members.add(summary.name);
  }

  /** Adds an event to the timeline and learns from it; false when it was known. */
  applyEvent(event: ConversationEvent): boolean {
    this.headSeq = Math.max(this.headSeq, event.seq);
    if (!this.timeline.add(event)) return false;
    if (event.kind === "group_created") {
      this.kind = "group";
      this.name = event.name;
      event.members?.forEach((m) => this.members.add(m));
    } else if (event.kind === "member_added") {
      usersOf(event).forEach((m) => this.members.add(m));
    } else if (event.kind === "member_removed") {
      usersOf(event).forEach((m) => this.members.delete(m));
    }
    return true;
  }

  applyReceipt(receipt: Receipt): void {
    const held = this.receipts.get(receipt.user) ?? { delivered_seq: 0, read_seq: 0 };
    this.receipts.set(receipt.user, {
      delivered_seq: Math.max(held.delivered_seq, receipt.delivered_seq),
      read_seq: Math.max(held.read_seq, receipt.read_seq),
    });
  }

  receiptOf(user: string): ReceiptState | undefined {
    return this.receipts.get(user);
  }

  /** The other members, as far as this device has seen them (a direct conversation's peer;
   * a group's members from its events, else the users who sent receipts). */
  others(): string[] {
    const known = this.members.size > 0 ? [...this.members] : [...this.receipts.keys()];
    return known.filter((user) => user !== this.me);
  }

  /** The ticks of this user's message at `seq`. */
  statusOf(seq: number): Exclude<MessageStatus, "pending" | "failed"> {
    const others = this.others();
    if (others.length === 0) return "sent";
    const states = others.map((user) => this.receipts.get(user) ?? { delivered_seq: 0, read_seq: 0 });
    if (states.every((s) => s.read_seq >= seq)) return "read";
    if (states.every((s) => s.delivered_seq >= seq || s.read_seq >= seq)) return "delivered";
    return "sent";
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

function usersOf(event: ConversationEvent): string[] {
  return event.users ?? (event.user ? [event.user] : []);
}
