// rooms/counter.js — run with: cargo run --bin gateway -- --room counter=rooms/counter.js
let count = 0;
function onJoin(conn, params) {
  if (!params.name) Room.refuse("a name, please");
  conn.assigns.name = params.name;
  Room.broadcast("joined", { name: params.name }, { except: conn.id });
  return { count, here: Room.connections().map((c) => c.assigns.name) };
}
function onEvent(conn, event, payload) {
  if (event !== "add") Room.refuse("unknown event");
  count += 1;
  Room.broadcast("count", { count, by: conn.assigns.name });
  if (count % 10 === 0) Room.push(conn.id, "prize", { count });
  return { count };
}
function onLeave(conn, why) {
  Room.broadcast("left", { name: conn.assigns.name, why });
}
