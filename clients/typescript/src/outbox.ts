/**
 * The messages of this device that have no `sent` yet, in the order they were written,
 * persisted in an [`OutboxStorage`] before `send` returns so that a reload or a crash loses
 * none: after a restart they are sent again with the same `client_msg_id`, which the server
 * answers with the original `sent` (`duplicate: true`) if the first attempt got through.
 */
import { CourierError } from "./errors.js";
import type { Body, Sent } from "./protocol.js";
import type { OutboxEntry, OutboxStorage } from "./storage.js";

interface Waiter {
  resolve(sent: Sent): void;
  reject(error: CourierError): void;
}

export class Outbox {
  private readonly waiters = new Map<string, Waiter[]>();
  /** Entries whose local write has not completed yet. */
  private readonly persisting = new Set<string>();
  /** Entries the server stored that the storage failed to delete: deleted again once the
   * next one stored is deleted, or by `clear`'s caller. A reload before that finds them and
   * sends them again, which the server answers as duplicates. */
  private readonly undeleted = new Set<string>();
  /** Entries the server stored, out of the list, whose delete from the storage is under way
   * (`clear` names them too; an `add` of the same id waits for none and is refused). */
  private readonly deleting = new Set<string>();
  /** Set by `clear`: the outbox takes no more entries. */
  private cleared = false;

  /** Called after every change of the entries. */
  onChange: () => void = () => {};

  /** Called when the server stored an entry, once it left the list (`settle`). */
  onSettled: (sent: Sent) => void = () => {};

  /** Called when a write the outbox goes on without fails (marking an entry failed or
   * retried, deleting one the server stored). */
  onError: (error: unknown) => void = () => {};

  private constructor(
    private readonly storage: OutboxStorage,
    private readonly scope: string,
    private entries: OutboxEntry[],
  ) {}

  static async open(storage: OutboxStorage, scope: string): Promise<Outbox> {
    return new Outbox(storage, scope, await storage.load(scope));
  }

  /** Every entry, oldest first (failed ones included). */
  list(): OutboxEntry[] {
    return this.entries.map((entry) => ({ ...entry }));
  }

  /** The oldest entry still to send, once it is stored locally (a later one waits for it,
   * so that the server gets them in order). */
  next(): OutboxEntry | undefined {
    const entry = this.entries.find((e) => !e.failed);
    return entry && !this.persisting.has(entry.client_msg_id) ? entry : undefined;
  }

  has(clientMsgId: string): boolean {
    return this.entries.some((entry) => entry.client_msg_id === clientMsgId);
  }

  /** Persists a new entry, after every earlier one; resolves with it once stored. */
  async add(fields: Omit<OutboxEntry, "position">): Promise<OutboxEntry> {
    if (this.cleared) throw clearedError();
    if (this.has(fields.client_msg_id) || this.deleting.has(fields.client_msg_id)) {
      throw new CourierError("bad_request", `client_msg_id ${fields.client_msg_id} is already in the outbox`);
    }
    // Its write replaces one of the same id left undeleted: that delete is not to be retried.
    this.undeleted.delete(fields.client_msg_id);
    // Microseconds of the wall clock, or one more than the last: increasing within a
    // millisecond and across reloads.
    const last = this.entries.at(-1)?.position ?? 0;
    const entry = { ...fields, position: Math.max(Date.now() * 1000, last + 1) };
    // In the list at once, so that its position is taken; sent only once stored.
    this.entries.push(entry);
    this.persisting.add(entry.client_msg_id);
    try {
      await this.storage.put(this.scope, entry);
      if (this.cleared) {
        // Written after the storage was cleared, or before: gone either way.
        await this.storage.delete(this.scope, entry.client_msg_id);
        throw clearedError();
      }
    } catch (error) {
      this.entries = this.entries.filter((e) => e !== entry);
      // Listed meanwhile to whoever read the entries on a change of another.
      this.onChange();
      throw error;
    } finally {
      this.persisting.delete(entry.client_msg_id);
    }
    this.onChange();
    return entry;
  }

  /** Takes in the entries another client of a shared storage wrote (`OutboxShare`) that it
   * does not list yet, in their places by position. */
  adopt(entries: OutboxEntry[]): void {
    const known = (id: string) => this.has(id) || this.deleting.has(id) || this.undeleted.has(id);
    const fresh = entries.filter((entry) => !known(entry.client_msg_id));
    if (this.cleared || fresh.length === 0) return;
    this.entries = [...this.entries, ...fresh].sort((a, b) => a.position - b.position);
    this.onChange();
  }

  /** Another client of a shared storage had the entry stored (and deletes it from the
   * storage): it leaves the list, `stored` is told it (before `onChange`, as in `settle`), and
   * its waiters have the `sent`. */
  storedElsewhere(sent: Sent, stored: (entry: OutboxEntry) => void): void {
    const id = sent.client_msg_id;
    const entry = this.entries.find((e) => e.client_msg_id === id);
    if (!entry) return;
    this.entries = this.entries.filter((e) => e !== entry);
    stored(entry);
    this.onChange();
    this.take(id).forEach((w) => w.resolve(sent));
  }

  /** Another client of a shared storage marked the entry failed (and wrote the mark), or
   * cleared its mark (`failed` undefined). */
  markedElsewhere(clientMsgId: string, failed: OutboxEntry["failed"]): void {
    const entry = this.entries.find((e) => e.client_msg_id === clientMsgId);
    if (!entry) return;
    if (failed) entry.failed = failed;
    else delete entry.failed;
    this.onChange();
    if (failed) this.take(clientMsgId).forEach((w) => w.reject(CourierError.fromMark(failed, clientMsgId)));
  }

  /** Another client of a shared storage deleted the outbox (a sign-out): the entries listed
   * here are never sent, their waiters rejected with `closed`; one whose write is under way
   * here is kept (written after the delete), and later ones are taken. */
  clearedElsewhere(): void {
    const gone = this.entries.filter((entry) => !this.persisting.has(entry.client_msg_id));
    if (gone.length === 0) return;
    this.entries = this.entries.filter((entry) => !gone.includes(entry));
    this.onChange();
    for (const entry of gone) this.take(entry.client_msg_id).forEach((w) => w.reject(clearedError()));
  }

  /** Another client of a shared storage discarded the entry (and deleted it). */
  discardedElsewhere(clientMsgId: string): void {
    this.drop(clientMsgId);
    this.take(clientMsgId).forEach((w) => w.reject(discardedError()));
  }

  /** Resolves with the entry's `sent`, or rejects when the server refuses it for good. */
  wait(clientMsgId: string): Promise<Sent> {
    return new Promise((resolve, reject) => {
      const list = this.waiters.get(clientMsgId) ?? [];
      list.push({ resolve, reject });
      this.waiters.set(clientMsgId, list);
    });
  }

  /** The server stored the entry: it leaves the outbox, and its waiters have the `sent`,
   * whatever the storage does with the delete (one that fails is reported to `onError` and
   * retried once another entry is deleted). It leaves the list at once, before `stored` (which
   * puts it in the timeline) and before `onChange`: a view rendered on either change never
   * shows it twice, unsent and stored (it was listed until its delete from the storage was
   * over, in the timeline meanwhile). */
  async settle(sent: Sent, stored: () => void = () => {}): Promise<void> {
    const id = sent.client_msg_id;
    const before = this.entries.length;
    this.entries = this.entries.filter((e) => e.client_msg_id !== id);
    this.deleting.add(id);
    stored();
    if (this.entries.length !== before) this.onChange();
    this.onSettled(sent);
    const deleted = await this.deleteStored(id);
    this.deleting.delete(id);
    this.take(id).forEach((w) => w.resolve(sent));
    if (deleted) {
      // The storage works again: the entries it failed to delete before go too.
      for (const earlier of [...this.undeleted]) {
        if (!(await this.deleteStored(earlier))) break;
      }
    }
  }

  /** The server refused the entry for good: it stays, marked failed, until retried or
   * discarded. A storage that cannot write the mark is reported to `onError`; the entry is
   * failed here all the same (its waiters rejected, the next entry sent), and a reload finds
   * it unmarked and sends it again, for the server to refuse again. */
  async fail(clientMsgId: string, error: CourierError): Promise<void> {
    const entry = this.entries.find((e) => e.client_msg_id === clientMsgId);
    if (!entry) return;
    entry.failed = { code: error.code, message: error.message };
    try {
      await this.storage.put(this.scope, entry);
    } catch (writeError) {
      this.onError(writeError);
    }
    this.onChange();
    this.take(clientMsgId).forEach((w) => w.reject(error));
  }

  /** Clears a failure so the entry is sent again. A storage that cannot write the cleared
   * mark is reported to `onError`; the entry is sent all the same, and a reload before its
   * `sent` finds it still failed, to retry again. */
  async retry(clientMsgId: string): Promise<void> {
    const entry = this.entries.find((e) => e.client_msg_id === clientMsgId);
    if (!entry?.failed) throw new CourierError("bad_request", `no failed message ${clientMsgId} in the outbox`);
    delete entry.failed;
    try {
      await this.storage.put(this.scope, entry);
    } catch (error) {
      this.onError(error);
    }
    this.onChange();
  }

  /** An entry's file is uploaded: its body becomes the media message the upload made, and
   * is written to the storage before it is sent. A storage that cannot write it is reported
   * to `onError`; the entry is sent all the same, and a reload before its `sent` uploads the
   * file again (another copy on the server, never a second message). False when the entry
   * left the outbox meanwhile (discarded, a sign-out). */
  async uploaded(clientMsgId: string, body: Body): Promise<boolean> {
    const entry = this.entries.find((e) => e.client_msg_id === clientMsgId);
    if (!entry?.upload) return false;
    entry.body = body;
    delete entry.upload;
    try {
      await this.storage.put(this.scope, entry);
    } catch (error) {
      this.onError(error);
    }
    this.onChange();
    return this.has(clientMsgId);
  }

  /** The bytes of the files that wait in the outbox for their upload (failed entries too:
   * they keep theirs until retried or discarded). */
  uploadBytes(): number {
    return this.entries.reduce((sum, entry) => sum + (entry.upload ? sizeOf(entry.upload.data) : 0), 0);
  }

  /** Drops an entry that will not be sent. */
  async discard(clientMsgId: string): Promise<void> {
    if (!this.has(clientMsgId)) throw new CourierError("bad_request", `no message ${clientMsgId} in the outbox`);
    await this.remove(clientMsgId);
    this.take(clientMsgId).forEach((w) => w.reject(discardedError()));
  }

  /** Empties the outbox for good (a sign-out): its entries are never sent, their waiters
   * rejected with `closed`, and `add` takes no more (one whose write is under way deletes it
   * once written). Deleting what the storage holds is the caller's; returns the ids of the
   * entries there were. */
  clear(): string[] {
    this.cleared = true;
    const ids = [...this.entries.map((entry) => entry.client_msg_id), ...this.deleting, ...this.undeleted];
    this.entries = [];
    this.undeleted.clear();
    for (const id of [...this.waiters.keys()]) this.take(id).forEach((w) => w.reject(clearedError()));
    this.onChange();
    return ids;
  }

  private async remove(clientMsgId: string): Promise<void> {
    await this.storage.delete(this.scope, clientMsgId);
    this.drop(clientMsgId);
  }

  /** Takes an entry out of the list (not the storage). */
  private drop(clientMsgId: string): void {
    const before = this.entries.length;
    this.entries = this.entries.filter((e) => e.client_msg_id !== clientMsgId);
    if (this.entries.length !== before) this.onChange();
  }

  /** Deletes a stored entry from the storage; false when that fails (reported, and kept in
   * `undeleted` to retry). */
  private async deleteStored(clientMsgId: string): Promise<boolean> {
    try {
      await this.storage.delete(this.scope, clientMsgId);
      this.undeleted.delete(clientMsgId);
      return true;
    } catch (error) {
      // After `clear` the caller deletes the whole outbox.
      if (!this.cleared) this.undeleted.add(clientMsgId);
      this.onError(error);
      return false;
    }
  }

  private take(clientMsgId: string): Waiter[] {
    const list = this.waiters.get(clientMsgId) ?? [];
    this.waiters.delete(clientMsgId);
    return list;
  }
}

function discardedError(): CourierError {
  return new CourierError("bad_request", "discarded from the outbox");
}

function clearedError(): CourierError {
  return new CourierError("closed", "this device's data was deleted (a sign-out): the message was not sent");
}

/** The size of a file to upload, in bytes. */
export function sizeOf(data: Blob | Uint8Array): number {
  return data instanceof Uint8Array ? data.byteLength : data.size;
}
