// The chat room. Its state is the last 1,000 messages. In a transient room (the default)
// they live in this runtime's memory and are gone with it; in a durable room (the gateway
// started with --data-dir) each message is also stored, and a restarted runtime reads them
// back and numbers on from the last.
// The gateway runs the hooks (onJoin, onEvent); the plain functions stay callable by name
// (the original design's API, and what operators and tests call through the gateway).

const MAX_MESSAGES = 1000;

// `epoch` names the sequence the ids belong to: a client that saw message `id` of this epoch
// can resume after it. A transient room's ids start over with every run, so it is the run's;
// a durable room's ids go on across runs, so it is the epoch of the run that stored the first.
const state = { messages: [], nextId: 1, epoch: Room.epoch, epochStored: false };
const store = Room.storage;

// Keys sort as the ids do.
const messageKey = (id) => "msg:" + String(id).padStart(16, "0");

if (store !== undefined) {
  for (const message of store.list({ prefix: "msg:" }).values()) state.messages.push(message);
  const last = state.messages[state.messages.length - 1];
  if (last !== undefined) state.nextId = last.id + 1;
  const epoch = store.get("epoch");
  // Stored with the first message, not before: a room that is only visited stores nothing.
  if (epoch !== undefined) Object.assign(state, { epoch, epochStored: true });
}

// A join gets the latest messages; `Room.settings` carries the gateway's --history-on-join.
function onJoin(conn, params) {
  // Authorization is the room's: a token that lists rooms (`gateway token --claims
  // '{"rooms":["vip"]}'`) admits its holder to those rooms only.
  const rooms = conn.user && conn.user.rooms;
  if (Array.isArray(rooms) && !rooms.includes(Room.id)) Room.refuse(`your token does not admit you to ${Room.id}`);
  // Who is online: one key per person (a second tab adds a second meta under the same key).
  // A verified user is their sub; an anonymous one the name they chose in the join.
  const name = conn.user ? displayName(conn.user) : chosenName(params);
  const key = conn.user ? String(conn.user.sub) : name;
  Room.presence.track(conn.id, key, { name, online_at: Date.now() });
  return history(params && params.since);
}

// A join that carries `since: {epoch, id}` (the last message it saw) gets exactly the
// messages after it, if this room still holds them (`resumed: true`); any other join gets the
// latest --history-on-join messages (`resumed: false`), and the client starts its list over.
function history(since) {
  const oldest = state.messages.length > 0 ? state.messages[0].id : state.nextId;
  const resumable =
    since !== null &&
    typeof since === "object" &&
    since.epoch === state.epoch &&
    Number.isInteger(since.id) &&
    since.id >= oldest - 1 &&
    since.id < state.nextId;
  if (resumable) {
    return { messages: state.messages.slice(since.id - oldest + 1), epoch: state.epoch, resumed: true };
  }
  return { messages: getHistory(Room.settings.historyOnJoin), epoch: state.epoch, resumed: false };
}

function chosenName(params) {
  const name = params && typeof params.name === "string" ? params.name.trim() : "";
  return name === "" ? "anonymous" : [...name].slice(0, Room.settings.maxSenderChars).join("");
}

function onEvent(conn, event, payload) {
  if (event !== "send_message") Room.refuse("unknown event");
  const { sender, text } = checkMessage(conn, payload);
  return sendMessage(sender, text);
}

// The limits come from the gateway's --max-sender-chars and --max-text-chars. With a verified
// user the sender is theirs (the token's name, else its sub), whatever the payload says.
function checkMessage(conn, payload) {
  const invalid = conn.user
    ? 'invalid payload: expected {"text": string}'
    : 'invalid payload: expected {"sender": string, "text": string}';
  if (payload === null || typeof payload !== "object" || Array.isArray(payload)) Room.refuse(invalid);
  const text = payload.text;
  const sender = conn.user ? displayName(conn.user) : payload.sender;
  if (typeof sender !== "string" || typeof text !== "string") Room.refuse(invalid);
  if (!conn.user) checkField("sender", sender, Room.settings.maxSenderChars);
  checkField("text", text, Room.settings.maxTextChars);
  return { sender, text };
}

function displayName(user) {
  return typeof user.name === "string" && user.name.trim() !== "" ? user.name : String(user.sub);
}

function checkField(name, value, maxChars) {
  if (value.trim() === "") Room.refuse(`${name} must not be blank`);
  // Characters, not UTF-16 units: an emoji counts once.
  if ([...value].length > maxChars) Room.refuse(`${name} is longer than ${maxChars} characters`);
}

function sendMessage(sender, text) {
  const message = {
    id: state.nextId++,
    sender: String(sender),
    text: String(text),
    timestamp: Date.now(),
  };
  state.messages.push(message);
  if (store !== undefined) {
    if (!state.epochStored) {
      store.put("epoch", state.epoch);
      state.epochStored = true;
    }
    store.put(messageKey(message.id), message);
  }
  // shift(), not splice(): QuickJS shifts a plain array with one memmove, while splice
  // copies it element by element through generic property access (the worker's top cost
  // in loadgen's many-rooms profile once a room held 1,000 messages).
  while (state.messages.length > MAX_MESSAGES) {
    const dropped = state.messages.shift();
    if (store !== undefined) store.delete(messageKey(dropped.id));
  }
  Room.broadcast("new_message", message);
  return message;
}

function getHistory(limit) {
  const wanted = limit === undefined ? MAX_MESSAGES : Math.floor(Number(limit));
  const n = Number.isFinite(wanted) ? Math.max(0, Math.min(wanted, MAX_MESSAGES)) : MAX_MESSAGES;
  return n === 0 ? [] : state.messages.slice(-n);
}

function getState() {
  return { messageCount: state.messages.length, epoch: state.epoch, durable: store !== undefined };
}
