/**
 * The messages of this device that have no `sent` yet, in the order they were written,
 * persisted in an [`OutboxStorage`] before `send` returns so that a reload or a crash loses
 * none: after a restart they are sent again with the same `client_msg_id`, which the server
 * answers with the original `sent` (`duplicate: true`) if the first attempt got through.
 */
import { CourierError } from "./errors.js";
import type { Sent } from "./protocol.js";
import type { OutboxEntry, OutboxStorage } from "./storage.js";

interface Waiter {
  resolve(sent: Sent): void;
  reject(error: CourierError): void;
}

export class Outbox {
  private readonly waiters = new Map<string, Waiter[]>();
  /** Entries whose local write has not completed yet. */
  private readonly persisting = new Set<string>();
  /** Set by `clear`: the outbox takes no more entries. */
  private cleared = false;

  /** Called after every change of the entries. */
  onChange: () => void = () => {};

  /** Called when a write the outbox goes on without fails (marking an entry failed). */
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

  /** Persists a new entry, after every earlier one. */
  async add(fields: Omit<OutboxEntry, "position">): Promise<void> {
    if (this.cleared) throw clearedError();
    if (this.has(fields.client_msg_id)) {
      throw new CourierError("bad_request", `client_msg_id ${fields.client_msg_id} is already in the outbox`);
    }
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
  }

  /** Resolves with the entry's `sent`, or rejects when the server refuses it for good. */
  wait(clientMsgId: string): Promise<Sent> {
    return new Promise((resolve, reject) => {
      const list = this.waiters.get(clientMsgId) ?? [];
      list.push({ resolve, reject });
      this.waiters.set(clientMsgId, list);
    });
  }

  /** The server stored the entry: it leaves the outbox. */
  async settle(sent: Sent): Promise<void> {
    await this.remove(sent.client_msg_id);
    this.take(sent.client_msg_id).forEach((w) => w.resolve(sent));
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

  /** Clears a failure so the entry is sent again. */
  async retry(clientMsgId: string): Promise<void> {
    const entry = this.entries.find((e) => e.client_msg_id === clientMsgId);
    if (!entry?.failed) throw new CourierError("bad_request", `no failed message ${clientMsgId} in the outbox`);
    delete entry.failed;
    await this.storage.put(this.scope, entry);
    this.onChange();
  }

  /** Drops an entry that will not be sent. */
  async discard(clientMsgId: string): Promise<void> {
    if (!this.has(clientMsgId)) throw new CourierError("bad_request", `no message ${clientMsgId} in the outbox`);
    await this.remove(clientMsgId);
    this.take(clientMsgId).forEach((w) => w.reject(new CourierError("bad_request", "discarded from the outbox")));
  }

  /** Empties the outbox for good (a sign-out): its entries are never sent, their waiters
   * rejected with `closed`, and `add` takes no more (one whose write is under way deletes it
   * once written). Deleting what the storage holds is the caller's; returns the ids of the
   * entries there were. */
  clear(): string[] {
    this.cleared = true;
    const ids = this.entries.map((entry) => entry.client_msg_id);
    this.entries = [];
    for (const id of [...this.waiters.keys()]) this.take(id).forEach((w) => w.reject(clearedError()));
    this.onChange();
    return ids;
  }

  private async remove(clientMsgId: string): Promise<void> {
    await this.storage.delete(this.scope, clientMsgId);
    const before = this.entries.length;
    this.entries = this.entries.filter((e) => e.client_msg_id !== clientMsgId);
    if (this.entries.length !== before) this.onChange();
  }

  private take(clientMsgId: string): Waiter[] {
    const list = this.waiters.get(clientMsgId) ?? [];
    this.waiters.delete(clientMsgId);
    return list;
  }
}

function clearedError(): CourierError {
  return new CourierError("closed", "this device's data was deleted (a sign-out): the message was not sent");
}
