/**
 * One WebSocket connection of a device: opens it with the token, waits for `hello`, sends
 * frames, and matches the direct replies (`sent`, `messages`, `pong`, `error`) to their
 * requests by `ref`. Everything else goes to `onFrame` in arrival order. A connection is
 * used once: after it closes, the client opens a new one.
 */
import { CourierError } from "./errors.js";
import { SUBPROTOCOL_JSON, brokenField, type ClientFrame, type Hello, type ServerFrame } from "./protocol.js";

/** What the SDK needs of a WebSocket: the browser's, Node 22's global, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

const OPEN = 1;

/** The frames that have a direct reply (`sent`, `messages`, `pong`, or `error`). */
export type RequestFrame = Extract<ClientFrame, { ref?: number }>;

/** Why a connection ended: the WebSocket close code and reason (1006 when it never opened
 * or dropped without a close frame). */
export interface CloseInfo {
  code: number;
  reason: string;
}

interface PendingReply {
  /** The request, which its reply must answer (`unanswered`). */
  request: RequestFrame;
  resolve(frame: ServerFrame): void;
  reject(error: CourierError): void;
  timer: ReturnType<typeof setTimeout>;
}

export interface ConnectionHandlers {
  onFrame(frame: ServerFrame): void;
  onClose(info: CloseInfo): void;
  /** A frame whose fields break the protocol was passed over (one that answers a request
   * rejects it instead). */
  onBroken(error: CourierError, frame: ServerFrame): void;
}

export class Connection {
  private nextRef = 1;
  private readonly pending = new Map<number, PendingReply>();
  private closed = false;
  /** Why the connection ended, once it has. */
  closeInfo: CloseInfo | undefined;

  private constructor(
    private readonly socket: WebSocketLike,
    readonly hello: Hello,
    private readonly handlers: ConnectionHandlers,
    private readonly replyTimeoutMs: number,
  ) {}

  /**
   * Opens `wsUrl` (`ws(s)://host/v1/ws`) with the token in the `access_token` query
   * parameter (a browser cannot set an `Authorization` header on a WebSocket) and resolves
   * with the connection once `hello` has arrived. `handlers` then get every other frame.
   */
  static open(
    WebSocketImpl: WebSocketConstructor,
    wsUrl: string,
    token: string,
    handlers: ConnectionHandlers,
    timeoutMs: number,
  ): Promise<Connection> {
    const url = new URL(wsUrl);
    url.searchParams.set("access_token", token);
    const socket = new WebSocketImpl(url.toString(), SUBPROTOCOL_JSON);
    return new Promise((resolve, reject) => {
      let connection: Connection | undefined;
      const timer = setTimeout(() => {
        socket.close();
        reject(new CourierError("timeout", `no hello from ${wsUrl} within ${timeoutMs} ms`));
      }, timeoutMs);
      socket.onmessage = (event) => {
        const frame = parseFrame(event.data);
        if (!frame) return;
        if (connection) {
          connection.receive(frame);
        } else if (frame.type === "hello") {
          clearTimeout(timer);
          connection = new Connection(socket, frame, handlers, timeoutMs);
          resolve(connection);
        }
      };
      socket.onerror = () => {
        // A close event follows; it says what happened.
      };
      socket.onclose = (event) => {
        clearTimeout(timer);
        const info = { code: event.code, reason: event.reason };
        if (connection) {
          connection.finish(info);
        } else {
          reject(
            new CourierError(
              "closed",
              `connection to ${wsUrl} closed before hello (code ${info.code}${info.reason ? `: ${info.reason}` : ""})`,
            ),
          );
        }
      };
    });
  }

  get isOpen(): boolean {
    return !this.closed && this.socket.readyState === OPEN;
  }

  /** Sends a frame that has no direct reply (`ack`, `typing`, `sync`). */
  send(frame: ClientFrame): void {
    if (!this.isOpen) throw new CourierError("closed", "the connection is closed");
    this.socket.send(JSON.stringify(frame));
  }

  /** Sends a frame that has no reply unless it is refused (`ack`) with a fresh `ref`, and
   * returns it: an `error` refusing the frame carries it, and goes to `onFrame`. */
  post(frame: Extract<ClientFrame, { type: "ack" }>): number {
    const ref = this.nextRef++;
    this.send({ ...frame, ref });
    return ref;
  }

  /** Sends a frame with a fresh `ref` and resolves with its direct reply; an `error` reply
   * rejects with its code. */
  request<F extends ServerFrame>(frame: RequestFrame): Promise<F> {
    const ref = this.nextRef++;
    return new Promise<F>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new CourierError("timeout", `no reply to ${frame.type} within ${this.replyTimeoutMs} ms`));
      }, this.replyTimeoutMs);
      this.pending.set(ref, { request: frame, resolve: resolve as (f: ServerFrame) => void, reject, timer });
      try {
        this.send({ ...frame, ref });
      } catch (error) {
        clearTimeout(timer);
        this.pending.delete(ref);
        reject(error);
      }
    });
  }

  /** Closes the connection and reports it closed at once, without waiting for the close
   * handshake (which a dead network would never complete). */
  close(code = 1000, reason = ""): void {
    this.socket.close(code, reason);
    this.finish({ code, reason });
  }

  /** A frame after `hello`: a reply settles its request; anything else goes to `onFrame`, but
   * a frame whose fields break the protocol (a seq that is text, an event without its sender),
   * which would corrupt what the client holds, is passed over and told to `onBroken`. A frame
   * with a request's `ref` that does not answer it (`unanswered`: a `sent` naming another
   * message or conversation than the send's, a reply of another type) rejects the request as
   * one that breaks the protocol: taken, it would settle another outbox entry, never sent.
   * A reply whose `ref` matches no request (none, or one given up after `replyTimeoutMs`)
   * goes to `onFrame`, which passes it over: a `sent` settles no entry but its send's reply. */
  private receive(frame: ServerFrame): void {
    const ref = "ref" in frame ? frame.ref : undefined;
    const waiting = ref === undefined ? undefined : this.pending.get(ref);
    const broken =
      brokenField(frame as ServerFrame & Record<string, unknown>) ?? (waiting && unanswered(waiting.request, frame));
    const refusal =
      broken && new CourierError("internal", `the server's ${frame.type} frame breaks the protocol (its ${broken}): passed over`);
    if (waiting) {
      this.pending.delete(ref!);
      clearTimeout(waiting.timer);
      if (refusal) waiting.reject(refusal);
      else if (frame.type === "error") waiting.reject(CourierError.fromFrame(frame));
      else waiting.resolve(frame);
      return;
    }
    if (this.closed) return;
    if (refusal) this.handlers.onBroken(refusal, frame);
    else this.handlers.onFrame(frame);
  }

  private finish(info: CloseInfo): void {
    if (this.closed) return;
    this.closed = true;
    this.closeInfo = info;
    for (const [, waiting] of this.pending) {
      clearTimeout(waiting.timer);
      waiting.reject(new CourierError("closed", `the connection closed (code ${info.code}) before the reply`));
    }
    this.pending.clear();
    this.handlers.onClose(info);
  }
}

/** The reply each request has when the server does not refuse it with an `error`. */
const REPLY_TYPES: Record<RequestFrame["type"], ServerFrame["type"] | undefined> = {
  send: "sent",
  delete: "sent",
  fetch: "messages",
  ping: "pong",
  // An ack has no reply but its refusal.
  ack: undefined,
};

/** Why a frame carrying a request's `ref` does not answer it (the field that says so), if it
 * does not: a reply of another type than the request's, one of another conversation, a
 * `sent` (or an `error`) naming another message than the send's `client_msg_id`. */
function unanswered(request: RequestFrame, reply: ServerFrame): string | undefined {
  if (reply.type !== "error" && reply.type !== REPLY_TYPES[request.type]) {
    return `type, not the reply to a ${request.type}`;
  }
  if ("conversation_id" in request && request.conversation_id !== undefined && "conversation_id" in reply) {
    if (reply.conversation_id !== undefined && reply.conversation_id !== request.conversation_id) {
      return `conversation_id, another conversation than the ${request.type}'s`;
    }
  }
  if (request.type === "send" && "client_msg_id" in reply && reply.client_msg_id !== undefined) {
    if (reply.client_msg_id !== request.client_msg_id) return "client_msg_id, another message than the send's";
  }
  return undefined;
}

function parseFrame(data: unknown): ServerFrame | undefined {
  if (typeof data !== "string") return undefined;
  try {
    const frame = JSON.parse(data) as ServerFrame;
    return typeof frame === "object" && frame !== null && typeof frame.type === "string" ? frame : undefined;
  } catch {
    return undefined;
  }
}
