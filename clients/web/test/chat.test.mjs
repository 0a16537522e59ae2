// Two people chat in two browser contexts of Debian's Chromium (headless, driven by
// playwright-core; nothing downloads a browser) against `courier serve --web-dir dist`:
// messages, typing, a photo, ticks turning blue, delete for everyone, going offline and
// catching up (with a message written offline surviving a reload), and a group, ticks that
// survive a reload; signing in with a pasted token, and signing out.
// Screenshots of each step go to test-output/screenshots/.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, rmSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
// The SDK's test support starts the server (built by `npm run build:test` there).
import { COURIER_BIN, Server, client, closeClients, until } from "../../typescript/build-test/test/support.js";

const WEB_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const SHOTS = resolve(WEB_DIR, "test-output/screenshots");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const WAIT = { timeout: 20_000 };
/** Read ticks are blue: `.ticks[data-status="read"]` in style.css. */
const BLUE = "rgb(83, 189, 235)";

let server;
let browser;
let step = 0;

before(async () => {
  rmSync(SHOTS, { recursive: true, force: true });
  mkdirSync(SHOTS, { recursive: true });
  server = await Server.start(["--web-dir", resolve(WEB_DIR, "dist")]);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  closeClients();
  await browser?.close();
  await server?.dispose();
});

/**
 * A signed-in page of `user` in a browser context of its own. Its WebSockets pass through
 * a route, so that the test can make the server unreachable (`who.serverReachable = false`)
 * while the page itself still loads.
 */
async function person(user) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const who = { user, context, problems: [], serverReachable: true, frames: [] };
  who.page = await signedIn(who);
  assert.equal(new URL(who.page.url()).hash, "", "the token is removed from the address bar");
  return who;
}

/** A page (a tab) of `who`'s context signed in as `who`'s "web" device, online (or only
 * shown, when the server is out of reach). The frames its WebSockets write to the server are
 * kept in `who.frames`, parsed. */
async function signedIn(who) {
  const page = await who.context.newPage();
  page.on("pageerror", (error) => who.problems.push(error.message));
  page.on("dialog", (dialog) => dialog.accept());
  await page.routeWebSocket(/\/v1\/ws/, (ws) => {
    if (!who.serverReachable) return ws.close();
    const toServer = ws.connectToServer();
    ws.onMessage((frame) => {
      who.frames.push(JSON.parse(frame));
      toServer.send(frame);
    });
  });
  await page.goto(`${server.url}/#token=${server.token(who.user, "web")}`);
  if (who.serverReachable) await page.locator('#connection[data-state="online"]').waitFor(WAIT);
  else await page.locator("#chat").waitFor(WAIT);
  return page;
}

async function shot(who, name) {
  step += 1;
  await who.page.screenshot({ path: `${SHOTS}/${String(step).padStart(2, "0")}-${who.user}-${name}.png` });
}

async function send(who, text) {
  await who.page.fill("#message-input", text);
  await who.page.press("#message-input", "Enter");
}

function message(who, text) {
  return who.page.locator("#timeline .message", { hasText: text });
}

async function open(who, name) {
  await who.page.locator("#conversation-list li", { hasText: name }).first().click();
  await who.page.locator("#conversation-title", { hasText: name }).waitFor(WAIT);
}

test("two people chat, share a photo, read, delete, go offline and catch up, and talk in a group", async () => {
  const alice = await person("alice");
  const bob = await person("bob");

  // Alice starts a chat with bob: her first message creates the conversation.
  await alice.page.fill("#new-chat-user", "bob");
  await alice.page.press("#new-chat-user", "Enter");
  await alice.page.locator("#conversation-title", { hasText: "bob" }).waitFor(WAIT);
  await send(alice, "Hi Bob! Lunch today?");
  await alice.page.locator("#conversation-list li", { hasText: "bob" }).waitFor(WAIT);
  await message(alice, "Hi Bob! Lunch today?").locator(".ticks:not([data-status=pending])").waitFor(WAIT);
  await shot(alice, "sent");

  // Bob sees the conversation, opens it and starts typing: alice sees him typing.
  await open(bob, "alice");
  await message(bob, "Hi Bob! Lunch today?").waitFor(WAIT);
  await bob.page.locator("#message-input").pressSequentially("Sure");
  await alice.page.locator("#typing", { hasText: "bob typing" }).waitFor(WAIT);
  await shot(alice, "bob-is-typing");
  await bob.page.press("#message-input", "Enter");
  await message(alice, "Sure").waitFor(WAIT);
  await alice.page.locator("#typing:empty").waitFor({ ...WAIT, state: "attached" });

  // Bob has the conversation open, so he has read alice's message: her ticks turn blue.
  await alice.page.waitForFunction(
    ([text, blue]) => {
      const own = [...document.querySelectorAll("#timeline .message.own")].find((m) => m.textContent.includes(text));
      const ticks = own?.querySelector(".ticks");
      return ticks?.dataset.status === "read" && getComputedStyle(ticks).color === blue;
    },
    ["Hi Bob! Lunch today?", BLUE],
    WAIT,
  );
  await shot(alice, "read-ticks-blue");

  // Alice shares a photo (a PNG the page draws); bob sees the image.
  const png = await alice.page.evaluate(async () => {
    const canvas = document.createElement("canvas");
    canvas.width = 160;
    canvas.height = 120;
    const g = canvas.getContext("2d");
    g.fillStyle = "#ffcc00";
    g.fillRect(0, 0, 160, 120);
    g.fillStyle = "#1f7aad";
    g.beginPath();
    g.arc(80, 60, 40, 0, Math.PI * 2);
    g.fill();
    const blob = await new Promise((done) => canvas.toBlob(done, "image/png"));
    return Array.from(new Uint8Array(await blob.arrayBuffer()));
  });
  await alice.page.setInputFiles("#photo-input", { name: "sunny.png", mimeType: "image/png", buffer: Buffer.from(png) });
  // Fetched with the token and shown from a `blob:` URL, at the size alice drew.
  await bob.page.waitForFunction(
    () => {
      const image = document.querySelector("#timeline .message img");
      return image?.src.startsWith("blob:") && image.complete && image.naturalWidth === 160;
    },
    null,
    WAIT,
  );
  await shot(bob, "photo-received");

  // Alice deletes her first message for everyone: it vanishes on bob's side.
  await message(alice, "Hi Bob! Lunch today?").locator(".delete").click();
  await bob.page.locator("#timeline .message.deleted", { hasText: "This message was deleted" }).waitFor(WAIT);
  assert.equal(await message(bob, "Hi Bob! Lunch today?").count(), 0);
  await shot(bob, "message-deleted");

  // Bob goes offline. Alice writes twice; bob writes a reply, which waits in his outbox.
  await bob.context.setOffline(true);
  await bob.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  await send(alice, "Are you there?");
  await send(alice, "Call me when you're back");
  await message(alice, "Call me when you're back").locator(".ticks:not([data-status=pending])").waitFor(WAIT);
  await send(bob, "Back soon");
  await message(bob, "Back soon").locator('.ticks[data-status="pending"]').waitFor(WAIT);
  await shot(bob, "offline-reply-pending");

  // The network returns but the server cannot be reached, and bob reloads the page: the
  // reply is still in his outbox (IndexedDB).
  bob.serverReachable = false;
  await bob.context.setOffline(false);
  await bob.page.reload();
  await open(bob, "alice");
  await message(bob, "Back soon").locator('.ticks[data-status="pending"]').waitFor(WAIT);
  await shot(bob, "reloaded-reply-still-pending");

  // The server is reachable again: bob catches up in order and his reply goes out.
  bob.serverReachable = true;
  await bob.page.locator('#connection[data-state="online"]').waitFor({ timeout: 30_000 });
  await open(bob, "alice");
  await message(bob, "Call me when you're back").waitFor(WAIT);
  const texts = await bob.page.locator("#timeline .message .text").allTextContents();
  assert.deepEqual(
    texts.filter((t) => ["Are you there?", "Call me when you're back", "Back soon"].includes(t)),
    ["Are you there?", "Call me when you're back", "Back soon"],
    "alice's messages in order, then bob's reply once sent",
  );
  await message(bob, "Back soon").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  await message(alice, "Back soon").waitFor(WAIT);
  assert.equal(await message(alice, "Back soon").count(), 1, "the reply arrives once");
  await shot(bob, "caught-up");
  await shot(alice, "reply-after-offline");

  // Alice creates a group with bob; bob sees it and her message with her name.
  await alice.page.fill("#new-group-name", "Weekend hike");
  await alice.page.fill("#new-group-members", "bob");
  await alice.page.press("#new-group-members", "Enter");
  await alice.page.locator("#conversation-title", { hasText: "Weekend hike" }).waitFor(WAIT);
  await alice.page.locator("#timeline .notice", { hasText: 'alice created the group "Weekend hike"' }).waitFor(WAIT);
  await send(alice, "Saturday at 9?");
  await open(bob, "Weekend hike");
  await message(bob, "Saturday at 9?").locator(".sender", { hasText: "alice" }).waitFor(WAIT);
  await alice.page.locator('#timeline .message.own .ticks[data-status="read"]').waitFor(WAIT);
  await shot(bob, "group");
  await shot(alice, "group-read");

  // Alice reloads the page: the server sends no receipt again, so her ticks come from the
  // receipts her client kept in IndexedDB with its outbox.
  await open(alice, "bob");
  await message(alice, "Call me when you're back").locator('.ticks[data-status="read"]').waitFor(WAIT);
  await alice.page.reload();
  await alice.page.locator('#connection[data-state="online"]').waitFor(WAIT);
  await open(alice, "bob");
  await message(alice, "Call me when you're back").locator('.ticks[data-status="read"]').waitFor(WAIT);
  await shot(alice, "reloaded-ticks-still-read");

  assert.deepEqual([...alice.problems, ...bob.problems], [], "no script errors in the pages");
});

test("signing in: a pasted token works, a token the server refuses leads back to the form with a reason", async () => {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  await page.goto(server.url);
  await page.locator("#sign-in").waitFor(WAIT);

  const forged = execFileSync(
    COURIER_BIN,
    ["token", "--user", "mallory", "--device", "web", "--jwt-secret", "not-the-server-secret-though-32-bytes-long"],
    { encoding: "utf8" },
  ).trim();
  await page.fill("#token-input", forged);
  await page.click("#sign-in-form button");
  await page.locator("#sign-in-error", { hasText: "refused this token" }).waitFor(WAIT);
  assert.equal(await page.locator("#chat").isVisible(), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, "the refused token is forgotten");
  step += 1;
  await page.screenshot({ path: `${SHOTS}/${String(step).padStart(2, "0")}-sign-in-refused.png` });

  await page.fill("#token-input", server.token("carol", "web"));
  await page.click("#sign-in-form button");
  await page.locator('#connection[data-state="online"]').waitFor(WAIT);
  assert.equal(await page.textContent("#me-name"), "carol (web)");
  await context.close();
});

/** The scopes of the rows in the SDK's IndexedDB object store (the outbox and the receipts). */
function storedScopes(page) {
  return page.evaluate(
    () =>
      new Promise((resolve, reject) => {
        const opening = indexedDB.open("courier");
        opening.onerror = () => reject(opening.error);
        opening.onsuccess = () => {
          const database = opening.result;
          const rows = database.transaction("outbox").objectStore("outbox").getAll();
          rows.onerror = () => reject(rows.error);
          rows.onsuccess = () => {
            database.close();
            resolve(rows.result.map((row) => row.scope));
          };
        };
      }),
  );
}

test("signing out deletes the unsent messages and the ticks this browser kept, after asking", async () => {
  const frank = await person("frank");
  const asked = [];
  frank.page.on("dialog", (dialog) => asked.push(dialog.message()));
  // Gus's own client, not the app: he writes first and reads frank's answer.
  const gus = await client(server, "gus", "node");
  const conv = (await gus.sendText({ toUser: "frank" }, "Hi Frank")).conversation_id;
  await open(frank, "gus");
  await send(frank, "Hello Gus");
  await message(frank, "Hello Gus").locator(".ticks:not([data-status=pending])").waitFor(WAIT);
  await gus.whenSynced();
  await gus.loadHistory(conv);
  gus.markRead(conv);
  await message(frank, "Hello Gus").locator('.ticks[data-status="read"]').waitFor(WAIT);

  // The server goes out of reach (the page itself still loads): frank's next message waits.
  await frank.context.setOffline(true);
  await frank.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  frank.serverReachable = false;
  await frank.context.setOffline(false);
  await send(frank, "Never sent");
  await message(frank, "Never sent").locator('.ticks[data-status="pending"]').waitFor(WAIT);
  const before = await storedScopes(frank.page);
  assert.ok(before.includes("frank/web") && before.includes("frank/web#receipts"), `stored: ${before}`);

  await frank.page.click("#sign-out");
  await frank.page.locator("#sign-in").waitFor(WAIT);
  assert.deepEqual(asked, ["Sign out? 1 unsent message will be deleted from this browser."]);
  const after = await storedScopes(frank.page);
  assert.deepEqual(after.filter((scope) => scope.startsWith("frank/web")), [], "nothing of the device is left");

  // Signing in again as the same device sends nothing that was left.
  frank.serverReachable = true;
  await frank.page.fill("#token-input", server.token("frank", "web"));
  await frank.page.click("#sign-in-form button");
  await frank.page.locator('#connection[data-state="online"]').waitFor(WAIT);
  await open(frank, "gus");
  await message(frank, "Hello Gus").waitFor(WAIT);
  assert.equal(await message(frank, "Never sent").count(), 0);
  assert.deepEqual(frank.problems, [], "no script errors in the page");
  await frank.context.close();
});

test("a picture someone shares never runs as a page of the app: an SVG is listed as a file, not downloaded", async () => {
  const dana = await person("dana");
  const downloads = [];
  dana.page.on("request", (request) => {
    if (new URL(request.url()).pathname.startsWith("/v1/media/")) downloads.push(request.url());
  });
  // Eve's own client, not the app: she sends what she likes.
  const eve = await client(server, "eve", "node");
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>document.documentElement.setAttribute("data-ran", "yes")</script><rect width="10" height="10"/></svg>`;
  await eve.sendMedia({ toUser: "dana" }, new TextEncoder().encode(svg), "image/svg+xml", { name: "cute.svg" });
  await open(dana, "eve");
  // Its bytes never come into the page: no `blob:` URL of them ("Open image in new tab" would
  // make it a page of the app's origin, where its script would run with the person's session).
  await message(dana, "File: cute.svg").waitFor(WAIT);
  assert.equal(await dana.page.locator("#timeline .message img").count(), 0);
  assert.deepEqual(downloads, []);
  assert.equal(await dana.page.evaluate(() => document.documentElement.getAttribute("data-ran")), null);
  await dana.context.close();
});

test("a member removed from a group can no longer write there, until added back", async () => {
  const hugo = await person("hugo");
  // Ida's own client, not the app: she runs the group.
  const ida = await client(server, "ida", "node");
  const group = await ida.createGroup("Choir", ["hugo"]);
  await ida.sendText({ conversationId: group }, "Rehearsal at 7");
  await open(hugo, "Choir");
  await message(hugo, "Rehearsal at 7").waitFor(WAIT);
  assert.equal(await hugo.page.locator("#composer").isVisible(), true);

  await ida.removeMember(group, "hugo");
  await hugo.page.locator("#timeline .notice", { hasText: "ida removed hugo" }).waitFor(WAIT);
  await hugo.page.locator("#composer").waitFor({ ...WAIT, state: "hidden" });
  await hugo.page.locator("#left-notice", { hasText: "no longer a member" }).waitFor(WAIT);
  await shot(hugo, "removed-from-group");

  await ida.addMembers(group, ["hugo"]);
  await hugo.page.locator("#composer").waitFor(WAIT);
  assert.equal(await hugo.page.locator("#left-notice").isVisible(), false);
  assert.deepEqual(hugo.problems, [], "no script errors in the page");
  await hugo.context.close();
});

test("a burst of messages in the open conversation is rendered once a frame, not once a message", async () => {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  // The page's clock (its timers and animation frames) goes only as the test moves it.
  await page.clock.install();
  await page.goto(`${server.url}/#token=${server.token("jan", "web")}`);
  await page.locator('#connection[data-state="online"]').waitFor(WAIT);
  const kai = await client(server, "kai", "node");
  const conv = (await kai.sendText({ toUser: "jan" }, "first")).conversation_id;
  const jan = { user: "jan", page };
  await open(jan, "kai");
  await message(jan, "first").waitFor(WAIT);
  await page.evaluate(() => {
    window.timelineRenders = 0;
    new MutationObserver((records) => (window.timelineRenders += records.length)).observe(
      document.getElementById("timeline"),
      { childList: true },
    );
  });
  await page.clock.pauseAt(Date.now() + 1_000);

  const burst = 50;
  for (let i = 1; i <= burst; i++) await kai.sendText({ conversationId: conv }, `burst ${i}`);
  // The page's client has taken every message once jan's delivered cursor is at the head.
  const probe = await client(server, "jan", "probe");
  const cursors = async () => (await probe.http.conversations()).find((c) => c.conversation_id === conv);
  await until("the page's client has the burst", async () => (await cursors())?.delivered_seq === burst + 1);
  const renders = await page.evaluate(() => window.timelineRenders);
  assert.ok(renders <= 1, `the timeline was rendered ${renders} times before a frame`);

  await page.clock.runFor(100);
  await page.locator(`#timeline .message[data-seq="${burst + 1}"]`).waitFor(WAIT);
  const shown = await page.locator("#timeline .message .text").allTextContents();
  assert.deepEqual(shown, ["first", ...Array.from({ length: burst }, (_, i) => `burst ${i + 1}`)]);
  assert.deepEqual(problems, [], "no script errors in the page");
  await context.close();
});

test("an event of a kind this app does not know (a later server's) shows nothing, and the rest as before", async () => {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  let socket;
  await page.routeWebSocket(/\/v1\/ws/, (ws) => {
    socket = ws;
    ws.connectToServer();
  });
  const lou = await client(server, "lou", "node");
  const conv = (await lou.sendText({ toUser: "max" }, "see you at 8")).conversation_id;
  await page.goto(`${server.url}/#token=${server.token("max", "web")}`);
  await page.locator('#connection[data-state="online"]').waitFor(WAIT);
  const max = { user: "max", page };
  await open(max, "lou");
  await message(max, "see you at 8").waitFor(WAIT);

  // What a later server might send: a new kind of event, and a new frame type.
  const sender = { user: "lou", device: "node" };
  socket.send(JSON.stringify({ type: "presence", user: "lou", online: true }));
  socket.send(
    JSON.stringify({
      type: "event",
      conversation_id: conv,
      seq: 2,
      server_msg_id: "x2",
      sender,
      ts_ms: Date.now(),
      kind: "reaction",
      target_seq: 1,
      emoji: "👍",
    }),
  );
  // A frame from the server after them: once it is shown, they were taken, and rendered a
  // frame later.
  lou.typing(conv, true);
  await page.locator("#typing", { hasText: "lou typing" }).waitFor(WAIT);
  await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
  const items = await page.locator("#timeline > li").allTextContents();
  assert.equal(items.length, 1, `the timeline shows: ${JSON.stringify(items)}`);
  const preview = page.locator("#conversation-list li", { hasText: "lou" }).locator(".preview");
  assert.equal(await preview.textContent(), "see you at 8", "the preview is the latest event shown");
  assert.deepEqual(problems, [], "no script errors in the page");
  await context.close();
});

test("media that is no picture, or a picture too large to show, is listed as a file and not downloaded", async () => {
  const olga = await person("olga");
  const downloads = [];
  olga.page.on("request", (request) => {
    if (new URL(request.url()).pathname.startsWith("/v1/media/")) downloads.push(request.url());
  });
  // Pat's own client, not the app: he sends what he likes, as large as the server takes.
  const pat = await client(server, "pat", "node");
  const tiny = Buffer.from(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwADAgH/2ZQnWgAAAABJRU5ErkJggg==",
    "base64",
  );
  const huge = new Uint8Array(16 * 1024 * 1024 + 1);
  await pat.sendMedia({ toUser: "olga" }, new Uint8Array(2048), "application/pdf", { name: "terms.pdf" });
  const big = await pat.sendMedia({ toUser: "olga" }, huge, "image/png", { name: "huge.png" });
  const small = await pat.sendMedia({ toUser: "olga" }, tiny, "image/png", { name: "dot.png" });
  await open(olga, "pat");
  const picture = olga.page.locator('#timeline .message img[alt="dot.png"][src^="blob:"]');
  await picture.waitFor({ ...WAIT, state: "attached" });
  await message(olga, "terms.pdf").waitFor(WAIT);
  await message(olga, "huge.png").waitFor(WAIT);
  assert.equal(await olga.page.locator("#timeline .message img").count(), 1, "only the small picture is an image");
  const shown = await picture.getAttribute("data-media");
  assert.deepEqual(
    downloads.map((url) => new URL(url).pathname),
    [`/v1/media/${shown}`],
    "only the small picture is downloaded",
  );
  assert.ok(big.seq > 0 && small.seq > big.seq);
  assert.deepEqual(olga.problems, [], "no script errors in the page");
  await olga.context.close();
});

test("a tab whose connection newer ones of the same device took says so and waits, and reconnects when asked", async () => {
  const tab = await person("quinn");
  // Sixteen more connections of quinn's "web" device (the server keeps 16 per device): the
  // tab's, the oldest, is closed for them.
  const token = server.token("quinn", "web");
  const others = [];
  for (let i = 0; i < 16; i++) others.push(await client(server, "quinn", "web", { token }));
  await Promise.all(others.map((other) => other.whenSynced()));
  await tab.page.locator("#replaced-notice").waitFor(WAIT);
  await tab.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  await shot(tab, "replaced");
  // The others keep their connections: the tab did not come back to take one.
  for (const other of others) await other.sendText({ toUser: "rex" }, "still connected");
  assert.ok(others.every((other) => other.state === "online"));
  assert.equal(await tab.page.locator("#connection").getAttribute("data-state"), "offline");

  others.pop().close();
  await tab.page.click("#reconnect");
  await tab.page.locator('#connection[data-state="online"]').waitFor(WAIT);
  assert.equal(await tab.page.locator("#replaced-notice").isVisible(), false);
  others.forEach((other) => other.close());
  assert.deepEqual(tab.problems, [], "no script errors in the page");
});

test("a photo chosen offline waits with the unsent messages, survives a reload, and is shared once back online", async () => {
  const uma = await person("uma");
  const vic = await client(server, "vic", "node");
  const conv = (await vic.sendText({ toUser: "uma" }, "Send me the photo")).conversation_id;
  await open(uma, "vic");
  // A 1x1 PNG.
  const png = Buffer.from(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
    "base64",
  );
  await uma.context.setOffline(true);
  await uma.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  await uma.page.setInputFiles("#photo-input", { name: "offline.png", mimeType: "image/png", buffer: png });
  await message(uma, "Photo: offline.png").locator('.ticks[data-status="pending"]').waitFor(WAIT);
  await shot(uma, "photo-offline-pending");

  // The server out of reach, the page reloads: the photo is still in the outbox (IndexedDB).
  uma.serverReachable = false;
  await uma.context.setOffline(false);
  await uma.page.reload();
  await open(uma, "vic");
  await message(uma, "Photo: offline.png").locator('.ticks[data-status="pending"]').waitFor(WAIT);

  uma.serverReachable = true;
  await uma.page.locator('#connection[data-state="online"]').waitFor({ timeout: 30_000 });
  const photos = () =>
    (vic.conversation(conv)?.timeline.list() ?? []).filter((event) => event.body && "media" in event.body);
  await until("vic has the photo", () => photos().length === 1);
  const media = photos()[0].body.media;
  assert.equal(media.name, "offline.png");
  assert.deepEqual(Buffer.from((await vic.downloadMedia(media.media_id)).bytes), png);
  await uma.page.locator("#timeline .message.own img").waitFor(WAIT);
  assert.equal(await message(uma, "Photo: offline.png").count(), 0, "no longer pending");
  assert.equal(await uma.page.locator("#status-line").textContent(), "", "nothing went wrong");
  assert.deepEqual(uma.problems, [], "no script errors in the page");
  await uma.context.close();
});

test("a photo the server refuses for good is marked failed, says why, and can be discarded", async () => {
  const wes = await person("wes");
  const xia = await client(server, "xia", "node");
  await xia.sendText({ toUser: "wes" }, "Send me the big one");
  await open(wes, "xia");
  // The server's answer to an upload over its limit.
  await wes.page.route("**/v1/media", (route) =>
    route.fulfill({
      status: 413,
      contentType: "application/json",
      body: JSON.stringify({ code: "too_large", message: "the upload is over the server's limit" }),
    }),
  );
  await wes.page.setInputFiles("#photo-input", { name: "huge.png", mimeType: "image/png", buffer: Buffer.alloc(64) });
  const failed = message(wes, "Photo: huge.png");
  await failed.locator('.ticks[data-status="failed"]').waitFor(WAIT);
  assert.match(await failed.locator(".ticks").getAttribute("title"), /over the server's limit/);
  await shot(wes, "photo-refused");
  await failed.locator(".discard").click();
  await failed.waitFor({ ...WAIT, state: "detached" });
  assert.equal(await wes.page.evaluate(() => document.querySelectorAll("#timeline .pending").length), 0);
  assert.deepEqual(wes.problems, [], "no script errors in the page");
  await wes.context.close();
});

test("a failure to reach the server is cleared from the status line once the connection is back", async () => {
  const yan = await person("yan");
  const zoe = await client(server, "zoe", "node");
  await zoe.sendText({ toUser: "yan" }, "Hello Yan");
  await yan.page.locator("#conversation-list li", { hasText: "zoe" }).waitFor(WAIT);
  await yan.context.setOffline(true);
  await yan.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  // A group created offline cannot be, and the status line says so.
  await yan.page.fill("#new-group-name", "Offline plans");
  await yan.page.fill("#new-group-members", "zoe");
  await yan.page.press("#new-group-members", "Enter");
  await yan.page.locator("#status-line", { hasText: "cannot reach the server" }).waitFor(WAIT);
  await yan.context.setOffline(false);
  await yan.page.locator('#connection[data-state="online"]').waitFor(WAIT);
  await yan.page.locator("#status-line:empty").waitFor({ ...WAIT, state: "attached" });
  assert.deepEqual(yan.problems, [], "no script errors in the page");
  await yan.context.close();
});

test("a photo whose download the server stops sending is given up, and shown once downloaded again", async () => {
  const kim = await person("kim");
  const lee = await client(server, "lee", "node");
  const dot = Buffer.from(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwADAgH/2ZQnWgAAAABJRU5ErkJggg==",
    "base64",
  );
  // The first download of a photo is answered with nothing, as by a proxy whose backend hung.
  let downloads = 0;
  await kim.page.route("**/v1/media/*", (route) => (++downloads === 1 ? undefined : route.continue()));
  await lee.sendMedia({ toUser: "kim" }, dot, "image/png", { name: "dot.png" });
  await open(kim, "lee");
  // The SDK's default: nothing for 30 s.
  await kim.page.locator('#timeline .message img[alt="the photo could not be loaded"]').waitFor({ timeout: 60_000 });
  await shot(kim, "photo-download-given-up");
  // The next render (a message comes) downloads it again.
  await lee.sendText({ toUser: "kim" }, "Did the photo come?");
  await kim.page.locator('#timeline .message img[alt="dot.png"][src^="blob:"]').waitFor(WAIT);
  assert.equal(downloads, 2);
  assert.deepEqual(kim.problems, [], "no script errors in the page");
  await kim.context.close();
});

test("two tabs of one device share the outbox: an unsent message is sent once, and shown sent in both", async () => {
  const ana = await person("ana");
  const ben = await client(server, "ben", "node");
  await ben.sendText({ toUser: "ana" }, "Two tabs?");
  await open(ana, "ben");
  // The server out of reach (the pages still load): what ana writes waits in the outbox.
  await ana.context.setOffline(true);
  await ana.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  ana.serverReachable = false;
  await ana.context.setOffline(false);
  await send(ana, "Written in the first tab");
  await message(ana, "Written in the first tab").locator('.ticks[data-status="pending"]').waitFor(WAIT);

  // A second tab of the same device opens meanwhile: it finds the message in the outbox
  // (IndexedDB) and writes one of its own.
  const second = { ...ana, page: await signedIn(ana) };
  await open(second, "ben");
  await message(second, "Written in the first tab").locator('.ticks[data-status="pending"]').waitFor(WAIT);
  await send(second, "Written in the second tab");
  await message(second, "Written in the second tab").locator('.ticks[data-status="pending"]').waitFor(WAIT);
  await shot(second, "second-tab-pending");

  // The server is reachable again: each message is sent once, by one of the tabs, and both
  // tabs show the ones they list as sent.
  ana.serverReachable = true;
  await until("ben has both", () => texts(ben).filter((t) => t.startsWith("Written in")).length === 2);
  for (const tab of [ana, second]) {
    await tab.page.locator('#connection[data-state="online"]').waitFor({ timeout: 30_000 });
    await message(tab, "Written in the first tab").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
    assert.equal(await message(tab, "Written in the first tab").count(), 1, "shown once");
  }
  await message(second, "Written in the second tab").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  assert.equal(await message(second, "Written in the second tab").count(), 1, "shown once");
  await shot(second, "second-tab-sent");
  const sends = (text) => ana.frames.filter((frame) => frame.type === "send" && frame.body?.text === text).length;
  assert.equal(sends("Written in the first tab"), 1, "the first tab's message was sent once");
  assert.equal(sends("Written in the second tab"), 1, "the second tab's message was sent once");
  assert.deepEqual(ana.problems, [], "no script errors in the pages");
  await ana.context.close();

  function texts(client) {
    return client
      .conversations()
      .flatMap((c) => c.timeline.list())
      .map((event) => (event.body && "text" in event.body ? event.body.text : ""));
  }
});

test("signing out in one tab deletes the unsent messages the device's other tabs list: none of them sends one", async () => {
  const ola = await person("ola");
  const pim = await client(server, "pim", "node");
  await pim.sendText({ toUser: "ola" }, "Sign out?");
  await open(ola, "pim");
  await ola.context.setOffline(true);
  await ola.page.locator('#connection[data-state="offline"]').waitFor(WAIT);
  ola.serverReachable = false;
  await ola.context.setOffline(false);
  const second = { ...ola, page: await signedIn(ola) };
  await open(second, "pim");
  await send(ola, "Never sent");
  // The second tab lists it too (the tabs share the outbox).
  await message(second, "Never sent").locator('.ticks[data-status="pending"]').waitFor(WAIT);

  await ola.page.click("#sign-out");
  await ola.page.locator("#sign-in").waitFor(WAIT);
  await message(second, "Never sent").waitFor({ ...WAIT, state: "detached" });
  ola.serverReachable = true;
  await second.page.locator('#connection[data-state="online"]').waitFor({ timeout: 30_000 });
  // A frame the second tab writes once online: a send of the deleted message would be before it.
  await send(second, "Still here");
  await message(second, "Still here").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  const sent = ola.frames.filter((frame) => frame.type === "send").map((frame) => frame.body?.text);
  assert.deepEqual(sent, ["Still here"]);
  assert.deepEqual(ola.problems, [], "no script errors in the pages");
  await ola.context.close();
});

/** Two tabs of `user`'s device with the conversation `peer` (a client of its own) opened with
 * `greeting`: the first tab (`who`), which opened first, holds the device's outbox. */
async function twoTabs(user, peer, greeting) {
  const who = await person(user);
  const other = await client(server, peer, "node");
  await other.sendText({ toUser: user }, greeting);
  await open(who, peer);
  const second = { ...who, page: await signedIn(who) };
  await open(second, peer);
  return { who, other, second };
}

/** The browser's id of the tab (the client) that holds the device's outbox, as `who`'s tab
 * sees it. */
function holder(who) {
  return who.page.evaluate(async () => {
    const held = (await navigator.locks.query()).held.filter((lock) => lock.name.startsWith("courier-outbox"));
    return held.length === 1 ? held[0].clientId : `${held.length} holders`;
  });
}

test("a tab frozen in the background gives the device's outbox up: another tab sends at once, and the frozen one takes it back once it runs", async () => {
  const { who: nia, other: rob, second } = await twoTabs("nia", "rob", "Frozen?");
  // The browser freezes the first tab (as Chromium does to background tabs): it is told
  // (`freeze`), and none of its scripts run until it is resumed. (Headless Chromium's frozen
  // state, by the DevTools protocol, neither tells the page nor stops its scripts: the test
  // tells it, and the debugger stops them.)
  const cdp = await nia.context.newCDPSession(nia.page);
  const first = await holder(second);
  await nia.page.evaluate(() => document.dispatchEvent(new Event("freeze")));
  await until("the frozen tab gave the outbox up", async () => (await holder(second)) !== first);
  await cdp.send("Debugger.enable");
  await cdp.send("Debugger.pause");
  await send(second, "Sent while the first tab is frozen");
  await message(second, "Sent while the first tab is frozen").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  await shot(second, "sent-while-first-tab-frozen");

  // Running again, the first tab asks for the outbox again, and has it once the second closes.
  await cdp.send("Debugger.resume");
  await nia.page.evaluate(() => document.dispatchEvent(new Event("resume")));
  await second.page.close();
  await send(nia, "Sent from the first tab again");
  await message(nia, "Sent from the first tab again").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  // Each is stored once (an entry another tab had in its outbox may be sent again by the next
  // owner: the server answers it as a duplicate).
  const texts = () => rob.conversations().flatMap((c) => c.timeline.list().map((event) => event.body?.text));
  await until("rob has both", () => texts().includes("Sent from the first tab again"));
  assert.deepEqual(texts(), ["Frozen?", "Sent while the first tab is frozen", "Sent from the first tab again"]);
  assert.deepEqual(nia.problems, [], "no script errors in the pages");
  await nia.context.close();
});

test("a tab whose connection newer ones took gives the device's outbox up: the device's other tab sends", async () => {
  const { who: sid, second } = await twoTabs("sid", "tom", "Replaced?");
  // Fifteen more connections of sid's "web" device: the first tab's, the oldest of 17, is closed.
  const token = server.token("sid", "web");
  const others = [];
  for (let i = 0; i < 15; i++) others.push(await client(server, "sid", "web", { token }));
  await sid.page.locator("#replaced-notice").waitFor(WAIT);
  await send(second, "Sent while the first tab waits");
  await message(second, "Sent while the first tab waits").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  others.forEach((other) => other.close());
  assert.deepEqual(sid.problems, [], "no script errors in the pages");
  await sid.context.close();
});

test("a hidden tab hands the device's outbox over to a tab waiting for it: suspended after, it holds no message back", async () => {
  const { who: val, second } = await twoTabs("val", "ugo", "Hidden?");
  const first = await holder(val);
  // The first tab is hidden (another tab is shown), and then suspended without a word, as
  // Safari does to hidden pages: none of its scripts run any more.
  await val.page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await until("the first tab handed the outbox over", async () => (await holder(val)) !== first);
  const debug = await val.context.newCDPSession(val.page);
  await debug.send("Debugger.enable");
  await debug.send("Debugger.pause");
  await send(second, "Sent while the first tab is suspended");
  await message(second, "Sent while the first tab is suspended").locator('.ticks:not([data-status="pending"])').waitFor(WAIT);
  await debug.send("Debugger.resume");
  assert.deepEqual(val.problems, [], "no script errors in the pages");
  await val.context.close();
});
