/**
 * Sends the outbox, oldest first and one at a time (so the server sequences a device's
 * messages in the order they were written), over whatever connection is open. A send that
 * gets `unavailable` or `rate_limited` is retried with the same `client_msg_id` after a
 * backoff (or the `retry_after_ms` asked for); one cut off by a closed connection is sent
 * again on the next; one refused for good stays in the outbox, marked failed. A frame over
 * the server's size limit is refused for good as `too_large`: one larger than the client's
 * `maxFrameBytes` is never sent, and one that the server answers by closing the connection
 * with 1009 is not sent again (it would close every connection after it).
 *
 * A photo `sendMedia` wrote (`OutboxEntry.upload`) is uploaded when its turn comes, over
 * HTTP while a connection is open, and its entry rewritten with the media body before the
 * `send`, with the entry's `client_msg_id` as any other: a photo chosen offline goes out once
 * online, in the order it was written. An upload refused for a while (`unavailable`, as
 * when the network is gone; `rate_limited`; `unauthorized`, a token that expired while the
 * connection stayed up) is tried again after a backoff; one refused for good (`too_large`:
 * over the server's limit) marks the entry failed.
 */
import { Backoff, sleep } from "./backoff.js";
import { CourierError } from "./errors.js";
import type { Identity } from "./identity.js";
import type { Session } from "./link.js";
import type { UploadedMedia } from "./http.js";
import type { Outbox } from "./outbox.js";
import { CLOSE_TOO_BIG, type ClientFrame, type ConversationEvent, type Sent } from "./protocol.js";
import type { OutboxEntry } from "./storage.js";

export interface SenderHandlers {
  session(): Session | undefined;
  /** The largest frame the server takes, in bytes of UTF-8. */
  maxFrameBytes: number;
  /** The server stored an entry: told once it has left the outbox's list, before its delete
   * from the storage. */
  onStored(entry: OutboxEntry, sent: Sent): void;
  /** The server refused an entry for good. */
  onRefused(entry: OutboxEntry, error: CourierError): void;
  onError(error: unknown): void;
  /** Aborted when the client closes: ends a wait before a retry. */
  closing: AbortSignal;
  /** Uploads a file (`POST /v1/media`); `signal` gives it up. */
  upload(data: Blob | Uint8Array, mime: string, signal: AbortSignal): Promise<UploadedMedia>;
}

export class OutboxSender {
  private flushing = false;
  /** The entry whose `send` awaits its reply; that reply settles it. */
  private inFlight: string | undefined;

  constructor(
    private readonly outbox: Outbox,
    private readonly me: Identity,
    private readonly handlers: SenderHandlers,
  ) {}

  /** Sends until the outbox is empty or the connection goes; a call while sending is a
   * no-op (the running loop picks up new entries). */
  async flush(): Promise<void> {
    if (this.flushing) return;
    this.flushing = true;
    const retries = new Backoff({ baseMs: 100, maxMs: 5_000 });
    try {
      for (let entry = this.outbox.next(); entry; entry = this.outbox.next()) {
        const session = this.handlers.session();
        if (!session) return;
        const connection = session.connection;
        if (entry.upload) {
          await this.upload(entry, retries, session);
          continue;
        }
        const tooLarge = tooLargeError(entry, this.handlers.maxFrameBytes);
        if (tooLarge) {
          // Written by an earlier version or with a larger limit: never sendable.
          await this.refuse(entry, tooLarge);
          continue;
        }
        this.inFlight = entry.client_msg_id;
        try {
          const sent = await connection.request<Sent>(sendFrame(entry));
          retries.reset();
          await this.outbox.settle(sent, () => this.handlers.onStored(entry, sent));
        } catch (error) {
          if (!(error instanceof CourierError)) throw error;
          if (error.code === "closed" && connection.closeInfo?.code === CLOSE_TOO_BIG) {
            // The server closed the connection over this frame's size: sending it again
            // would only close the next one.
            const refusal = new CourierError("too_large", "the message is larger than the server takes", {
              clientMsgId: entry.client_msg_id,
            });
            await this.refuse(entry, refusal);
            return;
          }
          if (error.code === "closed") return;
          if (error.code === "timeout") {
            connection.close(4000, "no reply to a send");
            return;
          }
          if (error.retriable) {
            await sleep(Math.max(error.retryAfterMs ?? 0, retries.next()), this.handlers.closing);
            continue;
          }
          await this.refuse(entry, error);
        } finally {
          this.inFlight = undefined;
        }
      }
    } catch (error) {
      this.handlers.onError(error);
    } finally {
      this.flushing = false;
    }
  }

  /** Uploads an entry's file and writes its media body into the entry, which the loop then
   * sends; a refusal to wait out waits (the loop then finds the connection, or not), another
   * marks the entry failed. The upload is given up when the connection it began on closes,
   * and made again on the next: an HTTP request has no timeout, and one whose network went
   * without a word would hold every later message of the outbox for ever. */
  private async upload(entry: OutboxEntry, retries: Backoff, session: Session): Promise<void> {
    const { data, mime } = entry.upload!;
    const giveUp = new AbortController();
    void session.closed.then(() => giveUp.abort());
    let uploaded: UploadedMedia;
    try {
      uploaded = await this.handlers.upload(data, mime, giveUp.signal);
    } catch (error) {
      if (!(error instanceof CourierError)) throw error;
      // A token refused meanwhile (expired) is the link's to tell; the photo waits for a
      // token the server takes, as a text waits for a connection.
      if (error.retriable || error.code === "unauthorized") {
        await sleep(Math.max(error.retryAfterMs ?? 0, retries.next()), this.handlers.closing);
      } else {
        await this.refuse(entry, error);
      }
      return;
    }
    retries.reset();
    const { name, caption } = "media" in entry.body ? entry.body.media : {};
    const { media_id, size, sha256 } = uploaded;
    const media = {
      media_id,
      mime: uploaded.mime,
      size,
      sha256,
      ...(name !== undefined && { name }),
      ...(caption !== undefined && { caption }),
    };
    await this.outbox.uploaded(entry.client_msg_id, { media });
  }

  private async refuse(entry: OutboxEntry, error: CourierError): Promise<void> {
    await this.outbox.fail(entry.client_msg_id, error);
    this.handlers.onRefused(entry, error);
  }

  /**
   * An event this device sent whose `sent` never arrived (the page closed or the connection
   * dropped after the server stored it) takes its entry out of the outbox: `client_msg_id`
   * is unique per device, so the event is that entry, stored.
   */
  settleFromEvent(event: ConversationEvent): void {
    const id = event.client_msg_id;
    if (event.kind !== "message" || !id || id === this.inFlight || !this.outbox.has(id)) return;
    if (event.sender.user !== this.me.user || event.sender.device !== this.me.device) return;
    const sent: Sent = {
      type: "sent",
      client_msg_id: id,
      conversation_id: event.conversation_id,
      seq: event.seq,
      server_msg_id: event.server_msg_id,
      ts_ms: event.ts_ms,
      duplicate: true,
    };
    this.outbox.settle(sent).catch((error) => this.handlers.onError(error));
  }
}

/** The `send` frame of an outbox entry (without its `ref`). */
export function sendFrame(entry: Omit<OutboxEntry, "position">): Extract<ClientFrame, { type: "send" }> {
  return {
    type: "send",
    client_msg_id: entry.client_msg_id,
    conversation_id: entry.conversation_id,
    to_user: entry.to_user,
    body: entry.body,
    reply_to: entry.reply_to,
  };
}

/** The largest `ref` a connection could add, for measuring a frame before it has one. */
const WIDEST_REF = Number.MAX_SAFE_INTEGER;

/** A `too_large` refusal when the entry's `send` frame, as the connection would write it,
 * is over `maxFrameBytes` bytes of UTF-8; otherwise undefined. */
export function tooLargeError(entry: Omit<OutboxEntry, "position">, maxFrameBytes: number): CourierError | undefined {
  const bytes = new TextEncoder().encode(JSON.stringify({ ...sendFrame(entry), ref: WIDEST_REF })).length;
  if (bytes <= maxFrameBytes) return undefined;
  return new CourierError(
    "too_large",
    `the message is ${bytes} bytes as a frame, over the server's limit of ${maxFrameBytes}`,
    { clientMsgId: entry.client_msg_id },
  );
}
