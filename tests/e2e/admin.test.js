"use strict";
// The operators' dashboard (static/admin.html, served at /admin) in headless Chromium, against
// the real gateway binary: two chat pages keep two rooms live, a phoenix.js client joins a room
// whose script logs, and the dashboard lists them, kills one, shows the console and calls a
// script function that posts into a chat. The tests run in order and share the pages.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const WebSocket = require("ws");
const { Socket } = require("phoenix");
const {
  SCREENSHOTS, getJson, launchChromium, startGateway, uniqueRoom, waitFor, withLogs, withTimeout,
} = require("./helpers");

const UI_TIMEOUT = 10000;
const LOGGING_ROOM = path.join(__dirname, "fixtures", "logging-room.js");

const adminRooms = (gw) => getJson(gw, "/api/admin/rooms");

describe("the admin dashboard in headless Chromium", () => {
  let gw;
  let browser;
  let socket;
  const pages = [];
  const roomA = uniqueRoom("admin-a");
  const roomB = uniqueRoom("admin-b");
  const logsRoom = uniqueRoom("console");
  let alice, bob, dash;

  before(async () => {
    gw = await startGateway({ args: ["--room", `logs=${LOGGING_ROOM}`] });
    browser = await launchChromium();
  });

  after(async () => {
    if (socket) socket.disconnect();
    if (browser) await withTimeout(browser.close(), 10000, "the browser to close").catch(() => {});
    if (gw) await gw.stop();
  });

  const t = (name, fn) => test(name, { timeout: 60000 }, withLogs(() => gw, async () => {
    try {
      await fn();
    } catch (e) {
      const step = `admin-failed-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 40)}`;
      for (const p of pages) await p.page.screenshot({ path: path.join(SCREENSHOTS, `${step}-${p.label}.png`) }).catch(() => {});
      throw e;
    }
    for (const p of pages) assert.deepEqual(p.errors, [], `uncaught errors in ${p.label}'s page`);
  }));

  async function openPage(label, url, { name, viewport = { width: 960, height: 680 } } = {}) {
    const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
    if (name) await context.addInitScript((n) => localStorage.setItem("roomvisor.name", n), name);
    const page = await context.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    const p = { label, page, context, errors: [] };
    page.on("pageerror", (e) => p.errors.push(String(e)));
    pages.push(p);
    await page.goto(url);
    return p;
  }

  async function openChat(label, roomId) {
    const p = await openPage(label, `${gw.baseUrl}/#room=${roomId}`, { name: label });
    await p.page.waitForSelector('#status[data-state="connected"]');
    await p.page.waitForFunction(
      (r) => [...document.querySelectorAll("#messages .notice")].some((n) => n.textContent === `Joined room ${r}`),
      roomId, { timeout: UI_TIMEOUT });
    return p;
  }

  /** The dashboard's table: [{kind, id, pid}], in its order. */
  const tableRows = () => dash.page.$$eval("#rooms tbody tr.room", (rows) => rows.map((r) => ({
    kind: r.dataset.kind, id: r.dataset.id, pid: Number(r.querySelector("td.pid").textContent),
  })));

  const row = (kind, id) => dash.page.locator(`#rooms tbody tr.room[data-kind="${kind}"][data-id="${id}"]`);
  const detailOf = (kind, id) => row(kind, id).locator("xpath=following-sibling::tr[1]");

  t("the table lists the live rooms with their workers' pids, like /api/admin/rooms", async () => {
    alice = await openChat("alice", roomA);
    bob = await openChat("bob", roomB);
    dash = await openPage("dashboard", `${gw.baseUrl}/admin`, { viewport: { width: 1280, height: 800 } });
    const api = await waitFor(async () => {
      const rooms = await adminRooms(gw);
      return [roomA, roomB].every((id) => rooms.some((r) => r.kind === "room" && r.id === id && r.pid)) && rooms;
    }, { timeout: UI_TIMEOUT, what: "both chat rooms in /api/admin/rooms" });
    await waitFor(async () => {
      const shown = await tableRows();
      return [roomA, roomB].every((id) => {
        const live = api.find((r) => r.id === id);
        return shown.some((s) => s.kind === "room" && s.id === id && s.pid === live.pid);
      });
    }, { timeout: UI_TIMEOUT, what: "the dashboard to list both rooms with their pids" });
    for (const id of [roomA, roomB]) {
      const r = row("room", id);
      assert.equal(await r.locator("td.members").textContent(), "1", `members of ${id}`);
      assert.match(await r.locator("td.rss").textContent(), /^\d+\.\d$/, `RSS of ${id}`);
      assert.match(await r.locator("td.cpu").textContent(), /^\d+$/, `CPU of ${id}`);
      assert.match(await r.locator("td.uptime").textContent(), /^\d+[smh]/, `uptime of ${id}`);
    }
    // Two polls, so the charts have a line and calls/s a reading.
    await waitFor(async () => (await dash.page.getAttribute("#card-rooms polyline", "points") || "").split(" ").length >= 2,
      { timeout: UI_TIMEOUT, what: "the rooms chart to have two points" });
    await waitFor(async () => await dash.page.textContent("#total-rooms") === "2"
      && await dash.page.textContent("#total-sockets") === "2",
    { timeout: UI_TIMEOUT, what: "the totals to show 2 rooms and 2 sockets" });
    await dash.page.screenshot({ path: path.join(SCREENSHOTS, "admin-01-rooms.png") });
  });

  t("Kill restarts the room's worker under a new pid, which the table then shows", async () => {
    const before = (await adminRooms(gw)).find((r) => r.id === roomB).pid;
    await row("room", roomB).locator("button.kill").click();
    const after = await waitFor(async () => {
      const r = (await adminRooms(gw)).find((x) => x.kind === "room" && x.id === roomB);
      return r && r.pid && r.pid !== before && r.pid;
    }, { timeout: UI_TIMEOUT, what: `room ${roomB} to run under a pid other than ${before}` });
    await waitFor(async () => (await tableRows()).some((s) => s.id === roomB && s.pid === after),
      { timeout: UI_TIMEOUT, what: `the dashboard to show ${roomB}'s new pid ${after}` });
    // The chat page was told of the reset and is back in the room.
    await bob.page.waitForSelector("#messages .notice.reset");
    await bob.page.waitForSelector('#status[data-state="connected"]');
  });

  t("the console panel shows a logging room's console lines as they come", async () => {
    socket = new Socket(gw.socketUrl, { transport: WebSocket, timeout: 5000 });
    socket.connect();
    const channel = socket.channel(`logs:${logsRoom}`, { name: "visitor-from-node" });
    await withTimeout(new Promise((resolve, reject) => {
      channel.join().receive("ok", resolve).receive("error", (e) => reject(new Error(JSON.stringify(e))));
    }), 5000, `the join of logs:${logsRoom}`);
    await row("logs", logsRoom).waitFor();
    await row("logs", logsRoom).locator("button.open").click();
    const consolePre = detailOf("logs", logsRoom).locator("pre.console");
    await waitFor(async () => /joined: visitor-from-node/.test(await consolePre.textContent()),
      { timeout: UI_TIMEOUT, what: "the console line in the dashboard" });
    // A second join logs again; the open panel picks it up on its own.
    const second = socket.channel(`logs:${logsRoom}`, { name: "second-visitor" });
    second.join();
    await waitFor(async () => /joined: second-visitor/.test(await consolePre.textContent()),
      { timeout: UI_TIMEOUT, what: "the second console line in the dashboard" });
    await dash.page.screenshot({ path: path.join(SCREENSHOTS, "admin-02-console.png") });
  });

  t("the call form's chat preset posts an operator's message into a chat room", async () => {
    await row("room", roomA).locator("button.open").click();
    const detail = detailOf("room", roomA);
    await detail.locator("button.preset-message").click();
    assert.equal(await detail.locator("input.fn").inputValue(), "sendMessage");
    assert.equal(await detail.locator("textarea.args").inputValue(), '["operator","<text>"]');
    await detail.locator("textarea.args").fill(JSON.stringify(["operator", "hello from the dashboard"]));
    await detail.locator("button.call").click();
    const result = detail.locator("pre.call-result.ok");
    await result.waitFor();
    const answer = JSON.parse(await result.textContent());
    assert.equal(answer.sender, "operator");
    assert.equal(answer.text, "hello from the dashboard");
    await alice.page.waitForFunction(() => [...document.querySelectorAll("#messages .message")].some((m) =>
      m.querySelector(".sender")?.textContent === "operator" && m.querySelector(".text")?.textContent === "hello from the dashboard"));
    // A function the script lacks is an error the form shows, not a crash.
    await detail.locator("input.fn").fill("noSuchFunction");
    await detail.locator("textarea.args").fill("[]");
    await detail.locator("button.call").click();
    await detail.locator("pre.call-result.error").waitFor();
    await dash.page.screenshot({ path: path.join(SCREENSHOTS, "admin-03-call.png"), fullPage: true });
    await alice.page.screenshot({ path: path.join(SCREENSHOTS, "admin-04-chat-operator-message.png") });
  });

  t("Stop drains a room, which leaves the table", async () => {
    const before = (await adminRooms(gw)).find((r) => r.id === logsRoom).pid;
    await row("logs", logsRoom).locator("button.stop").click();
    // Its members may still be joined, so the room may start again at once; the pid then changes.
    await waitFor(async () => {
      const r = (await adminRooms(gw)).find((x) => x.id === logsRoom);
      return !r || r.pid !== before;
    }, { timeout: UI_TIMEOUT, what: `room logs:${logsRoom} to stop` });
  });
});
