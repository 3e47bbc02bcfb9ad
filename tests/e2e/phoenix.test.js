"use strict";
// The official `phoenix` JS client (npm `phoenix`, priv/static/phoenix.cjs.js) against the real
// gateway binary. Every frame below is produced by the client's own code (Socket, Channel, Push);
// the only test-side addition is a WebSocket subclass that records the raw frames both ways.
//
// What the client can send (read from phoenix 1.8.16, assets/js/phoenix/*.js):
//
//   connect      GET {endPoint}/websocket?{params}&vsn=2.0.0 (socket.js endPointURL; the vsn query
//                is always added, opts.vsn overrides "2.0.0")                     -> tested (all)
//                with opts.authToken: Sec-WebSocket-Protocol "phoenix,
//                base64url.bearer.phx.<base64 token>"; the server must select "phoenix" or the
//                client's WebSocket fails the handshake                            -> tested
//                with opts.params: extra query parameters                         -> tested
//   phx_join     [jr, jr, topic, "phx_join", chanParams] (channel.join/rejoin; join_ref == ref).
//                Awaits phx_reply ok (joined; buffered pushes flushed) | error (rejoins after
//                rejoinAfterMs)                                                    -> tested
//                | no reply within `timeout`: the client sends phx_leave for that join and
//                rejoins (suite "slow room start", with fixtures/slow-first-join.js) -> tested
//                Before joining, a channel leaves any other joined/joining channel of the same
//                topic on the socket (socket.leaveOpenTopic): phx_leave then phx_join   -> tested
//                A second phx_join of a joined topic on the wire: the server closes the old
//                join (phx_close to its join_ref), the client's old channel closes   -> tested
//   push         [jr, ref, topic, event, payload] (channel.push); awaits phx_reply with that ref:
//                receive("ok"|"error"), else "timeout"; pushes made before the join reply are
//                buffered and sent after it                                        -> tested
//   binary push  channel.push(event, ArrayBuffer) is a binary frame:
//                [kind=0, len(jr), len(ref), len(topic), len(event), jr, ref, topic, event, bytes]
//                (serializer.js binaryEncode); awaits a phx_reply like any push. Rooms
//                speak JSON only: the gateway answers with a text phx_reply error
//                {"reason":"binary payloads are not supported"}                    -> tested
//   phx_leave    [jr, ref, topic, "phx_leave", {}] (channel.leave, and after a join timeout);
//                awaits phx_reply ok (or times out, which also closes the channel)  -> tested
//   heartbeat    [null, ref, "phoenix", "heartbeat", {}] every heartbeatIntervalMs after the
//                last reply (socket.sendHeartbeat), and socket.ping(cb); awaits phx_reply with
//                that ref within heartbeatIntervalMs, else closes (1000, "heartbeat timeout")
//                and reconnects                                                    -> tested
//   close        socket.disconnect(cb, code, reason): WebSocket close frame          -> tested
//   longpoll     transport LongPoll (or longPollFallbackMs): GET {endPoint}/longpoll?vsn=2.0.0
//                (+&token=, X-Phoenix-AuthToken header), POST ndjson batches; expects JSON
//                {status, token, messages}: not served (no /socket/longpoll)        -> not served
//   vsn          opts.vsn only changes the query parameter (the encoder stays v2); Phoenix
//                refuses an unsupported vsn at the upgrade; so does the gateway (403) -> tested
//
// What the client reacts to from the server:
//   phx_reply    matched by ref to a push (join, push, leave, heartbeat/ping)        -> tested
//   phx_close    channel closed and removed from the socket (onClose)               -> tested
//   phx_error    channel errored, rejoins (the gateway never sends it: a dead room worker is
//                a room_reset, the channel stays joined)                           -> not sent
//   other events channel.on(event): new_message, room_reset                         -> tested
//                presence_state / presence_diff, through phoenix.js's own Presence class
//                (onSync, onJoin, onLeave, list with a chooser)                    -> tested
//                and, on a kind made of hooks (fixtures/counter-room.js), pushes answered by
//                onEvent / Room.refuse, Room.broadcast and a Room.push with the join_ref -> tested
//                a frame whose join_ref is not the channel's current one is dropped (isMember)
//   binary frames kinds 1 (reply) and 2 (broadcast): the gateway sends only text       -> n/a
//   close/error  any close the client did not ask for: channels error, socket reconnects
//                with reconnectAfterMs, channels rejoin on open                     -> tested
//                (server shutdown + restart on the same port, and the idle timeout)

const { describe, test, before, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const WebSocket = require("ws");
const { Presence, Socket } = require("phoenix");
const {
  deferred, killWorker, logged, mintToken, roomInfo, sleep, startGateway, tokenClaims, uniqueRoom, waitFor, withLogs,
  withTimeout,
} = require("./helpers");

// ---------------------------------------------------------------------------------------------
// Client-side helpers

/** A `ws` WebSocket that records every frame, so tests can assert the wire, not just callbacks. */
function recordingTransport(log) {
  return class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      const conn = { url, protocols, index: log.connections.length };
      log.connections.push(conn);
      this.connIndex = conn.index;
      this.addEventListener("message", (ev) => {
        const entry = typeof ev.data === "string" ? JSON.parse(ev.data) : { binary: Buffer.from(ev.data) };
        log.received.push({ conn: conn.index, frame: entry, at: Date.now() });
      });
      this.addEventListener("close", (ev) => log.closes.push({ conn: conn.index, code: ev.code, reason: ev.reason }));
    }

    send(data) {
      const conn = this.connIndex;
      const entry = typeof data === "string" ? JSON.parse(data) : { binary: Buffer.from(data) };
      log.sent.push({ conn, frame: entry, at: Date.now() });
      super.send(data);
    }
  };
}

const openSockets = new Set();

/** A connected phoenix Socket with a frame log at `socket.log`. */
async function connect(gw, opts = {}) {
  const log = { connections: [], sent: [], received: [], closes: [] };
  const socket = new Socket(gw.socketUrl, { transport: recordingTransport(log), timeout: 5000, ...opts });
  socket.log = log;
  openSockets.add(socket);
  const opened = deferred();
  socket.onOpen(() => opened.resolve());
  socket.connect();
  await withTimeout(opened.promise, 5000, "the socket to open");
  return socket;
}

function disconnectAll() {
  for (const socket of openSockets) {
    for (const channel of [...socket.channels]) channel.rejoinTimer.reset();
    socket.disconnect();
  }
  openSockets.clear();
}

/** Resolves a Push with {status, response} for ok/error, rejects on timeout. */
function reply(push, what = `reply to ${push.event}`) {
  return withTimeout(new Promise((resolve, reject) => {
    push.receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => reject(new Error(`push timeout: no ${what}`)));
  }), 8000, what);
}

async function joinOk(channel) {
  const { status, response } = await reply(channel.join(), `join reply for ${channel.topic}`);
  assert.equal(status, "ok", `join ${channel.topic} failed: ${JSON.stringify(response)}`);
  return response;
}

async function sendOk(channel, sender, text) {
  const { status, response } = await reply(channel.push("send_message", { sender, text }), "send_message reply");
  assert.equal(status, "ok", `send_message failed: ${JSON.stringify(response)}`);
  assertMessage(response, sender, text);
  return response;
}

function assertMessage(msg, sender, text) {
  assert.equal(typeof msg, "object");
  assert.ok(Number.isInteger(msg.id) && msg.id >= 1, `message id ${msg.id}`);
  assert.equal(msg.sender, sender);
  assert.equal(msg.text, text);
  assert.ok(Number.isFinite(msg.timestamp), `timestamp ${msg.timestamp}`);
  assert.ok(Math.abs(msg.timestamp - Date.now()) < 60000, `timestamp ${msg.timestamp} is not ms since epoch, now`);
}

/** Collects a channel event's payloads. */
function collect(channel, event) {
  const seen = [];
  channel.on(event, (payload) => seen.push(payload));
  return seen;
}

const received = (socket, pred) => socket.log.received.map((r) => r.frame).filter((f) => Array.isArray(f) && pred(f));
const sent = (socket, pred) => socket.log.sent.map((s) => s.frame).filter((f) => Array.isArray(f) && pred(f));

// ---------------------------------------------------------------------------------------------

describe("phoenix.js client against one gateway", () => {
  let gw;
  before(async () => { gw = await startGateway(); });
  afterEach(() => disconnectAll());
  after(async () => {
    disconnectAll();
    if (gw) {
      const status = await gw.stop();
      assert.equal(status.code, 0, `gateway exit after SIGTERM: ${JSON.stringify(status)}`);
    }
  });
  const t = (name, fn, opts = {}) => test(name, { timeout: 30000, ...opts }, withLogs(() => gw, fn));

  t("join replies with the room's history; send_message replies ok with the stored message", async () => {
    const room = uniqueRoom("history");
    const a = await connect(gw);
    const chA = a.channel(`room:${room}`);
    const first = await joinOk(chA);
    assert.deepEqual(first.messages, [], "a new room has no history");
    assert.equal(first.resumed, false);
    assert.equal(typeof first.epoch, "number", "the join names the epoch its ids belong to");

    const m1 = await sendOk(chA, "alice", "hello");
    const m2 = await sendOk(chA, "alice", "second");
    const m3 = await sendOk(chA, "bob", "third ✓ 🎉");
    assert.ok(m1.id < m2.id && m2.id < m3.id, "ids increase");

    const b = await connect(gw);
    const history = await joinOk(b.channel(`room:${room}`));
    assert.deepEqual(history.messages, [m1, m2, m3], "a later join gets the history, oldest first");

    // On the wire: the join went out as [jr, jr, topic, "phx_join", {}] and came back with the
    // same refs.
    const [join] = sent(b, (f) => f[3] === "phx_join");
    assert.equal(join[0], join[1]);
    assert.deepEqual(join.slice(2), [`room:${room}`, "phx_join", {}]);
    const [joinReply] = received(b, (f) => f[1] === join[1]);
    assert.deepEqual(joinReply, [join[0], join[1], `room:${room}`, "phx_reply", { status: "ok", response: history }]);
  });

  t("two sockets see each other's new_message; a third socket in another room sees nothing", async () => {
    const room = uniqueRoom("pair");
    const other = uniqueRoom("other");
    const [a, b, c] = await Promise.all([connect(gw), connect(gw), connect(gw)]);
    const chA = a.channel(`room:${room}`);
    const chB = b.channel(`room:${room}`);
    const chC = c.channel(`room:${other}`);
    const seenA = collect(chA, "new_message");
    const seenB = collect(chB, "new_message");
    const seenC = collect(chC, "new_message");
    await Promise.all([joinOk(chA), joinOk(chB), joinOk(chC)]);

    const fromA = await sendOk(chA, "alice", "hi bob");
    const fromB = await sendOk(chB, "bob", "hi alice");
    const ids = (list) => list.map((m) => m.id).sort((x, y) => x - y);
    await waitFor(() => seenA.length >= 2 && seenB.length >= 2, { what: "both new_messages on both sockets" });
    assert.deepEqual(ids(seenA), [fromA.id, fromB.id], "the sender gets its own new_message too");
    assert.deepEqual(ids(seenB), [fromA.id, fromB.id]);
    assert.deepEqual(seenB.find((m) => m.id === fromA.id), fromA, "the push is the stored message");

    // C proves its socket is live by getting its own message; it must never see room's.
    const fromC = await sendOk(chC, "carol", "anyone?");
    await waitFor(() => seenC.length >= 1, { what: "carol's own new_message" });
    await sleep(300);
    assert.deepEqual(seenC, [fromC]);
    assert.deepEqual(received(c, (f) => f[2] === `room:${room}`), [], "no frame of the other room reached C");
    assert.equal(received(a, (f) => f[2] === `room:${other}`).length, 0);

    // Broadcasts are fastlaned: join_ref and ref null.
    const push = received(b, (f) => f[3] === "new_message")[0];
    assert.deepEqual(push.slice(0, 3), [null, null, `room:${room}`]);
  });

  t("pushes made before the join reply are buffered by the client and answered after it", async () => {
    const room = uniqueRoom("buffered");
    const a = await connect(gw);
    const ch = a.channel(`room:${room}`);
    const join = reply(ch.join());
    const early = reply(ch.push("send_message", { sender: "eager", text: "sent while joining" }));
    assert.equal((await join).status, "ok");
    const { status, response } = await early;
    assert.equal(status, "ok");
    assertMessage(response, "eager", "sent while joining");
  });

  t("error replies: blank text, bad payload, unknown event, invalid room id, unknown topic", async () => {
    const room = uniqueRoom("errors");
    const a = await connect(gw);
    const ch = a.channel(`room:${room}`);
    await joinOk(ch);

    let r = await reply(ch.push("send_message", { sender: "alice", text: "   " }));
    assert.deepEqual(r, { status: "error", response: { reason: "text must not be blank" } });
    r = await reply(ch.push("send_message", { sender: "", text: "hi" }));
    assert.deepEqual(r, { status: "error", response: { reason: "sender must not be blank" } });
    r = await reply(ch.push("send_message", { text: 42 }));
    assert.equal(r.status, "error");
    assert.match(r.response.reason, /invalid payload/);
    r = await reply(ch.push("shout", { text: "HI" }));
    assert.deepEqual(r, { status: "error", response: { reason: "unknown event" } });

    const bad = a.channel("room:../x");
    r = await reply(bad.join());
    assert.deepEqual(r, { status: "error", response: { reason: "invalid room id" } });
    const [badJoin] = sent(a, (f) => f[2] === "room:../x" && f[3] === "phx_join");
    assert.deepEqual(received(a, (f) => f[2] === "room:../x" && f[1] === badJoin[1]), [
      [badJoin[0], badJoin[1], "room:../x", "phx_reply", { status: "error", response: { reason: "invalid room id" } }],
    ]);
    bad.leave();

    const lobby = a.channel("lobby");
    r = await reply(lobby.join());
    assert.deepEqual(r, { status: "error", response: { reason: "unmatched topic" } });
    lobby.leave();

    // Nothing was stored by the refused sends, and the channel still works.
    const ok = await sendOk(ch, "alice", "still here");
    assert.equal(ok.id, 1);
  });

  t("channel.leave() is answered ok at once, then phx_close; the socket stops getting the room", async () => {
    const room = uniqueRoom("leave");
    const [a, b] = await Promise.all([connect(gw), connect(gw)]);
    const chA = a.channel(`room:${room}`);
    const chB = b.channel(`room:${room}`);
    const seenA = collect(chA, "new_message");
    const closed = deferred();
    chA.onClose(() => closed.resolve());
    await Promise.all([joinOk(chA), joinOk(chB)]);
    await waitFor(async () => (await roomInfo(gw, room))?.subscribers === 2, { what: "2 subscribers" });

    const started = Date.now();
    const leave = chA.leave(5000);
    const outcome = await withTimeout(new Promise((resolve) => {
      leave.receive("ok", (resp) => resolve({ status: "ok", resp })).receive("timeout", () => resolve({ status: "timeout" }));
    }), 7000, "the leave reply");
    const took = Date.now() - started;
    assert.equal(outcome.status, "ok", "leave must be answered by the server, not by the push timeout");
    assert.ok(took < 2000, `leave took ${took} ms`);
    await withTimeout(closed.promise, 2000, "channel onClose");
    assert.ok(!a.channels.includes(chA), "the closed channel is removed from the socket");

    // On the wire: [jr, ref, topic, "phx_leave", {}] -> phx_reply ok {} -> [jr, jr, topic, "phx_close", {}].
    const [leaveFrame] = sent(a, (f) => f[3] === "phx_leave");
    const jr = leaveFrame[0];
    assert.deepEqual(leaveFrame.slice(2), [`room:${room}`, "phx_leave", {}]);
    await waitFor(() => received(a, (f) => f[3] === "phx_close").length === 1, { what: "phx_close frame" });
    const frames = received(a, (f) => f[2] === `room:${room}` && (f[1] === leaveFrame[1] || f[3] === "phx_close"));
    assert.deepEqual(frames, [
      [jr, leaveFrame[1], `room:${room}`, "phx_reply", { status: "ok", response: {} }],
      [jr, jr, `room:${room}`, "phx_close", {}],
    ]);

    await waitFor(async () => (await roomInfo(gw, room))?.subscribers === 1, { what: "the leaver to be unsubscribed" });
    const before = a.log.received.length;
    await sendOk(chB, "bob", "are you gone?");
    await sleep(300);
    assert.equal(seenA.length, 0);
    assert.deepEqual(a.log.received.slice(before), [], "no frame reaches a socket that left the room");

    // A leave for a topic the server no longer has is answered ok too (Phoenix does so, and a
    // client whose channel the server already closed must not wait out its push timeout).
    const ref = a.makeRef();
    a.push({ topic: `room:${room}`, event: "phx_leave", payload: {}, ref, join_ref: jr });
    await waitFor(() => received(a, (f) => f[1] === ref).length === 1, { what: "reply to a stale phx_leave" });
    assert.deepEqual(received(a, (f) => f[1] === ref)[0], [jr, ref, `room:${room}`, "phx_reply", { status: "ok", response: {} }]);
  });

  t("joining a topic twice: the client leaves its old channel first and gets each message once", async () => {
    const room = uniqueRoom("twice");
    const a = await connect(gw);
    const first = a.channel(`room:${room}`);
    const closed = deferred();
    first.onClose(() => closed.resolve());
    await joinOk(first);
    const second = a.channel(`room:${room}`);
    const seen = collect(second, "new_message");
    await joinOk(second);
    await withTimeout(closed.promise, 3000, "the first channel to close");
    const order = sent(a, (f) => f[2] === `room:${room}`).map((f) => f[3]);
    assert.deepEqual(order, ["phx_join", "phx_leave", "phx_join"], "the client's leaveOpenTopic");

    const msg = await sendOk(second, "alice", "once");
    await waitFor(() => seen.length === 1, { what: "the new_message" });
    await sleep(300);
    assert.equal(received(a, (f) => f[3] === "new_message" && f[4].id === msg.id).length, 1,
      "the socket is subscribed once, not once per join");
    await waitFor(async () => (await roomInfo(gw, room))?.subscribers === 1, { what: "1 subscriber" });
  });

  t("a join the server sees twice closes the old join: the client's channel gets phx_close", async () => {
    const room = uniqueRoom("rejoin");
    const a = await connect(gw);
    const ch = a.channel(`room:${room}`);
    const closed = deferred();
    ch.onClose(() => closed.resolve());
    await joinOk(ch);
    const oldJoinRef = ch.joinRef();
    // A second phx_join of the same topic under a new join_ref, as a client that timed out its
    // join would send it (socket.push is the client's own frame writer).
    const ref = a.makeRef();
    a.push({ topic: `room:${room}`, event: "phx_join", payload: {}, ref, join_ref: ref });
    await withTimeout(closed.promise, 3000, "phx_close to the old join");
    assert.deepEqual(received(a, (f) => f[3] === "phx_close"), [[oldJoinRef, oldJoinRef, `room:${room}`, "phx_close", {}]]);
    await waitFor(() => received(a, (f) => f[1] === ref).length === 1, { what: "the second join's reply" });
    assert.equal(received(a, (f) => f[1] === ref)[0][4].status, "ok");
  });

  t("socket.ping() is answered; socket and channel params are accepted", async () => {
    const room = uniqueRoom("params");
    const a = await connect(gw, { params: { user_token: "abc" } });
    assert.match(a.log.connections[0].url, /\/socket\/websocket\?user_token=abc&vsn=2\.0\.0$/);
    const rtt = deferred();
    assert.equal(a.ping((ms) => rtt.resolve(ms)), true);
    const ms = await withTimeout(rtt.promise, 3000, "the ping reply");
    assert.ok(ms >= 0 && ms < 3000);
    const ch = a.channel(`room:${room}`, { last_seen_id: 0 });
    await joinOk(ch);
    assert.deepEqual(sent(a, (f) => f[3] === "phx_join")[0][4], { last_seen_id: 0 });
  });

  t("socket.disconnect() closes cleanly and unsubscribes the socket from its rooms", async () => {
    const room = uniqueRoom("disconnect");
    const a = await connect(gw);
    await joinOk(a.channel(`room:${room}`));
    await waitFor(async () => (await roomInfo(gw, room))?.subscribers === 1, { what: "1 subscriber" });
    const done = deferred();
    a.disconnect(() => done.resolve(), 1000, "bye");
    openSockets.delete(a);
    await withTimeout(done.promise, 3000, "disconnect callback");
    assert.deepEqual(a.log.closes.map((c) => c.code), [1000]);
    await waitFor(async () => (await roomInfo(gw, room))?.subscribers === 0, { what: "0 subscribers" });
  });

  t("kill -9 of the room worker: room_reset on every channel, then a fresh room works", async () => {
    const room = uniqueRoom("reset");
    const [a, b] = await Promise.all([connect(gw), connect(gw)]);
    const chA = a.channel(`room:${room}`);
    const chB = b.channel(`room:${room}`);
    const resetsA = collect(chA, "room_reset");
    const resetsB = collect(chB, "room_reset");
    const seenB = collect(chB, "new_message");
    const errors = [];
    for (const ch of [chA, chB]) {
      ch.onError((e) => errors.push(e));
      ch.onClose(() => errors.push("closed"));
    }
    await Promise.all([joinOk(chA), joinOk(chB)]);
    await sendOk(chA, "alice", "before the crash 1");
    await sendOk(chB, "bob", "before the crash 2");

    const killed = await killWorker(gw, room);
    await waitFor(() => resetsA.length === 1 && resetsB.length === 1, { what: "room_reset on both channels" });
    for (const payload of [resetsA[0], resetsB[0]]) {
      assert.equal(payload.reason, "room worker exited");
      assert.match(String(payload.detail), /signal: 9|SIGKILL/);
    }
    assert.deepEqual(errors, [], "the channels stay joined: no phx_error, no phx_close");
    assert.ok(chA.isJoined() && chB.isJoined());

    const fresh = await sendOk(chA, "alice", "after the crash");
    assert.equal(fresh.id, 1, "a fresh runtime numbers from 1");
    await waitFor(() => seenB.some((m) => m.id === 1 && m.text === "after the crash"), { what: "B to see the fresh message" });
    const info = await roomInfo(gw, room);
    assert.ok(info && info.pid !== killed, "a new worker process runs the room");

    const c = await connect(gw);
    const history = await joinOk(c.channel(`room:${room}`));
    assert.deepEqual(history.messages, [fresh], "the fresh room's history holds only what came after");
    assert.equal(resetsA.length, 1, "one reset per crash");
  });

  t("authToken: the bearer subprotocol handshake succeeds (the server selects \"phoenix\")", async () => {
    const room = uniqueRoom("token");
    const a = await connect(gw, { authToken: "secret-token" });
    assert.deepEqual(a.log.connections[0].protocols, ["phoenix", "base64url.bearer.phx.c2VjcmV0LXRva2Vu"]);
    assert.equal(a.conn.protocol, "phoenix");
    await joinOk(a.channel(`room:${room}`));
  });

  t("a binary push does not break the socket", async () => {
    const room = uniqueRoom("binary");
    const a = await connect(gw);
    const ch = a.channel(`room:${room}`);
    await joinOk(ch);
    const bytes = new TextEncoder().encode("binary payload").buffer;
    ch.push("send_message", bytes, 1000);
    assert.ok(a.log.sent.some((s) => s.frame.binary && s.frame.binary[0] === 0), "the client sent a binary push frame");
    await sendOk(ch, "alice", "text after binary");
    assert.equal(a.log.closes.length, 0);
  });

  t("a binary push is answered with an error reply, not left to time out", async () => {
    const room = uniqueRoom("binreply");
    const a = await connect(gw);
    const ch = a.channel(`room:${room}`);
    await joinOk(ch);
    const r = await reply(ch.push("send_message", new TextEncoder().encode("x").buffer, 2000), "reply to a binary push");
    assert.equal(r.status, "error");
    assert.deepEqual(r.response, { reason: "binary payloads are not supported" });
  });

  t("an unsupported vsn is refused at the upgrade, as Phoenix does", async () => {
    // The HTTP answer to the upgrade itself: 403, not just any failure to connect.
    const raw = new WebSocket(`${gw.socketUrl}/websocket?vsn=3.0.0`);
    const refused = await withTimeout(new Promise((resolve, reject) => {
      raw.on("unexpected-response", (req, res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => { body += chunk; });
        res.on("end", () => { resolve({ status: res.statusCode, body }); req.destroy(); });
      });
      raw.on("upgrade", (res) => reject(new Error(`the upgrade was accepted (${res.statusCode})`)));
      raw.on("error", (e) => reject(new Error(`the upgrade failed without an HTTP answer: ${e.message}`)));
    }), 3000, "the answer to the upgrade");
    assert.equal(refused.status, 403, `status of the refused upgrade: ${JSON.stringify(refused)}`);
    assert.match(refused.body, /unsupported vsn/);

    // phoenix.js sends the vsn it is given and sees the same refusal.
    const log = { connections: [], sent: [], received: [], closes: [] };
    const socket = new Socket(gw.socketUrl, { transport: recordingTransport(log), vsn: "3.0.0" });
    openSockets.add(socket);
    let opened = false;
    socket.onOpen(() => { opened = true; });
    const errored = deferred();
    socket.onError((error) => errored.resolve(error));
    socket.connect();
    const error = await withTimeout(errored.promise, 3000, "the upgrade to be refused");
    assert.equal(opened, false);
    assert.match(log.connections[0].url, /[?&]vsn=3\.0\.0$/);
    assert.match(String(error && error.message), /Unexpected server response: 403\b/);
  });
});

describe("phoenix.js heartbeats against the gateway's idle timeout", () => {
  const IDLE_MS = 2000;
  const HEARTBEAT_MS = 500;
  let gw;
  before(async () => { gw = await startGateway({ args: ["--idle-timeout-ms", String(IDLE_MS)] }); });
  afterEach(() => disconnectAll());
  after(async () => { disconnectAll(); if (gw) await gw.stop(); });
  const t = (name, fn) => test(name, { timeout: 30000 }, withLogs(() => gw, fn));

  t("heartbeats are answered and keep the socket open past the idle timeout; a silent socket is dropped and the client reconnects and rejoins by itself", async () => {
    const room = uniqueRoom("heartbeat");
    // `beating` sends heartbeats well inside the idle timeout; `silent` (the default 30 s
    // interval) sends nothing after joining, so the server drops it and the client must
    // reconnect and rejoin on its own.
    const [beating, silent] = await Promise.all([
      connect(gw, { heartbeatIntervalMs: HEARTBEAT_MS }),
      connect(gw, { reconnectAfterMs: () => 100 }),
    ]);
    const chBeat = beating.channel(`room:${room}`);
    const chSilent = silent.channel(`room:${room}`);
    const beatErrors = [];
    chBeat.onError((e) => beatErrors.push(e));
    let silentJoins = 0;
    const silentPushes = [];
    chSilent.join().receive("ok", () => {
      silentJoins++;
      // Right after the first rejoin (far from the next idle cut-off), the channel works again.
      if (silentJoins === 2) {
        chSilent.push("send_message", { sender: "silent", text: "back again" })
          .receive("ok", (msg) => silentPushes.push({ status: "ok", msg }))
          .receive("error", (msg) => silentPushes.push({ status: "error", msg }))
          .receive("timeout", () => silentPushes.push({ status: "timeout" }));
      }
    });
    await joinOk(chBeat);
    await waitFor(() => silentJoins === 1, { what: "the silent socket's join" });

    const watchMs = IDLE_MS * 2 + 1000;
    await sleep(watchMs);

    // The beating socket: one connection, never closed, every heartbeat answered in kind.
    assert.equal(beating.log.connections.length, 1, "the heartbeating socket never reconnected");
    assert.deepEqual(beating.log.closes, []);
    assert.deepEqual(beatErrors, []);
    const beats = sent(beating, (f) => f[2] === "phoenix" && f[3] === "heartbeat");
    assert.ok(beats.length >= Math.floor(watchMs / HEARTBEAT_MS) - 3, `only ${beats.length} heartbeats sent in ${watchMs} ms`);
    for (const hb of beats) assert.deepEqual([hb[0], hb[4]], [null, {}]);
    const replies = received(beating, (f) => f[2] === "phoenix");
    const answered = beats.filter((hb) => replies.some((r) => r[1] === hb[1]));
    assert.ok(answered.length >= beats.length - 1, `${answered.length} of ${beats.length} heartbeats answered`);
    for (const r of replies) assert.deepEqual(r, [null, r[1], "phoenix", "phx_reply", { status: "ok", response: {} }]);
    assert.ok(beating.isConnected() && chBeat.isJoined());
    await sendOk(chBeat, "beat", "still connected");

    // The silent socket: dropped by the server (1000 "idle timeout"), then reconnected and
    // rejoined by the client itself.
    assert.ok(silent.log.closes.length >= 1, "the silent socket was dropped");
    assert.equal(silent.log.closes[0].code, 1000);
    assert.equal(silent.log.closes[0].reason, "idle timeout");
    await waitFor(() => silentJoins >= 2, { timeout: 5000, what: "the silent channel to rejoin" });
    await waitFor(() => silentPushes.length === 1, { timeout: 6000, what: "the reply to a push after the rejoin" });
    assert.equal(silentPushes[0].status, "ok", JSON.stringify(silentPushes[0]));
    assertMessage(silentPushes[0].msg, "silent", "back again");
  });
});

describe("phoenix.js reconnects across a gateway restart", () => {
  let gw1, gw2;
  afterEach(() => disconnectAll());
  after(async () => {
    disconnectAll();
    await Promise.all([gw1?.stop(), gw2?.stop()].filter(Boolean));
  });

  test("SIGTERM closes the socket with 1001; the client reconnects to the new gateway on the same port, rejoins, and pushes work", { timeout: 45000 }, withLogs(() => [gw1, gw2], async () => {
    const room = uniqueRoom("restart");
    gw1 = await startGateway();
    const a = await connect(gw1);
    const ch = a.channel(`room:${room}`);
    const joins = [];
    const errors = [];
    ch.join().receive("ok", (resp) => joins.push(resp));
    ch.onError((e) => errors.push(e));
    await waitFor(() => joins.length === 1, { what: "the first join" });
    const before = await sendOk(ch, "alice", "before restart");
    assert.equal(before.id, 1);

    const status = await gw1.stop();
    assert.equal(status.code, 0, `gateway exit after SIGTERM: ${JSON.stringify(status)}`);
    await waitFor(() => a.log.closes.length >= 1, { what: "the client to see the close" });
    assert.equal(a.log.closes[0].code, 1001, `close frames: ${JSON.stringify(a.log.closes)}`);
    await waitFor(() => errors.length >= 1, { what: "the channel to error on the lost connection" });

    gw2 = await startGateway({ port: gw1.port });
    assert.equal(gw2.port, gw1.port);
    await waitFor(() => joins.length === 2 && ch.isJoined(), { timeout: 15000, what: "the client to rejoin by itself" });
    assert.deepEqual(joins[1].messages, [], "the new gateway's room starts empty");
    const after = await sendOk(ch, "alice", "after restart");
    assert.equal(after.id, 1);

    // The rejoin used a new join_ref, and the push after it carries that join_ref.
    const lastConn = a.log.connections.length - 1;
    const rejoin = a.log.sent.filter((s) => s.conn === lastConn && s.frame[3] === "phx_join").map((s) => s.frame);
    assert.equal(rejoin.length, 1);
    const firstJoin = sent(a, (f) => f[3] === "phx_join")[0];
    assert.notEqual(rejoin[0][0], firstJoin[0]);
    const push = a.log.sent.filter((s) => s.conn === lastConn && s.frame[3] === "send_message").map((s) => s.frame);
    assert.equal(push[0][0], rejoin[0][0]);
  }));
});

describe("phoenix.js recovers from a join that times out (slow room start)", () => {
  const path = require("node:path");
  let gw;
  before(async () => {
    gw = await startGateway({ args: ["--room-script", path.join(__dirname, "fixtures", "slow-first-join.js")] });
  });
  afterEach(() => disconnectAll());
  after(async () => { disconnectAll(); if (gw) await gw.stop(); });
  const t = (name, fn) => test(name, { timeout: 30000 }, withLogs(() => gw, fn));

  /**
   * The first join of a new room takes 1.5 s (fixture); the client gives it 400 ms, then sends
   * phx_leave for it and rejoins 100 ms later. Resolves once the rejoin is ok.
   */
  async function joinThroughTimeout(room) {
    const topic = `room:${room}`;
    const a = await connect(gw, { timeout: 400, rejoinAfterMs: () => 100 });
    const ch = a.channel(topic);
    const seen = collect(ch, "new_message");
    const outcomes = [];
    ch.join()
      .receive("ok", () => outcomes.push("ok"))
      .receive("error", (e) => outcomes.push(`error ${JSON.stringify(e)}`))
      .receive("timeout", () => outcomes.push("timeout"));
    await waitFor(() => outcomes.includes("ok"), { timeout: 10000, what: "the rejoin to succeed" });
    assert.equal(outcomes[0], "timeout", `outcomes: ${outcomes}`);
    assert.ok(ch.isJoined());
    const frames = sent(a, (f) => f[2] === topic);
    assert.deepEqual(frames.map((f) => f[3]).slice(0, 3), ["phx_join", "phx_leave", "phx_join"]);
    const [join1, leave, join2] = frames;
    assert.equal(leave[0], join1[0], "the leave names the timed-out join");
    assert.notEqual(join2[0], join1[0], "the rejoin is a new join");
    return { a, ch, topic, seen, join1, leave, join2 };
  }

  t("after a join timeout, the client's phx_leave is answered and its rejoin works", async () => {
    const room = uniqueRoom("slowjoin");
    const { a, ch, topic, join1, leave, join2 } = await joinThroughTimeout(room);
    await sendOk(ch, "alice", "after the slow join");
    // The server answers the leave of the timed-out join (ok, then phx_close to its join_ref)
    // once that join is done; the client drops both as outdated, and stays joined.
    await waitFor(() => received(a, (f) => f[1] === leave[1]).length === 1, { timeout: 5000, what: "the reply to the phx_leave" });
    assert.deepEqual(received(a, (f) => f[1] === leave[1])[0], [join1[0], leave[1], topic, "phx_reply", { status: "ok", response: {} }]);
    assert.ok(received(a, (f) => f[3] === "phx_close" && f[0] === join1[0]).length >= 1, "phx_close to the timed-out join");
    assert.deepEqual(received(a, (f) => f[3] === "phx_close" && f[0] === join2[0]), [], "no phx_close to the current join");
    assert.ok(ch.isJoined());
    await waitFor(async () => (await roomInfo(gw, room))?.subscribers === 1, { what: "exactly 1 subscriber" });
    await sendOk(ch, "alice", "still joined");
  });

  t("a join replaced while the server still runs it does not deliver messages twice", async () => {
    const room = uniqueRoom("slowdup");
    const { a, ch, seen } = await joinThroughTimeout(room);
    // Sent while the timed-out join is still running on the server (it ends 1.5 s after it
    // began). Phoenix serves one channel per topic and socket, so one broadcast is one frame.
    const msg = await sendOk(ch, "alice", "after the slow join");
    await sleep(1500);
    const copies = received(a, (f) => f[3] === "new_message" && f[4].id === msg.id);
    assert.equal(copies.length, 1, `one broadcast reached the socket ${copies.length} times: ${JSON.stringify(copies)}`);
    assert.equal(seen.length, 1, "channel.on(\"new_message\") fired once");
  });
});

describe("phoenix.js against a room kind made of hooks (--room counter=fixtures/counter-room.js)", () => {
  const path = require("node:path");
  let gw;
  before(async () => {
    gw = await startGateway({ args: ["--room", `counter=${path.join(__dirname, "fixtures", "counter-room.js")}`] });
  });
  afterEach(() => disconnectAll());
  after(async () => { disconnectAll(); if (gw) await gw.stop(); });
  const t = (name, fn) => test(name, { timeout: 30000 }, withLogs(() => gw, fn));

  t("onJoin answers the join, onEvent answers pushes (ok, Room.refuse, internal error), Room.broadcast skips `except`, Room.push reaches one join", async () => {
    const id = uniqueRoom("counter");
    const topic = `counter:${id}`;
    const [a, b, c] = await Promise.all([connect(gw), connect(gw), connect(gw, { rejoinAfterMs: () => 60000 })]);
    const chA = a.channel(topic, { name: "ann" });
    const chB = b.channel(topic, { name: "ben" });
    const countsA = collect(chA, "count");
    const countsB = collect(chB, "count");
    const whispersA = collect(chA, "whisper");
    const whispersB = collect(chB, "whisper");
    const leftB = collect(chB, "left");

    const joinedA = await joinOk(chA);
    assert.deepEqual(joinedA, { count: 0, you: joinedA.you, kind: "counter", topic });
    assert.equal(typeof joinedA.you, "string");
    const joinedB = await joinOk(chB);
    assert.notEqual(joinedB.you, joinedA.you, "conn ids are unique per join");

    // A refused join: the client gets the reason, and nothing is subscribed.
    const refused = await reply(c.channel(topic, { refuse: true }).join(), "the refused join's reply");
    assert.deepEqual(refused, { status: "error", response: { reason: "not welcome" } });
    await waitFor(async () => (await roomInfo(gw, id))?.subscribers === 2, { what: "2 subscribers, not 3" });
    assert.equal((await roomInfo(gw, id)).kind, "counter");

    // onEvent's return value is the ok reply; Room.broadcast reaches B but not A (except).
    assert.deepEqual(await reply(chA.push("add", { by: 2 })), { status: "ok", response: { count: 2 } });
    await waitFor(() => countsB.length === 1, { what: "the count broadcast at B" });
    assert.deepEqual(countsB, [{ count: 2, by: "ann" }]);
    const broadcast = received(b, (f) => f[3] === "count")[0];
    assert.deepEqual(broadcast.slice(0, 3), [null, null, topic], "broadcasts keep join_ref null (fastlane)");

    // Room.refuse → error reply with the reason; an async hook's reply waits for its promise.
    assert.deepEqual(await reply(chA.push("add", { by: "two" })),
      { status: "error", response: { reason: "by must be an integer" } });
    assert.deepEqual(await reply(chB.push("later", {})), { status: "ok", response: { count: 2, later: true } });
    assert.deepEqual(await reply(chB.push("who", {})), { status: "ok", response: { connections: ["ann", "ben"] } });
    assert.deepEqual(await reply(chA.push("nonsense", {})),
      { status: "error", response: { reason: "unknown event nonsense" } });

    // Any other exception is the script's bug: a fixed reason, the room stays up.
    assert.deepEqual(await reply(chA.push("crash", {})), { status: "error", response: { reason: "internal error" } });
    assert.deepEqual(await reply(chA.push("reserved", {})), { status: "error", response: { reason: "internal error" } },
      "phx_ event names are refused to scripts (TypeError)");

    // Room.push: to B's join only, with B's join_ref on the frame; undefined answers {}.
    assert.deepEqual(await reply(chA.push("whisper", { to: joinedB.you, text: "psst" })), { status: "ok", response: {} });
    await waitFor(() => whispersB.length === 1, { what: "the whisper at B" });
    assert.deepEqual(whispersB, [{ from: "ann", text: "psst" }]);
    const whisper = received(b, (f) => f[3] === "whisper")[0];
    assert.equal(whisper[0], chB.joinRef(), "Room.push carries the join's join_ref");
    assert.equal(whisper[1], null);
    await sleep(200);
    assert.deepEqual(whispersA, [], "nothing reached A");
    assert.deepEqual(countsA, [], "A was excepted from its own broadcast");

    // onLeave runs after a leave; what it broadcasts reaches those still there.
    await reply(chA.leave(), "the leave reply");
    await waitFor(() => leftB.length === 1, { what: "onLeave's broadcast at B" });
    assert.deepEqual(leftB, [{ name: "ann", why: "leave" }]);
  });

  t("after the worker is killed, every open join is replayed through onJoin: room_reset carries the new join reply, a join the new runtime refuses is closed", async () => {
    const id = uniqueRoom("counter-reset");
    const topic = `counter:${id}`;
    const [a, b] = await Promise.all([connect(gw), connect(gw, { rejoinAfterMs: () => 60000 })]);
    const chA = a.channel(topic, { name: "ann" });
    const resetsA = collect(chA, "room_reset");
    await joinOk(chA);
    await reply(chA.push("add", { by: 5 }));
    const chB = b.channel(topic, { name: "brittle", fragile: true });
    const closedB = deferred();
    chB.onClose(() => closedB.resolve());
    const joinedB = await joinOk(chB);
    assert.equal(joinedB.count, 5);
    const joinRefB = chB.joinRef();

    const oldPid = await killWorker(gw, id);
    await waitFor(() => resetsA.length === 1, { timeout: 8000, what: "room_reset at A" });
    const [reset] = resetsA;
    assert.match(reset.reason, /room worker exited/);
    assert.equal(typeof reset.detail, "string");
    assert.deepEqual(reset.response, { count: 0, you: reset.response.you, kind: "counter", topic },
      "the reset carries onJoin's answer in the fresh runtime: the counter starts over");
    await withTimeout(closedB.promise, 8000, "phx_close for the join the new runtime refused");
    assert.equal(received(b, (f) => f[3] === "phx_close" && f[2] === topic && f[0] === joinRefB).length, 1);
    assert.deepEqual(received(b, (f) => f[3] === "room_reset"), [], "a refused join gets no room_reset");
    const room = await waitFor(() => roomInfo(gw, id), { what: "the restarted room in /api/rooms" });
    assert.notEqual(room.pid, oldPid);
    await waitFor(async () => (await roomInfo(gw, id))?.subscribers === 1, { what: "only A subscribed" });

    // A is still joined and talks to the new runtime.
    assert.deepEqual(await reply(chA.push("add", { by: 1 })), { status: "ok", response: { count: 1 } });
  });
});

// ---------------------------------------------------------------------------------------------
// Presence: phoenix.js's Presence class, unchanged, on the chat's presence_state/presence_diff.

/** A channel of `socket` joined as `name`, with a phoenix.js Presence on it and its callbacks' log. */
async function present(socket, topic, name) {
  const channel = socket.channel(topic, { name });
  const presence = new Presence(channel);
  const seen = { syncs: 0, joins: [], leaves: [] };
  presence.onSync(() => { seen.syncs++; });
  presence.onJoin((key, current, joined) => seen.joins.push({ key, had: current ? current.metas.length : 0, new: joined.metas.length }));
  presence.onLeave((key, current, left) => seen.leaves.push({ key, left: left.metas.length, remain: current.metas.length }));
  await joinOk(channel);
  return { channel, presence, seen };
}

/** "key:metas" for each key, sorted: the shape of a presence list at a glance. */
const summary = (presence) => presence.list((key, { metas }) => `${key}:${metas.length}`).sort();

async function waitList(presence, expected, who) {
  await waitFor(() => JSON.stringify(summary(presence)) === JSON.stringify(expected), {
    what: `${who}'s presence list to be ${JSON.stringify(expected)}`,
  }).catch((e) => {
    e.message += ` (it is ${JSON.stringify(summary(presence))})`;
    throw e;
  });
}

describe("phoenix.js Presence against the chat room (join payload {name})", () => {
  let gw;
  before(async () => { gw = await startGateway(); });
  afterEach(() => disconnectAll());
  after(async () => { disconnectAll(); if (gw) await gw.stop(); });
  const t = (name, fn) => test(name, { timeout: 30000 }, withLogs(() => gw, fn));

  t("two users; a second tab of one is a second meta under its key; a leave removes that meta; a closed or killed socket removes its user", async () => {
    const topic = `room:${uniqueRoom("presence")}`;
    const [a, b] = await Promise.all([connect(gw), connect(gw)]);
    const ann = await present(a, topic, "ann");
    const bob = await present(b, topic, "bob");
    await waitList(ann.presence, ["ann:1", "bob:1"], "ann");
    await waitList(bob.presence, ["ann:1", "bob:1"], "bob");
    assert.ok(ann.seen.syncs >= 2 && bob.seen.syncs >= 1, `onSync ran (ann ${ann.seen.syncs}, bob ${bob.seen.syncs})`);
    // The meta is the chat's {name, online_at} with the gateway's phx_ref.
    const [annMeta] = bob.presence.list((key, { metas }) => key === "ann" && metas).filter(Boolean)[0];
    assert.deepEqual(Object.keys(annMeta).sort(), ["name", "online_at", "phx_ref"]);
    assert.equal(annMeta.name, "ann");
    assert.equal(typeof annMeta.phx_ref, "string");
    assert.ok(Math.abs(annMeta.online_at - Date.now()) < 60000, `online_at ${annMeta.online_at}`);
    // Ann's own diff may reach her after the state that already lists her: deduplicated by
    // phx_ref, so she is there once.
    await sleep(200);
    assert.deepEqual(summary(ann.presence), ["ann:1", "bob:1"]);

    // A second tab of ann: one key, two metas, told apart by phx_ref.
    const a2 = await connect(gw);
    const ann2 = await present(a2, topic, "ann");
    await waitList(bob.presence, ["ann:2", "bob:1"], "bob");
    await waitList(ann.presence, ["ann:2", "bob:1"], "ann");
    await waitList(ann2.presence, ["ann:2", "bob:1"], "ann's second tab");
    const people = bob.presence.list((key, { metas: [first, ...rest] }) => ({ key, name: first.name, tabs: rest.length + 1 }));
    assert.deepEqual(people.sort((x, y) => x.key.localeCompare(y.key)),
      [{ key: "ann", name: "ann", tabs: 2 }, { key: "bob", name: "bob", tabs: 1 }]);
    const refs = bob.presence.list((key, { metas }) => key === "ann" && metas.map((m) => m.phx_ref)).filter(Boolean)[0];
    assert.equal(new Set(refs).size, 2, `two phx_refs under ann: ${refs}`);
    assert.ok(bob.seen.joins.some((j) => j.key === "ann" && j.had === 1), "onJoin: ann was already there (a new device)");

    // The second tab leaves: its meta goes, the first stays.
    await reply(ann2.channel.leave(), "the leave reply");
    await waitList(bob.presence, ["ann:1", "bob:1"], "bob");
    const left = bob.presence.list((key, { metas }) => key === "ann" && metas.map((m) => m.phx_ref)).filter(Boolean)[0];
    assert.deepEqual(left, [annMeta.phx_ref], "the meta left is the first tab's");
    assert.ok(bob.seen.leaves.some((l) => l.key === "ann" && l.remain === 1), "onLeave: ann is still there");

    // A socket closed by its client: its user leaves.
    b.disconnect();
    await waitList(ann.presence, ["ann:1"], "ann");

    // A socket killed under the client (no close frame; the client does not reconnect in time).
    const c = await connect(gw, { reconnectAfterMs: () => 60000 });
    const carol = await present(c, topic, "carol");
    await waitList(ann.presence, ["ann:1", "carol:1"], "ann");
    await waitList(carol.presence, ["ann:1", "carol:1"], "carol");
    c.conn.terminate();
    await waitList(ann.presence, ["ann:1"], "ann");

    // A newcomer's presence_state agrees with what the diffs built.
    const d = await connect(gw);
    const dave = await present(d, topic, "dave");
    await waitList(dave.presence, ["ann:1", "dave:1"], "dave");
    await waitList(ann.presence, ["ann:1", "dave:1"], "ann");
  });

  t("a join with no name is listed as \"anonymous\"; after a worker crash the list is kept (no new presence_state) and matches the server's", async () => {
    const id = uniqueRoom("presence-reset");
    const topic = `room:${id}`;
    const [a, b] = await Promise.all([connect(gw), connect(gw)]);
    const ann = await present(a, topic, "ann");
    const nobody = await present(b, topic, undefined);
    await waitList(ann.presence, ["ann:1", "anonymous:1"], "ann");
    const states = received(a, (f) => f[3] === "presence_state").length;

    await killWorker(gw, id);
    await waitFor(() => received(a, (f) => f[3] === "room_reset").length === 1, { timeout: 8000, what: "room_reset" });
    // The replay tracks both again. The chat's meta has a fresh online_at, so the gateway sends
    // a diff that swaps each meta for a new one (new phx_ref); a script tracking the same meta
    // would cause none. Either way the list must end as the server's: a newcomer's
    // presence_state is that.
    const refs = (presence) => presence.list((key, { metas }) => `${key}=${metas.map((m) => m.phx_ref)}`).sort();
    const c = await connect(gw);
    const carol = await present(c, topic, "carol");
    await waitList(carol.presence, ["ann:1", "anonymous:1", "carol:1"], "carol");
    await waitList(ann.presence, ["ann:1", "anonymous:1", "carol:1"], "ann");
    await waitList(nobody.presence, ["ann:1", "anonymous:1", "carol:1"], "the anonymous one");
    await sleep(200); // any diff still in flight
    assert.deepEqual(refs(ann.presence), refs(carol.presence), "ann's list, kept over the reset, is the server's");
    assert.deepEqual(refs(nobody.presence), refs(carol.presence));
    assert.equal(received(a, (f) => f[3] === "presence_state").length, states, "no new presence_state on a reset");
  });
});

// ---------------------------------------------------------------------------------------------
// Tokens: phoenix.js's authToken and params against a gateway with --auth-secret.

describe("phoenix.js against a gateway that wants tokens (--auth-secret)", () => {
  const SECRET = "e2e-phoenix-secret-of-some-length";
  let gw;
  before(async () => { gw = await startGateway({ args: ["--auth-secret", SECRET] }); });
  afterEach(() => disconnectAll());
  after(async () => { disconnectAll(); if (gw) await gw.stop(); });
  const t = (name, fn, opts = {}) => test(name, { timeout: 30000, ...opts }, withLogs(() => gw, fn));

  /** How the upgrade of a socket URL is answered: "open", or the HTTP status it was refused with. */
  function upgrade(url, protocols) {
    return withTimeout(new Promise((resolve) => {
      const ws = new WebSocket(url, protocols);
      ws.on("open", () => { ws.terminate(); resolve("open"); });
      ws.on("unexpected-response", (_req, res) => { resolve(res.statusCode); res.destroy(); });
      ws.on("error", () => {});
    }), 5000, `the upgrade of ${url}`);
  }

  t("new Socket(url, {authToken}) opens and joins as the token's user; without a token (or with a forged one) it cannot connect", async () => {
    const token = mintToken({ sub: "u-ann", name: "Ann", secret: SECRET });
    const topic = `room:${uniqueRoom("tokens")}`;
    const a = await connect(gw, { authToken: token });
    assert.equal(a.conn.protocol, "phoenix");
    assert.ok(!a.log.connections[0].url.includes("token="), "the token went in the subprotocol, not the URL");
    // The join's name is ignored for a verified user: presence is keyed by sub, named by the token.
    const ann = await present(a, topic, "mallory");
    await waitList(ann.presence, ["u-ann:1"], "ann");
    assert.deepEqual(ann.presence.list((key, { metas }) => metas[0].name), ["Ann"]);
    const { status, response } = await reply(ann.channel.push("send_message", { sender: "mallory", text: "hi" }));
    assert.equal(status, "ok");
    assert.equal(response.sender, "Ann", "the sender is the token's name, not the payload's");

    // No token: refused at the upgrade (403). phoenix.js sees a failed connection, never an open.
    assert.equal(await upgrade(`${gw.socketUrl}/websocket?vsn=2.0.0`), 403);
    assert.equal(await upgrade(`${gw.socketUrl}/websocket?vsn=2.0.0`, ["phoenix", "base64url.bearer.phx.bm90LWEtdG9rZW4"]), 403,
      "a forged authToken");
    for (const opts of [{}, { authToken: "not-a-token" }]) {
      const log = { connections: [], sent: [], received: [], closes: [] };
      const s = new Socket(gw.socketUrl, { transport: recordingTransport(log), reconnectAfterMs: () => 60000, ...opts });
      openSockets.add(s);
      const errored = deferred();
      let opened = false;
      s.onOpen(() => { opened = true; });
      s.onError(() => errored.resolve());
      s.connect();
      await withTimeout(errored.promise, 5000, `the connection error (${JSON.stringify(opts)})`);
      await sleep(100);
      assert.equal(opened, false);
      assert.equal(s.isConnected(), false);
      assert.equal(log.sent.length, 0);
    }
  });

  t("params as a function: after the gateway closes the socket at exp (4001), phoenix.js reconnects with the token refreshed meanwhile, and rejoins", async () => {
    let current = mintToken({ sub: "u-bob", name: "Bob", ttl: "4s", secret: SECRET });
    const { iat, exp: expSecs } = tokenClaims(current);
    const exp = expSecs * 1000;
    const topic = `room:${uniqueRoom("refresh")}`;
    const b = await connect(gw, { params: () => ({ token: current }), reconnectAfterMs: () => 50 });
    const ch = b.channel(topic, {});
    const joins = [];
    ch.join().receive("ok", () => joins.push(Date.now()));
    await waitFor(() => joins.length === 1, { what: "the first join" });

    // What the page does at ~80% of the lifetime: POST /api/token/refresh with the token. (A
    // refresh gives the old lifetime from now, so one made at once would run out with the old.)
    await sleep(iat * 1000 + 0.8 * (exp - iat * 1000) - Date.now());
    const res = await withTimeout(fetch(`${gw.baseUrl}/api/token/refresh`, {
      method: "POST", headers: { Authorization: `Bearer ${current}` },
    }), 5000, "the refresh");
    assert.equal(res.status, 200);
    const refreshed = await res.json();
    assert.equal(typeof refreshed.token, "string");
    assert.equal(tokenClaims(refreshed.token).sub, "u-bob");
    assert.equal(refreshed.expires_at, tokenClaims(refreshed.token).exp * 1000);
    assert.ok(refreshed.expires_at > exp, "the new token outlives the old one");
    current = refreshed.token;

    await waitFor(() => b.log.closes.length >= 1, { timeout: exp - Date.now() + 5000, what: "the close at exp" });
    assert.deepEqual(b.log.closes[0], { conn: 0, code: 4001, reason: "token expired" });
    await waitFor(() => joins.length === 2 && ch.isJoined(), { timeout: 5000, what: "the rejoin on the new socket" });
    assert.equal(new URL(b.log.connections[1].url).searchParams.get("token"), current, "the reconnect presented the new token");
    assert.ok(logged(gw, /closing a socket whose token expired/));
    const { status, response } = await reply(ch.push("send_message", { text: "after the first exp" }));
    assert.equal(status, "ok");
    assert.equal(response.sender, "Bob");

    // A token that is no good is not refreshed.
    const bad = await fetch(`${gw.baseUrl}/api/token/refresh`, { method: "POST", headers: { Authorization: "Bearer not-a-token" } });
    assert.equal(bad.status, 401);
  }, { timeout: 30000 });
});
