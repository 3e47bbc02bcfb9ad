"use strict";
// The chat page (static/index.html, served at /) in headless Chromium, driven by playwright-core,
// against the real gateway binary. Each page gets its own browser context, so each has its own
// localStorage and therefore its own name, like two people on two machines.
//
// The tests run in order and share the gateway and the pages: one conversation, told in steps.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { chromium } = require("playwright-core");
const { killWorker, sleep, startGateway, uniqueRoom, waitFor, withLogs, withTimeout } = require("./helpers");

const CHROMIUM = process.env.E2E_CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run",
];
const SCREENSHOTS = path.resolve(process.env.E2E_SCREENSHOTS || path.join(__dirname, "screenshots"));
const UI_TIMEOUT = 10000;
const TIME = /^\d{2}:\d{2}:\d{2}$/;

describe("the chat page in headless Chromium", () => {
  let gw;
  let browser;
  const pages = [];    // every page opened, for screenshots on failure and the page-error check
  const room = uniqueRoom("browser");

  before(async () => {
    fs.mkdirSync(SCREENSHOTS, { recursive: true });
    gw = await startGateway();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true, timeout: 30000 });
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

  async function screenshot(p, step) {
    const file = path.join(SCREENSHOTS, `${step}-${p.label}.png`);
    await p.page.screenshot({ path: file, fullPage: false });
    return file;
  }

  async function screenshotAll(step) {
    for (const p of pages) await screenshot(p, step).catch(() => {});
  }

  /** Opens the page on `roomId` as `name`; resolves once it is connected and joined. */
  async function openPage(label, roomId, name) {
    const context = await browser.newContext({ viewport: { width: 960, height: 680 }, deviceScaleFactor: 1 });
    const page = await context.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    const p = { label, page, context, errors: [] };
    page.on("pageerror", (e) => p.errors.push(String(e)));
    pages.push(p);
    await page.goto(`${gw.baseUrl}/#room=${roomId}`);
    await page.fill("#name", name);
    await waitJoined(p, roomId);
    assert.equal(await page.inputValue("#room"), roomId);
    return p;
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

  let alice, bob;

  t("two pages on one room: a message sent with Enter and one sent with the button show in both, with sender and time", async () => {
    alice = await openPage("alice", room, "alice");
    bob = await openPage("bob", room, "bob");

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
    await screenshot(carol, "03-late-joiner");
    await carol.context.close();
    pages.splice(pages.indexOf(carol), 1);
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
    }
    await screenshot(alice, "05-disconnected");

    gw = await startGateway({ port });
    for (const p of [alice, bob]) {
      await p.page.waitForSelector('#status[data-state="connected"]', { timeout: 20000 });
      await waitJoined(p, room);
    }
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
