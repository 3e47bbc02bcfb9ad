"use strict";
// Shared helpers for the end-to-end suites: start and stop the real `gateway` binary, mint its
// tokens, read /api/rooms, and wait for things with bounded timeouts. Nothing here may hang:
// every wait has a deadline and fails with a message that says what it was waiting for.

const { execFileSync, spawn } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");
const readline = require("node:readline");
const crypto = require("node:crypto");

const GATEWAY = path.resolve(__dirname, process.env.ROOMVISOR_GATEWAY || "../../target/debug/gateway");
const LISTENING = /roomvisor gateway listening on (http:\/\/[^\s]+)/;
const START_TIMEOUT_MS = 15000;
const STOP_TIMEOUT_MS = 10000;

// Every gateway started by this process, so none can outlive the test run, even when a test
// fails or the runner is interrupted.
const live = new Set();

function killAllSync(signal = "SIGKILL") {
  for (const gw of live) {
    try { gw.proc.kill(signal); } catch { /* already gone */ }
  }
}
process.on("exit", () => killAllSync("SIGKILL"));
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(sig, () => { killAllSync("SIGKILL"); process.exit(130); });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Rejects with a clear message if `promise` does not settle within `ms`. */
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Polls `check` (sync or async) until it returns a truthy value, which is returned. Fails after
 * `timeout` ms with `what` and the last value or error seen.
 */
async function waitFor(check, { timeout = 5000, interval = 25, what = "a condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = value;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      const detail = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${detail})`);
    }
    await sleep(interval);
  }
}

/** A promise with its resolve/reject exposed, for callback-style APIs. */
function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

/** A room id unique to this run, so tests never share state by accident. */
function uniqueRoom(prefix) {
  return `${prefix}-${crypto.randomBytes(4).toString("hex")}`;
}

/**
 * Starts the gateway on 127.0.0.1 (port 0 picks a free one) and resolves once it has printed
 * its address. Restarting on a given port retries while the old listener lets go of it.
 */
async function startGateway({ port = 0, args = [], env = {}, timeout = START_TIMEOUT_MS } = {}) {
  if (!fs.existsSync(GATEWAY)) {
    throw new Error(`gateway binary not found at ${GATEWAY}: run \`cargo build --bins\` in the repository ` +
      "root, or set ROOMVISOR_GATEWAY");
  }
  const deadline = Date.now() + timeout;
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(port, args, env, Math.max(1000, deadline - Date.now()));
    } catch (e) {
      // Only a fixed port can be busy (the previous gateway on it may still be closing).
      if (port === 0 || Date.now() >= deadline || !/in use/i.test(e.message)) throw e;
      await sleep(100);
    }
  }
}

function startOnce(port, args, env, timeout) {
  const proc = spawn(GATEWAY, ["--port", String(port), ...args], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const gw = {
    proc,
    pid: proc.pid,
    log: [],                 // stderr lines, for failure reports
    exited: null,            // { code, signal } once it exited
    port: null,
    baseUrl: null,
    socketUrl: null,         // the endpoint to give phoenix's Socket (it appends /websocket)
    stop: (opts) => stopGateway(gw, opts),
    logTail: (n = 40) => gw.log.slice(-n).join("\n"),
  };
  live.add(gw);
  const exited = new Promise((resolve) => {
    proc.once("exit", (code, signal) => {
      gw.exited = { code, signal };
      live.delete(gw);
      resolve(gw.exited);
    });
  });
  gw.exitPromise = exited;
  readline.createInterface({ input: proc.stderr }).on("line", (line) => {
    gw.log.push(line);
    if (gw.log.length > 2000) gw.log.splice(0, 1000);
    if (process.env.E2E_VERBOSE) process.stderr.write(`[gateway ${proc.pid}] ${line}\n`);
  });
  const ready = new Promise((resolve, reject) => {
    readline.createInterface({ input: proc.stdout }).on("line", (line) => {
      const m = LISTENING.exec(line);
      if (!m) return;
      const url = new URL(m[1]);
      gw.port = Number(url.port);
      gw.baseUrl = `http://127.0.0.1:${gw.port}`;
      gw.socketUrl = `ws://127.0.0.1:${gw.port}/socket`;
      resolve(gw);
    });
    proc.once("error", reject);
    exited.then(({ code, signal }) => reject(new Error(
      `gateway exited before listening (code ${code}, signal ${signal}):\n${gw.logTail(20)}`)));
  });
  return withTimeout(ready, timeout, "the gateway to print its address").catch((e) => {
    proc.kill("SIGKILL");
    throw e;
  });
}

/**
 * A token signed with `secret`, minted the way the README shows it: `gateway token --sub ...`.
 * `ttl` is the gateway's duration syntax ("4s", "1h").
 */
function mintToken({ sub, name, ttl = "1h", secret }) {
  const args = ["token", "--sub", sub, "--ttl", ttl];
  if (name !== undefined) args.push("--name", name);
  const out = execFileSync(GATEWAY, args, {
    env: { ...process.env, ROOMVISOR_AUTH_SECRET: secret },
    encoding: "utf8",
    timeout: 10000,
  });
  return out.trim();
}

/** A JWT's claims, unverified: what the client may read of its own token (exp, name). */
function tokenClaims(token) {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));
}

/** Whether the gateway logged a line matching `pattern` (stderr, kept in gw.log). */
function logged(gw, pattern) {
  return gw.log.some((line) => pattern.test(line));
}

/** SIGTERM, then SIGKILL if it has not exited in time. Resolves with its exit status. */
async function stopGateway(gw, { timeout = STOP_TIMEOUT_MS } = {}) {
  if (gw.exited) return gw.exited;
  gw.proc.kill("SIGTERM");
  try {
    return await withTimeout(gw.exitPromise, timeout, `gateway ${gw.pid} to exit after SIGTERM`);
  } catch (e) {
    gw.proc.kill("SIGKILL");
    await gw.exitPromise;
    throw e;
  }
}

async function getJson(gw, pathname) {
  const res = await withTimeout(fetch(`${gw.baseUrl}${pathname}`), 5000, `GET ${pathname}`);
  if (!res.ok) throw new Error(`GET ${pathname}: HTTP ${res.status}`);
  return res.json();
}

/** The live rooms: [{id, pid, started_at, subscribers, calls}]. */
const fetchRooms = (gw) => getJson(gw, "/api/rooms");

async function roomInfo(gw, roomId) {
  return (await fetchRooms(gw)).find((r) => r.id === roomId) || null;
}

function pidAlive(pid) {
  try { process.kill(pid, 0); return true; } catch { return false; }
}

/**
 * `kill -9` of the room's worker process. Resolves with the killed pid once the process is
 * gone and the gateway no longer lists it for the room.
 */
async function killWorker(gw, roomId) {
  const room = await waitFor(() => roomInfo(gw, roomId), { timeout: 5000, what: `room ${roomId} in /api/rooms` });
  process.kill(room.pid, "SIGKILL");
  await waitFor(() => !pidAlive(room.pid), { timeout: 5000, what: `worker ${room.pid} to die` });
  await waitFor(async () => {
    const now = await roomInfo(gw, roomId);
    return !now || now.pid !== room.pid;
  }, { timeout: 5000, what: `the gateway to reap worker ${room.pid}` });
  return room.pid;
}

/**
 * Wraps a test body so that a failure carries the tail of every given gateway's log: the
 * server side of the story is what one needs to tell a client bug from a server bug.
 */
function withLogs(getGateways, fn) {
  return async (t) => {
    try {
      await fn(t);
    } catch (e) {
      const gws = [].concat(getGateways() || []).filter(Boolean);
      const logs = gws.map((gw) => `--- gateway pid ${gw.pid} (port ${gw.port}) log tail ---\n${gw.logTail(30)}`);
      if (logs.length && e && typeof e === "object") {
        try { e.message = `${e.message}\n${logs.join("\n")}`; } catch { /* read-only message */ }
      }
      throw e;
    }
  };
}

const CHROMIUM = process.env.E2E_CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run",
];
/** Where the Chromium suites put their screenshots (CI points it into target/). */
const SCREENSHOTS = path.resolve(process.env.E2E_SCREENSHOTS || path.join(__dirname, "screenshots"));

/** Debian's headless Chromium through playwright-core, with the screenshots folder ready. */
async function launchChromium() {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  const { chromium } = require("playwright-core");
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true, timeout: 30000 });
}

module.exports = {
  GATEWAY,
  SCREENSHOTS,
  launchChromium,
  deferred,
  fetchRooms,
  getJson,
  killWorker,
  logged,
  mintToken,
  pidAlive,
  roomInfo,
  sleep,
  startGateway,
  stopGateway,
  tokenClaims,
  uniqueRoom,
  waitFor,
  withLogs,
  withTimeout,
};
