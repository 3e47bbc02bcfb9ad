//! BENCHMARKS.md from the JSON results of `loadgen run`: the machine, every figure for each
//! server side by side with the ratios roomvisor/limit, roomvisor/hop, hop/limit,
//! roomvisor/peer and durable/roomvisor, and the budgets the benchmarks issue sets, each
//! marked met or missed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::stats::Better;
use crate::RunResult;

/// Result names and column titles, in column order.
const SERVERS: [(&str, &str); 8] = [
    ("roomvisor", "roomvisor"),
    ("cold", "roomvisor, no warm pool"),
    ("deno", "roomvisor --engine deno"),
    ("durable", "roomvisor --data-dir"),
    ("cluster", "roomvisor ×3 over NATS"),
    ("limit", "limit"),
    ("hop", "hop limit"),
    ("peer", "peer"),
];
/// The ratios shown, where both sides ran: roomvisor/cold is what the warm pool buys,
/// deno/roomvisor the other engine against QuickJS; roomvisor/limit is the cost of processes and JS
/// together, roomvisor/hop that of JS (and the gateway's other work), hop/limit that of the
/// processes.
const RATIOS: [(&str, &str); 8] = [
    ("roomvisor", "cold"),
    ("deno", "roomvisor"),
    ("roomvisor", "limit"),
    ("roomvisor", "hop"),
    ("hop", "limit"),
    ("roomvisor", "peer"),
    ("cluster", "roomvisor"),
    ("durable", "roomvisor"),
];
const SCENARIOS: [(&str, &str); 7] = [
    ("cold-start", "new rooms joined one after another, then concurrently"),
    ("fanout", "one room, one sender, every other socket a subscriber"),
    ("many-rooms", "rooms of two clients, all sending"),
    ("idle", "idle sockets, joined to a few rooms"),
    ("rooms-memory", "live rooms with nobody in them"),
    (
        "presence-wave",
        "a wave of joins into one room and the Presence frames it costs, diffs batched every 50 ms \
         (roomvisor only: the limit, the hop limit and the peer have no Presence)",
    ),
    (
        "stored-rooms",
        "rooms created with one stored message each, then a few kept busy while the rest hibernate \
         (durable only: without a store nothing hibernates)",
    ),
];
/// stored-rooms' summary: (metric, column title), one row per server that ran it.
const STORED_ROOMS_SUMMARY: [(&str, &str); 8] = [
    ("rooms created/s (join, one message, leave)", "rooms created/s"),
    ("rooms known to the store", "known rooms"),
    ("rooms live", "live rooms"),
    ("disk per known room once all are created", "disk per known room, one message each"),
    ("disk per known room after", "disk per known room, after the busy phase"),
    ("gateway RSS before", "gateway RSS before"),
    ("gateway RSS after", "gateway RSS after"),
    ("deliveries/s, as fast as delivered", "deliveries/s in the busy rooms"),
];

/// metric name → one value per round.
type Figures = BTreeMap<String, Vec<f64>>;

struct Table {
    /// (scenario, server) → figures, in the order metrics were first seen.
    figures: BTreeMap<(String, String), Figures>,
    order: BTreeMap<String, Vec<(String, String, Better)>>,
    shapes: BTreeMap<String, serde_json::Value>,
    rounds: usize,
}

pub fn write(out: &Path, command: &str, paths: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let mut table =
        Table { figures: BTreeMap::new(), order: BTreeMap::new(), shapes: BTreeMap::new(), rounds: 0 };
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let result: RunResult =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        table.add(result);
    }
    if table.figures.is_empty() {
        return Err("no results to report".into());
    }
    std::fs::write(out, table.render(command))?;
    Ok(())
}

impl Table {
    fn add(&mut self, result: RunResult) {
        let order = self.order.entry(result.scenario.clone()).or_default();
        let figures = self.figures.entry((result.scenario.clone(), result.server.clone())).or_default();
        for metric in result.metrics.0 {
            if !order.iter().any(|(name, _, _)| *name == metric.name) {
                order.push((metric.name.clone(), metric.unit.clone(), metric.better));
            }
            let values = figures.entry(metric.name).or_default();
            values.push(metric.value);
            self.rounds = self.rounds.max(values.len());
        }
        self.shapes.entry(result.scenario).or_insert(result.shape);
    }

    /// The median over rounds, so one disturbed run does not decide a figure.
    fn value(&self, scenario: &str, server: &str, metric: &str) -> Option<f64> {
        let values = self.figures.get(&(scenario.to_owned(), server.to_owned()))?.get(metric)?;
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }

    fn render(&self, command: &str) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `{command}` (which calls `loadgen report`); do not edit by hand. \
             Every figure is the median of {} round(s); in each round each scenario ran against \
             the servers one after another, each server freshly started.\n",
            self.rounds
        );
        let _ = writeln!(md, "Machine: {}\n", machine());
        let _ = writeln!(
            md,
            "- **roomvisor**: the release `gateway`, every room a QuickJS runtime in its own worker process, \
             started from its warm pool (8 prepared workers forked from a template; `--warm-workers`).\n\
             - **roomvisor, no warm pool** (`cold` in run.sh; cold-start and rooms-memory only): the same \
             gateway with `--warm-workers 0`, every room exec'ing its own worker: the figures before the pool.\n\
             - **roomvisor --engine deno** (`deno` in run.sh; cold-start, many-rooms and rooms-memory only): \
             the gateway built with the cargo feature `deno`, each room on deno_core's QuickJS backend (v8x); \
             its spares are exec'd, not forked.\n\
             - **limit**: `benches/limit`, the same Phoenix v2 frames from one axum process with an in-process \
             broadcast: no JS, no worker processes. roomvisor/limit is the cost of processes and JS.\n\
             - **hop limit** (`hop` in run.sh): the limit with `--hop`, one echo process per room, started \
             by the room's first join. Each message goes to its room's process over a socket pair, as \
             length-prefixed frames like the gateway's, and is broadcast and answered once it comes back: \
             processes but no JS. hop/limit is the cost of the processes, roomvisor/hop that of JS and the \
             rest of the gateway's work.\n\
             - **peer**: `benches/peer`, a Socket.IO 4 chat server on Node (rooms, history in memory, \
             broadcast to the room), what a user would pick instead.\n\
             - **roomvisor --data-dir** (`durable` in run.sh; cold-start, fanout, many-rooms and \
             stored-rooms only): the same gateway with durable rooms. Every chat message is stored in \
             SQLite (WAL, synchronous=FULL, group commit: one sync for every room that wrote meanwhile) \
             before it is broadcast or acknowledged. durable/roomvisor is the cost of that.\n\
             - **roomvisor ×3 over NATS** (fanout and many-rooms only): three release gateways joined \
             with `--cluster` through one `nats-server -js`, the clients spread over them round-robin.\n\
             - The load generator (`benches/loadgen`) runs on the same machine and shares its cores.\n"
        );
        self.render_budgets(&mut md);
        for (scenario, description) in SCENARIOS {
            let Some(order) = self.order.get(scenario) else { continue };
            let shape = self.shapes.get(scenario).map(|s| s.to_string()).unwrap_or_default();
            let _ = writeln!(md, "## {scenario}: {description}\n\nShape: `{shape}`\n");
            let servers: Vec<(&str, &str)> = SERVERS
                .iter()
                .copied()
                .filter(|(server, _)| self.figures.contains_key(&(scenario.to_owned(), server.to_string())))
                .collect();
            if scenario == "stored-rooms" {
                self.render_stored_rooms(&mut md, &servers);
            }
            let ratios: Vec<(&str, &str)> = RATIOS
                .iter()
                .copied()
                .filter(|(a, b)| servers.iter().any(|(s, _)| s == a) && servers.iter().any(|(s, _)| s == b))
                .collect();
            let mut header = String::from("| figure |");
            let mut rule = String::from("|---|");
            for (_, title) in &servers {
                header.push_str(&format!(" {title} |"));
                rule.push_str("--:|");
            }
            for (a, b) in &ratios {
                header.push_str(&format!(" {a}/{b} |"));
                rule.push_str("--:|");
            }
            let _ = writeln!(md, "{header}\n{rule}");
            for (metric, unit, better) in order {
                let arrow = match better {
                    Better::Higher => "↑",
                    Better::Lower => "↓",
                };
                let mut row = format!("| {metric} {arrow} |");
                for (server, _) in &servers {
                    let cell = self.value(scenario, server, metric).map(|v| format!("{} {unit}", number(v)));
                    row.push_str(&format!(" {} |", cell.unwrap_or_else(|| "–".to_owned())));
                }
                for (a, b) in &ratios {
                    let ratio = match (self.value(scenario, a, metric), self.value(scenario, b, metric)) {
                        (Some(x), Some(y)) if y != 0.0 => format!("{:.2}", x / y),
                        _ => "–".to_owned(),
                    };
                    row.push_str(&format!(" {ratio} |"));
                }
                let _ = writeln!(md, "{row}");
            }
            md.push('\n');
        }
        let _ = writeln!(md, "↑ higher is better, ↓ lower is better. A ratio a/b is a's figure over b's.");
        md
    }

    /// stored-rooms' few figures that matter, before its full table: `rooms` rooms created
    /// with one message each, then `clients / 2` of them kept busy while the rest hibernate.
    fn render_stored_rooms(&self, md: &mut String, servers: &[(&str, &str)]) {
        let _ = writeln!(
            md,
            "Every room is created with one message (join, send, reply, leave), `concurrency` at a time; \
             then `clients / 2` of them (at most half) are kept busy, two clients each all sending as in \
             many-rooms, while the others hibernate after `--room-idle-ms` (2 s in run.sh). Known and live rooms come \
             from `/healthz` after the busy phase. Disk is the data directory's files (SQLite's database \
             and its WAL, which keeps a few MiB however little is stored) over the known rooms: once every \
             room holds one message, and after the busy rooms have stored theirs.\n"
        );
        let mut header = String::from("| server |");
        let mut rule = String::from("|---|");
        for (_, title) in STORED_ROOMS_SUMMARY {
            header.push_str(&format!(" {title} |"));
            rule.push_str("--:|");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        for (server, title) in servers {
            let mut row = format!("| {title} |");
            for (metric, _) in STORED_ROOMS_SUMMARY {
                let unit = self.unit("stored-rooms", metric);
                let cell = self
                    .value("stored-rooms", server, metric)
                    .map(|v| format!("{} {unit}", number(v)).trim_end().to_owned());
                row.push_str(&format!(" {} |", cell.unwrap_or_else(|| "–".to_owned())));
            }
            let _ = writeln!(md, "{row}");
        }
        md.push('\n');
    }

    fn unit(&self, scenario: &str, metric: &str) -> &str {
        let order = self.order.get(scenario).map(Vec::as_slice).unwrap_or_default();
        order.iter().find(|(name, _, _)| name == metric).map(|(_, unit, _)| unit.as_str()).unwrap_or("")
    }

    fn render_budgets(&self, md: &mut String) {
        let ours = |scenario: &str, metric: &str| self.value(scenario, "roomvisor", metric);
        let ratio = |scenario: &str, metric: &str, other: &str| {
            Some(self.value(scenario, "roomvisor", metric)? / self.value(scenario, other, metric)?)
        };
        let fanout_rate = "deliveries/s, as fast as delivered";
        let per_room = "total per room (server growth + worker PSS)";
        // (budget, figure, unit, at most (else at least), the bound)
        let budgets: [(&str, Option<f64>, &str, bool, f64); 13] = [
            (
                "first join of a new room, one after another, p50 ≤ 0.5 ms",
                ours("cold-start", "first join, one after another p50"),
                "ms",
                true,
                0.5,
            ),
            (
                "first join of a new room, one after another, p99 ≤ 3 ms",
                ours("cold-start", "first join, one after another p99"),
                "ms",
                true,
                3.0,
            ),
            (
                "new rooms/s, 20 at a time ≥ 2,000",
                ours("cold-start", "new rooms/s, concurrently"),
                "/s",
                false,
                2000.0,
            ),
            (
                "per idle room (gateway growth + worker PSS) ≤ 400 KiB",
                ours("rooms-memory", per_room),
                "KiB",
                true,
                400.0,
            ),
            (
                "gateway growth per idle room ≤ 16 KiB",
                ours("rooms-memory", "server growth per room"),
                "KiB",
                true,
                16.0,
            ),
            (
                "idle room worker ≤ 5 MiB RSS (median)",
                ours("rooms-memory", "worker RSS, median"),
                "MiB",
                true,
                5.0,
            ),
            ("gateway ≤ 16 KiB per idle socket", ours("idle", "server growth per socket"), "KiB", true, 16.0),
            (
                "fan-out ≥ 0.8× the limit's deliveries/s",
                ratio("fanout", fanout_rate, "limit"),
                "×",
                false,
                0.8,
            ),
            ("fan-out ≥ 2× the peer's deliveries/s", ratio("fanout", fanout_rate, "peer"), "×", false, 2.0),
            (
                "fan-out send→receive p99 ≤ 10 ms at half the maximum rate",
                ours("fanout", "send→receive at half speed p99"),
                "ms",
                true,
                10.0,
            ),
            (
                "many-rooms ≥ 2× the peer's deliveries/s",
                ratio("many-rooms", fanout_rate, "peer"),
                "×",
                false,
                2.0,
            ),
            (
                "many-rooms ≥ 0.5× the hop limit's deliveries/s",
                ratio("many-rooms", fanout_rate, "hop"),
                "×",
                false,
                0.5,
            ),
            (
                "many-rooms send→receive p99 ≤ 10 ms at half the maximum rate",
                ours("many-rooms", "send→receive at half speed p99"),
                "ms",
                true,
                10.0,
            ),
        ];
        let _ = writeln!(md, "## Budgets\n\n| budget | roomvisor | |\n|---|--:|---|");
        for (what, value, unit, at_most, limit) in budgets {
            let (figure, verdict) = match value {
                Some(v) => {
                    let met = if at_most { v <= limit } else { v >= limit };
                    (format!("{} {unit}", number(v)), if met { "met" } else { "**missed**" })
                }
                None => ("–".to_owned(), "not measured"),
            };
            let _ = writeln!(md, "| {what} | {figure} | {verdict} |");
        }
        md.push('\n');
    }
}

fn number(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let whole = format!("{:.0}", v);
        let mut grouped = String::new();
        for (i, digit) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 && digit.is_ascii_digit() {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        grouped
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// CPU model, core count, memory and kernel, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, {mem_gib:.1} GiB memory, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(1234567.4), "1,234,567");
        assert_eq!(number(512.4), "512");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
    }

    #[test]
    fn the_median_of_rounds_is_reported() {
        let mut table =
            Table { figures: BTreeMap::new(), order: BTreeMap::new(), shapes: BTreeMap::new(), rounds: 0 };
        for v in [3.0, 1.0, 2.0] {
            let mut metrics = crate::stats::Metrics::default();
            metrics.push("x", v, "ms", Better::Lower);
            table.add(RunResult {
                server: "roomvisor".into(),
                scenario: "fanout".into(),
                shape: serde_json::Value::Null,
                metrics,
            });
        }
        assert_eq!(table.value("fanout", "roomvisor", "x"), Some(2.0));
        let md = table.render("test");
        assert!(md.contains("| figure | roomvisor |\n|---|--:|\n| x ↓ | 2.00 ms |\n"), "{md}");
    }

    fn result(server: &str, scenario: &str, figures: &[(&str, f64, &str)]) -> RunResult {
        let mut metrics = crate::stats::Metrics::default();
        for (name, value, unit) in figures {
            metrics.push(*name, *value, unit, Better::Higher);
        }
        RunResult {
            server: server.into(),
            scenario: scenario.into(),
            shape: serde_json::Value::Null,
            metrics,
        }
    }

    #[test]
    fn durable_stands_beside_roomvisor_with_its_ratio() {
        let mut table =
            Table { figures: BTreeMap::new(), order: BTreeMap::new(), shapes: BTreeMap::new(), rounds: 0 };
        let rate = "deliveries/s, as fast as delivered";
        table.add(result("roomvisor", "many-rooms", &[(rate, 40_000.0, "/s")]));
        table.add(result("durable", "many-rooms", &[(rate, 30_000.0, "/s")]));
        let md = table.render("test");
        assert!(md.contains("| figure | roomvisor | roomvisor --data-dir | durable/roomvisor |\n"), "{md}");
        assert!(md.contains(&format!("| {rate} ↑ | 40,000 /s | 30,000 /s | 0.75 |\n")), "{md}");
        assert!(md.contains("synchronous=FULL"), "{md}");
    }

    #[test]
    fn the_hop_limit_stands_beside_the_limit_with_its_ratios() {
        let mut table =
            Table { figures: BTreeMap::new(), order: BTreeMap::new(), shapes: BTreeMap::new(), rounds: 0 };
        let rate = "deliveries/s, as fast as delivered";
        table.add(result("roomvisor", "many-rooms", &[(rate, 20_000.0, "/s")]));
        table.add(result("limit", "many-rooms", &[(rate, 80_000.0, "/s")]));
        table.add(result("hop", "many-rooms", &[(rate, 40_000.0, "/s")]));
        let md = table.render("test");
        assert!(
            md.contains(
                "| figure | roomvisor | limit | hop limit | roomvisor/limit | roomvisor/hop | hop/limit |\n"
            ),
            "{md}"
        );
        assert!(
            md.contains(&format!("| {rate} ↑ | 20,000 /s | 80,000 /s | 40,000 /s | 0.25 | 0.50 | 0.50 |\n")),
            "{md}"
        );
        // Without roomvisor, only the hop limit's own ratio.
        let mut table =
            Table { figures: BTreeMap::new(), order: BTreeMap::new(), shapes: BTreeMap::new(), rounds: 0 };
        table.add(result("limit", "fanout", &[(rate, 80_000.0, "/s")]));
        table.add(result("hop", "fanout", &[(rate, 60_000.0, "/s")]));
        let md = table.render("test");
        assert!(md.contains(&format!("| {rate} ↑ | 80,000 /s | 60,000 /s | 0.75 |\n")), "{md}");
    }

    #[test]
    fn stored_rooms_has_its_summary() {
        let mut table =
            Table { figures: BTreeMap::new(), order: BTreeMap::new(), shapes: BTreeMap::new(), rounds: 0 };
        table.add(result(
            "durable",
            "stored-rooms",
            &[
                ("rooms created/s (join, one message, leave)", 512.0, "/s"),
                ("rooms known to the store", 10_000.0, ""),
                ("rooms live", 1_000.0, ""),
                ("disk per known room once all are created", 1_234.0, "B"),
                ("gateway RSS before", 12.0, "MiB"),
                ("gateway RSS after", 80.0, "MiB"),
            ],
        ));
        let md = table.render("test");
        assert!(md.contains("| server | rooms created/s | known rooms | live rooms |"), "{md}");
        assert!(
            md.contains(
                "| roomvisor --data-dir | 512 /s | 10,000 | 1,000 | 1,234 B | – | 12.0 MiB | 80.0 MiB | – |\n"
            ),
            "{md}"
        );
    }
}
