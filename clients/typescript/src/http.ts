/**
 * The HTTP API of PROTOCOL.md with one device's token: conversations, history, groups,
 * media (upload, download with `Range`) and devices. Errors become [`CourierError`]s with the
 * server's code and the HTTP status. A request of the JSON API with no answer within
 * `timeoutMs` is given up with `timeout` (fetch has none: one that hung, behind a proxy whose
 * backend stopped answering, would hold whatever awaits it, a read-back of receipts or the
 * list of conversations, for the client's life); a media download, whose transfer may take
 * long, is given up when nothing comes for `timeoutMs` (an upload of the outbox is given up
 * with its connection). A media download is held whole in memory: one of more than
 * `maxDownloadBytes` is refused with `too_large`, as soon as it says its length or once that
 * many bytes have come.
 */
import { askedDelayMs } from "./backoff.js";
import { CourierError, badInput } from "./errors.js";
import {
  brokenAnswer,
  isConversationId,
  isMediaType,
  isUserId,
  type Answer,
  type ConversationEvent,
  type ErrorCode,
  type MediaBody,
  type Receipt,
} from "./protocol.js";

export interface ConversationSummary {
  conversation_id: string;
  kind: "direct" | "group";
  /** The group's name, or the other user of a direct conversation. */
  name: string;
  head_seq: number;
  delivered_seq: number;
  read_seq: number;
}

/** What an upload returns: the fields of a media body. */
export type UploadedMedia = Pick<MediaBody, "media_id" | "mime" | "size" | "sha256">;

export interface MediaDownload {
  bytes: Uint8Array;
  mime: string;
  /** 206 for a range, 200 for the whole file. */
  status: number;
  /** The file's full size (from `Content-Range` or `Content-Length`). */
  totalSize: number;
}

export interface DeviceInfo {
  device: string;
  last_seen_ms: number;
  push: boolean;
}

/** A byte range: `start` through `end` inclusive (`end` omitted: to the end of the file). */
export interface ByteRange {
  start: number;
  end?: number;
}

/** The default of `maxDownloadBytes`: 100 MiB, the server's default limit on one upload
 * (`--media-max-bytes`). */
export const DEFAULT_MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024;

export class HttpApi {
  constructor(
    private readonly baseUrl: string,
    private readonly token: () => Promise<string>,
    private readonly fetchImpl: typeof fetch = globalThis.fetch.bind(globalThis),
    private readonly timeoutMs = 30_000,
    readonly maxDownloadBytes = DEFAULT_MAX_DOWNLOAD_BYTES,
  ) {}

  conversations(): Promise<ConversationSummary[]> {
    return this.json<{ conversations: ConversationSummary[] }>("GET", "/v1/conversations", "conversations").then(
      (b) => b.conversations,
    );
  }

  /** Events after `afterSeq` (default 0), at most `limit` (default 100, max 1000). */
  messages(
    conversationId: string,
    page: { afterSeq?: number; limit?: number } = {},
  ): Promise<{ events: ConversationEvent[]; head_seq: number; floor_seq?: number }> {
    checkConversation(conversationId);
    const query = new URLSearchParams();
    if (page.afterSeq !== undefined) query.set("after_seq", String(page.afterSeq));
    if (page.limit !== undefined) query.set("limit", String(page.limit));
    const suffix = query.size > 0 ? `?${query}` : "";
    return this.json("GET", `/v1/conversations/${conversationId}/messages${suffix}`, "messages");
  }

  /** Every current member's receipt cursors in a conversation (an addition to PROTOCOL.md:
   * `GET /v1/conversations/{id}/receipts`), for what moved while no client was connected. */
  receipts(conversationId: string): Promise<Omit<Receipt, "type">[]> {
    checkConversation(conversationId);
    const path = `/v1/conversations/${conversationId}/receipts`;
    return this.json<{ receipts: Omit<Receipt, "type">[] }>("GET", path, "receipts").then((b) => b.receipts);
  }

  /** Creates a group with the caller as member and admin; returns its conversation id. */
  async createGroup(name: string, members: string[]): Promise<string> {
    if (name.trim() === "") throw badInput("a group needs a name");
    members.forEach(checkUser);
    const body = await this.json<{ conversation_id: string }>("POST", "/v1/groups", "group", { name, members });
    return body.conversation_id;
  }

  /** Adds members to a group (admins only). */
  async addMembers(conversationId: string, users: string[]): Promise<void> {
    checkConversation(conversationId);
    users.forEach(checkUser);
    await this.json("POST", `/v1/groups/${conversationId}/members`, undefined, { users });
  }

  /** Removes a member (an admin removes anyone, a member removes itself). */
  async removeMember(conversationId: string, user: string): Promise<void> {
    checkConversation(conversationId);
    checkUser(user);
    await this.json("DELETE", `/v1/groups/${conversationId}/members/${user}`);
  }

  /** Uploads bytes as media of type `mime`; `signal` gives it up (`unavailable`). */
  async uploadMedia(data: Blob | Uint8Array, mime: string, signal?: AbortSignal): Promise<UploadedMedia> {
    if (!isMediaType(mime)) throw badInput(`not a media type: ${JSON.stringify(mime)}`);
    const response = await this.request("POST", "/v1/media", {
      body: data as BodyInit,
      headers: { "content-type": mime },
      signal,
    });
    return bodyOf<UploadedMedia>("POST", "/v1/media", response, "upload");
  }

  /** Downloads media, whole or a byte range (`Range: bytes=start-end`). Fails with `timeout`
   * when the server sends nothing for `timeoutMs`: no answer, or no byte since the last (a
   * large file that keeps coming is not cut), and with `too_large` when it is over
   * `maxDownloadBytes` (ask for a range of it). */
  async downloadMedia(mediaId: string, range?: ByteRange): Promise<MediaDownload> {
    if (!isConversationId(mediaId)) throw badInput(`not a media id: ${JSON.stringify(mediaId)}`);
    const headers: Record<string, string> = {};
    if (range) {
      const offset = (value: number) => Number.isSafeInteger(value) && value >= 0;
      if (!offset(range.start) || (range.end !== undefined && !(offset(range.end) && range.end >= range.start))) {
        throw badInput(`not a byte range: ${JSON.stringify(range)}`);
      }
      headers.range = `bytes=${range.start}-${range.end ?? ""}`;
    }
    const path = `/v1/media/${mediaId}`;
    const silence = new Silence(this.timeoutMs);
    let response: Response;
    let bytes: Uint8Array;
    try {
      response = await this.request("GET", path, { headers, signal: silence.signal });
      bytes = await readBody(response, () => silence.heard(), this.maxDownloadBytes, path);
    } catch (error) {
      if (!silence.signal.aborted) throw error;
      throw new CourierError("timeout", `GET ${path}: nothing came for ${this.timeoutMs} ms`);
    } finally {
      silence.end();
    }
    const contentRange = response.headers.get("content-range");
    const total = contentRange ? Number(contentRange.split("/")[1]) : bytes.length;
    return {
      bytes,
      mime: response.headers.get("content-type") ?? "application/octet-stream",
      status: response.status,
      totalSize: total,
    };
  }

  devices(): Promise<DeviceInfo[]> {
    return this.json<{ devices: DeviceInfo[] }>("GET", "/v1/devices", "devices").then((b) => b.devices);
  }

  /** Unlinks a device: its tokens are refused from then on. */
  async unlinkDevice(device: string): Promise<void> {
    checkId(device, "device");
    await this.request("DELETE", `/v1/devices/${device}`);
  }

  /** A request of the JSON API; the body of its answer is checked as `answer` when given. */
  private async json<T>(method: string, path: string, answer?: Answer, body?: unknown): Promise<T> {
    const init: { headers: Record<string, string>; body?: BodyInit; signal: AbortSignal } = {
      headers: {},
      signal: AbortSignal.timeout(this.timeoutMs),
    };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["content-type"] = "application/json";
    }
    try {
      const response = await this.request(method, path, init);
      return await bodyOf<T>(method, path, response, answer);
    } catch (error) {
      if (!init.signal.aborted) throw error;
      throw new CourierError("timeout", `${method} ${path}: no answer within ${this.timeoutMs} ms`);
    }
  }

  private async request(
    method: string,
    path: string,
    init: { headers?: Record<string, string>; body?: BodyInit; signal?: AbortSignal } = {},
  ): Promise<Response> {
    const token = await this.token();
    let response: Response;
    try {
      response = await this.fetchImpl(`${this.baseUrl}${path}`, {
        method,
        body: init.body,
        headers: { ...init.headers, authorization: `Bearer ${token}` },
        ...(init.signal && { signal: init.signal }),
      });
    } catch (error) {
      throw new CourierError("unavailable", `${method} ${path}: cannot reach the server (${String(error)})`);
    }
    if (response.ok) return response;
    throw await errorOf(method, path, response);
  }
}

/** A successful answer's JSON body; one that is not JSON did not come from Courier (a captive
 * portal's page, a proxy's): `unavailable`, to try again, without a status (the server was not
 * reached). One whose fields break the protocol (`brokenAnswer` of `answer`: a seq that is
 * text, a body that is no object) is refused as `internal`, as such a frame is: taken, it
 * would corrupt what the client holds, or throw in the views that render it. */
async function bodyOf<T>(method: string, path: string, response: Response, answer?: Answer): Promise<T> {
  const text = await response.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new CourierError(
      "unavailable",
      `${method} ${path}: the answer (HTTP ${response.status}) is not JSON, so not the server's: a captive portal's or a proxy's page?`,
    );
  }
  const broken = answer && brokenAnswer(answer, body);
  if (broken) {
    const message = `${method} ${path}: the answer breaks the protocol (its ${broken})`;
    throw new CourierError("internal", message, { status: response.status });
  }
  return body as T;
}

/** Aborts its signal once `ms` pass without `heard` (nor `end`). */
class Silence {
  private readonly controller = new AbortController();
  private timer: ReturnType<typeof setTimeout>;

  constructor(private readonly ms: number) {
    this.timer = setTimeout(() => this.controller.abort(), ms);
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  heard(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.controller.abort(), this.ms);
  }

  end(): void {
    clearTimeout(this.timer);
  }
}

/** A response's body, telling `progress` of each part as it comes; one of more than
 * `maxBytes` is refused (`too_large`) and not read further. */
async function readBody(
  response: Response,
  progress: () => void,
  maxBytes: number,
  path: string,
): Promise<Uint8Array> {
  const tooLarge = () => new CourierError("too_large", `GET ${path}: more than ${maxBytes} bytes (maxDownloadBytes)`);
  progress();
  if (Number(response.headers.get("content-length")) > maxBytes) {
    await response.body?.cancel();
    throw tooLarge();
  }
  if (!response.body) return new Uint8Array(await response.arrayBuffer());
  const parts: Uint8Array[] = [];
  let length = 0;
  const reader = response.body.getReader();
  for (let part = await reader.read(); !part.done; part = await reader.read()) {
    progress();
    parts.push(part.value);
    length += part.value.byteLength;
    if (length > maxBytes) {
      await reader.cancel();
      throw tooLarge();
    }
  }
  const bytes = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.byteLength;
  }
  return bytes;
}

async function errorOf(method: string, path: string, response: Response): Promise<CourierError> {
  const text = await response.text();
  try {
    const body = JSON.parse(text) as { code?: ErrorCode; message?: string; retry_after_ms?: number };
    const retryAfterMs = askedDelayMs(body.retry_after_ms) ?? retryAfterHeaderMs(response.headers.get("retry-after"));
    if (body.code) return new CourierError(body.code, body.message ?? "", { status: response.status, retryAfterMs });
  } catch {
    // Not a protocol error body: reported with the status below.
  }
  return new CourierError("http", `${method} ${path}: HTTP ${response.status}`, { status: response.status });
}

/** A `Retry-After` of whole seconds in milliseconds (an HTTP date, or none, is no hint). */
function retryAfterHeaderMs(header: string | null): number | undefined {
  if (header === null || !/^\d+$/.test(header.trim())) return undefined;
  return Number(header.trim()) * 1000;
}

function checkConversation(id: string): void {
  if (!isConversationId(id)) throw badInput(`not a conversation id: ${JSON.stringify(id)}`);
}

function checkUser(id: string): void {
  checkId(id, "user");
}

/** User and device ids share one alphabet (PROTOCOL.md). */
function checkId(id: string, what: "user" | "device"): void {
  if (!isUserId(id)) throw badInput(`not a ${what} id: ${JSON.stringify(id)}`);
}
