/**
 * One conversation's events, ordered by `seq`, without duplicates, with what is known to be
 * complete. An event arriving twice (at-least-once delivery, a retry, a gap fetch) is kept
 * once; a `delete` event blanks its target, held already or arriving later (a page read
 * before the delete was stored can come after it). `covered` records the ranges of seqs in which
 * every event this device may see is held; from them come the gaps to fetch and the highest
 * seq that is safe to acknowledge.
 */
import type { ConversationEvent } from "./protocol.js";

/** A range of seqs `(after, through]`. */
export interface SeqRange {
  after: number;
  through: number;
}

export class Timeline {
  private readonly events = new Map<number, ConversationEvent>();
  /** Disjoint, sorted, non-touching ranges. */
  private covered: SeqRange[] = [];
  /** The targets of the held `delete` events. */
  private readonly deletedTargets = new Set<number>();
  /** Events below this seq were removed by retention (`trimmed`); 1 when nothing was. */
  private floor = 1;
  /** Counts the changes of the held events. */
  private changes = 0;
  /** The lowest and highest held seqs, kept as events come, so that a long session's
   * streamed events cost the same as its first (they were found by scanning every event). */
  private lowest: number | undefined;
  private highest = 0;
  /** `list()` as of `changes`, sorted once per change rather than on every call. */
  private sorted: { version: number; events: ConversationEvent[] } | undefined;

  constructor(readonly conversationId: string) {}

  /** Adds an event; returns false when it was already held unchanged. A held message that
   * arrives marked deleted (e.g. from a fetch) takes the deletion; one whose `delete` is held
   * is kept deleted. */
  add(event: ConversationEvent): boolean {
    if (event.seq < this.floor) return false;
    const held = this.events.get(event.seq);
    if (held && !(event.deleted && !held.deleted)) return false;
    this.events.set(event.seq, { ...event });
    this.changes++;
    if (this.lowest === undefined || event.seq < this.lowest) this.lowest = event.seq;
    if (event.seq > this.highest) this.highest = event.seq;
    if (event.kind === "delete" && event.target_seq !== undefined) {
      this.deletedTargets.add(event.target_seq);
      this.blank(event.target_seq);
    }
    if (event.kind === "message" && this.deletedTargets.has(event.seq)) this.blank(event.seq);
    return true;
  }

  /** Records that every event of `(after, through]` this device may see is held. */
  cover(after: number, through: number): void {
    if (through <= after) return;
    const merged: SeqRange = { after, through };
    const kept: SeqRange[] = [];
    for (const range of this.covered) {
      if (range.through < merged.after || range.after > merged.through) {
        kept.push(range);
      } else {
        merged.after = Math.min(merged.after, range.after);
        merged.through = Math.max(merged.through, range.through);
      }
    }
    kept.push(merged);
    this.covered = kept.sort((a, b) => a.after - b.after);
  }

  /** The end of the complete run that starts right after `seq`: the highest seq `s` such
   * that `(seq, s]` is covered, or `seq` itself when `seq + 1` is not. */
  completeThrough(seq: number): number {
    const run = this.covered.find((range) => range.after <= seq && seq < range.through);
    return run ? run.through : seq;
  }

  /** The uncovered range just below `seq`, down to the highest held event under it: what
   * a gap fetch should ask for before `seq` is shown as following it. */
  gapBefore(seq: number): SeqRange | undefined {
    // A streamed event is above everything held: the highest is the one below it.
    let below = seq > this.highest ? this.highest : 0;
    if (below === 0) for (const held of this.events.keys()) if (held < seq && held > below) below = held;
    const after = Math.max(below, this.floor - 1);
    if (below === 0 || seq - 1 <= after) return undefined;
    return this.completeThrough(after) >= seq - 1 ? undefined : { after, through: seq - 1 };
  }

  /** The uncovered ranges between the lowest and the highest held events: seqs this device
   * may not have had although it holds events on both sides (a gap fill that failed, or was
   * cut off with its connection while the device's cursor moved past it on another tab). */
  holes(): SeqRange[] {
    const holes: SeqRange[] = [];
    if (this.lowest === undefined) return holes;
    for (let i = 1; i < this.covered.length; i++) {
      const hole = { after: this.covered[i - 1]!.through, through: this.covered[i]!.after };
      // Held events are covered, so `through` (uncovered) is below the highest only when
      // events are held above it.
      if (hole.after >= this.lowest && hole.through < this.highest) holes.push(hole);
    }
    return holes;
  }

  /** Retention removed everything below `floorSeq`: those events are dropped and never
   * asked for again. */
  trim(floorSeq: number): void {
    if (floorSeq <= this.floor) return;
    this.floor = floorSeq;
    this.changes++;
    for (const seq of this.events.keys()) if (seq < floorSeq) this.events.delete(seq);
    for (const seq of this.deletedTargets) if (seq < floorSeq) this.deletedTargets.delete(seq);
    this.lowest = undefined;
    for (const seq of this.events.keys()) if (this.lowest === undefined || seq < this.lowest) this.lowest = seq;
    if (this.lowest === undefined) this.highest = 0;
    this.cover(0, floorSeq - 1);
  }

  /** Whether `event` is at a held seq with another `server_msg_id`: the server's history of
   * the conversation is not what is held from there up (a server restored from a backup). */
  diverges(event: ConversationEvent): boolean {
    const held = this.events.get(event.seq);
    return held !== undefined && held.server_msg_id !== event.server_msg_id;
  }

  /** Drops the held events from `seq` up, and what is known complete there: they are not the
   * server's (`diverges`). Messages blanked by a dropped `delete` stay blanked (their bodies
   * are gone). */
  dropFrom(seq: number): void {
    for (const held of this.events.keys()) if (held >= seq) this.events.delete(held);
    this.changes++;
    this.covered = this.covered
      .filter((range) => range.after < seq - 1)
      .map((range) => ({ after: range.after, through: Math.min(range.through, seq - 1) }));
    this.deletedTargets.clear();
    this.lowest = undefined;
    this.highest = 0;
    for (const held of this.events.values()) {
      if (this.lowest === undefined || held.seq < this.lowest) this.lowest = held.seq;
      this.highest = Math.max(this.highest, held.seq);
      if (held.kind === "delete" && held.target_seq !== undefined) this.deletedTargets.add(held.target_seq);
    }
  }

  /** Whether events older than the oldest held may exist: nothing yet covers the seqs
   * between the retention floor and it. */
  get mayHaveOlder(): boolean {
    const lowest = this.lowestSeq;
    return lowest !== undefined && this.completeThrough(this.floor - 1) < lowest - 1;
  }

  /** Changes with every change of the held events (to cache what is derived from them). */
  get version(): number {
    return this.changes;
  }

  get floorSeq(): number {
    return this.floor;
  }

  get lowestSeq(): number | undefined {
    return this.lowest;
  }

  get highestSeq(): number {
    return this.highest;
  }

  get(seq: number): ConversationEvent | undefined {
    return this.events.get(seq);
  }

  /** Every held event, in seq order. */
  list(): ConversationEvent[] {
    if (this.sorted?.version !== this.changes) {
      const events = [...this.events.values()].sort((a, b) => a.seq - b.seq);
      this.sorted = { version: this.changes, events };
    }
    return [...this.sorted.events];
  }

  private blank(targetSeq: number): void {
    const target = this.events.get(targetSeq);
    if (!target || target.deleted) return;
    const { body: _removed, ...rest } = target;
    this.events.set(targetSeq, { ...rest, deleted: true });
  }
}
