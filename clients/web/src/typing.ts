/**
 * Typing notices for what the person types: `active: true` at most every 3 s while keys
 * are pressed, and `active: false` after 4 s without one or when the message is sent.
 */
import type { CourierClient } from "@courier-chat/client";

const REPEAT_MS = 3_000;
const IDLE_MS = 4_000;

export class TypingNotifier {
  private lastSent = new Map<string, number>();
  private idle = new Map<string, ReturnType<typeof setTimeout>>();

  constructor(private readonly client: CourierClient) {}

  typed(conversationId: string): void {
    const now = Date.now();
    if (now - (this.lastSent.get(conversationId) ?? 0) >= REPEAT_MS) {
      this.client.typing(conversationId, true);
      this.lastSent.set(conversationId, now);
    }
    clearTimeout(this.idle.get(conversationId));
    this.idle.set(conversationId, setTimeout(() => this.stopped(conversationId), IDLE_MS));
  }

  stopped(conversationId: string): void {
    clearTimeout(this.idle.get(conversationId));
    this.idle.delete(conversationId);
    if (this.lastSent.delete(conversationId)) this.client.typing(conversationId, false);
  }
}
