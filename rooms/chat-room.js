// The chat room. Its whole state is this array: no database, gone when the runtime is.
// The gateway calls the top-level functions by name.

const MAX_MESSAGES = 1000;

const state = { messages: [], nextId: 1 };

// Posting on the room's own topic reaches every Phoenix client joined to it as `new_message`.
const channel = new BroadcastChannel(Room.topic);

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
  channel.postMessage(message);
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
