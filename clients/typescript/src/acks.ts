/**
 * Acknowledgements of one device: cumulative `ack`s up to the end of the complete run of
 * events held from a base the device is known to have had everything through, never past a
 * hole (a reconnection would then skip the missing event). A base is what this device
 * acknowledged, where a connection's stream started (the server's cursor), or the top of a
 * page fetched up to the conversation's head on a caught-up connection (after a reload with
 * nothing to catch up, the only way to learn where the cursor is). Delivery acks are
 * coalesced: one per conversation per turn of the event loop, however many events arrived.
 *
 * What an ack already carried is counted per connection: one written into a connection whose
 * network was already gone never reached the server, and nothing says so (an `ack` has no
 * reply). So the first ack of each kind a new connection could send for a conversation goes
 * out even if an earlier connection sent the same seq; the server keeps the highest, and a
 * repeat moves nothing.
 */
import type { Conversation } from "./conversation.js";
import type { Session } from "./link.js";
import type { AckKind } from "./protocol.js";

export class Acknowledgements {
  /** Per conversation, the highest seq this device acknowledged in this process: it held
   * every event through it (a base, whether or not the ack reached the server). */
  private readonly acked = new Map<string, number>();
  private readonly scheduled = new Set<string>();
  /** Per conversation, a seq through which this device has had every event (held now, or
   * delivered to it before), learned from a fetch. */
  private readonly hadThrough = new Map<string, number>();

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

  /** Records that this device has had every event of a conversation through `seq`: a page
   * that reached the head, fetched on a connection whose catch-up was complete (everything
   * up to where the catch-up stopped came in it or was delivered before; everything since
   * is streamed live). */
  haveThrough(conversationId: string, seq: number): void {
    this.hadThrough.set(conversationId, Math.max(this.hadThrough.get(conversationId) ?? 0, seq));
  }

  /** Sends an `ack` of `kind` if the complete run moved past what was acknowledged. */
  acknowledge(conversation: Conversation, kind: AckKind): void {
    const session = this.session();
    if (!session) return;
    const base = Math.max(
      this.acked.get(conversation.id) ?? 0,
      session.streamBase.get(conversation.id) ?? 0,
      this.hadThrough.get(conversation.id) ?? 0,
    );
    const through = conversation.timeline.completeThrough(base);
    // What this connection carried, not what an earlier one may have lost.
    const carried = session.acked.get(conversation.id) ?? { delivered: 0, read: 0 };
    if (through < 1 || through <= (kind === "read" ? carried.read : carried.delivered)) return;
    session.connection.send({ type: "ack", conversation_id: conversation.id, seq: through, kind });
    // The server's read cursor never passes its delivered one: a read ack moves both.
    carried.delivered = Math.max(carried.delivered, through);
    conversation.deliveredSeq = Math.max(conversation.deliveredSeq, through);
    if (kind === "read") {
      carried.read = through;
      conversation.readSeq = Math.max(conversation.readSeq, through);
    }
    session.acked.set(conversation.id, carried);
    this.acked.set(conversation.id, Math.max(this.acked.get(conversation.id) ?? 0, through));
  }
}
