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

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
