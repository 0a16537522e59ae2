import { askedDelayMs } from "./backoff.js";
import type { ErrorCode, ErrorFrame } from "./protocol.js";

/**
 * Why an SDK call failed. `code` is the protocol's error code when the server answered one
 * (or the SDK refused bad input as `bad_request` before sending), otherwise one of the
 * SDK's own: `closed` (the connection went away before the reply; a send is retried from
 * the outbox), `timeout` (no reply in time), `http` (an HTTP status without a protocol body),
 * `replaced` (the server closed the connection for newer ones of the same device, and the
 * client is paused until `resume`: coming back would close the next oldest).
 */
export class CourierError extends Error {
  readonly code: ErrorCode | "closed" | "timeout" | "http" | "replaced";
  /** The HTTP status, for errors of the HTTP API. */
  readonly status: number | undefined;
  /** How long the server asks to wait before a retry (`rate_limited`). */
  readonly retryAfterMs: number | undefined;
  /** The send this error answers. */
  readonly clientMsgId: string | undefined;

  constructor(
    code: CourierError["code"],
    message: string,
    details: { status?: number; retryAfterMs?: number; clientMsgId?: string } = {},
  ) {
    super(`${code}: ${message}`);
    this.name = "CourierError";
    this.code = code;
    this.status = details.status;
    this.retryAfterMs = details.retryAfterMs;
    this.clientMsgId = details.clientMsgId;
  }

  static fromFrame(frame: ErrorFrame): CourierError {
    return new CourierError(frame.code, frame.message, {
      retryAfterMs: askedDelayMs(frame.retry_after_ms),
      clientMsgId: frame.client_msg_id,
    });
  }

  /** The refusal an outbox entry's `failed` mark records (`{code, message}` of the error). */
  static fromMark(mark: { code: string; message: string }, clientMsgId: string): CourierError {
    const prefix = `${mark.code}: `;
    const message = mark.message.startsWith(prefix) ? mark.message.slice(prefix.length) : mark.message;
    return new CourierError(mark.code as CourierError["code"], message, { clientMsgId });
  }

  /** True when the same request may succeed later unchanged (PROTOCOL.md: retry a send
   * with the same `client_msg_id` on `unavailable`; wait `retry_after_ms` on `rate_limited`). */
  get retriable(): boolean {
    return this.code === "unavailable" || this.code === "rate_limited" || this.code === "closed";
  }
}

/** A `bad_request` for input the SDK refuses before it reaches the server. */
export function badInput(message: string): CourierError {
  return new CourierError("bad_request", message);
}
