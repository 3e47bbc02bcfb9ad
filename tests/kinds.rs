//! Room kinds: `--room PREFIX=PATH` serves topics `PREFIX:ID` with their own script, beside
//! the default `room` kind, each room its own process.

mod common;

use std::process::Command;

use common::{script_file, Gateway};

/// A kind whose history says which kind and room answered.
const ECHO_KIND: &str = r#"
function getHistory(limit) { return [{ kind: "echo", room: Room.id }]; }
function sendMessage(sender, text) { return { id: 1, sender, text: text.toUpperCase() }; }
"#;

#[tokio::test]
async fn two_kinds_run_side_by_side_each_with_its_script() {
    let echo = script_file("echo.js", ECHO_KIND);
    let gateway = Gateway::start(&["--room", &format!("echo={}", echo.display())]);
    let mut client = gateway.connect().await;
    let (_, chat_history) = client.join_ok("room:lobby").await;
    assert!(chat_history.is_empty(), "the default kind runs the chat");
    let (echo_ref, echo_history) = client.join_ok("echo:lobby").await;
    assert_eq!(
        echo_history,
        [serde_json::json!({"kind": "echo", "room": "lobby"})],
        "Room.id is the id alone"
    );
    let reply = client.send_message(&echo_ref, "echo:lobby", "ann", "hi").await;
    assert_eq!(reply["response"]["text"], "HI", "{reply}");

    let rooms = gateway.rooms();
    let kinds: Vec<(String, String)> = rooms
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or_default().to_owned(),
                r["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(kinds, [("echo".to_owned(), "lobby".to_owned()), ("room".to_owned(), "lobby".to_owned())]);
    assert_ne!(rooms[0]["pid"], rooms[1]["pid"], "the same id in two kinds is two rooms, two processes");
}

#[tokio::test]
async fn a_topic_of_no_configured_kind_is_not_served() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("chess:g1").await;
    assert_eq!(reply["response"]["reason"], "unmatched topic", "{reply}");
    let (_, reply) = client.join("room:not valid").await;
    assert_eq!(reply["response"]["reason"], "invalid room id", "{reply}");
    assert!(gateway.rooms().is_empty());
}

#[test]
fn bad_kind_flags_stop_the_start_with_a_message_that_names_them() {
    let script = script_file("any.js", "function getHistory() { return []; }\n");
    let script = script.display().to_string();
    for (args, expected) in [
        (vec!["--room".to_owned(), format!("Game={script}")], "--room"),
        (vec!["--room".to_owned(), "game".to_owned()], "PREFIX=PATH"),
        (
            vec![
                "--room".to_owned(),
                format!("game={script}"),
                "--room".to_owned(),
                format!("game={script}"),
            ],
            "twice",
        ),
        (
            vec!["--room-script".to_owned(), script.clone(), "--room".to_owned(), format!("room={script}")],
            "replaces --room-script",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--port", "0"])
            .args(&args)
            .output()
            .expect("the gateway runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_chat_script_works_as_any_kind() {
    let chat = common::chat_script();
    let gateway = Gateway::start(&["--room", &format!("support={}", chat.display())]);
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let (ann_ref, _) = ann.join_ok("support:desk").await;
    bob.join_ok("support:desk").await;
    let reply = ann.send_message(&ann_ref, "support:desk", "ann", "help").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    // The script posts on `Room.topic`, so its broadcasts reach this kind's topic.
    let pushed = bob.next_event("new_message").await;
    assert_eq!((pushed[2].as_str(), pushed[4]["text"].as_str()), (Some("support:desk"), Some("help")));
}
