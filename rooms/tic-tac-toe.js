// Tic-tac-toe: a room kind written only against the room hooks (design §8). The gateway serves
// it as `game:<id>`. The whole game is the `game` object below; it lives as long as the runtime,
// so a worker restart starts a fresh game, with the seats handed out again in join order.
//
// Rules, all checked here and nowhere else:
// - The first two joins take the seats, X then O; later joins watch. A watcher may `sit` in a
//   free seat, and a join can ask to watch with params {spectate: true}.
// - X moves first; a move needs both seats filled, your turn, an empty cell, a game not over.
// - A player leaving frees the seat; the game waits for someone to sit and carry on from there.
// - `rematch` once the game is over: both seated players must ask; the new game swaps the seats,
//   so whoever was O opens as X.
//
// Every change is broadcast as one `state` event carrying the whole view (it is tiny). `version`
// only grows within one runtime and `runtime` names the runtime, so a client can drop a state
// older than the one it shows, yet always take the first state of a restarted room.

const LINES = [
  [0, 1, 2], [3, 4, 5], [6, 7, 8], // rows
  [0, 3, 6], [1, 4, 7], [2, 5, 8], // columns
  [0, 4, 8], [2, 4, 6],            // diagonals
];
const MAX_NAME_CHARS = 32;

const game = {
  board: Array(9).fill(null),    // null | "X" | "O"
  turn: "X",
  seats: { X: null, O: null },   // {connId, name} | null
  winner: null,                  // null | "X" | "O" | "draw"
  line: null,                    // the winning three cells
  rematch: [],                   // seats that asked for a rematch
  round: 1,
  version: 0,
  runtime: Date.now().toString(36) + Math.random().toString(36).slice(2, 8),
};
// Everyone joined, in join order: connId -> name. Kept here rather than read from
// Room.connections() so the view never depends on when the gateway counts a join as live.
const members = new Map();

// ---- helpers ----

function cleanName(name) {
  const s = typeof name === "string" ? name.trim().slice(0, MAX_NAME_CHARS) : "";
  return s || "guest";
}

function seatOf(connId) {
  if (game.seats.X && game.seats.X.connId === connId) return "X";
  if (game.seats.O && game.seats.O.connId === connId) return "O";
  return null;
}

function takeSeat(conn) {
  const seat = game.seats.X === null ? "X" : game.seats.O === null ? "O" : null;
  if (seat) {
    game.seats[seat] = { connId: conn.id, name: conn.assigns.name };
    // A new face in a finished game: earlier rematch votes were made with someone else.
    game.rematch = [];
  }
  return seat;
}

// The view everyone sees; spectators are the joins without a seat.
function view() {
  const spectators = [...members]
    .filter(([connId]) => seatOf(connId) === null)
    .map(([connId, name]) => ({ connId, name }));
  return {
    board: game.board, turn: game.turn, seats: game.seats, winner: game.winner, line: game.line,
    rematch: game.rematch, round: game.round, spectators,
    version: game.version, runtime: game.runtime,
  };
}

// One place that publishes a change, so no path can forget to bump the version.
function changed(notice, except) {
  game.version++;
  if (notice) Room.broadcast("notice", { text: notice }, except ? { except } : undefined);
  Room.broadcast("state", view(), except ? { except } : undefined);
}

// Room.push: only the player who is to move gets this; the page puts it in the title bar.
function nudge(except) {
  const seat = game.seats[game.turn];
  if (game.winner === null && seat && game.seats.X && game.seats.O && seat.connId !== except) {
    Room.push(seat.connId, "your_turn", { seat: game.turn, round: game.round });
  }
}

function winnerOf(board) {
  for (const line of LINES) {
    const [a, b, c] = line;
    if (board[a] && board[a] === board[b] && board[a] === board[c]) return { winner: board[a], line };
  }
  return board.every((cell) => cell !== null) ? { winner: "draw", line: null } : null;
}

function newRound() {
  // Swap the seats: the loser of a first-move advantage gets it next time.
  game.seats = { X: game.seats.O, O: game.seats.X };
  game.board = Array(9).fill(null);
  game.turn = "X";
  game.winner = null;
  game.line = null;
  game.rematch = [];
  game.round++;
}

// ---- hooks ----

function onJoin(conn, params) {
  // A verified user plays under the token's name; an anonymous one under the name it gives.
  const claimed = conn.user ? conn.user.name || conn.user.sub : params && params.name;
  conn.assigns.name = cleanName(claimed);
  members.set(conn.id, conn.assigns.name);
  const seat = params && params.spectate ? null : takeSeat(conn);
  // The joiner gets the state in its join reply; everyone else hears about it now.
  changed(`${conn.assigns.name} ${seat ? `sits down as ${seat}` : "is watching"}`, conn.id);
  nudge(conn.id);
  return { ...view(), you: conn.id, seat };
}

function onEvent(conn, event, payload) {
  switch (event) {
    case "move": return move(conn, payload && payload.cell);
    case "sit": return sit(conn);
    case "rematch": return rematch(conn);
    default: Room.refuse(`unknown event ${event}`);
  }
}

function onLeave(conn, why) {
  members.delete(conn.id);
  const seat = seatOf(conn.id);
  if (seat) {
    game.seats[seat] = null;
    game.rematch = [];
  }
  // A re-join is followed at once by onJoin, which tells everyone; say nothing twice.
  const notice = why === "rejoin" ? null : `${conn.assigns.name} left${seat ? `; seat ${seat} is free` : ""}`;
  changed(notice);
}

// ---- events ----

function move(conn, cell) {
  const seat = seatOf(conn.id);
  if (seat === null) Room.refuse("spectators cannot move");
  if (game.winner !== null) Room.refuse("the game is over");
  if (!game.seats.X || !game.seats.O) Room.refuse("waiting for an opponent");
  if (seat !== game.turn) Room.refuse("not your turn");
  if (!Number.isInteger(cell) || cell < 0 || cell > 8) Room.refuse("cell must be 0 to 8");
  if (game.board[cell] !== null) Room.refuse("that cell is taken");

  game.board[cell] = seat;
  const result = winnerOf(game.board);
  if (result) {
    game.winner = result.winner;
    game.line = result.line;
  } else {
    game.turn = seat === "X" ? "O" : "X";
  }
  let notice = null;
  if (game.winner === "draw") notice = "a draw";
  else if (game.winner) notice = `${conn.assigns.name} (${seat}) wins`;
  changed(notice);
  nudge();
  return view();
}

function sit(conn) {
  if (seatOf(conn.id)) Room.refuse("you already have a seat");
  const seat = takeSeat(conn);
  if (!seat) Room.refuse("no free seat");
  changed(`${conn.assigns.name} sits down as ${seat}`);
  nudge();
  return { ...view(), seat };
}

function rematch(conn) {
  const seat = seatOf(conn.id);
  if (seat === null) Room.refuse("only players can ask for a rematch");
  if (game.winner === null) Room.refuse("the game is not over");
  if (!game.rematch.includes(seat)) game.rematch.push(seat);
  const both = game.seats.X && game.seats.O && game.rematch.length === 2;
  if (both) newRound();
  changed(both ? `round ${game.round}: ${game.seats.X.name} plays X` : `${conn.assigns.name} wants a rematch`);
  nudge();
  return view();
}
