/** One-line descriptions of conversations and events. */
import type { Conversation, ConversationEvent, CourierClient } from "@courier-chat/client";
import { isPicture } from "./media.js";

/** A byte count for people: `2.0 KB`, `16.0 MB`. */
function sizeOf(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** The kinds of events this app shows: messages, and notices of group changes. A `delete`
 * shows as its blanked message; a kind a later server adds (the protocol welcomes new ones) is
 * not shown, rather than shown as an empty notice. */
const SHOWN_KINDS: ReadonlySet<string> = new Set(["message", "group_created", "member_added", "member_removed"]);

export function isShown(event: ConversationEvent): boolean {
  return SHOWN_KINDS.has(event.kind);
}

export function describe(event: ConversationEvent): string {
  if (event.kind !== "message") return notice(event);
  if (event.deleted || !event.body) return "This message was deleted";
  if ("text" in event.body) return event.body.text;
  const { media } = event.body;
  if (!isPicture(media)) {
    const caption = media.caption ? ` ${media.caption}` : "";
    return `File: ${media.name ?? media.mime} (${sizeOf(media.size)})${caption}`;
  }
  return `Photo: ${media.caption ?? media.name ?? ""}`;
}

export function notice(event: ConversationEvent): string {
  const who = event.sender.user;
  const users = (event.users ?? (event.user ? [event.user] : [])).join(", ");
  switch (event.kind) {
    case "group_created":
      return `${who} created the group "${event.name ?? ""}"`;
    case "member_added":
      return `${who} added ${users}`;
    case "member_removed":
      return who === users ? `${who} left` : `${who} removed ${users}`;
    default:
      return "";
  }
}

export function preview(conversation: Conversation): string {
  const last = conversation.timeline.list().filter(isShown).at(-1);
  return last ? describe(last) : "";
}

export function unreadCount(client: CourierClient, conversation: Conversation): number {
  return conversation.timeline
    .list()
    .filter((e) => e.kind === "message" && !e.deleted && e.sender.user !== client.user && e.seq > conversation.readSeq).length;
}
