//! TypeScript room scripts over real processes: a `.ts` kind's types are stripped at load with
//! every position kept, so the room runs as its JavaScript would and its errors name the `.ts`
//! file, line and column.

mod common;

use std::time::Duration;

use common::Gateway;

/// A fixture's absolute path: the gateway runs from the crate root, but say so anyway.
fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn a_typescript_chat_in_the_original_shape_runs_as_a_kind() {
    let gateway = Gateway::start(&["--room", &format!("typed={}", fixture("typed-chat.ts"))]);
    let mut ann = gateway.connect().await;
    let mut bob = gateway.connect().await;
    let (ann_ref, history) = ann.join_ok("typed:x").await;
    assert!(history.is_empty(), "{history:?}");
    bob.join_ok("typed:x").await;

    let reply = ann.send_message(&ann_ref, "typed:x", "ann", "typed hello").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let message = &reply["response"];
    assert_eq!((message["id"].as_u64(), message["sender"].as_str()), (Some(1), Some("ann")), "{reply}");
    assert_eq!(message["text"], "typed hello");
    assert!(message["timestamp"].as_u64().is_some_and(|t| t > 0), "{reply}");

    // Beam.callSync("broadcast", msg) reaches every client of the room, the sender too.
    for client in [&mut bob, &mut ann] {
        let pushed = client.next_event("new_message").await;
        assert_eq!(pushed[2], "typed:x", "{pushed}");
        assert_eq!(&pushed[4], message, "the broadcast is the message the function returned");
    }

    let mut cyd = gateway.connect().await;
    let (_, history) = cyd.join_ok("typed:x").await;
    assert_eq!(history, std::slice::from_ref(message), "getHistory(limit?: number) answers the join");
    assert_eq!(gateway.rooms()[0]["kind"], "typed");
}

#[tokio::test]
async fn a_throw_in_a_typescript_script_names_its_ts_line_and_column() {
    let gateway = Gateway::start(&["--room", &format!("boom={}", fixture("thrower.ts"))]);
    let mut client = gateway.connect().await;
    // The join runs getHistory, which sets a timer whose callback throws; its stack is logged.
    client.join_ok("boom:x").await;
    // Line 9, column 34 is the argument of the `new Error` in thrower.ts, after
    // `const error: Error = `: with the type removed rather than blanked it would be column 27.
    assert!(gateway.log_contains("at explode (thrower.ts:9:34)"), "the log's stack names the .ts position");
    assert!(gateway.log_contains("boom from a timer"));
}

#[tokio::test]
async fn a_typescript_script_that_does_not_parse_fails_its_rooms_start_not_the_gateway() {
    let path = fixture("broken.ts");
    let gateway = Gateway::start(&["--room", &format!("broken={path}")]);
    let mut client = gateway.connect().await;
    let (_, refused) = client.join("broken:x").await;
    assert_eq!(refused["status"], "error", "{refused}");
    let reason = refused["response"]["reason"].as_str().unwrap_or_default();
    assert_eq!(reason, "room unavailable: the room script failed to start", "{refused}");
    assert!(!refused.to_string().contains("fixtures"), "no path reaches the client: {refused}");
    // The operator's log says which file, where, and what is wrong with it.
    assert!(
        common::wait_for_within(Duration::from_secs(5), || {
            let lines = gateway.log_lines_now();
            lines
                .iter()
                .any(|l| l.contains(&path) && l.contains("broken.ts:4:51: syntax error: "))
                .then_some(())
        })
        .is_some(),
        "the log names the file and the error's position"
    );
    assert!(gateway.rooms().is_empty(), "no worker was started for a script that cannot run");

    // Nothing else is affected: the default kind still runs.
    let (_, history) = client.join_ok("room:lobby").await;
    assert!(history.is_empty());
}
