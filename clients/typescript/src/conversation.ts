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
 *
 * A group message's ticks count the members it was sequenced among, as the membership
 * events before it say: not a member added after it (who never receives it), and still one
 * removed after it.
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

/** The most users a conversation shows typing at once: a notice past it takes the place of
 * the one that expires first. (The server relays typing only in groups of up to 1,000
 * members, `--large-group-threshold`, and few type at once.) */
export const MAX_TYPING_USERS = 100;

/** The most users whose receipts a group keeps (a direct conversation keeps its other
 * user's): the server's default limit of members, `--max-group-members`. A receipt of one
 * more user is passed over. */
export const MAX_RECEIPT_USERS = 100_000;

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
  /** A group's members as its held events say, for the timeline's `version`, and the other
   * members at the start of each period between membership events asked for so far. */
  private membersCache: { version: number; membership: Membership; othersFrom: Map<number, string[]> } | undefined;
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
    if (!this.receipts.has(receipt.user) && !this.keepsReceiptsOf(receipt.user)) return false;
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

  /** Whether a receipt of a user not yet held is kept: a direct conversation's other user's
   * (any while not known), a group's while fewer than [`MAX_RECEIPT_USERS`] are held. */
  private keepsReceiptsOf(user: string): boolean {
    if (this.kind === "direct" && this.peer !== undefined) return user === this.peer;
    return this.receipts.size < MAX_RECEIPT_USERS;
  }

  /** The other members' cursors go back below `seq`, where the server's history diverged
   * from the one held (a restored server): what they acknowledged from there up was of the
   * history lost. Returns the cursors that went back. */
  receiptsBelow(seq: number): (ReceiptState & { user: string })[] {
    const moved: (ReceiptState & { user: string })[] = [];
    for (const [user, held] of this.receipts) {
      if (held.delivered_seq < seq && held.read_seq < seq) continue;
      const below = {
        delivered_seq: Math.min(held.delivered_seq, seq - 1),
        read_seq: Math.min(held.read_seq, seq - 1),
      };
      this.receipts.set(user, below);
      moved.push({ user, ...below });
    }
    return moved;
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
    return this.membersKnownAt(this.timeline.highestSeq);
  }

  /** Whether the latest event held here that adds or removes this user removes it from the
   * group: from there on it receives nothing of the group (until it is added back), and may
   * send nothing there. */
  get left(): boolean {
    return this.kind === "group" && this.membership().left;
  }

  /** The other members when the event at `seq` was sequenced, or undefined when this device
   * cannot know them all: a direct conversation's `others()` (when `membersComplete`); a
   * group's members added before `seq` and not removed before it, when this device holds
   * `group_created` and every event after it through `seq` without a hole, and was not
   * removed before `seq`. */
  othersAt(seq: number): string[] | undefined {
    const others = this.othersWhen(seq);
    return others && [...others];
  }

  /** The ticks of this user's message at `seq`: `delivered` and `read` only when every
   * other member at `seq` is known (`othersAt`) and has it; otherwise `sent`. */
  statusOf(seq: number): Exclude<MessageStatus, "pending" | "failed"> {
    const others = this.othersWhen(seq);
    if (!others || others.length === 0) return "sent";
    const states = others.map((user) => this.receipts.get(user) ?? { delivered_seq: 0, read_seq: 0 });
    if (states.every((s) => s.read_seq >= seq)) return "read";
    if (states.every((s) => s.delivered_seq >= seq || s.read_seq >= seq)) return "delivered";
    return "sent";
  }

  /** Whether the latest message of this user held here is not yet `read` by every other
   * member it counts (receipts are cumulative, so the earlier ones are then not either). */
  awaitsReceipts(): boolean {
    // A former member of a group is refused the members' receipts.
    if (this.left) return false;
    for (let seq = this.timeline.highestSeq; seq >= (this.timeline.lowestSeq ?? 1); seq--) {
      const event = this.timeline.get(seq);
      if (event?.kind !== "message" || event.sender.user !== this.me) continue;
      // Ticks wait for the members at `seq` to be known first: receipts would not move them.
      return Boolean(this.othersWhen(seq)?.length) && this.statusOf(seq) !== "read";
    }
    return false;
  }

  /** `othersAt` without the copy (a group's lists are cached, one per membership change). */
  private othersWhen(seq: number): readonly string[] | undefined {
    if (this.kind !== "group") return this.membersComplete ? this.others() : undefined;
    if (!this.membersKnownAt(seq)) return undefined;
    const { changes, periods } = this.membership();
    // The membership events before `seq` decide, so the seqs after the same one share them.
    const before = lastBelow(changes, seq);
    if (before === undefined) return undefined;
    const cache = this.membersCache!.othersFrom;
    let others = cache.get(before);
    if (!others) {
      others = [];
      for (const [user, spans] of periods) {
        if (user !== this.me && spans.some((span) => span.added < seq && seq < span.removed)) others.push(user);
      }
      cache.set(before, others);
    }
    return others;
  }

  /** Whether this device knows a group's members at `seq` (see `othersAt`). */
  private membersKnownAt(seq: number): boolean {
    const { createdSeq, knownBefore } = this.membership();
    if (createdSeq === 0 || seq < createdSeq || seq >= knownBefore) return false;
    return this.timeline.completeThrough(createdSeq - 1) >= seq;
  }

  private membership(): Membership {
    const version = this.timeline.version;
    if (this.membersCache?.version !== version) {
      this.membersCache = { version, membership: membershipOf(this.timeline.list(), this.me), othersFrom: new Map() };
    }
    return this.membersCache.membership;
  }

  /** Takes a typing notice. Expired ones are forgotten, and at [`MAX_TYPING_USERS`] the one
   * that expires first gives way: every notice holds as long, so the map's insertion order is
   * the order they expire in. */
  setTyping(user: string, active: boolean, now: number): void {
    this.typingUntil.delete(user);
    if (!active) return;
    for (const [other, until] of this.typingUntil) {
      if (until > now && this.typingUntil.size < MAX_TYPING_USERS) break;
      this.typingUntil.delete(other);
    }
    this.typingUntil.set(user, now + TYPING_EXPIRES_MS);
  }

  /** Users typing at `now`. */
  typing(now: number): string[] {
    return [...this.typingUntil].filter(([, until]) => until > now).map(([user]) => user);
  }
}

/** A group's members from its held events. */
interface Membership {
  /** The members after the last held event. */
  members: Set<string>;
  /** Each user's periods of membership: a member for the seqs strictly between `added` (its
   * `group_created` or `member_added`) and `removed` (its `member_removed`, or Infinity). */
  periods: Map<string, { added: number; removed: number }[]>;
  /** The seqs of `group_created` and of the membership events after it, in order. */
  changes: number[];
  createdSeq: number;
  /** This user's first removal after `group_created` (Infinity when none): while away it
   * sees no membership change, so from there on the members are not known. */
  knownBefore: number;
  /** Whether the last held event that adds or removes this user removes it. */
  left: boolean;
}

function membershipOf(events: ConversationEvent[], me: string): Membership {
  const membership: Membership = {
    members: new Set(),
    periods: new Map(),
    changes: [],
    createdSeq: 0,
    knownBefore: Infinity,
    left: false,
  };
  const { members, periods, changes } = membership;
  const add = (user: string, seq: number) => {
    if (members.has(user)) return;
    members.add(user);
    const spans = periods.get(user) ?? [];
    spans.push({ added: seq, removed: Infinity });
    periods.set(user, spans);
  };
  for (const event of events) {
    if (event.kind === "group_created") {
      members.clear();
      periods.clear();
      changes.length = 0;
      membership.createdSeq = event.seq;
      membership.knownBefore = Infinity;
      changes.push(event.seq);
      for (const user of event.members ?? []) add(user, event.seq);
    } else if (event.kind === "member_added") {
      changes.push(event.seq);
      usersOf(event).forEach((user) => add(user, event.seq));
      if (usersOf(event).includes(me)) membership.left = false;
    } else if (event.kind === "member_removed") {
      changes.push(event.seq);
      for (const user of usersOf(event)) {
        if (!members.delete(user)) continue;
        periods.get(user)!.at(-1)!.removed = event.seq;
      }
      if (usersOf(event).includes(me)) {
        membership.knownBefore = Math.min(membership.knownBefore, event.seq);
        membership.left = true;
      }
    }
  }
  return membership;
}

/** The last of the sorted `seqs` below `seq`. */
function lastBelow(seqs: number[], seq: number): number | undefined {
  let low = 0;
  let high = seqs.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (seqs[middle]! < seq) low = middle + 1;
    else high = middle;
  }
  return low > 0 ? seqs[low - 1] : undefined;
}

function usersOf(event: ConversationEvent): string[] {
  return event.users ?? (event.user ? [event.user] : []);
}
