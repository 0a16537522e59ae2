/**
 * Sends the outbox, oldest first and one at a time (so the server sequences a device's
 * messages in the order they were written), over whatever connection is open. A send that
 * gets `unavailable` or `rate_limited` is retried with the same `client_msg_id` after a
 * backoff (or the `retry_after_ms` asked for); one cut off by a closed connection is sent
 * again on the next; one refused for good stays in the outbox, marked failed.
 */
import { Backoff, sleep } from "./backoff.js";
import { CourierError } from "./errors.js";
import type { Identity } from "./identity.js";
import type { Session } from "./link.js";
import type { Outbox } from "./outbox.js";
import type { ConversationEvent, Sent } from "./protocol.js";
import type { OutboxEntry } from "./storage.js";

export interface SenderHandlers {
  session(): Session | undefined;
  /** The server stored an entry (before the entry leaves the outbox). */
  onStored(entry: OutboxEntry, sent: Sent): void;
  /** The server refused an entry for good. */
  onRefused(entry: OutboxEntry, error: CourierError): void;
  onError(error: unknown): void;
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
        const connection = this.handlers.session()?.connection;
        if (!connection) return;
        this.inFlight = entry.client_msg_id;
        try {
          const sent = await connection.request<Sent>({
            type: "send",
            client_msg_id: entry.client_msg_id,
            conversation_id: entry.conversation_id,
            to_user: entry.to_user,
            body: entry.body,
            reply_to: entry.reply_to,
          });
          retries.reset();
          this.handlers.onStored(entry, sent);
          await this.outbox.settle(sent);
        } catch (error) {
          if (!(error instanceof CourierError)) throw error;
          if (error.code === "closed") return;
          if (error.code === "timeout") {
            connection.close(4000, "no reply to a send");
            return;
          }
          if (error.retriable) {
            await sleep(Math.max(error.retryAfterMs ?? 0, retries.next()));
            continue;
          }
          await this.outbox.fail(entry.client_msg_id, error);
          this.handlers.onRefused(entry, error);
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
