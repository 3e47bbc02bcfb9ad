// rooms/counter.js — run with: cargo run --bin gateway -- --room counter=rooms/counter.js
// With --data-dir the count is stored: it survives kill -9 of the worker and of the gateway.
let count = Room.storage?.get("count") ?? 0;
function onJoin(conn, params) {
  if (!params.name) Room.refuse("a name, please");
  conn.assigns.name = params.name;
  Room.broadcast("joined", { name: params.name }, { except: conn.id });
  return { count, here: Room.connections().map((c) => c.assigns.name) };
}
function onEvent(conn, event, payload) {
  if (event !== "add") Room.refuse("unknown event");
  count += 1;
  Room.storage?.put("count", count); // durable before the broadcast and reply leave the gateway
  Room.broadcast("count", { count, by: conn.assigns.name });
  if (count % 10 === 0) Room.push(conn.id, "prize", { count });
  return { count };
}
function onLeave(conn, why) {
  Room.broadcast("left", { name: conn.assigns.name, why });
}
