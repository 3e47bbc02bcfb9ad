//! TypeScript room scripts: types are stripped at load, not compiled. Each type is replaced by
//! whitespace (swc's strip-only mode, the stripper behind Node.js's type stripping), so the
//! JavaScript QuickJS runs has every token at the line and column it had in the `.ts` file,
//! and stack traces need no source map. What only a compiler could do (enums, namespaces with
//! values, parameter properties) is refused with its position instead.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

use swc_common::errors::{DiagnosticBuilder, DiagnosticId, Emitter, Handler};
use swc_common::sync::Lrc;
use swc_common::{BytePos, SourceMap};
use swc_ts_fast_strip::{Mode, Options};

/// One problem the stripper reported, where it starts.
struct Problem {
    at: Option<BytePos>,
    message: String,
    syntax: bool,
}

/// swc reports through diagnostics rather than its return value (that only says "Syntax
/// error"); this keeps them so the first can be told with its position.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Problem>>>);

impl Emitter for Collector {
    fn emit(&mut self, diagnostic: &mut DiagnosticBuilder<'_>) {
        let syntax = matches!(&diagnostic.code, Some(DiagnosticId::Error(code)) if code == "InvalidSyntax");
        let problem = Problem {
            at: diagnostic.span.primary_span().map(|s| s.lo),
            message: diagnostic.message(),
            syntax,
        };
        if let Ok(mut problems) = self.0.lock() {
            problems.push(problem);
        }
    }
}

/// Returns `source` with its types blanked out, every other character where it was. On failure
/// the error reads `game.ts:3:1: what is wrong`: it names the file alone, never its directory,
/// so it may be shown to whoever wrote the script without telling them how the host is laid out.
pub fn strip_types(file_name: &str, source: &str) -> Result<String, String> {
    let name = Path::new(file_name).file_name().map(|n| n.to_string_lossy().into_owned());
    let name = name.unwrap_or_else(|| file_name.to_owned());
    let source_map: Lrc<SourceMap> = Default::default();
    let collector = Collector::default();
    let handler = Handler::with_emitter(false, false, Box::new(collector.clone()));
    let options = Options {
        // Room scripts are classic scripts: their top-level functions are the room's API.
        module: Some(false),
        filename: Some(name.clone()),
        mode: Mode::StripOnly,
        ..Default::default()
    };
    // A bug in the stripper must not take the gateway's room start-up down with it: the script
    // is refused instead.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        swc_ts_fast_strip::operate(&source_map, &handler, source.to_owned(), options)
    }));
    let summary = match outcome {
        Ok(Ok(output)) => return Ok(output.code),
        Ok(Err(error)) => error.to_string(),
        Err(_) => return Err(format!("{name}: the TypeScript stripper failed on this file")),
    };
    let problems = collector.0.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
    let Some(first) = problems.iter().min_by_key(|p| p.at.map_or(u32::MAX, |at| at.0)) else {
        return Err(format!("{name}: {summary}"));
    };
    let position = first
        .at
        .and_then(|at| source_map.try_lookup_char_pos(at).ok())
        .map(|loc| format!(":{}:{}", loc.line, loc.col.0 + 1))
        .unwrap_or_default();
    let what = if first.syntax { "syntax error: " } else { "" };
    let more = match problems.len() {
        1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    };
    Err(format!("{name}{position}: {what}{}{more}", first.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `needle` starts, as 1-based line and column.
    fn position_of(text: &str, needle: &str) -> Option<(usize, usize)> {
        text.lines().enumerate().find_map(|(i, line)| line.find(needle).map(|col| (i + 1, col + 1)))
    }

    #[test]
    fn types_go_and_everything_else_stays_where_it_was() {
        let source = "\
interface Message {
  id: number;
  text: string;
}
type Id = number;
function getHistory<T extends Message>(limit?: number, items: T[] = []): T[] {
  const n = (limit as number) ?? 10;
  const xs: Array<T> = items;
    findMe(n, xs);
  return xs.slice(-n) as T[];
}
";
        let stripped = strip_types("chat.ts", source).expect("strips");
        assert_eq!(position_of(source, "findMe"), Some((9, 5)));
        assert_eq!(position_of(&stripped, "findMe"), Some((9, 5)), "{stripped}");
        assert_eq!(stripped.lines().count(), source.lines().count());
        for (before, after) in source.lines().zip(stripped.lines()) {
            assert_eq!(before.len(), after.len(), "{before:?} became {after:?}");
        }
        // The erased interface leaves a `;` behind, in case the line before it needs ending.
        let javascript = "function getHistory(limit, items = []) {
  const n = (limit) ?? 10;
  const xs = items;
    findMe(n, xs);
  return xs.slice(-n);
}";
        let squeezed = |text: &str| text.split_whitespace().collect::<String>();
        assert_eq!(squeezed(&stripped).trim_start_matches(';'), squeezed(javascript), "{stripped}");
    }

    #[test]
    fn plain_javascript_comes_back_unchanged() {
        let source = "function sendMessage(sender, text) {\n  return { sender, text };\n}\n";
        assert_eq!(strip_types("chat.ts", source).as_deref(), Ok(source));
    }

    #[test]
    fn an_enum_is_refused_with_its_position() {
        let source = "const a = 1;\n\nenum Color { Red, Green }\n";
        let error = strip_types("game.ts", source).expect_err("an enum needs a compiler");
        assert!(error.starts_with("game.ts:3:1: "), "{error}");
        assert!(error.contains("enum"), "{error}");
        assert!(error.contains("strip-only"), "{error}");
    }

    #[test]
    fn a_parameter_property_is_refused() {
        let source = "class Room {\n  constructor(private id: string) {}\n}\n";
        let error = strip_types("room.ts", source).expect_err("a parameter property needs a compiler");
        assert!(error.starts_with("room.ts:2:"), "{error}");
        assert!(error.contains("parameter property"), "{error}");
    }

    #[test]
    fn a_syntax_error_names_the_line_and_column() {
        let source = "function ok(): number { return 1; }\nfunction broken(a: number {\n  return a;\n}\n";
        let error = strip_types("broken.ts", source).expect_err("does not parse");
        assert!(error.starts_with("broken.ts:2:"), "{error}");
        assert!(error.contains("syntax error: "), "{error}");
        let column: usize = error
            .trim_start_matches("broken.ts:2:")
            .split(':')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no column in {error}"));
        assert!((20..=28).contains(&column), "near the missing `)`: {error}");
    }

    #[test]
    fn the_error_names_the_file_not_its_directory() {
        let error = strip_types("/srv/secret/rooms/game.ts", "enum E { A }\n").expect_err("refused");
        assert!(error.starts_with("game.ts:1:1: "), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn modules_are_not_room_scripts() {
        let error =
            strip_types("game.ts", "export function f(): void {}\n").expect_err("a script, not a module");
        assert!(error.starts_with("game.ts:1:1: syntax error: "), "{error}");
    }
}
