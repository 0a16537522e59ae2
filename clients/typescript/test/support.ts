/**
 * Test support: a real `courier serve` on 127.0.0.1 with an ephemeral port and a temporary
 * data directory (binary from `COURIER_BIN`, default `target/debug/courier` of the
 * workspace), tokens from `courier token`, and a WebSocket whose network a test can cut.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { CourierClient, MemoryOutboxStorage, type CourierClientOptions, type WebSocketConstructor } from "../src/index.js";

const PACKAGE_DIR = resolve(fileURLToPath(import.meta.url), "../../..");
export const COURIER_BIN = process.env.COURIER_BIN ?? resolve(PACKAGE_DIR, "../../target/debug/courier");

/** Longest wait for anything a test expects. */
export const WAIT_MS = 20_000;

export class Server {
  private child: ChildProcess | undefined;
  address = "";
  /** The data directories this server has run on (a restore writes another). */
  private readonly dataDirs: string[];

  private constructor(
    private dataDirNow: string,
    private readonly args: string[],
  ) {
    this.dataDirs = [dataDirNow];
  }

  get dataDir(): string {
    return this.dataDirNow;
  }

  /** Starts a server with extra `serve` flags in a fresh data directory. */
  static async start(args: string[] = []): Promise<Server> {
    const server = new Server(mkdtempSync(join(tmpdir(), "courier-sdk-test-")), args);
    await server.spawn("127.0.0.1:0");
    return server;
  }

  get url(): string {
    return `http://${this.address}`;
  }

  token(user: string, device: string): string {
    return execFileSync(COURIER_BIN, ["token", "--user", user, "--device", device, "--data-dir", this.dataDir], {
      encoding: "utf8",
    }).trim();
  }

  /** SIGTERM (the server drains: `reconnect`, close 1001), then waits for the exit. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((done) => child.once("exit", done));
    child.kill("SIGTERM");
    await exited;
  }

  /** Starts the server again on the same address and data directory. */
  async restart(): Promise<void> {
    await this.stop();
    await this.spawn(this.address);
  }

  /** `courier backup` of the running server into a file; returns its path. */
  backup(): string {
    const archive = join(mkdtempSync(join(tmpdir(), "courier-sdk-backup-")), "backup.tar");
    this.dataDirs.push(dirname(archive));
    execFileSync(COURIER_BIN, ["backup", "--data-dir", this.dataDir, "--to", archive, "--quiet"]);
    return archive;
  }

  /** Stops the server, has `courier restore` write a new data directory from `archive`, and
   * starts the server there on the same address: the server goes back to the backup's moment. */
  async restore(archive: string): Promise<void> {
    await this.stop();
    const restored = join(mkdtempSync(join(tmpdir(), "courier-sdk-restored-")), "data");
    this.dataDirs.push(dirname(restored));
    execFileSync(COURIER_BIN, ["restore", "--from", archive, "--data-dir", restored, "--quiet"]);
    this.dataDirNow = restored;
    await this.spawn(this.address);
  }

  async dispose(): Promise<void> {
    await this.stop();
    for (const dir of this.dataDirs) rmSync(dir, { recursive: true, force: true });
  }

  private spawn(listen: string): Promise<void> {
    const child = spawn(
      COURIER_BIN,
      [
        "serve",
        "--listen",
        listen,
        "--data-dir",
        this.dataDir,
        "--min-free-disk",
        "0",
        "--media-min-free-disk",
        "0",
        "--log-format",
        "text",
        ...this.args,
      ],
      { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "info" } },
    );
    this.child = child;
    return new Promise((ready, failed) => {
      let output = "";
      const timer = setTimeout(() => failed(new Error(`courier did not report ready:\n${output}`)), WAIT_MS);
      child.stderr!.setEncoding("utf8");
      child.stderr!.on("data", (chunk: string) => {
        output += chunk;
        const match = /courier ready on (\S+)/.exec(output);
        if (match && !this.child?.killed) {
          this.address = match[1]!;
          clearTimeout(timer);
          ready();
        }
      });
      child.once("exit", (code) => {
        clearTimeout(timer);
        failed(new Error(`courier exited with ${code} before ready:\n${output}`));
      });
    });
  }
}

/**
 * A network a test controls: `WebSocket` connects through it; `cut()` drops every open
 * connection without a close frame and refuses new ones until `restore()`; while `lose` is
 * set, the frames the client writes that it matches never reach the server (written into a
 * connection whose network is already gone); while `answer` is set, a frame it returns a
 * reply for never reaches the server either, and the client reads that reply instead (a
 * server that refuses it: `unavailable`, `rate_limited`); while `mangle` is set, the client
 * reads what it returns for each frame of the server (a frame broken on its way).
 */
export class Network {
  private online = true;
  private readonly sockets = new Set<WebSocket>();
  readonly WebSocket: WebSocketConstructor;
  lose: ((frame: { type: string; kind?: string; client_msg_id?: string }) => boolean) | undefined;
  answer: ((frame: { type: string; ref?: number }) => Record<string, unknown> | undefined) | undefined;
  mangle: ((frame: Record<string, unknown>) => Record<string, unknown>) | undefined;

  constructor() {
    const network = this;
    class ControlledWebSocket extends WebSocket {
      constructor(url: string, protocols?: string | string[]) {
        // Port 1 on loopback refuses the connection, as a dead network would.
        super(network.online ? url : "ws://127.0.0.1:1/v1/ws", protocols);
        network.sockets.add(this);
        this.on("close", () => network.sockets.delete(this));
      }

      override send(data: unknown, ...rest: unknown[]): void {
        if (typeof data === "string" && network.lose?.(JSON.parse(data))) return;
        const reply = typeof data === "string" ? network.answer?.(JSON.parse(data)) : undefined;
        if (reply) {
          // Read as if it came from the server, after this write returns.
          setImmediate(() => this.emit("message", Buffer.from(JSON.stringify(reply)), false));
          return;
        }
        (super.send as (...args: unknown[]) => void).call(this, data, ...rest);
      }

      override emit(event: string | symbol, ...args: unknown[]): boolean {
        if (event === "message" && network.mangle && args[1] === false) {
          args = [Buffer.from(JSON.stringify(network.mangle(JSON.parse(String(args[0]))))), false];
        }
        return super.emit(event, ...args);
      }
    }
    this.WebSocket = ControlledWebSocket as unknown as WebSocketConstructor;
  }

  cut(): void {
    this.online = false;
    for (const socket of this.sockets) socket.terminate();
  }

  restore(): void {
    this.online = true;
  }
}

const opened: CourierClient[] = [];

/** Closes every client the tests opened (a failed test leaves none running). */
export function closeClients(): void {
  opened.splice(0).forEach((c) => c.close());
}

/** A client of `user`'s `device`, through `network` when given. */
export async function client(
  server: Server,
  user: string,
  device: string,
  options: Partial<CourierClientOptions> & { network?: Network } = {},
): Promise<CourierClient> {
  const { network, ...rest } = options;
  const created = await CourierClient.open({
    url: server.url,
    token: server.token(user, device),
    WebSocket: network?.WebSocket ?? (WebSocket as unknown as WebSocketConstructor),
    storage: new MemoryOutboxStorage(),
    backoff: { baseMs: 50, maxMs: 500 },
    ...rest,
  });
  opened.push(created);
  return created;
}

/** A client that has had its first catch-up. */
export async function synced(server: Server, user: string, device: string, options: Parameters<typeof client>[3] = {}) {
  const opened = await client(server, user, device, options);
  await opened.whenSynced();
  return opened;
}

/** Waits until `condition` holds (checked every 20 ms); fails naming `what` after
 * [`WAIT_MS`]. */
export async function until(what: string, condition: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The texts of a conversation's messages, in order (deleted ones as `(deleted)`). */
export function texts(client: CourierClient, conversationId: string): string[] {
  const conversation = client.conversation(conversationId);
  if (!conversation) return [];
  return conversation.timeline
    .list()
    .filter((event) => event.kind === "message")
    .map((event) => (event.deleted ? "(deleted)" : event.body && "text" in event.body ? event.body.text : "(media)"));
}
