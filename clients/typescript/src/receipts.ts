/**
 * The other members' receipts, kept in the device's storage (when it can keep them) so that a
 * new client over the same storage shows the ticks the last one showed at once: the server
 * sends a `receipt` only when a member's cursors move (never again on a catch-up), and what
 * moved while no client of the device was connected is read back over HTTP
 * (`CourierClient.refreshReceipts`) only for the conversations that need it.
 *
 * Writes are coalesced: the receipts that change while a write is under way go in the next
 * one, each with its latest cursors. The receipts of a conversation the server no longer lists
 * for this user (a group it left) are deleted (`forgetUnlisted`), so the storage holds no more
 * than the user's conversations.
 */
import type { OutboxStorage, StoredReceipt } from "./storage.js";

export class SavedReceipts {
  /** Loaded and not yet handed to a conversation, by conversation. */
  private readonly loaded = new Map<string, StoredReceipt[]>();
  /** To write, by `conversation user`. */
  private readonly dirty = new Map<string, StoredReceipt>();
  /** The write under way. */
  private writing: Promise<void> | undefined;
  /** Set by `clear`: nothing is written any more. */
  private cleared = false;
  /** The conversations with receipts in the storage, each with the number of the last save
   * of one of its receipts (`saves` then). */
  private readonly stored = new Map<string, number>();
  private saves = 0;

  /** Called when a write fails (the receipts stay known to this client). */
  onError: (error: unknown) => void = () => {};

  private constructor(
    private readonly storage: OutboxStorage,
    private readonly scope: string,
  ) {}

  /** Loads the scope's receipts (none when the storage keeps none). */
  static async open(storage: OutboxStorage, scope: string): Promise<SavedReceipts> {
    const saved = new SavedReceipts(storage, scope);
    const rows = storage.loadReceipts && storage.putReceipts ? await storage.loadReceipts(scope) : [];
    for (const row of rows) {
      saved.stored.set(row.conversation_id, 0);
      const list = saved.loaded.get(row.conversation_id) ?? [];
      list.push(row);
      saved.loaded.set(row.conversation_id, list);
    }
    return saved;
  }

  /** The loaded receipts of a conversation, once: when the client first knows it. */
  take(conversationId: string): StoredReceipt[] {
    const list = this.loaded.get(conversationId) ?? [];
    this.loaded.delete(conversationId);
    return list;
  }

  /** Writes a member's latest cursors (soon, with the others that change meanwhile). */
  save(receipt: StoredReceipt): void {
    if (!this.storage.putReceipts || this.cleared) return;
    this.stored.set(receipt.conversation_id, ++this.saves);
    this.dirty.set(`${receipt.conversation_id} ${receipt.user}`, { ...receipt });
    this.writing ??= this.write();
  }

  /** The conversations with stored receipts now, to pass to `forgetUnlisted` once the list of
   * the user's conversations asked for after this call has come. */
  storedNow(): ReadonlyMap<string, number> {
    return new Map(this.stored);
  }

  /** Deletes the receipts of the conversations of `before` (a `storedNow`) that `listed` does
   * not hold, unless one of their receipts was saved since (a conversation newer than the
   * list). */
  forgetUnlisted(before: ReadonlyMap<string, number>, listed: ReadonlySet<string>): void {
    const gone = [...before]
      .filter(([id, save]) => !listed.has(id) && this.stored.get(id) === save)
      .map(([id]) => id);
    if (gone.length === 0 || !this.storage.deleteReceipts || this.cleared) return;
    for (const id of gone) {
      this.stored.delete(id);
      this.loaded.delete(id);
    }
    this.storage.deleteReceipts(this.scope, gone).catch((error: unknown) => this.onError(error));
  }

  /** Writes nothing more (a sign-out), once the write under way has ended; resolves with the
   * conversations that have receipts in the storage, for the caller to delete. */
  async clear(): Promise<string[]> {
    this.cleared = true;
    this.dirty.clear();
    this.loaded.clear();
    await this.writing;
    return [...this.stored.keys()];
  }

  private async write(): Promise<void> {
    try {
      // Receipts of the same turn (a flush of many at once) join the first write.
      await Promise.resolve();
      while (this.dirty.size > 0) {
        const batch = [...this.dirty.values()];
        this.dirty.clear();
        try {
          await this.storage.putReceipts!(this.scope, batch);
        } catch (error) {
          this.onError(error);
        }
      }
    } finally {
      this.writing = undefined;
    }
  }
}
