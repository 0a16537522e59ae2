/**
 * Who a token speaks for, read from its claims (`sub`, `dev`) without verifying it: the
 * server verifies; the SDK only needs the names to keep one device's outbox apart from
 * another's in shared storage.
 */
import { badInput } from "./errors.js";
import { isUserId } from "./protocol.js";

export interface Identity {
  user: string;
  device: string;
}

export function identityOf(token: string): Identity {
  const { sub, dev } = claimsOf(token);
  if (typeof sub !== "string" || !isUserId(sub) || typeof dev !== "string" || !isUserId(dev)) {
    throw badInput("the token has no valid `sub` (user) and `dev` (device) claims");
  }
  return { user: sub, device: dev };
}

/** When the token expires (its `exp` claim, in ms), if it says; unverified, as a hint of
 * when to ask the server again whether it takes the token. */
export function expiresAtMs(token: string): number | undefined {
  try {
    const { exp } = claimsOf(token);
    return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

function claimsOf(token: string): { sub?: unknown; dev?: unknown; exp?: unknown } {
  const payload = token.split(".")[1];
  if (!payload) throw badInput("the token is not a JWT (header.payload.signature)");
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "=")), (c) =>
      c.charCodeAt(0),
    );
    const claims: unknown = JSON.parse(new TextDecoder().decode(bytes));
    if (typeof claims !== "object" || claims === null) throw new Error("not an object");
    return claims as { sub?: unknown; dev?: unknown; exp?: unknown };
  } catch {
    throw badInput("the token's payload is not base64url JSON");
  }
}

/** A new client message id: 128 random bits in hex (works outside secure contexts, where
 * `crypto.randomUUID` is missing). */
export function newClientMsgId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
