// Benchmark peer: the Socket.IO chat server a typical user would write instead
// of roomvisor. Kept deliberately plain (no adapters, no clustering) so that the
// comparison measures the stock stack, not clever tuning.
"use strict";

const http = require("node:http");
const { parseArgs } = require("node:util");
const { Server } = require("socket.io");

const HISTORY_LIMIT = 1000; // messages kept per room
const JOIN_REPLAY = 100; // messages returned by a join
const ROOM_ID = /^[A-Za-z0-9_-]{1,64}$/;

function usage(problem) {
  console.error(`${problem}\nusage: node server.js [--port N] [--host ADDR]`);
  process.exit(2);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      port: { type: "string", default: "4000" }, // 0 = let the OS pick a free port
      host: { type: "string", default: "127.0.0.1" },
    },
  }));
} catch (err) {
  usage(err.message);
}
const port = Number(args.port);
if (args.port.trim() === "" || !Number.isInteger(port) || port < 0 || port > 65535) {
  usage(`invalid --port: ${args.port}`);
}

// roomId -> { nextId, messages }; lives only as long as the process.
const rooms = new Map();
function roomState(roomId) {
  let room = rooms.get(roomId);
  if (!room) rooms.set(roomId, (room = { nextId: 1, messages: [] }));
  return room;
}

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"], // the load generator never long-polls
  serveClient: false, // nobody fetches /socket.io/socket.io.js
  perMessageDeflate: false, // compression would only add CPU to tiny frames
  maxHttpBufferSize: 65536, // larger frames close the socket (WS code 1009)
});

const fail = (reason) => ({ status: "error", reason });
const isRoomId = (v) => typeof v === "string" && ROOM_ID.test(v);
const channel = (roomId) => "room:" + roomId; // namespaced so it can't collide with socket ids

// Length is checked as string length (UTF-16 units), which is what JS users get.
function checkText(v, max, field) {
  if (typeof v !== "string" || v.length < 1 || v.length > max) {
    return `${field} must be 1..${max} characters`;
  }
  if (v.trim() === "") return `${field} must not be blank`;
  return null;
}

// Socket.IO passes the ack callback as the *last* argument, so a client that
// omits a payload (`["join"]`) or adds extras shifts it; pick it off the end.
// A client may also emit without an ack at all: then the reply is dropped.
function handle(socket, event, handler) {
  socket.on(event, (...args) => {
    const ack = typeof args[args.length - 1] === "function" ? args.pop() : () => {};
    ack(handler(...args));
  });
}

io.on("connection", (socket) => {
  handle(socket, "join", (roomId) => {
    if (!isRoomId(roomId)) return fail("invalid room id");
    socket.join(channel(roomId));
    return { status: "ok", messages: roomState(roomId).messages.slice(-JOIN_REPLAY) };
  });

  handle(socket, "send_message", (payload) => {
    const { room, sender, text } = payload && typeof payload === "object" ? payload : {};
    // Posting requires membership, mirroring the gateway's topic check.
    if (!isRoomId(room) || !socket.rooms.has(channel(room))) return fail("unmatched topic");
    const problem = checkText(sender, 64, "sender") || checkText(text, 4000, "text");
    if (problem) return fail(problem);

    const state = roomState(room);
    const message = { id: state.nextId++, sender, text, timestamp: Date.now() };
    state.messages.push(message);
    if (state.messages.length > HISTORY_LIMIT) state.messages.shift();

    // io.to() (not socket.to()) so the sender gets the broadcast too, like the gateway.
    io.to(channel(room)).emit("new_message", message);
    return { status: "ok", message };
  });

  handle(socket, "leave", (roomId) => {
    if (!isRoomId(roomId)) return fail("invalid room id");
    socket.leave(channel(roomId));
    return { status: "ok" };
  });
});

httpServer.on("error", (err) => {
  console.error(`peer failed to listen: ${err.message}`);
  process.exit(1);
});

httpServer.listen(port, args.host, () => {
  const { port: actual } = httpServer.address(); // resolves --port 0
  const host = args.host.includes(":") ? `[${args.host}]` : args.host; // IPv6 literal
  // Exactly one stdout line; the load generator parses the URL after "http://".
  console.log(`peer listening on http://${host}:${actual}`);
});

// Let the bench harness stop us with SIGTERM/SIGINT without a stack trace.
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    io.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref(); // don't hang on a stuck client
  });
}
