/**
 * A small typed event emitter: `on` returns the function that removes the listener. A
 * listener that throws is handed to `failed` and the others still run: the emitter's caller
 * (the client, amid taking a frame) is never cut short by the code of an app.
 */
export class Emitter<Events extends Record<string, unknown>> {
  private readonly listeners = new Map<keyof Events, Set<(value: never) => void>>();

  constructor(private readonly failed: (name: keyof Events, error: unknown) => void = reportToHost) {}

  on<K extends keyof Events>(name: K, listener: (value: Events[K]) => void): () => void {
    let set = this.listeners.get(name);
    if (!set) {
      set = new Set();
      this.listeners.set(name, set);
    }
    set.add(listener as (value: never) => void);
    return () => set.delete(listener as (value: never) => void);
  }

  /** Whether `name` has a listener. */
  has(name: keyof Events): boolean {
    return (this.listeners.get(name)?.size ?? 0) > 0;
  }

  emit<K extends keyof Events>(name: K, value: Events[K]): void {
    for (const listener of [...(this.listeners.get(name) ?? [])]) {
      try {
        (listener as (value: Events[K]) => void)(value);
      } catch (error) {
        this.failed(name, error);
      }
    }
  }
}

/** Hands an error to the host's reporting, as a DOM event listener's would be: the
 * browser's `reportError` (the console, `window.onerror`), else the console. */
export function reportToHost(_name: unknown, error: unknown): void {
  const report = (globalThis as { reportError?: (error: unknown) => void }).reportError;
  if (report) report(error);
  else console.error(error);
}
