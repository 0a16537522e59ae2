/**
 * Where the outbox keeps the messages that have no `sent` yet, so that they survive a
 * page reload or a restart: in memory (Node, tests) or IndexedDB (browsers). One storage
 * holds one device's outbox; the client opens it with a scope of `user/device`. Beside it,
 * a storage may keep the other members' receipts last seen: the server sends a receipt only
 * when a member's cursors move, never again on a catch-up, so without them a reload would
 * show every earlier message of one's own as `sent`.
 */
import type { Body } from "./protocol.js";

/** A message waiting for its `sent`. */
export interface OutboxEntry {
  client_msg_id: string;
  /** Exactly one of the two, as in the `send` frame. */
  conversation_id?: string;
  to_user?: string;
  body: Body;
  reply_to?: number;
  /** Local time of the `send` call, for display. */
  created_ms: number;
  /** The order of the outbox: increasing with each `send`, across reloads too. */
  position: number;
  /** Set when the server refused the message for good (the code and message). */
  failed?: { code: string; message: string };
  /** A file `sendMedia` wrote while it waits for its upload (which happens when the entry's
   * turn comes, online): until then the body's `media_id` and `sha256` are empty, and the
   * storage keeps the bytes with the entry (IndexedDB and `MemoryOutboxStorage` keep a
   * `Blob` as it is; a storage of one's own must too). */
  upload?: { data: Blob | Uint8Array; mime: string };
}

/** Another member's cursors in a conversation, as its latest `receipt` said. */
export interface StoredReceipt {
  conversation_id: string;
  user: string;
  delivered_seq: number;
  read_seq: number;
}

export interface OutboxStorage {
  /** Every entry of the scope, oldest first. */
  load(scope: string): Promise<OutboxEntry[]>;
  put(scope: string, entry: OutboxEntry): Promise<void>;
  delete(scope: string, clientMsgId: string): Promise<void>;
  /** Optional (both or neither): the receipts of the scope, and writing some (each one
   * replaces the one of its conversation and user). A storage without them forgets the
   * receipts on a reload. */
  loadReceipts?(scope: string): Promise<StoredReceipt[]>;
  putReceipts?(scope: string, receipts: StoredReceipt[]): Promise<void>;
  /** Optional: deletes every receipt of these conversations in the scope. A storage without
   * it keeps the receipts of the conversations this user left. */
  deleteReceipts?(scope: string, conversationIds: string[]): Promise<void>;
  /** Optional: deletes everything of the scope, its outbox and its receipts (a sign-out,
   * `CourierClient.forget`). Without it, the client deletes the entries and receipts it knows
   * of one by one. */
  clear?(scope: string): Promise<void>;
  /** Optional, for a storage that several clients use at once (the tabs of a browser share
   * IndexedDB): the name of the Web Lock (`navigator.locks`) whose holder alone sends the
   * scope's outbox, and of the `BroadcastChannel` on which the clients tell each other what
   * became of its entries. Without it (or without Web Locks) each client sends every entry
   * it lists. */
  lockName?(scope: string): string;
}

function byAge(a: OutboxEntry, b: OutboxEntry): number {
  return a.position - b.position;
}

/** Kept as long as the process (or the object) lives. */
export class MemoryOutboxStorage implements OutboxStorage {
  private readonly scopes = new Map<string, Map<string, OutboxEntry>>();
  private readonly receipts = new Map<string, Map<string, StoredReceipt>>();

  async load(scope: string): Promise<OutboxEntry[]> {
    return [...(this.scopes.get(scope)?.values() ?? [])].map((e) => structuredClone(e)).sort(byAge);
  }

  async put(scope: string, entry: OutboxEntry): Promise<void> {
    let entries = this.scopes.get(scope);
    if (!entries) {
      entries = new Map();
      this.scopes.set(scope, entries);
    }
    entries.set(entry.client_msg_id, structuredClone(entry));
  }

  async delete(scope: string, clientMsgId: string): Promise<void> {
    this.scopes.get(scope)?.delete(clientMsgId);
  }

  async loadReceipts(scope: string): Promise<StoredReceipt[]> {
    return [...(this.receipts.get(scope)?.values() ?? [])].map((r) => structuredClone(r));
  }

  async putReceipts(scope: string, receipts: StoredReceipt[]): Promise<void> {
    let held = this.receipts.get(scope);
    if (!held) {
      held = new Map();
      this.receipts.set(scope, held);
    }
    for (const receipt of receipts) held.set(receiptKey(receipt), structuredClone(receipt));
  }

  async deleteReceipts(scope: string, conversationIds: string[]): Promise<void> {
    const held = this.receipts.get(scope);
    if (!held) return;
    const gone = new Set(conversationIds);
    for (const [key, receipt] of held) if (gone.has(receipt.conversation_id)) held.delete(key);
  }

  async clear(scope: string): Promise<void> {
    this.scopes.delete(scope);
    this.receipts.delete(scope);
  }
}

/** A receipt's key within its scope: conversation ids and user ids hold no space. */
function receiptKey(receipt: StoredReceipt): string {
  return `${receipt.conversation_id} ${receipt.user}`;
}

const STORE = "outbox";

/** The scope of a device's receipts in the object store: `#` is in no user or device id, so
 * it is no outbox's scope. */
function receiptScope(scope: string): string {
  return `${scope}#receipts`;
}

/** IndexedDB database `name` (default `courier`), object store `outbox` keyed by
 * `[scope, client_msg_id]`. The receipts share it, as rows `{scope: "<scope>#receipts",
 * id: "<conversation> <user>", receipt}`: a store of their own would take a schema upgrade,
 * which an open tab of an earlier version would block (the page would wait for its outbox). */
export class IndexedDbOutboxStorage implements OutboxStorage {
  private database: Promise<IDBDatabase> | undefined;

  constructor(
    private readonly name = "courier",
    private readonly factory: IDBFactory = globalThis.indexedDB,
  ) {
    if (!factory) throw new Error("IndexedDB is not available here: use MemoryOutboxStorage");
  }

  async load(scope: string): Promise<OutboxEntry[]> {
    const range = IDBKeyRange.bound([scope, ""], [scope, "\uffff"]);
    const rows = await this.run<{ scope: string; entry: OutboxEntry }[]>("readonly", (store) => store.getAll(range));
    return rows.map((row) => row.entry).sort(byAge);
  }

  async put(scope: string, entry: OutboxEntry): Promise<void> {
    await this.run("readwrite", (store) => store.put({ scope, id: entry.client_msg_id, entry }));
  }

  async delete(scope: string, clientMsgId: string): Promise<void> {
    await this.run("readwrite", (store) => store.delete([scope, clientMsgId]));
  }

  async loadReceipts(scope: string): Promise<StoredReceipt[]> {
    const key = receiptScope(scope);
    const range = IDBKeyRange.bound([key, ""], [key, "\uffff"]);
    const rows = await this.run<{ receipt: StoredReceipt }[]>("readonly", (store) => store.getAll(range));
    return rows.map((row) => row.receipt);
  }

  /** All in one transaction. */
  async putReceipts(scope: string, receipts: StoredReceipt[]): Promise<void> {
    if (receipts.length === 0) return;
    const key = receiptScope(scope);
    await this.run("readwrite", (store) => {
      let request!: IDBRequest;
      for (const receipt of receipts) request = store.put({ scope: key, id: receiptKey(receipt), receipt });
      return request;
    });
  }

  /** All in one transaction: a key range per conversation (`<conversation> <user>`). */
  async deleteReceipts(scope: string, conversationIds: string[]): Promise<void> {
    if (conversationIds.length === 0) return;
    const key = receiptScope(scope);
    await this.run("readwrite", (store) => {
      let request!: IDBRequest;
      for (const id of conversationIds) {
        request = store.delete(IDBKeyRange.bound([key, `${id} `], [key, `${id} \uffff`]));
      }
      return request;
    });
  }

  /** All in one transaction: the outbox's key range of the scope and its receipts'. */
  async clear(scope: string): Promise<void> {
    await this.run("readwrite", (store) => {
      store.delete(IDBKeyRange.bound([scope, ""], [scope, "\uffff"]));
      const key = receiptScope(scope);
      return store.delete(IDBKeyRange.bound([key, ""], [key, "\uffff"]));
    });
  }

  /** Every tab of the origin shares the database: one at a time sends a scope's outbox. */
  lockName(scope: string): string {
    return `courier-outbox ${this.name} ${scope}`;
  }

  private open(): Promise<IDBDatabase> {
    this.database ??= new Promise((resolve, reject) => {
      const request = this.factory.open(this.name, 1);
      request.onupgradeneeded = () => {
        request.result.createObjectStore(STORE, { keyPath: ["scope", "id"] });
      };
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
    return this.database;
  }

  /** Runs one request in its own transaction and resolves once the transaction commits. */
  private async run<T>(mode: IDBTransactionMode, work: (store: IDBObjectStore) => IDBRequest): Promise<T> {
    const database = await this.open();
    return new Promise<T>((resolve, reject) => {
      const transaction = database.transaction(STORE, mode);
      const request = work(transaction.objectStore(STORE));
      transaction.oncomplete = () => resolve(request.result as T);
      transaction.onerror = () => reject(transaction.error);
      transaction.onabort = () => reject(transaction.error);
    });
  }
}
