"use strict";
// The tic-tac-toe page (static/game.html, served at /game) in headless Chromium against the real
// gateway running rooms/tic-tac-toe.js as the `game` kind: a room written only against the room
// hooks. Three browser contexts: alice and bob play, carol watches.
//
// The tests run in order and share the gateway and the pages: one evening of games, in steps.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const {
  SCREENSHOTS, killWorker, launchChromium, roomInfo, sleep, startGateway, uniqueRoom, waitFor, withLogs, withTimeout,
} = require("./helpers");

const UI_TIMEOUT = 10000;

describe("tic-tac-toe in headless Chromium: two players and a spectator", () => {
  let gw;
  let browser;
  const pages = [];
  const game = uniqueRoom("ttt");

  before(async () => {
    // No --room flag: the game is a kind the gateway serves out of the box, as `cargo run` does.
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
      await screenshotAll(`game-failed-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 40)}`);
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

  /** Opens /game on `game` as `name`; resolves once joined (the join notice is shown). */
  async function openPage(label) {
    const context = await browser.newContext({ viewport: { width: 900, height: 620 }, deviceScaleFactor: 1 });
    const page = await context.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    const p = { label, page, context, errors: [] };
    page.on("pageerror", (e) => p.errors.push(String(e)));
    pages.push(p);
    await page.goto(`${gw.baseUrl}/game#game=${game}&name=${label}`);
    await page.waitForSelector('#status[data-state="connected"]');
    await page.waitForFunction((g) => [...document.querySelectorAll("#log .notice")]
      .some((n) => n.textContent.startsWith(`Joined game ${g}`)), game);
    assert.equal(await page.inputValue("#game"), game);
    assert.equal(await page.inputValue("#name"), label);
    return p;
  }

  /** What a page shows: the board as a 9-character string ("." for empty), and the rest. */
  function view(p) {
    return p.page.evaluate(() => ({
      board: [...document.querySelectorAll("#board .cell")].map((c) => c.textContent || ".").join(""),
      win: [...document.querySelectorAll("#board .cell.win")].map((c) => Number(c.dataset.cell)),
      banner: document.getElementById("banner").textContent,
      X: document.querySelector("#seat-X .name").textContent,
      O: document.querySelector("#seat-O .name").textContent,
      you: document.querySelector(".seat .you")?.parentElement.id ?? null,
      seat: document.body.dataset.seat,
      round: Number(document.body.dataset.round),
      spectators: [...document.querySelectorAll("#spectators li")].map((li) => li.textContent),
      rematch: document.getElementById("rematch").hidden ? null : document.getElementById("rematch").textContent,
      sit: !document.getElementById("sit").hidden,
      error: document.getElementById("error").textContent,
      nudges: Number(document.getElementById("board").dataset.nudges || 0),
    }));
  }

  async function waitBoard(p, board) {
    await p.page.waitForFunction((b) =>
      [...document.querySelectorAll("#board .cell")].map((c) => c.textContent || ".").join("") === b,
    board, { timeout: UI_TIMEOUT }).catch(async (e) => {
      throw new Error(`${p.label}'s board is ${(await view(p)).board}, not ${board}: ${e.message}`);
    });
  }

  /** `p` clicks `cell`; every page then shows `board`. */
  async function play(p, cell, board) {
    await p.page.click(`#board .cell[data-cell="${cell}"]`);
    for (const q of pages) await waitBoard(q, board);
  }

  async function waitBanner(p, text) {
    await p.page.waitForFunction((t) => document.getElementById("banner").textContent === t, text, { timeout: UI_TIMEOUT })
      .catch(async (e) => { throw new Error(`${p.label}'s banner is "${(await view(p)).banner}", not "${text}": ${e.message}`); });
  }

  let alice, bob, carol;

  t("the first two joins take the seats X and O, the third watches; all three pages agree", async () => {
    alice = await openPage("alice");
    await waitBanner(alice, "Waiting for a second player…");
    bob = await openPage("bob");
    carol = await openPage("carol");
    await waitBanner(alice, "Your move (X)");
    for (const p of [bob, carol]) await waitBanner(p, "alice (X) to move");
    await waitFor(async () => (await view(alice)).spectators.length === 1, { what: "carol in alice's spectator list" });

    const views = { alice: await view(alice), bob: await view(bob), carol: await view(carol) };
    for (const [label, v] of Object.entries(views)) {
      assert.equal(v.board, ".........", `${label}'s board`);
      assert.deepEqual([v.X, v.O], ["alice", "bob"], `${label}'s seats`);
      assert.equal(v.round, 1);
    }
    assert.deepEqual([views.alice.seat, views.bob.seat, views.carol.seat], ["X", "O", "spectator"]);
    assert.deepEqual([views.alice.you, views.bob.you, views.carol.you], ["seat-X", "seat-O", null]);
    assert.deepEqual(views.alice.spectators, ["carol"]);
    assert.deepEqual(views.carol.spectators, ["carol (you)"]);
    assert.equal(views.carol.sit, false, "no free seat to take");
    assert.equal(await alice.page.isDisabled('#board .cell[data-cell="0"]'), false);
    assert.equal(await bob.page.isDisabled('#board .cell[data-cell="0"]'), true, "not bob's turn");
    // The room got a kind of its own.
    const room = await roomInfo(gw, game);
    assert.equal(room.kind, "game");
    assert.equal(room.subscribers, 3);
    for (const p of [alice, bob, carol]) await screenshot(p, "game-01-start");
  });

  t("moves show on every page; the script refuses what the page would not send; three in a row wins", async () => {
    await play(alice, 4, "....X....");
    await waitBanner(bob, "Your move (O)");
    await waitBanner(carol, "bob (O) to move");
    // Room.push reached bob's join only: the page counts your_turn nudges.
    await waitFor(async () => (await view(bob)).nudges === 1, { what: "bob's your_turn nudge" });

    // The page disables what is not yours to click; the rules still live in the script, which
    // refuses moves sent anyway (the page's own move(), called directly).
    await alice.page.evaluate(() => move(0));
    await alice.page.waitForFunction(() => document.getElementById("error").textContent === "not your turn");
    await carol.page.evaluate(() => move(0));
    await carol.page.waitForFunction(() => document.getElementById("error").textContent === "spectators cannot move");
    await bob.page.evaluate(() => move(4));
    await bob.page.waitForFunction(() => document.getElementById("error").textContent === "that cell is taken");

    await play(bob, 0, "O...X....");
    assert.equal((await view(bob)).error, "", "a good move clears the error");
    await play(alice, 2, "O.X.X....");
    for (const p of [alice, bob, carol]) await screenshot(p, "game-02-mid-game");
    await play(bob, 8, "O.X.X...O");
    await play(alice, 6, "O.X.X.X.O");

    await waitBanner(alice, "You win!");
    for (const p of [bob, carol]) await waitBanner(p, "alice (X) wins!");
    for (const p of [alice, bob, carol]) {
      const v = await view(p);
      assert.deepEqual(v.win, [2, 4, 6], `${p.label} sees the winning line`);
      assert.equal(await p.page.locator("#board .cell:not([disabled])").count(), 0, "the board is closed");
    }
    assert.equal((await view(alice)).rematch, "Rematch");
    assert.equal((await view(bob)).rematch, "Rematch");
    assert.equal((await view(carol)).rematch, null, "spectators have no rematch button");
    await waitFor(async () => (await view(carol)).board === "O.X.X.X.O");
    for (const p of [alice, bob, carol]) await screenshot(p, "game-03-win");
  });

  t("a rematch needs both players; the new round swaps the seats, so bob opens as X", async () => {
    await alice.page.click("#rematch");
    await alice.page.waitForFunction(() => document.getElementById("rematch").textContent === "Waiting for the other player…");
    await sleep(200);
    assert.equal((await view(bob)).board, "O.X.X.X.O", "one vote starts nothing");
    assert.equal((await view(bob)).rematch, "Rematch");

    await bob.page.click("#rematch");
    for (const p of [alice, bob, carol]) await waitBoard(p, ".........");
    await waitBanner(bob, "Your move (X)");
    await waitBanner(alice, "bob (X) to move");
    await waitBanner(carol, "bob (X) to move");
    for (const p of [alice, bob, carol]) {
      const v = await view(p);
      assert.deepEqual([v.X, v.O, v.round], ["bob", "alice", 2], `${p.label}'s seats after the rematch`);
      assert.deepEqual(v.win, []);
      assert.equal(v.rematch, null);
    }
    await play(bob, 0, "X........");
    await play(alice, 4, "X...O....");
  });

  t("killing the game room's worker mid-game: all three pages show the restart, the seats are dealt again in join order, and play goes on", async () => {
    const before = await roomInfo(gw, game);
    assert.equal(before.kind, "game");
    const oldPid = await killWorker(gw, game);
    for (const p of [alice, bob, carol]) {
      await p.page.waitForSelector("#log .notice.reset");
      assert.match(await p.page.textContent("#log .notice.reset"), /^The room restarted \(room worker exited.*\): the game starts over\.$/);
      await waitBoard(p, ".........");
    }
    // The gateway restarted the room at once and replayed the three joins in join order.
    const after = await waitFor(() => roomInfo(gw, game), { what: "the restarted game room" });
    assert.notEqual(after.pid, oldPid);
    assert.equal(after.subscribers, 3);
    await waitBanner(alice, "Your move (X)");
    for (const p of [bob, carol]) await waitBanner(p, "alice (X) to move");
    for (const p of [alice, bob, carol]) {
      const v = await view(p);
      assert.deepEqual([v.X, v.O, v.round], ["alice", "bob", 1], `${p.label}'s seats after the restart`);
      assert.equal(await p.page.getAttribute("#status", "data-state"), "connected");
    }
    assert.deepEqual((await view(carol)).spectators, ["carol (you)"]);
    await screenshot(carol, "game-04-restarted");

    await play(alice, 0, "X........");
    await play(bob, 8, "X.......O");
    await play(alice, 4, "X...X...O");
    await waitBanner(bob, "Your move (O)");
    for (const p of [alice, bob, carol]) await screenshot(p, "game-05-after-restart");
  });

  t("a player who leaves frees the seat; the spectator takes it and the game carries on", async () => {
    await bob.context.close();
    pages.splice(pages.indexOf(bob), 1);
    await waitFor(async () => (await view(carol)).sit, { what: "carol's Take-the-seat button" });
    const v = await view(alice);
    assert.equal(v.O, "free seat");
    assert.equal(v.banner, "Waiting for a second player…");
    assert.ok(await alice.page.locator("#log .notice", { hasText: "bob left; seat O is free" }).count() === 1);

    await carol.page.click("#sit");
    await waitBanner(carol, "Your move (O)");
    await waitBanner(alice, "carol (O) to move");
    assert.deepEqual((await view(alice)).spectators, []);
    await play(carol, 2, "X.O.X...O");
  });
});
