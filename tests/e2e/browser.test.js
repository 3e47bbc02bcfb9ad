"use strict";
// The chat page (static/index.html, served at /) in headless Chromium, driven by playwright-core,
// against the real gateway binary. Each page gets its own browser context, so each has its own
// localStorage and therefore its own name, like two people on two machines.
//
// The tests run in order and share the gateway and the pages: one conversation, told in steps.
// A second suite runs the page against a gateway that wants tokens (--auth-secret).

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const {
  SCREENSHOTS, killWorker, launchChromium, logged, mintToken, sleep, startGateway, tokenClaims, uniqueRoom, waitFor,
  withLogs, withTimeout,
} = require("./helpers");

const UI_TIMEOUT = 10000;
const TIME = /^\d{2}:\d{2}:\d{2}$/;

/** Who the page lists as online, in its order: "name", or "name ×N" for N tabs. */
function onlineList(p) {
  return p.page.$$eval("#online li", (items) => items.map((li) => {
    const name = li.querySelector(".name")?.textContent;
    const count = li.querySelector(".count")?.textContent;
    return count ? `${name} ${count}` : name;
  }));
}

/** Waits until the page's online list is exactly `expected`. */
async function waitOnline(p, expected) {
  await waitFor(async () => JSON.stringify(await onlineList(p)) === JSON.stringify(expected), {
    timeout: UI_TIMEOUT,
    what: `${p.label}'s online list to be ${JSON.stringify(expected)}`,
  }).catch(async (e) => {
    e.message += ` (it shows ${JSON.stringify(await onlineList(p).catch(() => "?"))})`;
    throw e;
  });
}

async function screenshot(p, step) {
  const file = path.join(SCREENSHOTS, `${step}-${p.label}.png`);
  await p.page.screenshot({ path: file, fullPage: false });
  return file;
}

async function waitJoined(p, roomId) {
  await p.page.waitForSelector('#status[data-state="connected"]');
  await p.page.waitForFunction(
    (r) => [...document.querySelectorAll("#messages .notice")].some((n) => n.textContent === `Joined room ${r}`),
    roomId, { timeout: UI_TIMEOUT });
}

/** The rendered messages: [{id, sender, time, text, mine, stale}]. */
function messages(p) {
  return p.page.$$eval("#messages .message", (rows) => rows.map((row) => ({
    id: Number(row.dataset.id),
    sender: row.querySelector(".sender")?.textContent,
    time: row.querySelector("time.time")?.textContent,
    text: row.querySelector(".text")?.textContent,
    mine: row.classList.contains("mine"),
    stale: row.classList.contains("stale"),
  })));
}

async function waitForText(p, text) {
  await p.page.waitForFunction(
    (t) => [...document.querySelectorAll("#messages .message .text")].some((n) => n.textContent === t),
    text, { timeout: UI_TIMEOUT });
}

async function sendWithEnter(p, text) {
  await p.page.fill("#text", text);
  await p.page.press("#text", "Enter");
  await waitForText(p, text);
  await p.page.waitForFunction(() => document.getElementById("text").value === "");
}

async function sendWithButton(p, text) {
  await p.page.fill("#text", text);
  await p.page.click("#send");
  await waitForText(p, text);
  await p.page.waitForFunction(() => document.getElementById("text").value === "");
}

describe("the chat page in headless Chromium", () => {
  let gw;
  let browser;
  const pages = [];    // every page opened, for screenshots on failure and the page-error check
  const room = uniqueRoom("browser");

  before(async () => {
    gw = await startGateway();
    browser = await launchChromium();
  });

  after(async () => {
    if (browser) await withTimeout(browser.close(), 10000, "the browser to close").catch(() => {});
    if (gw) await gw.stop();
  });

  const t = (name, fn) => test(name, { timeout: 45000 }, withLogs(() => gw, async () => {
    try {
      await fn();
    } catch (e) {
      await screenshotAll(`failed-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 40)}`);
      throw e;
    }
    for (const p of pages) assert.deepEqual(p.errors, [], `uncaught errors in ${p.label}'s page`);
  }));

  async function screenshotAll(step) {
    for (const p of pages) await screenshot(p, step).catch(() => {});
  }

  /**
   * Opens the page on `roomId` as `name`; resolves once it is connected and joined. The name is
   * the one the page remembers (localStorage), so the join already carries it and the room
   * lists the page under it; `context` opens another tab of the same person.
   */
  async function openPage(label, roomId, name, { context } = {}) {
    if (!context) {
      context = await browser.newContext({ viewport: { width: 960, height: 680 }, deviceScaleFactor: 1 });
      await context.addInitScript((n) => localStorage.setItem("roomvisor.name", n), name);
    }
    const page = await context.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    const p = { label, page, context, errors: [] };
    page.on("pageerror", (e) => p.errors.push(String(e)));
    pages.push(p);
    await page.goto(`${gw.baseUrl}/#room=${roomId}`);
    assert.equal(await page.inputValue("#name"), name);
    await waitJoined(p, roomId);
    assert.equal(await page.inputValue("#room"), roomId);
    return p;
  }

  async function closePage(p, { context = true } = {}) {
    pages.splice(pages.indexOf(p), 1);
    await (context ? p.context.close() : p.page.close());
  }

  let alice, bob;

  t("two pages on one room: a message sent with Enter and one sent with the button show in both, with sender and time", async () => {
    alice = await openPage("alice", room, "alice");
    bob = await openPage("bob", room, "bob");
    await waitOnline(alice, ["alice", "bob"]);
    await waitOnline(bob, ["alice", "bob"]);

    await sendWithEnter(alice, "Hi Bob! Sent with Enter.");
    await waitForText(bob, "Hi Bob! Sent with Enter.");
    await sendWithButton(bob, "Hello Alice, this one came from the Send button.");
    await waitForText(alice, "Hello Alice, this one came from the Send button.");

    for (const p of [alice, bob]) {
      const shown = await messages(p);
      assert.deepEqual(shown.map((m) => [m.id, m.sender, m.text]), [
        [1, "alice", "Hi Bob! Sent with Enter."],
        [2, "bob", "Hello Alice, this one came from the Send button."],
      ], `${p.label}'s page`);
      for (const m of shown) {
        assert.match(m.time, TIME, `time of message ${m.id} on ${p.label}'s page`);
        assert.equal(m.mine, m.sender === p.label, `.mine marks only ${p.label}'s own messages`);
      }
    }
    assert.equal(await alice.page.textContent("#error"), "");
    await screenshot(alice, "01-exchange");
    await screenshot(bob, "01-exchange");
  });

  t("switching the room field moves to another room with its own history, and back", async () => {
    const other = uniqueRoom("side");
    await alice.page.fill("#room", other);
    await alice.page.press("#room", "Enter");
    await waitJoined(alice, other);
    assert.equal(new URL(alice.page.url()).hash, `#room=${other}`);
    assert.deepEqual(await messages(alice), [], "the other room has its own (empty) history");

    await sendWithEnter(alice, "Anyone in the side room?");
    await sendWithButton(bob, "Alice, where did you go?");
    await sleep(300);
    assert.deepEqual((await messages(alice)).map((m) => m.text), ["Anyone in the side room?"],
      "nothing of the first room reaches a page that moved away");
    assert.ok(!(await messages(bob)).some((m) => m.text === "Anyone in the side room?"));
    await screenshot(alice, "02-other-room");

    // The room field also switches on change (blur), not only on Enter.
    await alice.page.fill("#room", room);
    await alice.page.dispatchEvent("#room", "change");
    await waitJoined(alice, room);
    await waitForText(alice, "Alice, where did you go?");
    assert.deepEqual((await messages(alice)).map((m) => m.text), [
      "Hi Bob! Sent with Enter.",
      "Hello Alice, this one came from the Send button.",
      "Alice, where did you go?",
    ], "back in the first room, its history is shown, and nothing of the side room");
  });

  t("a third page joining later sees the history", async () => {
    const carol = await openPage("carol", room, "carol");
    await waitForText(carol, "Alice, where did you go?");
    const shown = await messages(carol);
    assert.deepEqual(shown.map((m) => [m.id, m.sender, m.text]), [
      [1, "alice", "Hi Bob! Sent with Enter."],
      [2, "bob", "Hello Alice, this one came from the Send button."],
      [3, "bob", "Alice, where did you go?"],
    ]);
    for (const m of shown) assert.match(m.time, TIME);
    assert.ok(shown.every((m) => !m.mine));
    await waitOnline(carol, ["alice", "bob", "carol"]);
    await screenshot(carol, "03-late-joiner");
    await closePage(carol);
    // Closing the page closes its socket: the others' lists drop carol.
    await waitOnline(alice, ["alice", "bob"]);
    await waitOnline(bob, ["alice", "bob"]);
  });

  t("who is online: two people, a second tab counts under one name, a rename follows, a closed page drops out", async () => {
    const lobby = uniqueRoom("online");
    const dana = await openPage("dana", lobby, "dana");
    const erin = await openPage("erin", lobby, "erin");
    await waitOnline(dana, ["dana", "erin"]);
    await waitOnline(erin, ["dana", "erin"]);
    assert.equal(await erin.page.textContent("#online-count"), "(2)");
    assert.deepEqual(await erin.page.$$eval("#online li.me .name", (n) => n.map((x) => x.textContent)), ["erin"],
      "the page marks its own entry");

    // Dana's second tab (same browser, same remembered name): one person, two metas.
    const dana2 = await openPage("dana-tab2", lobby, "dana", { context: dana.context });
    await waitOnline(erin, ["dana ×2", "erin"]);
    await waitOnline(dana2, ["dana ×2", "erin"]);
    await waitOnline(dana, ["dana ×2", "erin"]);
    await screenshot(erin, "07-online");
    // The list alone: the panel from its top to the end of the list (the panel is full height).
    const panel = await erin.page.locator("#online-panel").boundingBox();
    const list = await erin.page.locator("#online").boundingBox();
    await erin.page.screenshot({
      path: path.join(SCREENSHOTS, "07-online-list.png"),
      clip: { x: panel.x, y: panel.y, width: panel.width, height: list.y + list.height + 16 - panel.y },
    });

    await closePage(dana2, { context: false });
    await waitOnline(erin, ["dana", "erin"]);
    await waitOnline(dana, ["dana", "erin"]);

    // A new name takes a new join (the page rejoins once typing stops), and the lists follow.
    await erin.page.fill("#name", "erin2");
    await waitOnline(dana, ["dana", "erin2"]);
    await waitOnline(erin, ["dana", "erin2"]);
    await sendWithEnter(erin, "new name, same page");
    await waitForText(dana, "new name, same page");
    assert.equal((await messages(dana)).at(-1).sender, "erin2");

    await closePage(erin);
    await waitOnline(dana, ["dana"]);
    await closePage(dana);
  });

  t("a message with <script> and <img onerror> markup shows as text and runs nothing", async () => {
    const evil = `<script>window.__xss=1</script> <img src=x onerror="window.__xss=2"> <b>bold?</b>`;
    await sendWithEnter(alice, evil);
    await waitForText(bob, evil);
    await sleep(500); // give a (wrongly) inserted image time to fail and fire onerror
    for (const p of [alice, bob]) {
      assert.equal(await p.page.evaluate(() => typeof window.__xss), "undefined", `script ran on ${p.label}'s page`);
      assert.equal(await p.page.locator("#messages img, #messages script, #messages b").count(), 0,
        `markup became elements on ${p.label}'s page`);
      const last = (await messages(p)).at(-1);
      assert.equal(last.text, evil);
    }
  });

  t("killing the room worker shows the reset notice in both pages, and the chat goes on", async () => {
    const before = (await messages(alice)).length;
    await killWorker(gw, room);
    for (const p of [alice, bob]) {
      await p.page.waitForSelector("#messages .notice.reset");
      const notice = await p.page.textContent("#messages .notice.reset");
      assert.match(notice, /room was reset: room worker exited/);
      const shown = await messages(p);
      assert.equal(shown.length, before, "the old conversation stays visible");
      assert.ok(shown.every((m) => m.stale), "and is marked stale");
      assert.equal(await p.page.getAttribute("#status", "data-state"), "connected");
      // Presence lives in the gateway, not in the worker: the list is kept (no new
      // presence_state), and the replayed joins' diffs refresh it.
      assert.deepEqual(await onlineList(p), ["alice", "bob"], `${p.label}'s online list right after the reset`);
    }

    await sendWithButton(bob, "Still here after the reset?");
    await waitForText(alice, "Still here after the reset?");
    await sendWithEnter(alice, "Yes, a fresh room.");
    await waitForText(bob, "Yes, a fresh room.");
    for (const p of [alice, bob]) {
      const fresh = (await messages(p)).filter((m) => !m.stale);
      assert.deepEqual(fresh.map((m) => [m.id, m.sender, m.text]), [
        [1, "bob", "Still here after the reset?"],
        [2, "alice", "Yes, a fresh room."],
      ], `${p.label}'s page after the reset`);
      await waitOnline(p, ["alice", "bob"]);
      await screenshot(p, "04-after-reset");
    }
  });

  t("the status shows disconnected when the gateway stops, and connected again after it restarts on the same port", async () => {
    const port = gw.port;
    for (const p of [alice, bob]) await p.page.evaluate(() => { window.__sameDocument = true; });
    const status = await gw.stop();
    assert.equal(status.code, 0);
    for (const p of [alice, bob]) {
      await p.page.waitForSelector('#status[data-state="disconnected"]');
      assert.equal(await p.page.textContent("#status"), "disconnected");
      assert.equal(await p.page.locator("#online.stale").count(), 1, "the online list is greyed while disconnected");
    }
    await screenshot(alice, "05-disconnected");

    gw = await startGateway({ port });
    for (const p of [alice, bob]) {
      await p.page.waitForSelector('#status[data-state="connected"]', { timeout: 20000 });
      await waitJoined(p, room);
    }
    // The new gateway knows only who joined it: both again, from their rejoins.
    for (const p of [alice, bob]) await waitOnline(p, ["alice", "bob"]);
    for (const p of [alice, bob]) {
      assert.equal(await p.page.evaluate(() => window.__sameDocument), true,
        `${p.label}'s page reconnected by itself, without a reload`);
    }
    await sendWithEnter(alice, "We are back.");
    await waitForText(bob, "We are back.");
    const shown = await messages(bob);
    assert.deepEqual(shown.map((m) => [m.id, m.sender, m.text]), [[1, "alice", "We are back."]],
      "a restarted gateway starts the room afresh");
    await screenshot(alice, "06-reconnected");
    await screenshot(bob, "06-reconnected");
  });
});

describe("the chat page against a gateway that wants tokens (--auth-secret)", () => {
  const SECRET = "e2e-browser-secret-of-some-length";
  let gw;
  let browser;
  const pages = [];
  const room = uniqueRoom("signed");

  before(async () => {
    gw = await startGateway({ args: ["--auth-secret", SECRET] });
    browser = await launchChromium();
  });

  after(async () => {
    if (browser) await withTimeout(browser.close(), 10000, "the browser to close").catch(() => {});
    if (gw) await gw.stop();
  });

  const t = (name, fn) => test(name, { timeout: 45000 }, withLogs(() => gw, async () => {
    try {
      await fn();
    } catch (e) {
      for (const p of pages) await screenshot(p, `failed-auth-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 30)}`).catch(() => {});
      throw e;
    }
    for (const p of pages) assert.deepEqual(p.errors, [], `uncaught errors in ${p.label}'s page`);
  }));

  const mint = (sub, name, ttl) => mintToken({ sub, name, ttl, secret: SECRET });

  /**
   * Opens the page at `fragment` (`#room=…&token=…`, as a sign-in link would). Every WebSocket
   * the page opens is recorded in `window.__sockets` ({url, openedAt, closedAt, code}): the
   * close code is what tells a token expiry (4001) from any other drop, and Playwright does not
   * report it.
   */
  async function openAt(label, fragment) {
    const context = await browser.newContext({ viewport: { width: 960, height: 680 }, deviceScaleFactor: 1 });
    await context.addInitScript(() => {
      const Native = window.WebSocket;
      const log = (window.__sockets = []);
      window.WebSocket = class RecordedWebSocket extends Native {
        constructor(url, protocols) {
          super(url, protocols);
          const entry = { url: String(url), openedAt: null, closedAt: null, code: null };
          log.push(entry);
          this.addEventListener("open", () => { entry.openedAt = Date.now(); });
          this.addEventListener("close", (ev) => { entry.closedAt = Date.now(); entry.code = ev.code; });
        }
      };
    });
    const page = await context.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    const p = { label, page, context, errors: [], refreshes: [] };
    page.on("pageerror", (e) => p.errors.push(String(e)));
    page.on("request", (req) => {
      if (req.method() === "POST" && new URL(req.url()).pathname === "/api/token/refresh") p.refreshes.push(Date.now());
    });
    pages.push(p);
    await page.goto(`${gw.baseUrl}/${fragment}`);
    return p;
  }

  async function openSignedIn(label, token) {
    const p = await openAt(label, `#room=${room}&token=${token}`);
    await waitJoined(p, room);
    return p;
  }

  async function closePage(p) {
    pages.splice(pages.indexOf(p), 1);
    await p.context.close();
  }

  const sockets = (p) => p.page.evaluate(() => window.__sockets);
  const tokenOf = (url) => new URL(url).searchParams.get("token");

  let ann, bob;

  t("a sign-in link's token: the page shows the token's name, each sees the other online by it, and it is the sender", async () => {
    const annToken = mint("u-ann", "Ann", "1h");
    ann = await openSignedIn("ann", annToken);
    bob = await openSignedIn("bob", mint("u-bob", "Bob", "1h"));

    for (const [p, name] of [[ann, "Ann"], [bob, "Bob"]]) {
      assert.equal(await p.page.textContent("#user-name"), name, `${p.label}'s page names the token's user`);
      assert.equal(await p.page.isVisible("#user"), true);
      assert.equal(await p.page.isVisible("#name"), false, "no name box: the token says who this is");
      assert.equal(new URL(p.page.url()).hash, `#room=${room}`, "the token is taken out of the address bar");
      assert.equal(await p.page.isVisible("#banner"), false);
    }
    assert.equal(await ann.page.evaluate(() => sessionStorage.getItem("roomvisor.token")), annToken);
    assert.equal(tokenOf((await sockets(ann))[0].url), annToken, "the socket presents the token as ?token=");

    // Keyed by sub, listed by the token's name.
    await waitOnline(ann, ["Ann", "Bob"]);
    await waitOnline(bob, ["Ann", "Bob"]);
    assert.deepEqual(await bob.page.$$eval("#online li", (li) => li.map((x) => x.dataset.key)), ["u-ann", "u-bob"]);

    await sendWithEnter(ann, "Hello from a verified Ann");
    await waitForText(bob, "Hello from a verified Ann");
    const atBob = (await messages(bob)).at(-1);
    assert.equal(atBob.sender, "Ann", "the sender is the token's name");
    assert.equal(atBob.mine, false);
    assert.equal((await messages(ann)).at(-1).mine, true);
    await screenshot(ann, "08-signed-in");

    // A reload keeps the session (sessionStorage), with no token in the URL.
    await ann.page.reload();
    await waitJoined(ann, room);
    assert.equal(await ann.page.textContent("#user-name"), "Ann");
    await waitOnline(ann, ["Ann", "Bob"]);
    await waitOnline(bob, ["Ann", "Bob"]);
  });

  t("a short token is refreshed before it runs out: the gateway closes the old socket (4001) at its exp, the page reconnects with the new token and goes on", async () => {
    const first = mint("u-cara", "Cara", "4s");
    const exp = tokenClaims(first).exp * 1000;
    const cara = await openSignedIn("cara", first);
    await waitOnline(cara, ["Ann", "Bob", "Cara"]);
    // Mark what is on the page now: the rejoin after the reconnect replaces it.
    await cara.page.evaluate(() => document.querySelectorAll("#messages > *").forEach((n) => { n.dataset.before = "1"; }));

    // The gateway closes the socket at the first token's exp, with 4001.
    await waitFor(async () => (await sockets(cara))[0].code === 4001,
      { timeout: exp - Date.now() + 5000, what: "the first socket to be closed with 4001" });
    const [old] = await sockets(cara);
    assert.ok(old.closedAt >= exp - 1000, `closed at ${old.closedAt}, the token's exp is ${exp}`);
    assert.ok(cara.refreshes.length >= 1 && cara.refreshes[0] < exp,
      `the page refreshed its token before it ran out (refreshes at ${cara.refreshes}, exp ${exp})`);
    await waitFor(() => logged(gw, /closing a socket whose token expired/), { what: "the gateway's log of the expiry close" });

    // It reconnected at once, with the refreshed token (same user, later exp).
    const again = await waitFor(async () => (await sockets(cara)).find((s, i) => i > 0 && s.openedAt), { what: "a new socket" });
    const fresh = tokenOf(again.url);
    assert.notEqual(fresh, first);
    assert.equal(tokenClaims(fresh).sub, "u-cara");
    assert.ok(tokenClaims(fresh).exp * 1000 > exp, "the new token outlives the old one");
    assert.ok(again.openedAt - old.closedAt < 2000, `reconnected ${again.openedAt - old.closedAt} ms after the close`);
    assert.equal(await cara.page.evaluate(() => sessionStorage.getItem("roomvisor.token")) !== first, true,
      "the stored token is the refreshed one");

    // Past the first token's exp, the page is joined and sends as Cara.
    await cara.page.waitForFunction(
      (r) => [...document.querySelectorAll("#messages .notice")].some((n) => !n.dataset.before && n.textContent === `Joined room ${r}`),
      room, { timeout: UI_TIMEOUT });
    assert.ok(Date.now() > exp);
    await sendWithButton(cara, "Still here after my first token ran out");
    await waitForText(ann, "Still here after my first token ran out");
    assert.equal((await messages(ann)).at(-1).sender, "Cara");
    assert.equal(await cara.page.isVisible("#banner"), false, "no session-expired message");
    await waitOnline(ann, ["Ann", "Bob", "Cara"]);
    await screenshot(cara, "09-after-token-refresh");
    await closePage(cara);
    await waitOnline(ann, ["Ann", "Bob"]);
  });

  t("no token, or one that has run out: the page says so and opens no socket", async () => {
    const none = await openAt("no-token", `#room=${room}`);
    await none.page.waitForSelector("#banner:not([hidden])");
    assert.match(await none.page.textContent("#banner"), /needs you signed in: open the page with a token/);
    assert.equal(await none.page.textContent("#status"), "signed out");
    assert.equal(await none.page.isVisible("#name"), false);
    assert.equal(await none.page.isDisabled("#send"), true);

    const expired = mint("u-dan", "Dan", "1s");
    await sleep(tokenClaims(expired).exp * 1000 - Date.now() + 100);
    const late = await openAt("expired", `#room=${room}&token=${expired}`);
    await late.page.waitForSelector("#banner:not([hidden])");
    assert.equal(await late.page.textContent("#banner"), "Your session expired: open the page with a fresh token.");
    assert.equal(await late.page.textContent("#status"), "signed out");
    await screenshot(late, "10-session-expired");
    for (const p of [none, late]) {
      assert.deepEqual(await sockets(p), [], `${p.label}'s page did not try a socket the gateway would refuse`);
    }
    await waitOnline(ann, ["Ann", "Bob"]);
  });
});
