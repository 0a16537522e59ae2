/** The sidebar's list of conversations: name, last message, unread count. */
import type { Conversation, CourierClient } from "@courier-chat/client";
import { el } from "./dom.js";
import { preview, unreadCount } from "./summary.js";

export function renderConversationList(
  list: HTMLElement,
  client: CourierClient,
  selected: string | undefined,
  select: (conversationId: string) => void,
): void {
  const items = client.conversations().map((conversation: Conversation) => {
    const unread = unreadCount(client, conversation);
    const item = el(
      "li",
      { "data-conversation": conversation.id, "aria-selected": String(conversation.id === selected) },
      el("span", { class: "name" }, conversation.name ?? conversation.id, el("span", { class: "preview" }, preview(conversation))),
      unread > 0 && conversation.id !== selected && el("span", { class: "unread" }, String(unread)),
    );
    item.addEventListener("click", () => select(conversation.id));
    return item;
  });
  list.replaceChildren(...items);
}
