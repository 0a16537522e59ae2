/**
 * The Courier reference web app: sign in with a token, then chat. One `CourierClient` per
 * tab; every view re-renders from the client's state when the client reports a change.
 */
import { CourierClient, CourierError, type ConnectionState } from "@courier-chat/client";
import { renderConversationList } from "./conversation-list.js";
import { byId, showError } from "./dom.js";
import { MediaUrls } from "./media.js";
import { renderTimeline, type Shown } from "./timeline-view.js";
import { forgetToken, rememberToken, takeToken } from "./token.js";
import { TypingNotifier } from "./typing.js";

async function start(): Promise<void> {
  const token = takeToken();
  if (!token) return showSignIn();
  let client: CourierClient;
  try {
    client = await CourierClient.open({ url: location.origin, token, backoff: { baseMs: 500, maxMs: 10_000 } });
  } catch (error) {
    forgetToken();
    return showSignIn(error);
  }
  new ChatView(client).show();
}

/** The sign-in form, with why the last token did not work. */
function showSignIn(error?: unknown): void {
  byId("chat").hidden = true;
  byId("sign-in").hidden = false;
  byId("sign-in-error").textContent = error instanceof Error ? error.message : "";
}

byId<HTMLFormElement>("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  rememberToken(byId<HTMLTextAreaElement>("token-input").value);
  location.reload();
});

class ChatView {
  /** The open conversation. */
  private selected: string | undefined;
  /** The user of a new chat, open before its first message creates the conversation. */
  private draftUser: string | undefined;
  private readonly media: MediaUrls;
  private readonly typing: TypingNotifier;
  private typingTimer: ReturnType<typeof setInterval> | undefined;
  /** What the client's events changed since the last render, rendered at the next animation
   * frame: a burst of events (a catch-up, a busy group) renders once a frame, not once an
   * event (each rendered the whole list and timeline: a thousand messages arriving in the open
   * conversation held the tab for minutes). A hidden tab renders once shown again. */
  private stale = { list: false, timeline: false };
  private frame: number | undefined;
  /** The status line shows a failure to reach the server, which the next connection ends. */
  private showsUnreachable = false;

  constructor(private readonly client: CourierClient) {
    this.media = new MediaUrls(client);
    this.typing = new TypingNotifier(client);
  }

  show(): void {
    byId("chat").hidden = false;
    byId("me-name").textContent = `${this.client.user} (${this.client.device})`;
    this.client.on("state", (state) => this.showState(state));
    this.client.on("conversations", () => this.renderSoon("list"));
    this.client.on("timeline", (id) => this.onTimeline(id));
    this.client.on("outbox", () => this.renderSoon("timeline"));
    this.client.on("typing", (id) => id === this.selected && this.renderTyping());
    this.client.on("error", (error) => this.onError(error));
    // The browser knows first when the network goes and comes back.
    window.addEventListener("offline", () => this.client.pause());
    window.addEventListener("online", () => this.client.resume());
    if (!navigator.onLine) this.client.pause();
    document.addEventListener("visibilitychange", () => this.selected && this.markRead());
    this.wireForms();
    this.client.refreshConversations().catch((e) => this.onError(e));
    this.showState(this.client.state);
  }

  private wireForms(): void {
    byId("sign-out").addEventListener("click", () => void this.signOut());
    byId("reconnect").addEventListener("click", () => {
      byId("replaced-notice").hidden = true;
      this.client.resume();
    });
    byId<HTMLFormElement>("new-chat").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = byId<HTMLInputElement>("new-chat-user");
      this.openChatWith(input.value.trim());
      input.value = "";
    });
    byId<HTMLFormElement>("new-group").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = byId<HTMLInputElement>("new-group-name");
      const members = byId<HTMLInputElement>("new-group-members");
      const users = members.value.split(",").map((m) => m.trim()).filter(Boolean);
      this.client.createGroup(name.value.trim(), users).then((id) => this.select(id), (e) => this.onError(e));
      name.value = "";
      members.value = "";
    });
    const message = byId<HTMLInputElement>("message-input");
    message.addEventListener("input", () => this.selected && this.typing.typed(this.selected));
    byId<HTMLFormElement>("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = message.value.trim();
      if (!text) return;
      if (this.selected) {
        this.typing.stopped(this.selected);
        this.client.sendText({ conversationId: this.selected }, text).catch((e) => this.onError(e));
      } else if (this.draftUser) {
        const user = this.draftUser;
        this.client
          .sendText({ toUser: user }, text)
          .then((s) => this.draftUser === user && this.select(s.conversation_id), (e) => this.onError(e));
      }
      message.value = "";
    });
    const photo = byId<HTMLInputElement>("photo-input");
    photo.addEventListener("change", () => {
      const file = photo.files?.[0];
      if (!file || !this.selected) return;
      this.client
        .sendMedia({ conversationId: this.selected }, file, file.type || "application/octet-stream", { name: file.name })
        .catch((e) => this.onError(e));
      photo.value = "";
    });
  }

  /** Opens the direct conversation with `user`, or a new chat that its first message creates. */
  private openChatWith(user: string): void {
    const existing = this.client.conversations().find((c) => c.kind === "direct" && c.name === user);
    if (existing) return this.select(existing.id);
    this.selected = undefined;
    this.draftUser = user;
    byId("conversation-title").textContent = user;
    this.renderComposer();
    byId("typing").textContent = "";
    this.renderList();
    this.renderTimeline();
    byId("message-input").focus();
  }

  private select(conversationId: string): void {
    this.selected = conversationId;
    this.draftUser = undefined;
    const conversation = this.client.conversation(conversationId);
    byId("conversation-title").textContent = conversation?.name ?? conversationId;
    this.renderComposer();
    byId("timeline").replaceChildren();
    this.renderList();
    this.renderTimeline();
    this.renderTyping();
    if (!conversation || conversation.timeline.list().length < 20) {
      this.client.loadHistory(conversationId).catch((e) => this.onError(e));
    }
    this.markRead();
    byId("message-input").focus();
  }

  private onTimeline(conversationId: string): void {
    this.renderSoon("list");
    if (conversationId === this.selected) this.renderSoon("timeline");
  }

  private renderSoon(part: "list" | "timeline"): void {
    this.stale[part] = true;
    this.frame ??= requestAnimationFrame(() => {
      this.frame = undefined;
      const { list, timeline } = this.stale;
      this.stale = { list: false, timeline: false };
      if (list) this.renderList();
      if (timeline) this.renderOpen();
    });
  }

  /** The open conversation (or new chat) as the client holds it now. */
  private renderOpen(): void {
    if (this.selected) {
      byId("conversation-title").textContent = this.client.conversation(this.selected)?.name ?? this.selected;
      this.renderComposer();
    }
    this.renderTimeline();
    this.markRead();
  }

  /** The composer, or in a group this user left (as far as its events say) a notice: the
   * server would refuse what was written there. It comes back when the user is added back. */
  private renderComposer(): void {
    const left = this.selected !== undefined && (this.client.conversation(this.selected)?.left ?? false);
    byId("composer").hidden = left;
    byId("left-notice").hidden = !left;
  }

  private markRead(): void {
    if (this.selected && document.visibilityState === "visible") this.client.markRead(this.selected);
  }

  private renderList(): void {
    renderConversationList(byId("conversation-list"), this.client, this.selected, (id) => this.select(id));
  }

  private renderTimeline(): void {
    const shown: Shown | undefined = this.selected
      ? { conversationId: this.selected }
      : this.draftUser
        ? { toUser: this.draftUser }
        : undefined;
    if (shown) renderTimeline(byId("timeline"), this.client, shown, this.media);
  }

  private renderTyping(): void {
    const typing = this.selected ? this.client.conversation(this.selected)?.typing(Date.now()) ?? [] : [];
    byId("typing").textContent = typing.length > 0 ? `${typing.join(", ")} typing…` : "";
    // Notices expire without a frame saying so: look again while someone is typing.
    clearInterval(this.typingTimer);
    if (typing.length > 0) this.typingTimer = setInterval(() => this.renderTyping(), 1000);
  }

  private showState(state: ConnectionState): void {
    if (state === "online") {
      byId("replaced-notice").hidden = true;
      if (this.showsUnreachable) byId("status-line").textContent = "";
      this.showsUnreachable = false;
    }
    const badge = byId("connection");
    badge.dataset.state = state;
    badge.textContent = state;
  }

  /** A refused token signs out; a connection newer ones of this device took (the client
   * stays offline until resumed: coming back would close another tab's) shows a notice with a
   * button to reconnect; anything else goes to the status line, a failure to reach the
   * server until the next connection is up. */
  private onError(error: unknown): void {
    if (error instanceof CourierError && error.code === "unauthorized") void this.signOut(error);
    else if (error instanceof CourierError && error.code === "replaced") byId("replaced-notice").hidden = false;
    else {
      showError(error);
      this.showsUnreachable = unreachable(error);
    }
  }

  /**
   * Signing out forgets the token and deletes what this browser keeps of the device (its
   * unsent messages, in plain text, and the ticks), as a shared computer needs: asking first
   * when unsent messages would be lost. A refused token (expired, or the device removed)
   * forgets the token only and says why on the sign-in form: nobody chose to sign out, and the
   * unsent messages go out once the same user and device signs in again.
   */
  private async signOut(refused?: CourierError): Promise<void> {
    if (refused) {
      this.client.close();
      forgetToken();
      return showSignIn(new Error(`The server refused this token (${refused.message}). Ask for a new one.`));
    }
    const unsent = this.client.outboxEntries().length;
    const lost = unsent === 1 ? "1 unsent message" : `${unsent} unsent messages`;
    if (unsent > 0 && !confirm(`Sign out? ${lost} will be deleted from this browser.`)) return;
    forgetToken();
    try {
      await this.client.forget();
    } catch (error) {
      const why = error instanceof Error ? error.message : String(error);
      return showSignIn(new Error(`Signed out, but this browser's copy of the chats could not be deleted: ${why}`));
    }
    location.reload();
  }
}

/** A failure to reach the server (no HTTP status, no connection, no answer in time): stale
 * once a connection is up again, unlike a refusal the server answered. */
function unreachable(error: unknown): boolean {
  if (!(error instanceof CourierError)) return false;
  return (error.code === "unavailable" && error.status === undefined) || error.code === "timeout" || error.code === "closed";
}

start().catch(showError);
