/**
 * Where the outbox keeps the messages that have no `sent` yet, so that they survive a
 * page reload or a restart: in memory (Node, tests) or IndexedDB (browsers). One storage
 * holds one device's outbox; the client opens it with a scope of `user/device`.
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
}

export interface OutboxStorage {
  /** Every entry of the scope, oldest first. */
  load(scope: string): Promise<OutboxEntry[]>;
  put(scope: string, entry: OutboxEntry): Promise<void>;
  delete(scope: string, clientMsgId: string): Promise<void>;
}

function byAge(a: OutboxEntry, b: OutboxEntry): number {
  return a.position - b.position;
}

/** Kept as long as the process (or the object) lives. */
export class MemoryOutboxStorage implements OutboxStorage {
  private readonly scopes = new Map<string, Map<string, OutboxEntry>>();

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
}

const STORE = "outbox";

/** IndexedDB database `name` (default `courier`), object store `outbox` keyed by
 * `[scope, client_msg_id]`. */
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
