/**
 * The signed-in user's token. It comes from the person (pasted, or in the address's
 * fragment `#token=...`, which browsers never send to a server), is kept in this tab's
 * session storage so that a reload stays signed in, and is removed from the address bar at
 * once so that it does not linger in history or get copied with the link.
 */
const KEY = "courier.token";

export function takeToken(): string | undefined {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const fromAddress = fragment.get("token");
  if (fromAddress) {
    sessionStorage.setItem(KEY, fromAddress.trim());
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(KEY) ?? undefined;
}

export function rememberToken(token: string): void {
  sessionStorage.setItem(KEY, token.trim());
}

export function forgetToken(): void {
  sessionStorage.removeItem(KEY);
}
