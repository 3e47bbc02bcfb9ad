"use strict";
// The chat page (static/index.html) in headless Chromium against a durable gateway
// (`--data-dir`): the page remembers the last message it saw of the room ({epoch, id}) and
// a rejoin, after a reload or a reconnect, asks for what came after it (`since`).
//
// The gateway runs with --history-on-join 2, so a join that did not resume shows only the
// room's last two messages: a page that shows more than that got them by resuming (or kept
// them), which is what these tests tell apart from a plain join.
//
// The tests run in order and share the gateway and the pages: one conversation, told in steps.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const {
  SCREENSHOTS, killWorker, launchChromium, startGateway, uniqueRoom, waitFor, withLogs, withTimeout,
} = require("./helpers");

const UI_TIMEOUT = 10000;
const HISTORY_ON_JOIN = 2;
// The page retries a lost socket after min(250 ms * 2^n, 5 s): a reconnect is due within 5 s
// of the gateway coming back, however long it was away.
const RECONNECT_TIMEOUT = 15000;

/**
 * Runs in every document of a page's context, before the page's own script. It records each
 * `phx_join` the page sends, with its reply ({params, reply}), in `window.__joins`: what the
 * page asked for (`since`) and what the room answered (`resumed`) are not on the screen.
 * While `window.__hold` is set, the page's sockets go to a path the gateway does not serve, so
 * they fail as if the gateway were still down: that keeps a page away while another client
 * talks in the room.
 */
function recordJoins() {
  const Native = window.WebSocket;
  const joins = (window.__joins = []);
  window.__hold = false;
  window.WebSocket = class RecordingWebSocket extends Native {
    constructor(url, protocols) {
      const target = new URL(String(url));
      if (window.__hold) target.pathname = "/held-away-by-the-test";
      super(target.href, protocols);
      const byRef = new Map();
      this.addEventListener("message", (ev) => {
        let frame;
        try { frame = JSON.parse(ev.data); } catch { return; }
        const join = frame[3] === "phx_reply" && byRef.get(frame[1]);
        if (join) join.reply = frame[4];
      });
      const send = this.send.bind(this);
      this.send = (data) => {
        try {
          const frame = JSON.parse(data);
          if (frame[3] === "phx_join") {
            const join = { params: frame[4], reply: null };
            joins.push(join);
            byRef.set(frame[1], join);
          }
        } catch { /* not JSON: not a join */ }
        send(data);
      };
    }
  };
}

describe("the chat page on a durable gateway: reload, kill -9 of the gateway, kill -9 of the worker", () => {
  let gw;
  let browser;
  let dataDir;
  const pages = [];
  const room = uniqueRoom("durable");
  const gatewayArgs = () => ["--data-dir", dataDir, "--history-on-join", String(HISTORY_ON_JOIN)];

  before(async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "roomvisor-e2e-durable-"));
    gw = await startGateway({ args: gatewayArgs() });
    browser = await launchChromium();
  });

  after(async () => {
    if (browser) await withTimeout(browser.close(), 10000, "the browser to close").catch(() => {});
    if (gw) await gw.stop().catch(() => {});
    if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
  });

  const t = (name, fn) => test(name, { timeout: 60000 }, withLogs(() => gw, async () => {
    try {
      await fn();
    } catch (e) {
      for (const p of pages) {
        await screenshot(p, `durable-failed-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 40)}`).catch(() => {});
      }
      throw e;
    }
    for (const p of pages) assert.deepEqual(p.errors, [], `uncaught errors in ${p.label}'s page`);
  }));

  async function screenshot(p, step) {
    await p.page.screenshot({ path: path.join(SCREENSHOTS, `${step}-${p.label}.png`), fullPage: false });
  }

  async function openPage(label, name) {
    const context = await browser.newContext({ viewport: { width: 960, height: 680 }, deviceScaleFactor: 1 });
    await context.addInitScript((n) => localStorage.setItem("roomvisor.name", n), name);
    await context.addInitScript(recordJoins);
    const page = await context.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    const p = { label, page, context, errors: [] };
    page.on("pageerror", (e) => p.errors.push(String(e)));
    pages.push(p);
    await page.goto(`${gw.baseUrl}/#room=${room}`);
    await joined(p, 1);
    return p;
  }

  /** Waits for the page's `count`th join of this document to be answered; returns it. */
  async function joined(p, count) {
    const join = await waitFor(async () => {
      const joins = await p.page.evaluate(() => window.__joins);
      return joins.length >= count && joins[count - 1].reply ? joins[count - 1] : null;
    }, { timeout: RECONNECT_TIMEOUT, what: `${p.label}'s join #${count} to be answered` });
    assert.equal(join.reply.status, "ok", JSON.stringify(join.reply));
    await p.page.waitForSelector('#status[data-state="connected"]');
    return join;
  }

  /** The rendered messages, in page order: [{id, sender, text, stale}]. */
  function messages(p) {
    return p.page.$$eval("#messages .message", (rows) => rows.map((row) => ({
      id: Number(row.dataset.id),
      sender: row.querySelector(".sender")?.textContent,
      text: row.querySelector(".text")?.textContent,
      stale: row.classList.contains("stale"),
    })));
  }

  /** Waits until the page shows exactly `expected` ([id, sender, text] each), in that order. */
  async function waitMessages(p, expected, what) {
    const want = JSON.stringify(expected);
    let last = null;
    await waitFor(async () => {
      last = (await messages(p)).map((m) => [m.id, m.sender, m.text]);
      return JSON.stringify(last) === want;
    }, { timeout: UI_TIMEOUT, what: `${p.label}'s page to show ${what}` }).catch((e) => {
      e.message += `\nexpected ${want}\nshown    ${JSON.stringify(last)}`;
      throw e;
    });
  }

  async function send(p, text) {
    await p.page.fill("#text", text);
    await p.page.press("#text", "Enter");
    await p.page.waitForFunction(() => document.getElementById("text").value === "");
  }

  const sent = [];   // [id, sender, text] of every message acknowledged, in order
  let alice;
  let bob;
  let epoch;

  t("messages on a durable gateway: a reload shows each once, its join resuming after the last one", async () => {
    alice = await openPage("alice", "alice");
    const first = (await alice.page.evaluate(() => window.__joins))[0];
    assert.equal(first.params.since, undefined, "a new tab has nothing to resume from");
    assert.equal(first.reply.response.resumed, false);
    epoch = first.reply.response.epoch;
    assert.equal(typeof epoch, "number", JSON.stringify(first.reply));

    for (const text of ["one", "two", "three"]) {
      await send(alice, text);
      sent.push([sent.length + 1, "alice", text]);
      await waitMessages(alice, sent, `${sent.length} messages`);
    }
    await screenshot(alice, "durable-01-sent");

    await alice.page.reload();
    const join = await joined(alice, 1);
    assert.deepEqual(join.params.since, { epoch, id: 3 }, "the reloaded page asks for what came after message 3");
    assert.equal(join.reply.response.resumed, true, JSON.stringify(join.reply));
    assert.deepEqual(join.reply.response.messages, [], "nothing came after it");
    // More than --history-on-join: the page kept what it had shown.
    await waitMessages(alice, sent, "the three messages once each after the reload");
    await screenshot(alice, "durable-02-reloaded");
  });

  t("kill -9 of the gateway: a new one on the same data dir and port; the page reconnects by itself and resumes, with what another client sent meanwhile", async () => {
    await alice.page.evaluate(() => { window.__sameDocument = true; });
    const joinsBefore = (await alice.page.evaluate(() => window.__joins)).length;
    const port = gw.port;
    gw.proc.kill("SIGKILL");
    assert.equal((await gw.exitPromise).signal, "SIGKILL");
    await alice.page.waitForSelector('#status[data-state="disconnected"]');
    // Alice stays away until bob has spoken, whatever her backoff.
    await alice.page.evaluate(() => { window.__hold = true; });

    gw = await startGateway({ port, args: gatewayArgs() });
    bob = await openPage("bob", "bob");
    const bobJoin = (await bob.page.evaluate(() => window.__joins))[0];
    assert.equal(bobJoin.reply.response.epoch, epoch, "a durable room's epoch outlives the gateway");
    assert.equal(bobJoin.reply.response.resumed, false);
    // A new tab joins without `since`: the last --history-on-join messages, read back from disk.
    await waitMessages(bob, sent.slice(-HISTORY_ON_JOIN), "the last two messages, from the store");

    for (const text of ["four (alice is away)", "five (alice is still away)"]) {
      await send(bob, text);
      sent.push([sent.length + 1, "bob", text]);
    }
    await waitMessages(bob, sent.slice(-4), "the last two and its own two");
    assert.notEqual(await alice.page.getAttribute("#status", "data-state"), "connected", "alice is still away");
    await screenshot(alice, "durable-03-away");
    await screenshot(bob, "durable-03-away");

    await alice.page.evaluate(() => { window.__hold = false; });
    const join = await joined(alice, joinsBefore + 1);
    assert.deepEqual(join.params.since, { epoch, id: 3 }, "the rejoin asks for what came after message 3");
    assert.equal(join.reply.response.resumed, true, JSON.stringify(join.reply));
    assert.deepEqual(join.reply.response.messages.map((m) => m.id), [4, 5], "exactly the two alice missed");
    await waitMessages(alice, sent, "every message once, in order, none missing");
    assert.equal(await alice.page.evaluate(() => window.__sameDocument), true, "alice's page reconnected without a reload");
    await screenshot(alice, "durable-04-resumed");

    await send(bob, "six, after the restart");
    sent.push([6, "bob", "six, after the restart"]);
    await waitMessages(alice, sent, "bob's new message with the next id");
    await screenshot(alice, "durable-05-next");
  });

  t("kill -9 of the room's worker: the page says the room restarted with its history kept, and shows nothing twice", async () => {
    await killWorker(gw, room);
    for (const p of [alice, bob]) {
      await p.page.waitForSelector("#messages .notice.restarted");
      assert.match(await p.page.textContent("#messages .notice.restarted"), /room restarted .*its history was kept/);
      assert.equal(await p.page.locator("#messages .notice.reset").count(), 0, `${p.label}: no "history is gone" notice`);
    }
    // The new runtime's answers to the replayed joins overlap what each page shows.
    await waitMessages(alice, sent, "the same messages, once each");
    await waitMessages(bob, sent.slice(1), "the same messages, once each");
    for (const p of [alice, bob]) {
      assert.ok((await messages(p)).every((m) => !m.stale), `${p.label}'s messages are not greyed out`);
    }

    await send(alice, "seven, after the worker restarted");
    sent.push([7, "alice", "seven, after the worker restarted"]);
    await waitMessages(bob, sent.slice(1), "alice's message with the next id");
    await waitMessages(alice, sent, "its own message with the next id");
    await screenshot(alice, "durable-06-worker-restarted");
  });
});
