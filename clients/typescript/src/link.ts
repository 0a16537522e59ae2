/**
 * Keeps one device's connection open: connects, reconnects after a drop with exponential
 * backoff and full jitter (or after the delay a draining server sent in `reconnect`), pings
 * an idle connection and abandons one that does not answer, holds off while paused, and
 * stops for good when the server refuses the token. Each connection gets a fresh
 * [`Session`]; its frames go to `onFrame`.
 *
 * Whether the server refuses the token is asked over HTTP (`LinkSettings.probe`): a browser
 * cannot tell a refused upgrade (HTTP 401 or 403) from a network failure, both a close 1006
 * before `hello`. The probe is made once per token after a failed attempt since a connection
 * was last up, not after each (a server that is down or overloaded would get two requests per
 * attempt), again once the token has expired or [`VOUCH_CEILINGS`] backoff ceilings after the
 * probe that found it taken (the device may have been unlinked since), and after each attempt
 * while it cannot reach the server either. A connection the server closes with 1008 (policy)
 * is probed too: an unlinked device or one past its user's limit of devices is refused;
 * otherwise newer connections of the same device took its place (16 per device on a gateway),
 * and coming back would only close the next oldest, which would come back in turn: the link
 * pauses until `resume` and says so (`onReplaced`).
 */
import { Backoff, sleep, withJitter } from "./backoff.js";
import { Connection, type WebSocketConstructor } from "./connection.js";
import { CourierError } from "./errors.js";
import { expiresAtMs } from "./identity.js";
import { CLOSE_POLICY, type ServerFrame } from "./protocol.js";

export type ConnectionState = "connecting" | "online" | "offline" | "closed";

/** What one connection knows while it lasts. */
export interface Session {
  connection: Connection;
  /** Resolves when the connection has closed. */
  closed: Promise<void>;
  /** Per conversation, the seq of the last event this connection streamed. */
  streamed: Map<string, number>;
  /** Per conversation, where this connection's stream started (the server's cursor). */
  streamBase: Map<string, number>;
  /** The conversations an event of whose was passed over since their last streamed event
   * (it broke the protocol): the stream has a hole there. */
  passedOver: Set<string>;
  /** An event whose conversation could not be told was passed over: the streams of the
   * conversations that start after it may have lost it, so they tell no stream base. */
  baseUnknown: boolean;
  /** Per conversation, the cursors this connection's `ack`s carried. */
  acked: Map<string, { delivered: number; read: number }>;
  /** `reconnect.after_ms`, once the server asked. */
  reconnectAfterMs?: number;
  /** Set at the connection's first `sync_done`: its catch-up is complete. */
  caughtUp?: boolean;
}

/** How long a connection must stay up after its catch-up before the reconnect backoff
 * starts over: a server that closes every connection soon after it opens (a frame it
 * refuses, an overload) then sees the delays grow instead of a reconnection storm. */
export const STABLE_CONNECTION_MS = 5_000;

/** How long a probe that found the token taken vouches for it, in ceilings of the reconnect
 * backoff (5 min by default): failed attempts meanwhile are not probed again. An attempt the
 * server refuses because the device was unlinked since looks the same in a browser as one the
 * network failed, so the token is probed again after that, not only once it has expired. */
export const VOUCH_CEILINGS = 10;

export interface LinkSettings {
  WebSocketImpl: WebSocketConstructor;
  websocketUrl: string;
  token: () => Promise<string>;
  backoff: Backoff;
  replyTimeoutMs: number;
  heartbeatMs: number;
  /** Asks the server whether it refuses the token for good (an HTTP request with it): its
   * refusal (`unauthorized`, `forbidden`) if so; `reached` false when the request did not
   * reach the server (the network is down too). */
  probe: () => Promise<TokenProbe>;
}

/** What a probe of the token found. */
export interface TokenProbe {
  refused?: CourierError;
  reached: boolean;
}

export interface LinkHandlers {
  onOnline(session: Session): void;
  onFrame(session: Session, frame: ServerFrame): void;
  onState(state: ConnectionState): void;
  onRefused(error: CourierError): void;
  /** A frame whose fields break the protocol was passed over. */
  onBroken(session: Session, error: CourierError, frame: ServerFrame): void;
  /** The server closed the connection for newer ones of the same device (`replaced`): the
   * link is paused until `resume`. */
  onReplaced(error: CourierError): void;
}

export class Link {
  private current: Session | undefined;
  private connectionState: ConnectionState = "connecting";
  private stopped = false;
  /** Set by `pause` until `resume`. */
  private paused: { resumed: Promise<void>; resume: () => void } | undefined;
  private wake = new AbortController();
  /** A token a probe found the server taking since a connection was last up, and when: an
   * attempt with it that fails is the network's or the server's, and is not probed again
   * (unless the token has expired since, or the probe is [`VOUCH_CEILINGS`] old). */
  private vouched: { token: string; atMs: number } | undefined;

  constructor(
    private readonly settings: LinkSettings,
    private readonly handlers: LinkHandlers,
  ) {}

  get state(): ConnectionState {
    return this.connectionState;
  }

  /** The open connection's session, if there is one. */
  get session(): Session | undefined {
    return this.current?.connection.isOpen ? this.current : undefined;
  }

  start(): void {
    void this.run();
  }

  pause(): void {
    if (this.paused || this.stopped) return;
    let resume!: () => void;
    const resumed = new Promise<void>((r) => (resume = r));
    this.paused = { resumed, resume };
    this.current?.connection.close(1000, "client paused");
    this.setState("offline");
  }

  resume(): void {
    const paused = this.paused;
    this.paused = undefined;
    paused?.resume();
    this.reconnectNow();
  }

  reconnectNow(): void {
    this.wake.abort();
    this.wake = new AbortController();
  }

  close(): void {
    this.stopped = true;
    this.current?.connection.close(1000, "client closed");
    this.resume();
    this.setState("closed");
  }

  /** The session's catch-up is complete (`sync_done`). The backoff starts over once the
   * connection has stayed up [`STABLE_CONNECTION_MS`] more, not at once. */
  caughtUp(session: Session): void {
    if (session.caughtUp) return;
    session.caughtUp = true;
    const timer = setTimeout(() => {
      if (this.current === session && session.connection.isOpen) this.settings.backoff.reset();
    }, STABLE_CONNECTION_MS);
    void session.closed.then(() => clearTimeout(timer));
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      if (this.paused) {
        this.setState("offline");
        await this.paused.resumed;
        continue;
      }
      this.setState("connecting");
      const session = await this.connect();
      if (!session) continue;
      if (this.stopped || this.paused) {
        session.connection.close(1000, this.stopped ? "client closed" : "client paused");
        continue;
      }
      this.setState("online");
      this.handlers.onOnline(session);
      await this.heartbeat(session);
      this.current = undefined;
      if (this.stopped || this.paused) continue;
      // Offline before the probe of a 1008: the connection is gone while it is asked.
      this.setState("offline");
      if (session.connection.closeInfo?.code === CLOSE_POLICY) {
        await this.closedByPolicy();
        if (this.stopped || this.paused) continue;
      }
      const delay =
        session.reconnectAfterMs !== undefined ? withJitter(session.reconnectAfterMs) : this.settings.backoff.next();
      await sleep(delay, this.wake.signal);
    }
  }

  /** One attempt; after a failure it has waited its backoff (or stopped the link). */
  private async connect(): Promise<Session | undefined> {
    const { settings } = this;
    // Frames may follow `hello` in the same read, before `open` resolves: the session they
    // go to exists first.
    let closed!: () => void;
    const session: Session = {
      connection: undefined as unknown as Connection,
      closed: new Promise<void>((r) => (closed = r)),
      streamed: new Map(),
      streamBase: new Map(),
      passedOver: new Set(),
      baseUnknown: false,
      acked: new Map(),
    };
    let token: string | undefined;
    try {
      token = await settings.token();
      session.connection = await Connection.open(
        settings.WebSocketImpl,
        settings.websocketUrl,
        token,
        {
          onFrame: (frame) => this.handlers.onFrame(session, frame),
          onClose: () => closed(),
          onBroken: (error, frame) => this.handlers.onBroken(session, error, frame),
        },
        settings.replyTimeoutMs,
      );
      // Current at once: acknowledgements of frames that came with `hello` go out on it.
      this.current = session;
      // The next failure may be a refusal again (the device unlinked meanwhile).
      this.vouched = undefined;
      return session;
    } catch (error) {
      if (this.stopped) return undefined;
      if (await this.refusedBeforeHello(error, token)) return undefined;
      await sleep(settings.backoff.next(), this.wake.signal);
      return undefined;
    }
  }

  /** After an attempt closed before `hello`: whether the server refuses the token, which then
   * stops the link. Probed once per token since a connection was last up (see the module's
   * doc). */
  private async refusedBeforeHello(error: unknown, token: string | undefined): Promise<boolean> {
    if (!(error instanceof CourierError) || error.code !== "closed" || token === undefined) return false;
    if (this.vouches(token)) return false;
    const probe = await this.settings.probe();
    if (this.stopped) return true;
    if (probe.refused) {
      this.refuse(probe.refused);
      return true;
    }
    if (probe.reached) this.vouched = { token, atMs: Date.now() };
    return false;
  }

  /** Whether a probe found `token` taken recently enough to take a failed attempt with it for
   * the network's or the server's. */
  private vouches(token: string): boolean {
    const vouched = this.vouched;
    if (vouched?.token !== token || hasExpired(token)) return false;
    return Date.now() - vouched.atMs < VOUCH_CEILINGS * this.settings.backoff.maxMs;
  }

  /** An open connection the server closed with 1008: a refused token stops the link; a token
   * the server still takes means newer connections of the device took this one's place, and
   * the link pauses. When the probe cannot reach the server, the link reconnects as after
   * any drop (and asks again if closed with 1008 again). */
  private async closedByPolicy(): Promise<void> {
    const probe = await this.settings.probe();
    if (this.stopped || this.paused) return;
    if (probe.refused) return this.refuse(probe.refused);
    if (!probe.reached) return;
    this.pause();
    this.handlers.onReplaced(
      new CourierError(
        "replaced",
        "newer connections of this device took this one's place (the server keeps 16 per device): " +
          "close one of them (another tab or window) and resume",
      ),
    );
  }

  private refuse(error: CourierError): void {
    this.close();
    this.handlers.onRefused(error);
  }

  /** Until the connection ends: pings when it has been idle, abandons it when a ping gets
   * no answer. A ping refused with an `error` (`rate_limited` while the connection's frames
   * are over the server's rate) was answered: the connection is alive and kept. */
  private async heartbeat(session: Session): Promise<void> {
    const stop = new AbortController();
    void session.closed.then(() => stop.abort());
    while (!stop.signal.aborted) {
      await sleep(this.settings.heartbeatMs, stop.signal);
      if (stop.signal.aborted) return;
      try {
        await session.connection.request({ type: "ping" });
      } catch (error) {
        if (!(error instanceof CourierError) || error.code === "timeout") {
          session.connection.close(4000, "no answer to ping");
          return;
        }
      }
    }
  }

  private setState(state: ConnectionState): void {
    if (this.connectionState === state) return;
    this.connectionState = state;
    this.handlers.onState(state);
  }
}

/** Whether the token's `exp` claim has passed (one without a readable `exp` has not). */
function hasExpired(token: string): boolean {
  const expires = expiresAtMs(token);
  return expires !== undefined && Date.now() >= expires;
}
