//! Verified identity (design §9): tokens at the upgrade, `conn.user` in the room, the chat's
//! sender from the token, authorization in `onJoin`, and the socket closed when its token
//! expires. Over real sockets against the gateway binary; tokens come from `gateway token`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Gateway;
use serde_json::json;

const SECRET: &str = "a-test-secret-of-some-length";

/// `gateway token ...` with the secret in the environment, as the README shows it.
fn mint(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("token")
        .args(args)
        .env("ROOMVISOR_AUTH_SECRET", SECRET)
        .output()
        .expect("gateway token runs");
    assert!(output.status.success(), "gateway token: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("a token is text").trim().to_owned()
}

fn secured() -> Gateway {
    Gateway::start(&["--auth-secret", SECRET])
}

/// phoenix.js's `authToken`: the token in base64url, no padding, after its prefix.
fn auth_token_protocol(token: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut encoded = String::new();
    for chunk in token.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            encoded.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    format!("phoenix, base64url.bearer.phx.{encoded}")
}

#[tokio::test]
async fn only_a_token_this_gateway_signed_and_that_is_still_good_opens_a_socket() {
    let gateway = secured();
    let good = mint(&["--sub", "ann"]);
    assert!(gateway.connect_with(&format!("token={good}"), None).await.is_ok(), "the query parameter");
    let protocols = auth_token_protocol(&good);
    assert!(gateway.connect_with("", Some(&protocols)).await.is_ok(), "phoenix.js's authToken");

    let forged = {
        let other = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["token", "--sub", "ann", "--auth-secret", "some-other-secret-entirely"])
            .output()
            .expect("gateway token runs");
        String::from_utf8(other.stdout).expect("text").trim().to_owned()
    };
    // A token whose signature is good but whose time is up (2001).
    let expired = sign_hs256(&json!({"sub": "ann", "exp": 1_000_000_000u64}));
    for (what, query, why) in [
        ("no token", String::new(), "no token"),
        ("a forged token", format!("token={forged}"), "bad signature"),
        ("an expired token", format!("token={expired}"), "expired"),
        ("a malformed token", "token=not-a-token".to_owned(), "malformed"),
    ] {
        assert_eq!(gateway.connect_with(&query, None).await.err(), Some(403), "{what}");
        assert!(gateway.log_contains(why), "the log says why ({why}) for {what}");
    }
    assert!(
        !gateway.log_contains_now(&good) && !gateway.log_contains_now(&forged),
        "tokens are never logged"
    );
}

#[tokio::test]
async fn the_chat_takes_the_sender_from_the_token_and_rooms_admit_by_claims() {
    let gateway = secured();
    let ann = mint(&["--sub", "u-ann", "--name", "Ann", "--claims", r#"{"rooms":["vip","lobby"]}"#]);
    let bob = mint(&["--sub", "u-bob"]);
    let mut ann = gateway.connect_with(&format!("token={ann}"), None).await.expect("ann connects");
    let mut bob = gateway.connect_with(&format!("token={bob}"), None).await.expect("bob connects");

    let (ann_ref, _) = ann.join_ok("room:vip").await;
    let (_, refused) = ann.join("room:kitchen").await;
    assert_eq!(refused["response"]["reason"], "your token does not admit you to kitchen", "{refused}");
    let (bob_ref, _) = bob.join_ok("room:vip").await;

    let reply = ann.send_message(&ann_ref, "room:vip", "mallory", "hi").await;
    assert_eq!(reply["response"]["sender"], "Ann", "the token's name, not the payload's: {reply}");
    let reply = bob.send_message(&bob_ref, "room:vip", "Ann", "me too").await;
    assert_eq!(reply["response"]["sender"], "u-bob", "no name: the sub");
    // The game seats a verified player under the token's name too.
    let (_, seated) = ann.join_with("game:duel", json!({"name": "mallory"})).await;
    assert_eq!(seated["response"]["seats"]["X"]["name"], "Ann", "{seated}");
}

#[tokio::test]
async fn a_socket_is_closed_when_its_token_expires() {
    let gateway = secured();
    let short = mint(&["--sub", "ann", "--ttl", "2s"]);
    let mut client = gateway.connect_with(&format!("token={short}"), None).await.expect("connects");
    client.join_ok("room:brief").await;
    let closed = tokio::time::timeout(Duration::from_secs(5), client.closed()).await;
    assert_eq!(closed.ok().flatten(), Some(4001), "closed with 'token expired'");
}

#[tokio::test]
async fn a_still_valid_token_is_refreshed_with_the_same_claims_and_opens_a_socket() {
    let gateway = secured();
    assert_eq!(common::http_get(gateway.addr, "/api/auth", &[]).1, r#"{"required":true}"#);
    let token = mint(&["--sub", "u-ann", "--name", "Ann", "--ttl", "10m"]);
    let bearer = format!("Bearer {token}");
    let (status, body) = common::http_post(gateway.addr, "/api/token/refresh", &[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let fresh = answer["token"].as_str().expect("a token");
    assert!(answer["expires_at"].as_u64().is_some_and(|at| at > 500_000 + now_ms()), "{answer}");
    let mut client =
        gateway.connect_with(&format!("token={fresh}"), None).await.expect("the fresh token works");
    let (join_ref, _) = client.join_ok("room:again").await;
    let reply = client.send_message(&join_ref, "room:again", "x", "hi").await;
    assert_eq!(reply["response"]["sender"], "Ann", "the same claims");

    for bad in ["Bearer junk", "Bearer ", "Basic x"] {
        let (status, _) = common::http_post(gateway.addr, "/api/token/refresh", &[("Authorization", bad)]);
        assert_eq!(status, 401, "{bad}");
    }
    let (status, _) = common::http_post(gateway.addr, "/api/token/refresh", &[]);
    assert_eq!(status, 401);
    let open = Gateway::start(&[]);
    assert_eq!(common::http_get(open.addr, "/api/auth", &[]).1, r#"{"required":false}"#);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn gateway_token_without_a_secret_says_what_it_needs() {
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["token", "--sub", "ann"])
        .env_remove("ROOMVISOR_AUTH_SECRET")
        .output()
        .expect("gateway token runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--auth-secret"));
    let short = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["token", "--sub", "ann", "--auth-secret", "short"])
        .output()
        .expect("gateway token runs");
    assert_eq!(short.status.code(), Some(2), "a short secret is refused");
}

/// An HS256 token with these claims, signed with the gateway's secret.
fn sign_hs256(claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("signs")
}
