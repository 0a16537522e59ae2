/**
 * `CourierClient`: one device of one user. It keeps a connection open (reconnecting with
 * backoff and jitter, or after the delay a draining server asks for with `reconnect`), sends
 * the outbox in order and retries with the same `client_msg_id`, keeps each conversation's
 * timeline ordered and complete (fetching gaps), acknowledges what it holds, and tracks
 * receipts and typing. Views subscribe with `on(...)` and read the state back.
 */
import { Acknowledgements } from "./acks.js";
import { Backoff, askedDelayMs, sleep, type BackoffOptions } from "./backoff.js";
import type { Connection, WebSocketConstructor } from "./connection.js";
import { Conversation, type MessageStatus } from "./conversation.js";
import { Emitter, reportToHost } from "./emitter.js";
import { CourierError, badInput } from "./errors.js";
import { DEFAULT_MAX_DOWNLOAD_BYTES, HttpApi, type ByteRange, type MediaDownload } from "./http.js";
import { identityOf, newClientMsgId, type Identity } from "./identity.js";
import { Link, type ConnectionState, type Session, type TokenProbe } from "./link.js";
import { Outbox, sizeOf } from "./outbox.js";
import {
  DEFAULT_MAX_FRAME_BYTES,
  MAX_FETCH_LIMIT,
  isClientMsgId,
  isConversationId,
  isMediaType,
  isSeq,
  isUserId,
  type Body,
  type ConversationEvent,
  type MediaBody,
  type Messages,
  type Receipt,
  type Sent,
  type ServerFrame,
} from "./protocol.js";
import { SavedReceipts } from "./receipts.js";
import { OutboxSender, tooLargeError } from "./sender.js";
import { OutboxShare, hostLocks, type ShareNews } from "./share.js";
import { IndexedDbOutboxStorage, MemoryOutboxStorage, type OutboxEntry, type OutboxStorage } from "./storage.js";

export type { ConnectionState } from "./link.js";

export interface CourierClientOptions {
  /** The server's HTTP base URL, e.g. `http://127.0.0.1:8080` (WebSocket: the same host). */
  url: string;
  /** A token, or a function that returns a fresh one for each connection. */
  token: string | (() => string | Promise<string>);
  /** The WebSocket implementation (default: the global one; on Node 20 pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** Where the outbox, and the other members' receipts last seen, live (default: IndexedDB
   * when present, else memory). */
  storage?: OutboxStorage;
  fetch?: typeof fetch;
  backoff?: BackoffOptions;
  /** Longest wait for `hello`, a reply, or the answer to a request of the HTTP API but
   * media (default 30 s). */
  replyTimeoutMs?: number;
  /** Idle time between pings that check the connection is alive (default 25 s). */
  heartbeatMs?: number;
  /** The server's limit on one frame, in bytes (default 65536, the server's default,
   * `--max-frame-bytes`). A message whose `send` frame is larger is refused by `send` with
   * `too_large` and never enters the outbox. */
  maxFrameBytes?: number;
  /** The most bytes of files `sendMedia` keeps in the outbox waiting for their upload
   * (default [`DEFAULT_MAX_QUEUED_UPLOAD_BYTES`]): a `sendMedia` while they hold as much or
   * more is refused with `unavailable`. One file of any size is taken when none waits. */
  maxQueuedUploadBytes?: number;
  /** The most bytes one `downloadMedia` takes (default [`DEFAULT_MAX_DOWNLOAD_BYTES`], 100 MiB,
   * the server's default upload limit): it holds them all in memory. A larger download (a file,
   * or a range of it) is refused with `too_large`. */
  maxDownloadBytes?: number;
}

/** The default of `maxQueuedUploadBytes`: 100 MiB, the server's default limit on one upload
 * (`--media-max-bytes`). */
export const DEFAULT_MAX_QUEUED_UPLOAD_BYTES = 100 * 1024 * 1024;

/** What a client reports; each name carries the value listed. */
export interface ClientEvents extends Record<string, unknown> {
  state: ConnectionState;
  /** The catch-up after a (re)connection is complete. */
  synced: void;
  /** A new event, from the connection or a fetch; a conversation's in seq order (one above
   * a gap waits until the gap is fetched), but for older history `loadHistory` loads. */
  event: ConversationEvent;
  /** A conversation's timeline, receipts or outbox entries changed. */
  timeline: string;
  /** The list of conversations changed. */
  conversations: void;
  /** The outbox changed: an entry was added, stored, refused, retried or discarded. */
  outbox: void;
  typing: string;
  /** A conversation's history on the server is not what this client held from `seq` up: an
   * event came at a seq held with another `server_msg_id` (a server restored from a backup
   * gives the seqs sent after the backup to new messages; PROTOCOL.md has no epoch to say so).
   * The held events from `seq` up are dropped for the server's (also gone from the server,
   * and their deletes of earlier messages with them: see the README). */
  diverged: { conversation_id: string; seq: number };
  /** An error nobody awaits: a refused token, an `error` without a request, a listener of
   * another event that threw (`internal`). */
  error: CourierError;
}

/** Whom a message goes to: an existing conversation, or the direct one with a user. */
export type Target = { conversationId: string } | { toUser: string };

const HISTORY_PAGE = 50;
/** The default of `replyTimeoutMs`. */
const DEFAULT_REPLY_TIMEOUT_MS = 30_000;
/** The widest fields an upload gives a media body, to check and measure its message before
 * the upload: a media id is at most 128 characters, a SHA-256 64 hex digits. */
const WIDEST_UPLOAD = { media_id: "m".repeat(128), sha256: "0".repeat(64) };
/** The waits between the fetches of a gap, or the read-backs of receipts, the server refuses
 * for a while (`unavailable`, `rate_limited`, at least its `retry_after_ms`) or does not
 * answer. */
const GAP_RETRY = { baseMs: 500, maxMs: 30_000 };
/** The failures of a gap fetch or a receipts read-back that it waits out; `closed` is the
 * next catch-up's. */
const GAP_WAITS_OUT = new Set<CourierError["code"]>(["unavailable", "rate_limited", "timeout"]);

export class CourierClient {
  readonly user: string;
  readonly device: string;
  readonly http: HttpApi;
  private readonly emitter = new Emitter<ClientEvents>((name, error) => this.listenerFailed(name, error));
  private readonly conversationsById = new Map<string, Conversation>();
  private readonly link: Link;
  private readonly acks: Acknowledgements;
  private readonly sender: OutboxSender;
  private synced = false;
  private syncWaiters: { resolve: () => void; reject: (error: CourierError) => void }[] = [];
  /** Why the client stopped for good (a refused token, `close`): `whenSynced` rejects with it. */
  private stoppedWith: CourierError | undefined;
  /** A read-back of receipts is under way, and a catch-up since asks for another pass. */
  private readingBack = false;
  private readBackAgain = false;
  /** Conversations whose receipts the server does not list for this user (a group whose
   * receipts go to the senders they cover only, one this user left): not asked again. */
  private readonly receiptsUnlisted = new Set<string>();
  /** Per conversation, the new events above a hole, held back from the `event` listeners
   * until it is filled (`tellInOrder`); they are in the timeline meanwhile. */
  private readonly heldBack = new Map<string, ConversationEvent[]>();
  /** The retention floors (`trimmed`) of conversations the client does not know, until the
   * next list of conversations: taken by the conversation when it is made (a new device's
   * catch-up of one whose events were all trimmed), dropped with the rest by the list (one of
   * a conversation it does not hold is not the user's). */
  private readonly unknownFloors = new Map<string, number>();
  /** Gap fetches in flight or waiting to be tried again, as `conversation/after`. */
  private readonly gapsFetching = new Set<string>();
  /** Aborted by `close`: ends the waits of gap fetches to try again. */
  private readonly closing = new AbortController();
  private summariesLoading: Promise<void> | undefined;
  private readonly maxFrameBytes: number;
  private readonly maxQueuedUploadBytes: number;
  /** Set for an outbox other clients share (the tabs of a browser): this client sends it
   * only while it owns it. */
  private share: OutboxShare | undefined;

  private constructor(
    identity: Identity,
    private readonly options: CourierClientOptions,
    private readonly storage: OutboxStorage,
    private readonly outbox: Outbox,
    private readonly savedReceipts: SavedReceipts,
  ) {
    this.user = identity.user;
    this.device = identity.device;
    this.http = new HttpApi(
      baseUrl(options.url),
      () => this.token(),
      options.fetch,
      options.replyTimeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS,
      options.maxDownloadBytes ?? DEFAULT_MAX_DOWNLOAD_BYTES,
    );
    const WebSocketImpl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WebSocketImpl) {
      throw badInput("no global WebSocket here (Node 20): pass one, e.g. `WebSocket` from the `ws` package");
    }
    this.maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    if (!(this.maxFrameBytes > 0)) throw badInput("maxFrameBytes must be positive");
    this.maxQueuedUploadBytes = options.maxQueuedUploadBytes ?? DEFAULT_MAX_QUEUED_UPLOAD_BYTES;
    if (!(this.maxQueuedUploadBytes > 0)) throw badInput("maxQueuedUploadBytes must be positive");
    if (!(this.http.maxDownloadBytes > 0)) throw badInput("maxDownloadBytes must be positive");
    this.link = new Link(
      {
        WebSocketImpl,
        websocketUrl: websocketUrl(options.url),
        token: () => this.token(),
        backoff: new Backoff(options.backoff),
        replyTimeoutMs: options.replyTimeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS,
        heartbeatMs: options.heartbeatMs ?? 25_000,
        probe: () => this.probeToken(),
      },
      {
        onOnline: () => {
          void this.sender.flush();
          this.acks.online();
        },
        onFrame: (session, frame) => this.onFrame(session, frame),
        onState: (state) => {
          if (state !== "online") this.synced = false;
          this.emitter.emit("state", state);
          // A catch-up that came with `hello`, before the connection was online, is told now.
          if (state === "online") this.caughtUp();
        },
        onRefused: (error) => {
          this.stop(error);
          this.emitter.emit("error", error);
        },
        onReplaced: (error) => {
          // Paused until `resume`: another tab of the device sends the shared outbox meanwhile.
          this.share?.pause("client");
          this.emitter.emit("error", error);
        },
        onBroken: (session, error, frame) => {
          if (frame.type === "event") this.eventPassedOver(session, frame);
          this.emitter.emit("error", error);
        },
      },
    );
    this.acks = new Acknowledgements(() => this.link.session);
    this.sender = new OutboxSender(outbox, identity, {
      session: () => (!this.share || this.share.owns ? this.link.session : undefined),
      maxFrameBytes: this.maxFrameBytes,
      onStored: (entry, sent) => this.ownStored(entry, sent),
      onRefused: (entry, error) => {
        const failed = { code: error.code, message: error.message };
        this.share?.tell({ kind: "failed", client_msg_id: entry.client_msg_id, failed });
        if (entry.conversation_id) this.emitter.emit("timeline", entry.conversation_id);
        this.emitter.emit("error", error);
      },
      onError: (error) => this.report(error),
      closing: this.closing.signal,
      upload: (data, mime, signal) => this.http.uploadMedia(data, mime, signal),
    });
    outbox.onChange = () => this.emitter.emit("outbox", undefined);
    outbox.onSettled = (sent) => this.share?.tell({ kind: "stored", sent });
    outbox.onError = (error) => this.report(error);
    savedReceipts.onError = (error) => this.report(error);
  }

  /** Opens the device's outbox and starts connecting; resolves before the connection is up
   * (sends made meanwhile wait in the outbox). */
  static async open(options: CourierClientOptions): Promise<CourierClient> {
    const identity = identityOf(await resolveToken(options.token));
    const storage: OutboxStorage =
      options.storage ??
      ((globalThis as { indexedDB?: IDBFactory }).indexedDB ? new IndexedDbOutboxStorage() : new MemoryOutboxStorage());
    const scope = `${identity.user}/${identity.device}`;
    const outbox = await Outbox.open(storage, scope);
    const savedReceipts = await SavedReceipts.open(storage, scope);
    const client = new CourierClient(identity, options, storage, outbox, savedReceipts);
    const locks = hostLocks();
    const lockName = storage.lockName?.(scope);
    if (locks && lockName) {
      client.share = new OutboxShare(
        lockName,
        locks,
        () => void client.takeOutbox(scope),
        (news) => client.onShareNews(news),
      );
    }
    client.link.start();
    return client;
  }

  on<K extends keyof ClientEvents>(name: K, listener: (value: ClientEvents[K]) => void): () => void {
    return this.emitter.on(name, listener);
  }

  get state(): ConnectionState {
    return this.link.state;
  }

  /** Resolves once the current (or next) connection has had its catch-up; rejects once the
   * client has stopped for good before that: with the server's refusal of the token
   * (`unauthorized`, `forbidden`), or `closed` after `close`. */
  whenSynced(): Promise<void> {
    if (this.synced) return Promise.resolve();
    if (this.stoppedWith) return Promise.reject(this.stoppedWith);
    return new Promise((resolve, reject) => this.syncWaiters.push({ resolve, reject }));
  }

  // ---- conversations -----------------------------------------------------------------

  /** Known conversations, the most recently active first. */
  conversations(): Conversation[] {
    const latest = (c: Conversation) => c.timeline.get(c.timeline.highestSeq)?.ts_ms ?? 0;
    return [...this.conversationsById.values()].sort((a, b) => latest(b) - latest(a) || b.headSeq - a.headSeq);
  }

  conversation(conversationId: string): Conversation | undefined {
    return this.conversationsById.get(conversationId);
  }

  /** Reloads the list of conversations (`GET /v1/conversations`), and deletes the saved
   * receipts of the conversations it no longer holds (groups this user left). */
  refreshConversations(): Promise<void> {
    this.summariesLoading ??= this.loadConversations().finally(() => {
      this.summariesLoading = undefined;
    });
    return this.summariesLoading;
  }

  private async loadConversations(): Promise<void> {
    const stored = this.savedReceipts.storedNow();
    const summaries = await this.http.conversations();
    for (const summary of summaries) this.conversationFor(summary.conversation_id).applySummary(summary);
    this.unknownFloors.clear();
    this.savedReceipts.forgetUnlisted(stored, new Set(summaries.map((summary) => summary.conversation_id)));
    this.emitter.emit("conversations", undefined);
  }

  /** Reads back every member's receipt cursors in a conversation (`GET
   * /v1/conversations/{id}/receipts`): the server sends a `receipt` only to the devices
   * connected when cursors move, and none on a catch-up. The client does it by itself after
   * each catch-up, for the conversations whose latest own message it holds is not yet read,
   * and when it loads a conversation's latest page. */
  async refreshReceipts(conversationId: string): Promise<void> {
    const receipts = await this.http.receipts(conversationId).catch((error: unknown) => {
      const unlisted = error instanceof CourierError && (error.code === "too_large" || error.code === "forbidden");
      if (unlisted) this.receiptsUnlisted.add(conversationId);
      throw error;
    });
    const conversation = this.conversationFor(conversationId);
    let moved = false;
    for (const receipt of receipts) {
      const never = receipt.delivered_seq === 0 && receipt.read_seq === 0;
      if (receipt.user !== this.user && !never && this.takeReceipt(conversation, receipt)) moved = true;
    }
    if (moved) this.emitter.emit("timeline", conversationId);
  }

  /** Loads up to `limit` events older than the oldest held (the latest ones when none is
   * held); resolves false when there is nothing older. */
  async loadHistory(conversationId: string, limit = HISTORY_PAGE): Promise<boolean> {
    checkConversation(conversationId);
    if (!isSeq(limit)) throw badInput(`limit must be a whole number of events from 1, not ${limit}`);
    const conversation = this.conversationFor(conversationId);
    const timeline = conversation.timeline;
    const lowest = timeline.lowestSeq;
    if (lowest !== undefined && !timeline.mayHaveOlder) return false;
    if (lowest === undefined && conversation.headSeq === 0) await this.refreshConversations();
    const before = lowest ?? conversation.headSeq + 1;
    const after = Math.max(timeline.floorSeq - 1, before - 1 - limit);
    if (before - 1 <= after) return false;
    await this.fetchRange(conversation, after, before - 1);
    if (lowest === undefined && this.awaitsReceipts(conversation)) {
      void this.readBack(conversation.id).catch((e) => this.report(e));
    }
    return true;
  }

  /** The ticks of a message of this user (`pending`/`failed` for outbox entries). */
  statusOf(conversationId: string, seq: number): MessageStatus {
    return this.conversationsById.get(conversationId)?.statusOf(seq) ?? "sent";
  }

  /** The outbox entries (not yet stored by the server) of a conversation, oldest first. */
  pending(conversationId: string): OutboxEntry[] {
    return this.outbox.list().filter((entry) => entry.conversation_id === conversationId);
  }

  /** Every outbox entry. */
  outboxEntries(): OutboxEntry[] {
    return this.outbox.list();
  }

  // ---- sending -----------------------------------------------------------------------

  /**
   * Writes a message to the outbox and resolves with its `sent` once the server has stored
   * it, however many reconnections that takes; rejects if the server refuses it for good
   * (the entry then stays in the outbox, failed, for `retry` or `discard`). A message whose
   * frame is over `maxFrameBytes` is refused at once with `too_large`, outside the outbox.
   */
  send(target: Target, body: Body, options: { replyTo?: number; clientMsgId?: string } = {}): Promise<Sent> {
    return this.enqueue(target, body, options);
  }

  /** `send`, for a body or a file to upload first (`sendMedia`: the body is checked and
   * measured as it will be once uploaded). */
  private async enqueue(
    target: Target,
    body: Body,
    options: { replyTo?: number; clientMsgId?: string },
    upload?: OutboxEntry["upload"],
  ): Promise<Sent> {
    const clientMsgId = options.clientMsgId ?? newClientMsgId();
    if (!isClientMsgId(clientMsgId)) throw badInput("client_msg_id must be 1 to 64 characters");
    const measured = upload && "media" in body ? { media: { ...body.media, ...WIDEST_UPLOAD } } : body;
    checkBody(measured);
    const entry: Omit<OutboxEntry, "position"> = { client_msg_id: clientMsgId, body, created_ms: Date.now() };
    if (upload) entry.upload = upload;
    if ("conversationId" in target) entry.conversation_id = checkConversation(target.conversationId);
    else if (isUserId(target.toUser)) entry.to_user = target.toUser;
    else throw badInput(`not a user id: ${JSON.stringify(target.toUser)}`);
    if (options.replyTo !== undefined) {
      if (!isSeq(options.replyTo)) throw badInput("replyTo must be the seq of a message (an integer from 1)");
      entry.reply_to = options.replyTo;
    }
    const tooLarge = tooLargeError({ ...entry, body: measured }, this.maxFrameBytes);
    if (tooLarge) throw tooLarge;
    try {
      const added = await this.outbox.add(entry);
      this.share?.tell({ kind: "added", entry: added });
    } catch (error) {
      // A later entry written meanwhile found this one ahead of it, still being written, and
      // was not sent: it is next now.
      void this.sender.flush();
      throw error;
    }
    // Waited for only once added: a refused add (a duplicate id, a storage error) leaves no
    // promise behind to reject unhandled later. Nothing settles the entry in between: its
    // reply or event comes from the network, after this continuation.
    const stored = this.outbox.wait(clientMsgId);
    if (entry.conversation_id) this.emitter.emit("timeline", entry.conversation_id);
    void this.sender.flush();
    return stored;
  }

  sendText(target: Target, text: string, options: { replyTo?: number } = {}): Promise<Sent> {
    return this.send(target, { text }, options);
  }

  /** Writes a file to the outbox as a media message and resolves with its `sent` once the
   * server has stored it: the file is uploaded when the entry's turn comes, online (a photo
   * chosen offline waits, and survives a reload with the outbox), then sent as any entry.
   * Refused at once with `unavailable` while the files waiting for their upload hold
   * `maxQueuedUploadBytes` or more; an upload the server refuses for good (`too_large`) leaves
   * the entry failed. */
  async sendMedia(
    target: Target,
    data: Blob | Uint8Array,
    mime: string,
    details: { name?: string; caption?: string } = {},
  ): Promise<Sent> {
    if (!isMediaType(mime)) throw badInput(`not a media type: ${JSON.stringify(mime)}`);
    const queued = this.outbox.uploadBytes();
    if (queued >= this.maxQueuedUploadBytes) {
      throw new CourierError(
        "unavailable",
        `${queued} bytes of files already wait for their upload (maxQueuedUploadBytes ${this.maxQueuedUploadBytes}): ` +
          "send this one once they have gone (or discard those marked failed)",
      );
    }
    const media: MediaBody = { media_id: "", mime, size: sizeOf(data), sha256: "" };
    if (details.name !== undefined) media.name = details.name;
    if (details.caption !== undefined) media.caption = details.caption;
    return this.enqueue(target, { media }, {}, { data, mime });
  }

  /** Sends a failed outbox entry again. */
  async retry(clientMsgId: string): Promise<Sent> {
    await this.outbox.retry(clientMsgId);
    this.share?.tell({ kind: "retried", client_msg_id: clientMsgId });
    const stored = this.outbox.wait(clientMsgId);
    void this.sender.flush();
    return stored;
  }

  /** Drops an outbox entry. */
  async discard(clientMsgId: string): Promise<void> {
    const entry = this.outbox.list().find((e) => e.client_msg_id === clientMsgId);
    await this.outbox.discard(clientMsgId);
    this.share?.tell({ kind: "discarded", client_msg_id: clientMsgId });
    if (entry?.conversation_id) this.emitter.emit("timeline", entry.conversation_id);
  }

  /** Deletes a message for everyone (needs a connection). */
  async delete(conversationId: string, seq: number): Promise<Sent> {
    checkConversation(conversationId);
    if (!isSeq(seq)) throw badInput("seq must be a positive integer");
    const sent = await this.online().request<Sent>({ type: "delete", conversation_id: conversationId, seq });
    const conversation = this.conversationFor(conversationId);
    this.addOwn(conversation, sent, { kind: "delete", target_seq: seq });
    return sent;
  }

  /** Says this user is typing (or stopped) in a conversation; dropped while offline, and in
   * a group this user left (`Conversation.left`: the server would refuse it, `forbidden`, an
   * error for every notice of someone typing there). */
  typing(conversationId: string, active: boolean): void {
    checkConversation(conversationId);
    if (typeof active !== "boolean") throw badInput("active is true or false");
    if (this.conversationsById.get(conversationId)?.left) return;
    this.link.session?.connection.send({ type: "typing", conversation_id: conversationId, active });
  }

  /** Marks the conversation read up to the latest event this device holds completely. */
  markRead(conversationId: string): void {
    const conversation = this.conversationsById.get(conversationId);
    if (conversation) this.acks.acknowledge(conversation, "read");
  }

  // ---- groups and media --------------------------------------------------------------

  /** Creates a group and loads its first events. */
  async createGroup(name: string, members: string[]): Promise<string> {
    const id = await this.http.createGroup(name, members);
    await this.refreshConversations();
    await this.loadHistory(id);
    return id;
  }

  addMembers(conversationId: string, users: string[]): Promise<void> {
    return this.http.addMembers(conversationId, users);
  }

  removeMember(conversationId: string, user: string): Promise<void> {
    return this.http.removeMember(conversationId, user);
  }

  downloadMedia(mediaId: string, range?: ByteRange): Promise<MediaDownload> {
    return this.http.downloadMedia(mediaId, range);
  }

  // ---- connection --------------------------------------------------------------------

  /** Closes the connection and connects no more until `resume` (e.g. while the browser
   * reports no network); sends wait in the outbox meanwhile (a shared outbox is given up to
   * another client, which sends it if it can). */
  pause(): void {
    this.share?.pause("client");
    this.link.pause();
  }

  /** Connects again after `pause` (or `replaced`), at once. */
  resume(): void {
    this.share?.resume("client");
    this.link.resume();
  }

  /** Skips the current backoff wait (e.g. when the browser says it is online again). */
  reconnectNow(): void {
    this.link.reconnectNow();
  }

  /** Closes the connection for good. */
  close(): void {
    this.share?.close();
    this.link.close();
    this.closing.abort();
    this.stop(new CourierError("closed", "the client was closed"));
  }

  /** The client connects no more: whoever waits for a catch-up is told why (the first
   * reason given). */
  private stop(reason: CourierError): void {
    this.stoppedWith ??= reason;
    this.syncWaiters.splice(0).forEach((waiter) => waiter.reject(this.stoppedWith!));
  }

  /**
   * Closes the client for good and deletes what its storage keeps of this device: the outbox
   * (its messages are never sent: their `send`s reject with `closed`) and the receipts kept
   * for the ticks. For a sign-out: without it the unsent messages stay on the computer, in
   * plain text, and the next client of the same user and device sends them.
   */
  async forget(): Promise<void> {
    // The outbox is given up to another client only once deleted: it would send what is left.
    const share = this.share;
    this.share = undefined;
    share?.tell({ kind: "cleared" });
    this.close();
    try {
      const entries = this.outbox.clear();
      const conversations = await this.savedReceipts.clear();
      const scope = `${this.user}/${this.device}`;
      if (this.storage.clear) return await this.storage.clear(scope);
      await Promise.all(entries.map((id) => this.storage.delete(scope, id)));
      await this.storage.deleteReceipts?.(scope, conversations);
    } finally {
      share?.close();
    }
  }

  /** This client now owns the shared outbox (`OutboxShare`): it takes in what the others
   * wrote before (or a client closed with unsent) and sends it. */
  private async takeOutbox(scope: string): Promise<void> {
    try {
      this.outbox.adopt(await this.storage.load(scope));
    } catch (error) {
      this.report(error);
    }
    void this.sender.flush();
  }

  /** What another client of the shared outbox did: its new entries are listed here too (and
   * sent if this client owns the outbox), and what became of an entry is taken by whoever
   * lists it. */
  private onShareNews(news: ShareNews): void {
    switch (news.kind) {
      case "added":
        this.outbox.adopt([news.entry]);
        void this.sender.flush();
        break;
      case "stored":
        this.outbox.storedElsewhere(news.sent, (entry) => this.ownStored(entry, news.sent));
        break;
      case "failed":
      case "retried":
        this.outbox.markedElsewhere(news.client_msg_id, news.kind === "failed" ? news.failed : undefined);
        void this.sender.flush();
        break;
      case "discarded":
        this.outbox.discardedElsewhere(news.client_msg_id);
        break;
      case "cleared":
        this.outbox.clearedElsewhere();
        break;
    }
  }

  /** Whether the server refuses the token for good, which no retry would fix: `unauthorized`
   * (expired, or its device unlinked) or `forbidden` (a new device past its user's limit of
   * devices, until one is unlinked). A browser cannot see the HTTP status of a refused
   * upgrade, so an HTTP request with the same token tells; the link says when to ask. One
   * with no answer within `replyTimeoutMs` (`timeout`) counts as not reaching the server. */
  private async probeToken(): Promise<TokenProbe> {
    try {
      await this.http.devices();
      return { reached: true };
    } catch (probe) {
      if (!(probe instanceof CourierError)) return { reached: false };
      if (probe.code === "unauthorized" || probe.code === "forbidden") return { refused: probe, reached: true };
      // An HTTP status came back (a proxy's 502 too): the server, or what fronts it, is up.
      return { reached: probe.status !== undefined };
    }
  }

  private online(): Connection {
    const connection = this.link.session?.connection;
    if (!connection) throw new CourierError("closed", "not connected");
    return connection;
  }

  private token(): Promise<string> {
    return resolveToken(this.options.token);
  }

  // ---- frames ------------------------------------------------------------------------

  private onFrame(session: Session, frame: ServerFrame): void {
    switch (frame.type) {
      case "event": {
        const { type: _type, ...event } = frame;
        this.onStreamedEvent(session, event);
        break;
      }
      // A receipt or typing notice of a conversation the client does not know is passed over:
      // a conversation appears from its events or the list of conversations, not from these
      // (a phantom entry, named by its id, with nothing in it). Its receipts are read back
      // once its latest page is loaded (`loadHistory`).
      case "receipt": {
        const conversation = this.conversationsById.get(frame.conversation_id);
        if (conversation && this.takeReceipt(conversation, frame)) this.emitter.emit("timeline", frame.conversation_id);
        break;
      }
      case "typing": {
        const conversation = this.conversationsById.get(frame.conversation_id);
        if (!conversation) break;
        conversation.setTyping(frame.user, frame.active, Date.now());
        this.emitter.emit("typing", frame.conversation_id);
        break;
      }
      case "trimmed": {
        // One of a conversation the client does not know waits for the list to say it is the
        // user's (a conversation is not made up of it, as of a receipt).
        const conversation = this.conversationsById.get(frame.conversation_id);
        if (!conversation) {
          const floor = Math.max(frame.floor_seq, this.unknownFloors.get(frame.conversation_id) ?? 0);
          this.unknownFloors.set(frame.conversation_id, floor);
          void this.refreshConversations().catch((e) => this.report(e));
          break;
        }
        conversation.timeline.trim(frame.floor_seq);
        // A hole below the floor is no longer one: the events held back above it are told.
        this.tellInOrder(conversation, []);
        this.emitter.emit("timeline", frame.conversation_id);
        break;
      }
      case "sync_done":
        this.link.caughtUp(session);
        this.caughtUp();
        this.fillHoles();
        void this.readBackReceipts();
        break;
      case "reconnect":
        session.reconnectAfterMs = askedDelayMs(frame.after_ms);
        break;
      case "error":
        // An ack's refusal to wait out is the acknowledgements' to send again.
        if (!this.acks.refused(session, frame)) this.emitter.emit("error", CourierError.fromFrame(frame));
        break;
      default:
        // `hello` comes first and is consumed by the connection; `sent`, `messages` and
        // `pong` are replies, matched to their requests by `ref`: one here matched none
        // under way, and is passed over (a `sent` settles only its own send).
        break;
    }
  }

  /** Tells `whenSynced` and the `synced` listeners that the connection has had its catch-up,
   * once it is online: frames read with `hello` (a `sync_done` among them) are handled
   * before the link has said the connection is up. */
  private caughtUp(): void {
    if (this.synced || this.link.state !== "online" || !this.link.session?.caughtUp) return;
    this.synced = true;
    this.syncWaiters.splice(0).forEach((waiter) => waiter.resolve());
    this.emitter.emit("synced", undefined);
  }

  /** An event of the connection's stream: the stream is complete from the server's cursor
   * on, so everything since the previous streamed event of the conversation is held. */
  private onStreamedEvent(session: Session, event: ConversationEvent): void {
    const conversation = this.conversationFor(event.conversation_id);
    const id = conversation.id;
    this.takeHistory(conversation, [event]);
    const previous = session.streamed.get(id);
    // After a passed over event, the stream says nothing of what lies below this one: the
    // seqs since the previous held event are a gap to fetch, and no stream base is told.
    const lost = session.passedOver.delete(id) || (previous === undefined && session.baseUnknown);
    if (previous === undefined && !lost) session.streamBase.set(id, event.seq - 1);
    conversation.timeline.cover(lost ? event.seq - 1 : (previous ?? event.seq - 1), event.seq);
    session.streamed.set(id, event.seq);
    const gap = conversation.timeline.gapBefore(event.seq);
    this.applyEvents(conversation, [event]);
    if (gap) this.fillGap(conversation, gap.after, gap.through);
  }

  /** A streamed event that breaks the protocol was passed over: its conversation's stream on
   * this connection has a hole (`onStreamedEvent`), or, when the event does not say its
   * conversation, every conversation's may. The connection stays: the hole is fetched. */
  private eventPassedOver(session: Session, frame: ServerFrame & { type: "event" }): void {
    const id: unknown = frame.conversation_id;
    if (typeof id === "string" && isConversationId(id)) {
      session.passedOver.add(id);
      return;
    }
    for (const streamed of session.streamed.keys()) session.passedOver.add(streamed);
    session.baseUnknown = true;
  }

  private fillGap(conversation: Conversation, after: number, through: number): void {
    const key = `${conversation.id}/${after}`;
    if (this.gapsFetching.has(key)) return;
    this.gapsFetching.add(key);
    this.fetchGap(conversation, after, through)
      .catch((e) => this.report(e))
      .finally(() => this.gapsFetching.delete(key));
  }

  /** Fetches a gap; one the server refuses for a while (`unavailable`, `rate_limited`) or
   * does not answer is fetched again after the wait, from what is still missing of it. One
   * cut off with its connection is left to the next catch-up's `fillHoles`: that catch-up
   * may not bring it (another tab of the device moved its cursor past the gap). */
  private async fetchGap(conversation: Conversation, after: number, through: number): Promise<void> {
    const retries = new Backoff(GAP_RETRY);
    for (;;) {
      try {
        return await this.fetchRange(conversation, after, through);
      } catch (error) {
        if (!(error instanceof CourierError) || !GAP_WAITS_OUT.has(error.code)) throw error;
        await sleep(Math.max(error.retryAfterMs ?? 0, retries.next()), this.closing.signal);
        if (this.closing.signal.aborted) return;
        after = conversation.timeline.completeThrough(after);
        if (after >= through) return;
      }
    }
  }

  /** After a catch-up: fetches the holes left between held events (`Timeline.holes`). A
   * gap fill that failed or was cut off leaves one, and neither the live stream (it goes on
   * above the hole) nor a catch-up that starts above it (another tab of the device
   * acknowledged it) would ever bring it. */
  private fillHoles(): void {
    for (const conversation of this.conversationsById.values()) {
      for (const hole of conversation.timeline.holes()) this.fillGap(conversation, hole.after, hole.through);
    }
  }

  private applyEvents(conversation: Conversation, events: ConversationEvent[]): void {
    const fresh: ConversationEvent[] = [];
    for (const event of events) {
      if (!conversation.applyEvent(event)) continue;
      fresh.push(event);
      this.sender.settleFromEvent(event);
    }
    const changed = fresh.length > 0;
    this.tellInOrder(conversation, fresh);
    if (conversation.kind === undefined) void this.refreshConversations().catch((e) => this.report(e));
    if (changed) this.emitter.emit("timeline", conversation.id);
    this.acks.scheduleDelivered(conversation);
  }

  /** The server holds another history of the conversation from the first of `events` that
   * `Timeline.diverges` up: the held events from there, and those waiting to be told, are
   * dropped for the server's, which come or are fetched as any others, and the members'
   * receipts from there up are forgotten and read back. Called before what the
   * events cover is recorded (dropped with the rest otherwise). */
  private takeHistory(conversation: Conversation, events: ConversationEvent[]): void {
    const seq = events.find((event) => conversation.timeline.diverges(event))?.seq;
    if (seq === undefined) return;
    conversation.timeline.dropFrom(seq);
    this.acks.divergedFrom(conversation, seq);
    // The other members' cursors from there up were of the lost history: the server's are read
    // back (a receipt of the new history may have come first, and been taken as no move).
    for (const moved of conversation.receiptsBelow(seq)) {
      this.savedReceipts.save({ conversation_id: conversation.id, ...moved });
    }
    if (!this.receiptsUnlisted.has(conversation.id)) void this.readBack(conversation.id).catch((e) => this.report(e));
    const waiting = this.heldBack.get(conversation.id)?.filter((event) => event.seq < seq);
    if (waiting?.length) this.heldBack.set(conversation.id, waiting);
    else this.heldBack.delete(conversation.id);
    this.emitter.emit("diverged", { conversation_id: conversation.id, seq });
  }

  /** Gives new events to the `event` listeners in seq order: those above a hole in the
   * timeline (a gap being fetched) wait until it is filled, so that the gap's events come
   * before the live one that showed it. History loaded below the oldest held event comes as
   * it is loaded. */
  private tellInOrder(conversation: Conversation, fresh: ConversationEvent[]): void {
    const waiting = this.heldBack.get(conversation.id);
    if (!waiting && fresh.length === 0) return;
    const events = waiting ? [...waiting, ...fresh].sort((a, b) => a.seq - b.seq) : fresh;
    const hole = conversation.timeline.holes()[0];
    let told = 0;
    while (told < events.length && (!hole || events[told]!.seq <= hole.after)) {
      this.emitter.emit("event", events[told]!);
      told++;
    }
    if (told < events.length) this.heldBack.set(conversation.id, events.slice(told));
    else this.heldBack.delete(conversation.id);
  }

  /** Fetches `(after, through]` page by page (over the connection when there is one, else
   * over HTTP) and records what each page covers. */
  private async fetchRange(conversation: Conversation, after: number, through: number): Promise<void> {
    let from = after;
    while (from < through) {
      const limit = Math.min(MAX_FETCH_LIMIT, through - from);
      const page = await this.fetchPage(conversation, from, limit);
      const last = page.events.at(-1)?.seq;
      const coveredThrough = page.events.length < limit ? Math.max(page.head_seq, last ?? from) : last!;
      this.takeHistory(conversation, page.events);
      // Covered first: the seqs a page skips (a time this user was not a member) are no
      // hole to hold its later events back for.
      conversation.timeline.cover(from, coveredThrough);
      this.applyEvents(conversation, page.events);
      conversation.headSeq = Math.max(conversation.headSeq, page.head_seq);
      // Up to the head on a caught-up connection that is still open: the device has had
      // everything through the page's top (what lies below it came in the catch-up, was
      // delivered before, or is streamed live), so acks may start there.
      const via = page.via;
      if (via?.caughtUp && via === this.link.session && page.head_seq > 0 && coveredThrough >= page.head_seq) {
        this.acks.haveThrough(conversation.id, page.head_seq);
      }
      this.acks.scheduleDelivered(conversation);
      if (coveredThrough <= from) return;
      from = coveredThrough;
    }
  }

  private async fetchPage(
    conversation: Conversation,
    afterSeq: number,
    limit: number,
  ): Promise<{ events: ConversationEvent[]; head_seq: number; via?: Session }> {
    const session = this.link.session;
    if (session) {
      const page = await session.connection.request<Messages>({
        type: "fetch",
        conversation_id: conversation.id,
        after_seq: afterSeq,
        limit,
      });
      return { events: page.events as ConversationEvent[], head_seq: page.head_seq, via: session };
    }
    const page = await this.http.messages(conversation.id, { afterSeq, limit });
    if (page.floor_seq !== undefined) conversation.timeline.trim(page.floor_seq);
    return page;
  }

  // ---- own events ----------------------------------------------------------------------

  /** An outbox entry the server stored: the message enters the timeline. */
  private ownStored(entry: OutboxEntry, sent: Sent): void {
    this.addOwn(this.conversationFor(sent.conversation_id), sent, {
      kind: "message",
      body: entry.body,
      client_msg_id: entry.client_msg_id,
      reply_to: entry.reply_to,
      deleted: false,
    });
  }

  /** This device's own event, known from its `sent`. */
  private addOwn(conversation: Conversation, sent: Sent, fields: Partial<ConversationEvent>): void {
    const event: ConversationEvent = {
      conversation_id: sent.conversation_id,
      seq: sent.seq,
      server_msg_id: sent.server_msg_id,
      sender: { user: this.user, device: this.device },
      ts_ms: sent.ts_ms,
      kind: "message",
      ...fields,
    };
    this.takeHistory(conversation, [event]);
    conversation.timeline.cover(sent.seq - 1, sent.seq);
    const gap = conversation.timeline.gapBefore(sent.seq);
    this.applyEvents(conversation, [event]);
    // Where this connection streams the conversation, the events before a `sent` that
    // outran them are on their way; elsewhere they are fetched.
    if (gap && !this.link.session?.streamed.has(conversation.id)) this.fillGap(conversation, gap.after, gap.through);
  }

  /** Takes a member's cursors and saves them; false when they moved neither. */
  private takeReceipt(conversation: Conversation, receipt: Omit<Receipt, "type">): boolean {
    if (!conversation.applyReceipt(receipt)) return false;
    const cursors = conversation.receiptOf(receipt.user)!;
    this.savedReceipts.save({ conversation_id: conversation.id, user: receipt.user, ...cursors });
    return true;
  }

  /** After a catch-up: the receipts that moved while this device was away, for each
   * conversation whose latest own message is not yet read, one request at a time (a
   * reconnection does not send a burst of them), across reconnections too: a catch-up
   * while a read-back is under way has it go over the conversations again once done. */
  private async readBackReceipts(): Promise<void> {
    if (this.readingBack) {
      this.readBackAgain = true;
      return;
    }
    this.readingBack = true;
    do {
      this.readBackAgain = false;
      try {
        const waiting = [...this.conversationsById.values()].filter((c) => this.awaitsReceipts(c));
        for (const conversation of waiting) {
          const done = await this.readBack(conversation.id).catch((error) => {
            // One the server does not list is not asked again; another failure ends the pass.
            if (!this.receiptsUnlisted.has(conversation.id)) throw error;
            return true;
          });
          // Offline after a wait: the next catch-up reads back again.
          if (!done) break;
        }
      } catch (error) {
        this.report(error);
      }
    } while (this.readBackAgain);
    this.readingBack = false;
  }

  /** Reads a conversation's receipts back (`refreshReceipts`); a refusal to wait out
   * (`rate_limited`, `unavailable`, `timeout`: push back, not a failure) is asked again after
   * the server's `retry_after_ms` or a backoff, and told to no listener. Resolves false when
   * the client went offline or closed meanwhile (the next catch-up reads back again). */
  private async readBack(conversationId: string): Promise<boolean> {
    const retries = new Backoff(GAP_RETRY);
    for (;;) {
      try {
        await this.refreshReceipts(conversationId);
        return true;
      } catch (error) {
        if (!(error instanceof CourierError) || !GAP_WAITS_OUT.has(error.code)) throw error;
        await sleep(Math.max(error.retryAfterMs ?? 0, retries.next()), this.closing.signal);
        if (this.closing.signal.aborted || !this.link.session) return false;
      }
    }
  }

  /** Whether to read a conversation's receipts back (`Conversation.awaitsReceipts`), unless
   * the server said it does not list them. */
  private awaitsReceipts(conversation: Conversation): boolean {
    return !this.receiptsUnlisted.has(conversation.id) && conversation.awaitsReceipts();
  }

  private conversationFor(conversationId: string): Conversation {
    let conversation = this.conversationsById.get(conversationId);
    if (!conversation) {
      conversation = new Conversation(conversationId, this.user);
      for (const receipt of this.savedReceipts.take(conversationId)) conversation.applyReceipt(receipt);
      conversation.timeline.trim(this.unknownFloors.get(conversationId) ?? 1);
      this.unknownFloors.delete(conversationId);
      this.conversationsById.set(conversationId, conversation);
      this.emitter.emit("conversations", undefined);
    }
    return conversation;
  }

  /** A listener of the app threw: the client goes on (the change it was told of is taken
   * whole, and the other listeners heard it), and says so to the `error` listeners, or, when
   * there are none or one of them threw, to the host's error reporting. */
  private listenerFailed(name: keyof ClientEvents, error: unknown): void {
    if (name === "error" || !this.emitter.has("error")) return reportToHost(name, error);
    const what = error instanceof Error ? error.message : String(error);
    this.emitter.emit("error", new CourierError("internal", `a "${String(name)}" listener threw: ${what}`));
  }

  /** Reports a background failure (a gap fetch, a list refresh) to `error` listeners; a
   * closed connection is not one: the work is redone after the reconnection. */
  private report(error: unknown): void {
    if (error instanceof CourierError) {
      if (error.code !== "closed") this.emitter.emit("error", error);
    } else {
      this.emitter.emit("error", new CourierError("internal", String(error)));
    }
  }
}

function resolveToken(token: CourierClientOptions["token"]): Promise<string> {
  return Promise.resolve(typeof token === "function" ? token() : token);
}

function baseUrl(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw badInput(`not a URL: ${JSON.stringify(url)} (expected e.g. http://127.0.0.1:8080)`);
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
    throw badInput(`the server URL must be http(s)://, not ${parsed.protocol}`);
  }
  return parsed.origin + parsed.pathname.replace(/\/+$/, "");
}

function websocketUrl(url: string): string {
  return `${baseUrl(url).replace(/^http/, "ws")}/v1/ws`;
}

function checkConversation(id: string): string {
  if (!isConversationId(id)) throw badInput(`not a conversation id: ${JSON.stringify(id)}`);
  return id;
}

/** A body the server would take: exactly one of `text` and `media`, with the fields and types
 * of PROTOCOL.md (checked here, or the message would enter the outbox only to be refused). */
function checkBody(body: Body): void {
  const shape = "a body is {text} or {media: {media_id, mime, size, sha256, name?, caption?}}";
  if (typeof body !== "object" || body === null || Object.keys(body).length !== 1) throw badInput(shape);
  if ("text" in body) {
    if (typeof body.text !== "string" || body.text.length === 0) throw badInput("a text body needs text");
    return;
  }
  const media = (body as { media?: Partial<Record<keyof MediaBody, unknown>> }).media;
  if (typeof media !== "object" || media === null) throw badInput(shape);
  const { media_id, mime, size, sha256, name, caption } = media;
  if (typeof media_id !== "string" || !isConversationId(media_id)) throw badInput("media_id is not a media id");
  if (typeof mime !== "string" || mime === "") throw badInput("a media body needs its mime type");
  if (!Number.isSafeInteger(size) || (size as number) < 0) throw badInput("a media body's size is a byte count");
  if (typeof sha256 !== "string") throw badInput("a media body needs its sha256");
  for (const [field, value] of [["name", name], ["caption", caption]] as const) {
    if (value !== undefined && typeof value !== "string") throw badInput(`a media body's ${field} is text`);
  }
}
