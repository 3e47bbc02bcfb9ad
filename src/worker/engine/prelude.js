// The room script API (sections 5 and 8 of design.md: the globals and the room's hooks), built
// on a handful of natives. Evaluated before the room script as a function expression: it
// installs the globals and returns the hooks the Rust event loop drives. Nothing here is
// engine-specific, so a V8 backend can reuse it unchanged.
(function (native, roomId, roomKind, settingsJson, epoch, durable) {
  "use strict";

  const toJson = (value) => {
    const json = JSON.stringify(value);
    return json === undefined ? "null" : json;
  };

  const describe = (err) => {
    if (err !== null && typeof err === "object" && "message" in err) {
      return [String(err.message), err.stack ? String(err.stack) : ""];
    }
    return [String(err), ""];
  };

  const inspect = (value) => {
    if (typeof value === "string") return value;
    if (value instanceof Error) return value.stack ? `${value}\n${value.stack}` : String(value);
    try {
      const json = JSON.stringify(value);
      return json === undefined ? String(value) : json;
    } catch (_) {
      return String(value);
    }
  };

  const format = (args) => args.map(inspect).join(" ");

  // Errors nobody can catch any more (timer callbacks, listeners) still deserve a log line.
  const report = (what, err) => {
    const [message, stack] = describe(err);
    native.log("error", `${what}: ${message}${stack ? "\n" + stack : ""}`);
  };

  const define = (name, value) =>
    Object.defineProperty(globalThis, name, { value, writable: true, configurable: true });

  define(
    "console",
    Object.freeze({
      log: (...args) => native.log("info", format(args)),
      info: (...args) => native.log("info", format(args)),
      debug: (...args) => native.log("debug", format(args)),
      warn: (...args) => native.log("warn", format(args)),
      error: (...args) => native.log("error", format(args)),
    }),
  );

  // ---- the room: its joins, and speaking to them ----
  // `Room.refuse(reason)` throws one of these; the gateway gives the client `{reason}`, where
  // any other exception is the room's bug and gives "internal error".
  class Refusal {
    constructor(reason) {
      this.reason = reason;
    }
  }

  // The live joins in join order (a Map keeps insertion order), by conn id.
  const conns = new Map();

  const eventName = (event) => {
    const name = String(event);
    // phx_* events drive the client's own channel state machine (replies, closes, errors).
    if (name === "" || name.startsWith("phx_")) throw new TypeError(`not an event a room may send: "${name}"`);
    return name;
  };

  const exceptIds = (options) => {
    const except = options === undefined || options === null ? undefined : options.except;
    if (except === undefined || except === null) return [];
    return (Array.isArray(except) ? except : [except]).map(String);
  };

  // ---- storage and alarms (durable rooms, design section 10) ----
  // Served from memory: the gateway loaded every entry before the script ran. Values stay
  // JSON text until read, so a read hands out a fresh copy that the caller may change freely.
  // Each write goes to the gateway with the turn's others, and nothing the turn causes
  // leaves the gateway before they are durable.
  const MAX_KEY_BYTES = 2048;
  const MAX_VALUE_BYTES = 128 * 1024;

  const utf8Length = (text) => {
    let n = text.length;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      // Two bytes below U+0800, three above; a surrogate pair is four, two per unit.
      if (c >= 0x80) n += c < 0x800 || (c >= 0xd800 && c <= 0xdfff) ? 1 : 2;
    }
    return n;
  };

  const makeStorage = (init) => {
    const entries = new Map();
    let storedBytes = 0;
    for (let i = 0; i < init.keys.length; i++) {
      entries.set(init.keys[i], init.values[i]);
      storedBytes += utf8Length(init.keys[i]) + utf8Length(init.values[i]);
    }
    // Sorted keys for list(), kept until a key comes or goes.
    let sortedKeys = null;

    const checkKey = (key) => {
      if (typeof key !== "string") throw new TypeError("storage keys are strings");
      if (utf8Length(key) > MAX_KEY_BYTES) throw new RangeError(`storage keys are at most ${MAX_KEY_BYTES} bytes`);
      return key;
    };
    const read = (key) => {
      const json = entries.get(checkKey(key));
      return json === undefined ? undefined : JSON.parse(json);
    };
    const write = (key, value) => {
      checkKey(key);
      if (value === undefined) throw new TypeError("storage values cannot be undefined; use delete()");
      const json = JSON.stringify(value);
      if (json === undefined) throw new TypeError("storage values must be JSON-serializable");
      const size = utf8Length(json);
      if (size > MAX_VALUE_BYTES) throw new RangeError(`storage values are at most ${MAX_VALUE_BYTES} bytes`);
      const old = entries.get(key);
      const keyBytes = utf8Length(key);
      const after = storedBytes + size + (old === undefined ? keyBytes : -utf8Length(old));
      if (after > init.maxBytes) throw new RangeError(`room storage is full (${init.maxBytes} bytes)`);
      // The native first: if it refuses, memory is as it was.
      native.storagePut(key, json, after);
      if (old === undefined) sortedKeys = null;
      entries.set(key, json);
      storedBytes = after;
    };
    const remove = (key) => {
      const old = entries.get(checkKey(key));
      if (old === undefined) return false;
      storedBytes -= utf8Length(key) + utf8Length(old);
      entries.delete(key);
      sortedKeys = null;
      native.storageDelete(key, storedBytes);
      return true;
    };
    return Object.freeze({
      get(keys) {
        if (!Array.isArray(keys)) return read(keys);
        const found = new Map();
        for (const key of keys) {
          const value = read(key);
          if (value !== undefined) found.set(key, value);
        }
        return found;
      },
      put(key, value) {
        if (typeof key === "object" && key !== null && value === undefined) {
          for (const [k, v] of Object.entries(key)) write(k, v);
          return;
        }
        write(key, value);
      },
      delete(keys) {
        if (!Array.isArray(keys)) return remove(keys);
        let n = 0;
        for (const key of keys) if (remove(key)) n++;
        return n;
      },
      // Keys in order (UTF-16 code units, as JavaScript compares strings), as a Map.
      list(options) {
        const { prefix = "", start, end, limit, reverse = false } = options ?? {};
        if (sortedKeys === null) sortedKeys = [...entries.keys()].sort();
        const keys = reverse ? [...sortedKeys].reverse() : sortedKeys;
        const max = limit === undefined ? Infinity : Math.max(0, Math.floor(Number(limit)));
        const found = new Map();
        for (const key of keys) {
          if (found.size >= max) break;
          if (!key.startsWith(prefix)) continue;
          if (start !== undefined && key < start) continue;
          if (end !== undefined && key >= end) continue;
          found.set(key, JSON.parse(entries.get(key)));
        }
        return found;
      },
      get bytes() {
        return storedBytes;
      },
    });
  };

  const storage = durable === undefined || durable === null ? undefined : makeStorage(durable);
  let alarmAt = storage !== undefined && durable.alarmAt >= 0 ? durable.alarmAt : null;
  const requireDurable = (what) => {
    if (storage === undefined) throw new Error(`${what} needs a durable room (start the gateway with --data-dir)`);
  };

  define(
    "Room",
    Object.freeze({
      id: roomId,
      kind: roomKind,
      topic: roomKind + ":" + roomId,
      epoch,
      storage,
      settings: Object.freeze(JSON.parse(settingsJson)),
      setAlarm(when) {
        requireDurable("Room.setAlarm");
        const at = when instanceof Date ? when.getTime() : Number(when);
        if (!Number.isFinite(at)) throw new TypeError("Room.setAlarm takes a time in ms since the epoch, or a Date");
        alarmAt = Math.max(0, Math.floor(at));
        native.setAlarm(alarmAt);
      },
      getAlarm() {
        requireDurable("Room.getAlarm");
        return alarmAt;
      },
      deleteAlarm() {
        requireDurable("Room.deleteAlarm");
        if (alarmAt === null) return;
        alarmAt = null;
        native.setAlarm(-1);
      },
      refuse(reason) {
        throw new Refusal(reason === undefined ? "refused" : String(reason));
      },
      push(connId, event, payload) {
        native.push(String(connId), eventName(event), toJson(payload === undefined ? {} : payload));
      },
      broadcast(event, payload, options) {
        native.broadcast(eventName(event), toJson(payload === undefined ? {} : payload), exceptIds(options));
      },
      connections() {
        return [...conns.values()];
      },
      // Phoenix Presence, kept by the gateway (so a crash of this runtime does not lose it):
      // phoenix.js's Presence class reads the list and its diffs unchanged.
      presence: Object.freeze({
        track(connId, key, meta) {
          const value = meta === undefined ? {} : meta;
          if (value === null || typeof value !== "object" || Array.isArray(value)) {
            throw new TypeError("presence meta must be an object");
          }
          native.track(String(connId), String(key), toJson(value));
        },
        untrack(connId) {
          native.untrack(String(connId));
        },
        list() {
          return JSON.parse(native.hostCallSync("presence_list", "[]"));
        },
      }),
    }),
  );

  // ---- Beam: host handlers in the gateway ----
  const pendingHostCalls = new Map();
  define(
    "Beam",
    Object.freeze({
      callSync(name, ...args) {
        return JSON.parse(native.hostCallSync(String(name), toJson(args)));
      },
      call(name, ...args) {
        return new Promise((resolve, reject) => {
          const id = native.hostCallAsync(String(name), toJson(args));
          pendingHostCalls.set(id, { resolve, reject });
        });
      },
    }),
  );

  const settleHostCall = (id, ok, payload) => {
    const pending = pendingHostCalls.get(id);
    if (pending === undefined) return;
    pendingHostCalls.delete(id);
    if (ok) pending.resolve(JSON.parse(payload));
    else pending.reject(new Error(payload));
  };

  // ---- timers ----
  const timers = new Map();
  let nextTimerId = 1;

  const addTimer = (callback, delay, args, repeat) => {
    if (typeof callback !== "function") throw new TypeError("timer callback is not a function");
    const ms = Math.max(0, Number(delay) || 0);
    const id = nextTimerId++;
    // An interval of 0 would re-arm at the same instant forever; browsers clamp too.
    timers.set(id, { at: Date.now() + ms, callback, args, every: repeat ? Math.max(1, ms) : 0 });
    return id;
  };

  define("setTimeout", (callback, delay, ...args) => addTimer(callback, delay, args, false));
  define("setInterval", (callback, delay, ...args) => addTimer(callback, delay, args, true));
  define("clearTimeout", (id) => void timers.delete(id));
  define("clearInterval", (id) => void timers.delete(id));
  define("queueMicrotask", (callback) => {
    if (typeof callback !== "function") throw new TypeError("microtask is not a function");
    Promise.resolve().then(() => {
      try {
        callback();
      } catch (err) {
        report("uncaught error in microtask", err);
      }
    });
  });

  const earliestDue = (now, idLimit) => {
    let found;
    for (const [id, timer] of timers) {
      if (timer.at > now || id >= idLimit) continue;
      if (found === undefined || timer.at < found[1].at) found = [id, timer];
    }
    return found;
  };

  // Runs one due timer. The Rust loop gives each one a fresh CPU budget and its microtasks,
  // and passes a fixed `now` and id limit so that timers armed meanwhile wait for the next turn.
  const runDueTimer = (now, idLimit) => {
    const due = earliestDue(now, idLimit);
    if (due === undefined) return false;
    const [id, timer] = due;
    if (timer.every > 0) timer.at = Date.now() + timer.every;
    else timers.delete(id);
    try {
      timer.callback(...timer.args);
    } catch (err) {
      report("uncaught error in timer", err);
    }
    return true;
  };

  const nextTimerAt = () => {
    let at = -1;
    for (const timer of timers.values()) if (at < 0 || timer.at < at) at = timer.at;
    return at;
  };

  // ---- BroadcastChannel (the web standard, with PubSub topics as names) ----
  const openChannels = new Map(); // name -> Set<BroadcastChannel>

  class BroadcastChannel {
    #name;
    #closed = false;
    #listeners = new Set();

    constructor(name) {
      if (arguments.length === 0) throw new TypeError("BroadcastChannel needs a name");
      this.#name = String(name);
      this.onmessage = null;
      let peers = openChannels.get(this.#name);
      if (peers === undefined) {
        peers = new Set();
        openChannels.set(this.#name, peers);
        native.subscribe(this.#name);
      }
      peers.add(this);
    }

    get name() {
      return this.#name;
    }

    postMessage(data) {
      if (this.#closed) throw new Error("InvalidStateError: BroadcastChannel is closed");
      const json = toJson(data);
      native.post(this.#name, json);
      // The standard also delivers to other instances of the name in this same runtime,
      // asynchronously, never to the poster itself.
      for (const peer of openChannels.get(this.#name) ?? []) {
        if (peer !== this) addTimer(() => peer.#dispatch(json), 0, [], false);
      }
    }

    close() {
      if (this.#closed) return;
      this.#closed = true;
      const peers = openChannels.get(this.#name);
      if (peers === undefined) return;
      peers.delete(this);
      if (peers.size === 0) {
        openChannels.delete(this.#name);
        native.unsubscribe(this.#name);
      }
    }

    addEventListener(type, listener) {
      if (type === "message" && listener) this.#listeners.add(listener);
    }

    removeEventListener(type, listener) {
      if (type === "message") this.#listeners.delete(listener);
    }

    #dispatch(json) {
      if (this.#closed) return;
      const event = { type: "message", data: JSON.parse(json), target: this, currentTarget: this };
      const handlers = [];
      if (typeof this.onmessage === "function") handlers.push(this.onmessage);
      handlers.push(...this.#listeners);
      for (const handler of handlers) {
        try {
          if (typeof handler === "function") handler.call(this, event);
          else if (typeof handler.handleEvent === "function") handler.handleEvent(event);
        } catch (err) {
          report(`uncaught error in BroadcastChannel("${this.#name}") listener`, err);
        }
      }
    }

    static deliver(name, json) {
      for (const channel of [...(openChannels.get(name) ?? [])]) channel.#dispatch(json);
    }
  }

  const deliver = BroadcastChannel.deliver;
  delete BroadcastChannel.deliver;
  define("BroadcastChannel", BroadcastChannel);

  // ---- calls from the gateway ----
  // Only what the room script itself declares is callable; the prelude's and the engine's
  // globals are not, so the gateway cannot be talked into calling `eval`.
  const builtins = new Set(Object.getOwnPropertyNames(globalThis));
  const identifier = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
  const globalEval = eval;

  const lookup = (name) => {
    if (!identifier.test(name) || builtins.has(name)) return undefined;
    // Function declarations are properties of the global object: found without compiling
    // anything (the eval below showed up in the worker's profile on every call).
    if (Object.prototype.hasOwnProperty.call(globalThis, name)) {
      const value = globalThis[name];
      return typeof value === "function" ? value : undefined;
    }
    try {
      // Indirect eval of a bare identifier also finds top-level `const f = () => ...`,
      // which is not a property of globalThis.
      const value = globalEval(name);
      return typeof value === "function" ? value : undefined;
    } catch (_) {
      return undefined;
    }
  };

  const replyValue = (callId, value) => {
    let json;
    try {
      json = toJson(value);
    } catch (err) {
      native.replyError(callId, `result is not JSON-serializable: ${describe(err)[0]}`, "", "");
      return;
    }
    native.replyOk(callId, json);
  };

  const replyError = (callId, err) => {
    if (err instanceof Refusal) {
      native.replyError(callId, err.reason, "", "refused");
      return;
    }
    const [message, stack] = describe(err);
    native.replyError(callId, message, stack, "");
  };

  // Async calls not yet answered. A promise job cut off by the CPU budget can leave one
  // unsettled for ever, so the host then answers every pending call with a timeout
  // (abandonPendingCalls), and a late settle of an abandoned call is dropped.
  const pendingCalls = new Set();

  const abandonPendingCalls = () => {
    const ids = [...pendingCalls];
    pendingCalls.clear();
    return ids;
  };

  // Runs `body` (sync or async) and answers the call with its result, passed through `done`
  // (which may throw, e.g. a Refusal), or with its error, passed through `failed`.
  const settle = (callId, body, done, failed) => {
    const answer = (value) => {
      try {
        replyValue(callId, done(value));
      } catch (err) {
        replyError(callId, err);
      }
    };
    const fail = (err) => {
      failed(err);
      replyError(callId, err);
    };
    let result;
    try {
      result = body();
    } catch (err) {
      fail(err);
      return;
    }
    if (result !== null && typeof result === "object" && typeof result.then === "function") {
      pendingCalls.add(callId);
      Promise.resolve(result).then(
        (value) => pendingCalls.delete(callId) && answer(value),
        (err) => pendingCalls.delete(callId) && fail(err),
      );
    } else {
      answer(result);
    }
  };

  const same = (value) => value;
  const nothing = () => {};
  const orEmpty = (value) => (value === undefined ? {} : value);

  // ---- the hooks (design section 8), and the original design's mapping without them ----
  // Looked up once: the script's top level has run before the first call, and looking up a
  // name the script lacks costs an eval that throws, on every event otherwise.
  const hookCache = new Map();
  const hookFn = (name) => {
    if (!hookCache.has(name)) hookCache.set(name, lookup(name));
    return hookCache.get(name);
  };

  const checkField = (name, value, max) => {
    if (typeof value !== "string") Room.refuse('invalid payload: expected {"sender": string, "text": string}');
    if (value.trim() === "") Room.refuse(`${name} must not be blank`);
    if ([...value].length > max) Room.refuse(`${name} is longer than ${max} characters`);
  };

  // A script in the original shape: a join reads `getHistory(n)`, `send_message` calls
  // `sendMessage(sender, text)` once the payload passes the chat's checks.
  const defaultJoin = () => {
    const getHistory = hookFn("getHistory");
    if (getHistory === undefined) return {};
    const history = getHistory(Room.settings.historyOnJoin);
    // An async getHistory answers the join once its promise settles.
    if (history !== null && typeof history === "object" && typeof history.then === "function") {
      return Promise.resolve(history).then((messages) => ({ messages }));
    }
    return { messages: history };
  };

  const defaultEvent = (conn, event, payload) => {
    const sendMessage = hookFn("sendMessage");
    if (event !== "send_message" || sendMessage === undefined) Room.refuse("unknown event");
    if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
      Room.refuse('invalid payload: expected {"sender": string, "text": string}');
    }
    checkField("sender", payload.sender, Room.settings.maxSenderChars);
    checkField("text", payload.text, Room.settings.maxTextChars);
    return sendMessage(payload.sender, payload.text);
  };

  // The gateway's calls for the hooks have names no script function can have.
  const hookCalls = {
    "@join"(callId, [id, user, params]) {
      // In the map from the start, so that `Room.connections()` and `Room.push` inside onJoin
      // already count the join; out again if it is refused.
      const conn = { id, user, params, assigns: {} };
      conns.set(id, conn);
      const onJoin = hookFn("onJoin");
      const body = onJoin === undefined ? () => defaultJoin(conn, params) : () => onJoin(conn, params);
      settle(callId, body, orEmpty, () => conns.delete(id));
    },
    "@event"(callId, [id, event, payload]) {
      const conn = conns.get(id);
      if (conn === undefined) {
        native.replyError(callId, "unknown connection", "", "unknown_connection");
        return;
      }
      const onEvent = hookFn("onEvent");
      const body =
        onEvent === undefined ? () => defaultEvent(conn, event, payload) : () => onEvent(conn, event, payload);
      settle(callId, body, orEmpty, nothing);
    },
    // A due alarm. The gateway names the time it fired for: an alarm changed since is not
    // run. One that succeeds is deleted unless onAlarm set another; one that fails stays,
    // and the gateway tries again.
    "@alarm"(callId, [at]) {
      const onAlarm = hookFn("onAlarm");
      if (alarmAt === null || alarmAt !== at || onAlarm === undefined) {
        if (alarmAt !== null && alarmAt === at) {
          alarmAt = null;
          native.setAlarm(-1);
        }
        replyValue(callId, { ran: false });
        return;
      }
      const ran = () => {
        if (alarmAt === at) {
          alarmAt = null;
          native.setAlarm(-1);
        }
        return { ran: true };
      };
      settle(callId, () => onAlarm(), ran, nothing);
    },
    "@leave"(callId, [id, why]) {
      const conn = conns.get(id);
      conns.delete(id);
      const onLeave = hookFn("onLeave");
      if (conn === undefined || onLeave === undefined) {
        replyValue(callId, null);
        return;
      }
      settle(callId, () => onLeave(conn, why), () => null, nothing);
    },
  };

  const invoke = (callId, name, argsJson) => {
    const hook = Object.prototype.hasOwnProperty.call(hookCalls, name) ? hookCalls[name] : undefined;
    if (hook !== undefined) {
      let args;
      try {
        args = JSON.parse(argsJson);
      } catch (err) {
        // The payload came from a client: too deep for this engine's parser is bad input.
        native.replyError(callId, "invalid payload", "", "refused");
        return;
      }
      hook(callId, args);
      return;
    }
    const fn = lookup(name);
    if (fn === undefined) {
      native.replyError(callId, `the room script has no function named "${name}"`, "", "");
      return;
    }
    settle(callId, () => fn.apply(globalThis, JSON.parse(argsJson)), same, nothing);
  };

  const timerWatermark = () => nextTimerId;

  // What keeps a room from hibernating: armed timers, and calls or host calls not settled.
  const stats = () => [timers.size, pendingCalls.size + pendingHostCalls.size];

  return { invoke, deliver, settleHostCall, runDueTimer, nextTimerAt, timerWatermark, abandonPendingCalls, stats };
});
