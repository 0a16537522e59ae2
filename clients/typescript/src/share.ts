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
 *
 * An owner that cannot send gives the lock up, and asks for it again once it can: a client
 * paused (`pause`, or `replaced`), and a page the browser freezes (`freeze`: its scripts stop,
 * and a lock it holds is held until it resumes, maybe never, if it is discarded) or keeps in
 * its back/forward cache (`pagehide` with `persisted`). A page that is hidden hands the lock
 * over to a client waiting for it (a visible tab, or one still running): a hidden page may be
 * frozen, or suspended without a word (Safari), at any time after. Sending is idempotent by
 * `client_msg_id`, so an entry in flight when its owner gave up, sent again by the next owner, is
 * answered as a duplicate. A page frozen or cached withdraws its own request too: granted the
 * lock while it cannot run, it would hold it unused.
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
  query?(): Promise<{ pending?: { name?: string }[] }>;
}

/** Why a client does not ask for the outbox: its connection is paused (`pause`, `replaced`),
 * or its page is frozen or in the back/forward cache. */
export type ShareHold = "client" | "page";

/** What a page tells of its lifecycle (`watchPage`). */
export interface PageWatch {
  /** Frozen, or kept in the back/forward cache: no script runs until `running`. */
  stopped(): void;
  running(): void;
  /** Hidden (it may be frozen or suspended from now on without a word). */
  hidden(): void;
}

export class OutboxShare {
  private ownsOutbox = false;
  private closed = false;
  private readonly channel: BroadcastChannel;
  /** The request for the lock, or the lock held: `abort` withdraws the one, `release` gives
   * the other up. */
  private asked: { abort: AbortController; release?: () => void } | undefined;
  private readonly holds = new Set<ShareHold>();
  private readonly unwatch: () => void;

  /** Asks for the lock at once; `onOwned` is called once it is granted, `onNews` with what
   * the other clients tell. `watch` reports the page's lifecycle (`watchPage` by default). */
  constructor(
    private readonly name: string,
    private readonly locks: Locks,
    private readonly onOwned: () => void,
    onNews: (news: ShareNews) => void,
    watch: (page: PageWatch) => () => void = watchPage,
  ) {
    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (event: MessageEvent<ShareNews>) => onNews(event.data);
    this.unwatch = watch({
      stopped: () => this.pause("page"),
      running: () => this.resume("page"),
      hidden: () => void this.handOver(),
    });
    this.ask();
  }

  /** Whether this client sends the outbox. */
  get owns(): boolean {
    return this.ownsOutbox;
  }

  tell(news: ShareNews): void {
    if (!this.closed) this.channel.postMessage(news);
  }

  /** This client cannot send for now (`why`): it gives the outbox up to the next client, and
   * asks for it again once resumed for every reason it was paused for. */
  pause(why: ShareHold): void {
    this.holds.add(why);
    this.giveUp();
  }

  resume(why: ShareHold): void {
    if (this.holds.delete(why)) this.ask();
  }

  /** Gives the outbox up to the next client (and asks for it no more). */
  close(): void {
    this.closed = true;
    this.giveUp();
    this.unwatch();
    this.channel.close();
  }

  private ask(): void {
    if (this.closed || this.asked || this.holds.size > 0) return;
    const asked: { abort: AbortController; release?: () => void } = { abort: new AbortController() };
    this.asked = asked;
    this.locks
      .request(this.name, { signal: asked.abort.signal }, () => {
        // Given up while the grant was on its way: the lock goes to the next at once.
        if (this.asked !== asked) return Promise.resolve();
        this.ownsOutbox = true;
        this.onOwned();
        return new Promise<void>((release) => (asked.release = release));
      })
      // Withdrawn before it was granted.
      .catch(() => {});
  }

  /** Withdraws the request for the lock, or gives the lock up. */
  private giveUp(): void {
    const asked = this.asked;
    this.asked = undefined;
    this.ownsOutbox = false;
    asked?.abort.abort();
    asked?.release?.();
  }

  /** The page is hidden: an owner that another client waits for gives the lock to it, and
   * asks again after it. */
  private async handOver(): Promise<void> {
    if (!this.ownsOutbox || !this.locks.query) return;
    const { pending = [] } = await this.locks.query().catch(() => ({ pending: [] }));
    if (!this.ownsOutbox || !pending.some((request) => request.name === this.name)) return;
    this.giveUp();
    this.ask();
  }
}

/** Watches this host's page (none in Node): `freeze` and `resume` (Chromium's Page
 * Lifecycle), `pagehide` and `pageshow` of the back/forward cache (`persisted`), and
 * `visibilitychange` to hidden. Returns what stops watching. */
export function watchPage(page: PageWatch): () => void {
  const host = globalThis as { document?: Document; addEventListener?: Window["addEventListener"] };
  const document = host.document;
  if (!document || typeof host.addEventListener !== "function") return () => {};
  const window = globalThis as unknown as Window;
  const cached = (handler: () => void) => (event: PageTransitionEvent) => event.persisted && handler();
  const onPageHide = cached(() => page.stopped());
  const onPageShow = cached(() => page.running());
  const onFreeze = () => page.stopped();
  const onResume = () => page.running();
  const onVisibility = () => document.visibilityState === "hidden" && page.hidden();
  window.addEventListener("pagehide", onPageHide);
  window.addEventListener("pageshow", onPageShow);
  document.addEventListener("freeze", onFreeze);
  document.addEventListener("resume", onResume);
  document.addEventListener("visibilitychange", onVisibility);
  return () => {
    window.removeEventListener("pagehide", onPageHide);
    window.removeEventListener("pageshow", onPageShow);
    document.removeEventListener("freeze", onFreeze);
    document.removeEventListener("resume", onResume);
    document.removeEventListener("visibilitychange", onVisibility);
  };
}

/** The Web Locks and `BroadcastChannel` of this host, when it has both. */
export function hostLocks(): Locks | undefined {
  const locks = (globalThis as { navigator?: { locks?: Locks } }).navigator?.locks;
  return locks && typeof BroadcastChannel === "function" ? locks : undefined;
}
