/**
 * Acknowledgements of one device: cumulative `ack`s up to the end of the complete run of
 * events held from the server's cursor on, never past a hole (a reconnection would then skip
 * the missing event). Delivery acks are coalesced: one per conversation per turn of the
 * event loop, however many events arrived.
 */
import type { Conversation } from "./conversation.js";
import type { Session } from "./link.js";
import type { AckKind } from "./protocol.js";

export class Acknowledgements {
  /** Per conversation, what this device acknowledged in this process. */
  private readonly acked = new Map<string, { delivered: number; read: number }>();
  private readonly scheduled = new Set<string>();

  constructor(private readonly session: () => Session | undefined) {}

  /** Acknowledges delivery of what `conversation` holds, once the current turn is over. */
  scheduleDelivered(conversation: Conversation): void {
    if (this.scheduled.has(conversation.id)) return;
    this.scheduled.add(conversation.id);
    queueMicrotask(() => {
      this.scheduled.delete(conversation.id);
      this.acknowledge(conversation, "delivered");
    });
  }

  /** Sends an `ack` of `kind` if the complete run moved past what was acknowledged. */
  acknowledge(conversation: Conversation, kind: AckKind): void {
    const session = this.session();
    if (!session) return;
    const acked = this.acked.get(conversation.id) ?? { delivered: 0, read: 0 };
    const base = Math.max(acked.delivered, session.streamBase.get(conversation.id) ?? 0);
    const through = conversation.timeline.completeThrough(base);
    if (through < 1 || through <= (kind === "read" ? acked.read : acked.delivered)) return;
    session.connection.send({ type: "ack", conversation_id: conversation.id, seq: through, kind });
    // The server's read cursor never passes its delivered one: a read ack moves both.
    acked.delivered = Math.max(acked.delivered, through);
    conversation.deliveredSeq = Math.max(conversation.deliveredSeq, through);
    if (kind === "read") {
      acked.read = through;
      conversation.readSeq = Math.max(conversation.readSeq, through);
    }
    this.acked.set(conversation.id, acked);
  }
}
