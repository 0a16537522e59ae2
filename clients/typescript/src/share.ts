/**
 * An outbox that several clients share at once (the tabs of a browser share IndexedDB:
 * `OutboxStorage.lockName`) is sent by one of them at a time, the one holding the Web Lock of
 * that name (`navigator.locks`). Each client writes its own entries to the storage and tells
 * the others on a `BroadcastChannel` of the same name what it changed (an entry added,
 * retried, discarded); the owner tells what became of each entry (stored, refused), and every
 * client that lists the entry takes that. When the owner closes (or its tab does), the lock
 * passes to another client, which loads the outbox from the storage and sends what is left.
 * Without it each tab sent every entry it had loaded, and a reload or a second tab sent again
 * what another was sending (the server answered duplicates, and each tab listed what another
 * had sent as unsent until it was reloaded).
 */
import type { Sent } from "./protocol.js";
import type { OutboxEntry } from "./storage.js";

/** What a client tells the others of a shared outbox. */
export type ShareNews =
  | { kind: "added"; entry: OutboxEntry }
  | { kind: "stored"; sent: Sent }
  | { kind: "failed"; client_msg_id: string; failed: { code: string; message: string } }
  | { kind: "retried"; client_msg_id: string }
  | { kind: "discarded"; client_msg_id: string }
  /** A client deleted the outbox (`forget`, a sign-out): what the others list of it is gone. */
  | { kind: "cleared" };

/** The part of the Web Locks API this uses. */
export interface Locks {
  request(name: string, options: { signal: AbortSignal }, granted: () => Promise<void>): Promise<unknown>;
}

export class OutboxShare {
  private ownsOutbox = false;
  private readonly channel: BroadcastChannel;
  private readonly closing = new AbortController();
  private release: (() => void) | undefined;

  /** Asks for the lock at once; `onOwned` is called once it is granted, `onNews` with what
   * the other clients tell. */
  constructor(name: string, locks: Locks, onOwned: () => void, onNews: (news: ShareNews) => void) {
    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (event: MessageEvent<ShareNews>) => onNews(event.data);
    locks
      .request(name, { signal: this.closing.signal }, () => {
        this.ownsOutbox = true;
        onOwned();
        return new Promise<void>((release) => (this.release = release));
      })
      // Aborted by `close` before it was granted.
      .catch(() => {});
  }

  /** Whether this client sends the outbox. */
  get owns(): boolean {
    return this.ownsOutbox;
  }

  tell(news: ShareNews): void {
    if (!this.closing.signal.aborted) this.channel.postMessage(news);
  }

  /** Gives the outbox up to the next client (and asks for it no more). */
  close(): void {
    this.ownsOutbox = false;
    this.closing.abort();
    this.release?.();
    this.channel.close();
  }
}

/** The Web Locks and `BroadcastChannel` of this host, when it has both. */
export function hostLocks(): Locks | undefined {
  const locks = (globalThis as { navigator?: { locks?: Locks } }).navigator?.locks;
  return locks && typeof BroadcastChannel === "function" ? locks : undefined;
}
