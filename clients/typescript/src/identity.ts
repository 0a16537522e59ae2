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
  const payload = token.split(".")[1];
  if (!payload) throw badInput("the token is not a JWT (header.payload.signature)");
  let claims: { sub?: unknown; dev?: unknown };
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "=")), (c) =>
      c.charCodeAt(0),
    );
    claims = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw badInput("the token's payload is not base64url JSON");
  }
  const { sub, dev } = claims;
  if (typeof sub !== "string" || !isUserId(sub) || typeof dev !== "string" || !isUserId(dev)) {
    throw badInput("the token has no valid `sub` (user) and `dev` (device) claims");
  }
  return { user: sub, device: dev };
}

/** A new client message id: 128 random bits in hex (works outside secure contexts, where
 * `crypto.randomUUID` is missing). */
export function newClientMsgId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
