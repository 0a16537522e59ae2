/**
 * The frames of the Courier client protocol v1 (PROTOCOL.md), JSON subprotocol
 * `courier.v1.json`, as TypeScript types, and the checks of ids the protocol defines.
 * Field names are the protocol's own (snake_case), so a frame is sent and read as is.
 */

/** The JSON subprotocol the SDK speaks. */
export const SUBPROTOCOL_JSON = "courier.v1.json";

/** A user's device, as the server names the sender of an event. */
export interface Sender {
  user: string;
  device: string;
}

/** A media attachment: `media_id`, `mime`, `size` and `sha256` come from an upload. */
export interface MediaBody {
  media_id: string;
  mime: string;
  size: number;
  sha256: string;
  name?: string;
  caption?: string;
}

/** The body of a message: text or media. */
export type Body = { text: string } | { media: MediaBody };

export type EventKind = "message" | "delete" | "member_added" | "member_removed" | "group_created";

/** One event of a conversation's log (an `event` frame, or an entry of `messages`). */
export interface ConversationEvent {
  conversation_id: string;
  seq: number;
  server_msg_id: string;
  sender: Sender;
  ts_ms: number;
  kind: EventKind;
  /** `message`: absent once deleted for everyone. */
  body?: Body;
  client_msg_id?: string;
  reply_to?: number;
  /** `message`: true once deleted for everyone. */
  deleted?: boolean;
  /** `delete`: the seq of the deleted message. */
  target_seq?: number;
  /** `member_added` / `member_removed` of a single user. */
  user?: string;
  /** `member_added` / `member_removed`: everyone added or removed by one request. */
  users?: string[];
  /** `group_created`. */
  name?: string;
  members?: string[];
}

export type AckKind = "delivered" | "read";

export type ClientFrame =
  | {
      type: "send";
      ref?: number;
      client_msg_id: string;
      conversation_id?: string;
      to_user?: string;
      body: Body;
      reply_to?: number;
    }
  | { type: "ack"; ref?: number; conversation_id: string; seq: number; kind: AckKind }
  | { type: "sync"; cursors?: Record<string, number> }
  | { type: "fetch"; ref?: number; conversation_id: string; after_seq?: number; limit?: number }
  | { type: "delete"; ref?: number; conversation_id: string; seq: number }
  | { type: "typing"; conversation_id: string; active: boolean }
  | { type: "ping"; ref?: number };

export interface Hello {
  type: "hello";
  user: string;
  device: string;
  server_time_ms: number;
}

export interface Sent {
  type: "sent";
  ref?: number;
  client_msg_id: string;
  conversation_id: string;
  seq: number;
  server_msg_id: string;
  ts_ms: number;
  duplicate: boolean;
}

export interface Messages {
  type: "messages";
  ref?: number;
  conversation_id: string;
  events: Omit<ConversationEvent, "type">[];
  head_seq: number;
}

export interface Receipt {
  type: "receipt";
  conversation_id: string;
  user: string;
  delivered_seq: number;
  read_seq: number;
}

export interface Trimmed {
  type: "trimmed";
  conversation_id: string;
  floor_seq: number;
}

export interface TypingNotice {
  type: "typing";
  conversation_id: string;
  user: string;
  active: boolean;
}

/** The error codes of PROTOCOL.md. */
export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "too_large"
  | "rate_limited"
  | "unavailable"
  | "internal";

export interface ErrorFrame {
  type: "error";
  ref?: number;
  code: ErrorCode;
  message: string;
  client_msg_id?: string;
  retry_after_ms?: number;
}

export type ServerFrame =
  | Hello
  | Sent
  | ({ type: "event" } & ConversationEvent)
  | Messages
  | Receipt
  | { type: "sync_done" }
  | Trimmed
  | TypingNotice
  | ErrorFrame
  | { type: "reconnect"; after_ms: number }
  | { type: "pong"; ref?: number };

/** The most events one `fetch` returns (PROTOCOL.md). */
export const MAX_FETCH_LIMIT = 1000;

/** The server's default limit on one frame's payload, in bytes (64 KiB); a larger one closes
 * the connection with WebSocket code 1009. */
export const DEFAULT_MAX_FRAME_BYTES = 64 * 1024;

/** The WebSocket close code of a frame over the server's size limit ("message too big"). */
export const CLOSE_TOO_BIG = 1009;

/** The WebSocket close code of a policy violation: Courier closes an open connection with it
 * when its device is unlinked, when its user is past the limit of devices, and when newer
 * connections of the same device take its place (16 per device on a gateway). */
export const CLOSE_POLICY = 1008;

const USER_ID = /^[A-Za-z0-9._@-]{1,64}$/;
const CONVERSATION_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/** A media type as an upload's `Content-Type` takes it: `type/subtype`. */
export function isMediaType(value: string): boolean {
  return /^[\w.+-]+\/[\w.+-]+$/.test(value);
}

export function isUserId(value: string): boolean {
  return USER_ID.test(value);
}

export function isConversationId(value: string): boolean {
  return CONVERSATION_ID.test(value);
}

/** Client message ids are 1 to 64 characters (Unicode scalar values, as the server counts
 * them: an emoji is one, though two UTF-16 code units), unique per sending device. */
export function isClientMsgId(value: string): boolean {
  if (value.length === 0 || value.length > 128) return false;
  return [...value].length <= 64;
}

/** A `seq` (or `reply_to`): an integer from 1. */
export function isSeq(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 1;
}

type Check = (value: unknown) => boolean;

const isText: Check = (value) => typeof value === "string";
const isId: Check = (value) => typeof value === "string" && CONVERSATION_ID.test(value);
/** A count or a cursor: an integer from 0. */
const isCount: Check = (value) => Number.isSafeInteger(value) && (value as number) >= 0;
const isTexts: Check = (value) => Array.isArray(value) && value.every(isText);
const optional =
  (check: Check): Check =>
  (value) =>
    value === undefined || check(value);
const isRecord = (value: unknown): value is Record<string, unknown> => typeof value === "object" && value !== null;

/** A media body's fields, as an upload gives them. */
const MEDIA_FIELDS: Record<string, Check> = {
  media_id: isId,
  mime: isText,
  size: isCount,
  sha256: isText,
  name: optional(isText),
  caption: optional(isText),
};

/** A body: `text` is text, `media` a media body (a body of a kind a later server adds is let
 * through, as an event kind is). */
const isBody: Check = (value) =>
  isRecord(value) &&
  (!("text" in value) || isText(value.text)) &&
  (!("media" in value) || (isRecord(value.media) && brokenOf(value.media, MEDIA_FIELDS) === undefined));

const EVENT_FIELDS: Record<string, Check> = {
  conversation_id: isId,
  seq: isSeq,
  server_msg_id: isText,
  sender: (value) => isRecord(value) && isText(value.user) && isText(value.device),
  ts_ms: isCount,
  kind: isText,
  body: optional(isBody),
  client_msg_id: optional(isText),
  reply_to: optional(isSeq),
  deleted: optional((value) => typeof value === "boolean"),
  target_seq: optional(isSeq),
  user: optional(isText),
  users: optional(isTexts),
  name: optional(isText),
  members: optional(isTexts),
};

/** A list whose every item has `fields`. */
const listOf =
  (fields: Record<string, Check>): Check =>
  (value) =>
    Array.isArray(value) && value.every((item) => isRecord(item) && brokenOf(item, fields) === undefined);

/** The fields of the frames the client reads, with their types in PROTOCOL.md. */
const FRAME_FIELDS: Partial<Record<string, Record<string, Check>>> = {
  hello: { user: isText, device: isText },
  sent: { client_msg_id: isText, conversation_id: isId, seq: isSeq, server_msg_id: isText, ts_ms: isCount },
  event: EVENT_FIELDS,
  messages: {
    conversation_id: isId,
    events: listOf(EVENT_FIELDS),
    head_seq: isCount,
  },
  receipt: { conversation_id: isId, user: isText, delivered_seq: isCount, read_seq: isCount },
  trimmed: { conversation_id: isId, floor_seq: isCount },
  typing: { conversation_id: isId, user: isText, active: (value) => typeof value === "boolean" },
  error: { code: isText, message: isText },
};

/** The fields of the HTTP API's answers the client reads, with their types in PROTOCOL.md. */
const ANSWER_FIELDS = {
  conversations: {
    conversations: listOf({
      conversation_id: isId,
      kind: isText,
      name: isText,
      head_seq: isCount,
      delivered_seq: isCount,
      read_seq: isCount,
    }),
  },
  messages: { events: listOf(EVENT_FIELDS), head_seq: isCount, floor_seq: optional(isCount) },
  receipts: { receipts: listOf({ user: isText, delivered_seq: isCount, read_seq: isCount }) },
  upload: { media_id: isId, mime: isText, size: isCount, sha256: isText },
  group: { conversation_id: isId },
  devices: { devices: listOf({ device: isText, last_seen_ms: isCount, push: (value) => typeof value === "boolean" }) },
} satisfies Record<string, Record<string, Check>>;

/** An answer of the HTTP API the client reads. */
export type Answer = keyof typeof ANSWER_FIELDS;

/** The field of an HTTP answer's body whose value breaks PROTOCOL.md, if one does (`body` when
 * it is no object). */
export function brokenAnswer(answer: Answer, body: unknown): string | undefined {
  return isRecord(body) ? brokenOf(body, ANSWER_FIELDS[answer]) : "body";
}

function brokenOf(record: Record<string, unknown>, fields: Record<string, Check>): string | undefined {
  return Object.keys(fields).find((field) => !fields[field]!(record[field]));
}

/** The field of a server frame whose value breaks PROTOCOL.md (missing, or of another type),
 * if one does; frames of a type the client does not read have none. */
export function brokenField(frame: { type: string } & Record<string, unknown>): string | undefined {
  const fields = FRAME_FIELDS[frame.type];
  return fields && brokenOf(frame, fields);
}
