/**
 * The open conversation's timeline: each message as a bubble (own ones with their ticks
 * and a delete button, photos as images), group changes as notices, and the outbox's
 * entries at the end with a clock (or a failure mark, and buttons to retry and to discard).
 */
import type { ConversationEvent, CourierClient, MessageStatus, OutboxEntry } from "@courier-chat/client";
import { el, showError, timeOf } from "./dom.js";
import { isPicture, type MediaUrls } from "./media.js";
import { describe, isShown, notice } from "./summary.js";

const TICKS: Record<MessageStatus, string> = {
  pending: "…",
  failed: "!",
  sent: "✓",
  delivered: "✓✓",
  read: "✓✓",
};

/** What the timeline shows: a conversation, or a new chat with a user that the server has
 * not created yet (only its outbox entries). */
export type Shown = { conversationId: string } | { toUser: string };

export function renderTimeline(list: HTMLElement, client: CourierClient, shown: Shown, media: MediaUrls): void {
  const fromBottom = list.scrollHeight - list.scrollTop;
  const atBottom = fromBottom - list.clientHeight < 40;
  const items: HTMLElement[] = [];
  if ("conversationId" in shown) {
    const timeline = client.conversation(shown.conversationId)?.timeline;
    if (timeline?.mayHaveOlder) items.push(earlierButton(client, shown.conversationId));
    for (const event of timeline?.list() ?? []) {
      if (!isShown(event)) continue;
      items.push(event.kind === "message" ? messageItem(client, event, media) : el("li", { class: "notice" }, notice(event)));
    }
  }
  const pending =
    "conversationId" in shown
      ? client.pending(shown.conversationId)
      : client.outboxEntries().filter((entry) => entry.to_user === shown.toUser);
  for (const entry of pending) items.push(pendingItem(client, entry));
  list.replaceChildren(...items);
  // At the bottom, follow new messages; elsewhere (reading, or loading earlier ones) stay put.
  list.scrollTop = atBottom ? list.scrollHeight : list.scrollHeight - fromBottom;
}

function earlierButton(client: CourierClient, conversationId: string): HTMLElement {
  const button = el("button", { type: "button", id: "earlier" }, "Earlier messages");
  button.addEventListener("click", () => client.loadHistory(conversationId).catch(showError));
  return el("li", { class: "notice" }, button);
}

function messageItem(client: CourierClient, event: ConversationEvent, media: MediaUrls): HTMLElement {
  const own = event.sender.user === client.user;
  const deleted = event.deleted || !event.body;
  const item = el("li", {
    class: `message${own ? " own" : ""}${deleted ? " deleted" : ""}`,
    "data-seq": String(event.seq),
  });
  const conversation = client.conversation(event.conversation_id);
  if (!own && conversation?.kind === "group") item.append(el("span", { class: "sender" }, event.sender.user));
  if (!deleted && event.body && "media" in event.body && isPicture(event.body.media)) {
    const image = el("img", { alt: event.body.media.name ?? "photo", "data-media": event.body.media.media_id });
    media.url(event.body.media.media_id).then(
      (url) => (image.src = url),
      () => (image.alt = "the photo could not be loaded"),
    );
    item.append(image);
    if (event.body.media.caption) item.append(el("span", { class: "text" }, event.body.media.caption));
  } else {
    item.append(el("span", { class: "text" }, describe(event)));
  }
  const meta = el("span", { class: "meta" }, timeOf(event.ts_ms));
  if (own && !deleted) {
    const status = client.statusOf(event.conversation_id, event.seq);
    meta.append(el("span", { class: "ticks", "data-status": status, title: status }, TICKS[status]));
    const remove = el("button", { class: "delete", type: "button", title: "Delete for everyone" }, "delete");
    remove.addEventListener("click", () => {
      if (confirm("Delete this message for everyone?")) {
        client.delete(event.conversation_id, event.seq).catch((e) => showError(e));
      }
    });
    meta.append(remove);
  }
  item.append(meta);
  return item;
}

function pendingItem(client: CourierClient, entry: OutboxEntry): HTMLElement {
  const status: MessageStatus = entry.failed ? "failed" : "pending";
  const text = "text" in entry.body ? entry.body.text : `Photo: ${entry.body.media.name ?? "sending"}`;
  const meta = el(
    "span",
    { class: "meta" },
    timeOf(entry.created_ms),
    el("span", { class: "ticks", "data-status": status, title: entry.failed?.message ?? status }, TICKS[status]),
  );
  if (entry.failed) {
    const retry = el("button", { class: "delete", type: "button" }, "retry");
    retry.addEventListener("click", () => client.retry(entry.client_msg_id).catch((e) => showError(e)));
    // A refusal a retry would meet again (a photo over the server's limit, a group left)
    // would otherwise stay in the timeline, and in the browser's outbox, for good.
    const discard = el("button", { class: "delete discard", type: "button", title: "Remove this unsent message" }, "discard");
    discard.addEventListener("click", () => client.discard(entry.client_msg_id).catch((e) => showError(e)));
    meta.append(retry, discard);
  }
  return el("li", { class: "message own pending", "data-client-msg-id": entry.client_msg_id }, el("span", { class: "text" }, text), meta);
}
