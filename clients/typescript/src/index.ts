/**
 * `@courier-chat/client`: the Courier client SDK for browsers and Node 20+.
 *
 * ```ts
 * import { CourierClient } from "@courier-chat/client";
 * const client = await CourierClient.open({ url: "http://127.0.0.1:8080", token });
 * await client.sendText({ toUser: "bob" }, "hello");
 * client.on("event", (event) => console.log(event.sender.user, event.body));
 * ```
 */
export {
  CourierClient,
  DEFAULT_MAX_QUEUED_UPLOAD_BYTES,
  type ClientEvents,
  type ConnectionState,
  type CourierClientOptions,
  type Target,
} from "./client.js";
export {
  Conversation,
  MAX_RECEIPT_USERS,
  MAX_TYPING_USERS,
  TYPING_EXPIRES_MS,
  type MessageStatus,
  type ReceiptState,
} from "./conversation.js";
export { Timeline, type SeqRange } from "./timeline.js";
export { CourierError } from "./errors.js";
export {
  DEFAULT_MAX_DOWNLOAD_BYTES,
  HttpApi,
  type ByteRange,
  type ConversationSummary,
  type DeviceInfo,
  type MediaDownload,
  type UploadedMedia,
} from "./http.js";
export {
  IndexedDbOutboxStorage,
  MemoryOutboxStorage,
  type OutboxEntry,
  type OutboxStorage,
  type StoredReceipt,
} from "./storage.js";
export { Backoff, type BackoffOptions } from "./backoff.js";
export type { WebSocketConstructor, WebSocketLike } from "./connection.js";
export { identityOf, type Identity } from "./identity.js";
export * from "./protocol.js";
