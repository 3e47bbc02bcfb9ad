//! Verified identity (design §9): HS256 JSON Web Tokens signed with `--auth-secret`. A socket
//! presents its token at the upgrade, as the `token` query parameter (phoenix.js's
//! `params: {token}`) or in phoenix.js's `authToken` subprotocol; a verified token's claims
//! become `conn.user` in every room the socket joins, and its `exp` ends the socket.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::util::epoch_ms;

/// phoenix.js sends `authToken` as the subprotocol `base64url.bearer.phx.<token in base64url>`.
const AUTH_TOKEN_PROTOCOL_PREFIX: &str = "base64url.bearer.phx.";
/// A refresh keeps a session going, but not for ever: a stolen token cannot be kept alive
/// past this long after its holder first signed in (`auth_time`).
const MAX_SESSION: Duration = Duration::from_secs(24 * 3600);
/// A token without `iat` is refreshed for this long.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// Longest token looked at: a token is a few hundred bytes; a huge one is an attack on the
/// parser, refused before it is decoded.
const MAX_TOKEN_BYTES: usize = 4096;

/// The gateway's signing key.
#[derive(Clone)]
pub struct Auth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

/// Who a verified socket is.
#[derive(Debug, Clone)]
pub struct User {
    pub sub: String,
    /// Every claim of the token, as JSON: the script's `conn.user`. Shared by every join of
    /// the socket.
    pub claims: Arc<RawValue>,
    /// When the token expires (ms since the epoch): the socket is closed then.
    pub expires_at_ms: u64,
}

/// Why a socket was refused at the upgrade; never carries the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    /// Signed with another key, or with another algorithm than HS256.
    Forged,
    Expired,
    /// The token has no `sub` (or it is not a non-empty string).
    NoSubject,
    /// A refresh of a session that began longer ago than a refresh may extend.
    SessionTooOld,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Missing => "no token",
            AuthError::Malformed => "a malformed token",
            AuthError::Forged => "a token with a bad signature",
            AuthError::Expired => "an expired token",
            AuthError::NoSubject => "a token without a subject (sub)",
            AuthError::SessionTooOld => "a session too old to refresh",
        })
    }
}

/// The claims every accepted token has; the rest pass through to the room untouched.
#[derive(Deserialize)]
struct Required {
    sub: String,
    exp: u64,
}

impl Auth {
    pub fn new(secret: &str) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        // A token is good until its `exp` and not a second longer: the socket is closed then.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The user a token names, if this gateway signed it and it has not expired.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let claims = decode::<Box<RawValue>>(token, &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => AuthError::Forged,
                ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => AuthError::NoSubject,
                _ => AuthError::Malformed,
            }
        })?;
        let required: Required =
            serde_json::from_str(claims.claims.get()).map_err(|_| AuthError::Malformed)?;
        if required.sub.is_empty() {
            return Err(AuthError::NoSubject);
        }
        let expires_at_ms = required.exp.saturating_mul(1000);
        Ok(User { sub: required.sub, claims: Arc::from(claims.claims), expires_at_ms })
    }

    /// A token for `sub`, valid for `ttl`, with `extra` claims beside `sub`, `name`, `iat` and
    /// `exp`: for development, tests and the README.
    pub fn mint(
        &self,
        sub: &str,
        name: Option<&str>,
        ttl: Duration,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let now = epoch_ms() / 1000;
        let mut claims = extra.clone();
        claims.insert("sub".into(), sub.into());
        if let Some(name) = name {
            claims.insert("name".into(), name.into());
        }
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), now.saturating_add(ttl.as_secs().max(1)).into());
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|e| e.to_string())
    }
}

impl Auth {
    /// A fresh token for a still-valid one: the same claims, a new `iat` and an `exp` as far
    /// ahead as the old token's lifetime, and `auth_time` kept (set from the first `iat`),
    /// so a session can be kept alive for at most [`MAX_SESSION`]. Returns the token and its
    /// expiry (ms since the epoch).
    pub fn refresh(&self, token: &str) -> Result<(String, u64), AuthError> {
        let user = self.verify(token)?;
        let mut claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(user.claims.get()).map_err(|_| AuthError::Malformed)?;
        let number = |name: &str| claims.get(name).and_then(serde_json::Value::as_u64);
        let now = epoch_ms() / 1000;
        let exp = user.expires_at_ms / 1000;
        let lifetime = number("iat").map_or(DEFAULT_LIFETIME.as_secs(), |iat| exp.saturating_sub(iat).max(1));
        let auth_time = number("auth_time").or(number("iat")).unwrap_or(now);
        if now.saturating_sub(auth_time) > MAX_SESSION.as_secs() {
            return Err(AuthError::SessionTooOld);
        }
        let exp = now.saturating_add(lifetime);
        claims.insert("auth_time".into(), auth_time.into());
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), exp.into());
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| AuthError::Malformed)?;
        Ok((token, exp.saturating_mul(1000)))
    }
}

/// The token a socket presents: the `token` query parameter, else phoenix.js's `authToken`
/// subprotocol.
pub fn presented_token(query: Option<&str>, protocols: Option<&str>) -> Option<String> {
    let from_query = query.unwrap_or_default().split('&').find_map(|pair| pair.strip_prefix("token="));
    if let Some(token) = from_query {
        return Some(percent_decode(token));
    }
    let offered = protocols.unwrap_or_default().split(',').map(str::trim);
    let encoded = offered.into_iter().find_map(|p| p.strip_prefix(AUTH_TOKEN_PROTOCOL_PREFIX))?;
    base64url_decode(encoded)
}

/// A JWT is base64url and dots, which need no escaping; decoding `%XX` still lets a client
/// that escapes everything in.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unpadded base64url, as phoenix.js writes it (`btoa` with `+/` → `-_` and no `=`).
fn base64url_decode(encoded: &str) -> Option<String> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    let input = encoded.trim_end_matches('=').as_bytes();
    if input.len() > MAX_TOKEN_BYTES * 2 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    for chunk in input.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_and_carries_its_claims() {
        let auth = Auth::new("s3cret");
        let token = auth
            .mint(
                "u1",
                Some("Ann"),
                Duration::from_secs(60),
                &serde_json::json!({"rooms": ["vip"]}).as_object().unwrap().clone(),
            )
            .unwrap();
        let user = auth.verify(&token).unwrap();
        assert_eq!(user.sub, "u1");
        let claims: serde_json::Value = serde_json::from_str(user.claims.get()).unwrap();
        assert_eq!(claims["name"], "Ann");
        assert_eq!(claims["rooms"], serde_json::json!(["vip"]), "extra claims ride along");
        assert!(user.expires_at_ms > epoch_ms());
    }

    #[test]
    fn forged_expired_malformed_and_subjectless_tokens_are_refused() {
        let auth = Auth::new("s3cret");
        let other =
            Auth::new("another").mint("u1", None, Duration::from_secs(60), &Default::default()).unwrap();
        assert_eq!(auth.verify(&other).unwrap_err(), AuthError::Forged);
        assert_eq!(auth.verify("not.a.token").unwrap_err(), AuthError::Malformed);
        assert_eq!(auth.verify("").unwrap_err(), AuthError::Missing);
        let key = EncodingKey::from_secret(b"s3cret");
        let past = epoch_ms() / 1000 - 10;
        let expired =
            encode(&Header::default(), &serde_json::json!({"sub": "u1", "exp": past}), &key).unwrap();
        assert_eq!(auth.verify(&expired).unwrap_err(), AuthError::Expired);
        let future = epoch_ms() / 1000 + 60;
        let nobody = encode(&Header::default(), &serde_json::json!({"exp": future}), &key).unwrap();
        assert_eq!(auth.verify(&nobody).unwrap_err(), AuthError::NoSubject);
        let blank = encode(&Header::default(), &serde_json::json!({"sub": "", "exp": future}), &key).unwrap();
        assert_eq!(auth.verify(&blank).unwrap_err(), AuthError::NoSubject);
        let hs512 =
            encode(&Header::new(Algorithm::HS512), &serde_json::json!({"sub": "u", "exp": future}), &key)
                .unwrap();
        assert_eq!(auth.verify(&hs512).unwrap_err(), AuthError::Forged, "only HS256 is accepted");
    }

    #[test]
    fn a_refresh_keeps_the_claims_and_the_lifetime_but_not_for_ever() {
        let auth = Auth::new("s3cret");
        let extra = serde_json::json!({"rooms": ["vip"]}).as_object().unwrap().clone();
        let token = auth.mint("u1", Some("Ann"), Duration::from_secs(600), &extra).unwrap();
        let (fresh, expires_at_ms) = auth.refresh(&token).unwrap();
        let user = auth.verify(&fresh).unwrap();
        let claims: serde_json::Value = serde_json::from_str(user.claims.get()).unwrap();
        assert_eq!((claims["sub"].as_str(), claims["name"].as_str()), (Some("u1"), Some("Ann")));
        assert_eq!(claims["rooms"], serde_json::json!(["vip"]));
        assert_eq!(user.expires_at_ms, expires_at_ms);
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert_eq!(lifetime, 600);
        assert_eq!(auth.refresh("junk").unwrap_err(), AuthError::Malformed);
        let key = EncodingKey::from_secret(b"s3cret");
        let now = epoch_ms() / 1000;
        let old = serde_json::json!({"sub": "u1", "iat": now, "exp": now + 60, "auth_time": now - 25 * 3600});
        let old = encode(&Header::default(), &old, &key).unwrap();
        assert_eq!(auth.refresh(&old).unwrap_err(), AuthError::SessionTooOld);
    }

    #[test]
    fn the_token_comes_from_the_query_or_the_auth_token_subprotocol() {
        assert_eq!(presented_token(Some("vsn=2.0.0&token=a.b.c"), None).as_deref(), Some("a.b.c"));
        assert_eq!(presented_token(Some("token=a%2Eb"), None).as_deref(), Some("a.b"));
        // phoenix.js: btoa("a.b.c") with the URL-safe alphabet and no padding.
        let protocols = "phoenix, base64url.bearer.phx.YS5iLmM";
        assert_eq!(presented_token(Some("vsn=2.0.0"), Some(protocols)).as_deref(), Some("a.b.c"));
        assert_eq!(presented_token(Some("vsn=2.0.0"), Some("phoenix")), None);
        assert_eq!(base64url_decode("YWJjZA"), Some("abcd".to_owned()));
        assert_eq!(base64url_decode("a*b"), None);
    }
}
