/**
 * Reconnect delays: exponential backoff with full jitter (a random delay between zero and
 * `base * 2^attempt`, capped), so that clients cut off together do not come back together.
 */
export interface BackoffOptions {
  /** The first delay's ceiling in ms (default 500). */
  baseMs?: number;
  /** The largest delay in ms (default 30 000). */
  maxMs?: number;
  /** The source of randomness in [0, 1) (default `Math.random`). */
  random?: () => number;
}

export class Backoff {
  private attempt = 0;
  private readonly baseMs: number;
  /** The largest delay in ms. */
  readonly maxMs: number;
  private readonly random: () => number;

  constructor(options: BackoffOptions = {}) {
    this.baseMs = options.baseMs ?? 500;
    this.maxMs = options.maxMs ?? 30_000;
    this.random = options.random ?? Math.random;
    if (!(this.baseMs > 0) || !(this.maxMs >= this.baseMs)) {
      throw new RangeError("backoff needs 0 < baseMs <= maxMs");
    }
  }

  /** The delay before the next attempt; each call widens the window until `reset`. */
  next(): number {
    const ceiling = Math.min(this.maxMs, this.baseMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    return Math.floor(this.random() * ceiling);
  }

  /** After a successful connection. */
  reset(): void {
    this.attempt = 0;
  }
}

/** A delay the server asked for (`reconnect.after_ms`, `retry_after_ms`), plus up to 20%
 * jitter so that a gateway's clients do not all arrive in the same millisecond. */
export function withJitter(ms: number, random: () => number = Math.random): number {
  return Math.floor(ms + ms * 0.2 * random());
}

/** The longest wait a timer takes (2^31 - 1 ms, ~24.8 days): a longer one fires at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** A wait the server asked for (`retry_after_ms`, `reconnect.after_ms`) in ms, if it is one: a
 * number from 0, at most what a timer takes; anything else is no wait asked for. */
export function askedDelayMs(value: unknown): number | undefined {
  return typeof value === "number" && value >= 0 ? Math.min(value, MAX_TIMER_MS) : undefined;
}

/** Resolves after `ms` (at most [`MAX_TIMER_MS`]), or once `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, Math.min(ms, MAX_TIMER_MS));
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
