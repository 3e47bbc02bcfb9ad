// The chat room. Its whole state is this array: no database, gone when the runtime is.
// The gateway runs the hooks (onJoin, onEvent); the plain functions stay callable by name
// (the original design's API, and what operators and tests call through the gateway).

const MAX_MESSAGES = 1000;

const state = { messages: [], nextId: 1 };

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
  return { messages: getHistory(Room.settings.historyOnJoin) };
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
  // shift(), not splice(): QuickJS shifts a plain array with one memmove, while splice
  // copies it element by element through generic property access (the worker's top cost
  // in loadgen's many-rooms profile once a room held 1,000 messages).
  while (state.messages.length > MAX_MESSAGES) {
    state.messages.shift();
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
  return { messageCount: state.messages.length };
}
