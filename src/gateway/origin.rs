//! Which web pages may open a socket: a browser sends `Origin`, and only the gateway's own
//! origins and those named with `--allowed-origin` get through. The request's `Host` header
//! is not trusted for this: an attacker's page reached through DNS rebinding sends a `Host`
//! that matches its own `Origin`.

use std::net::{IpAddr, SocketAddr};

/// The origins allowed to open a socket.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    listening: SocketAddr,
    allowed: Vec<String>,
}

impl OriginPolicy {
    /// The gateway's own origins (`http` and `https` on `localhost`, `127.0.0.1`, `[::1]` and
    /// the bound address, at the bound port) and the `--allowed-origin` list.
    pub fn new(listening: SocketAddr, allowed: &[String]) -> OriginPolicy {
        let allowed = allowed.iter().map(|a| a.trim_end_matches('/').to_ascii_lowercase()).collect();
        OriginPolicy { listening, allowed }
    }

    /// `Ok` when the origin may connect. Clients that send no `Origin` are not browsers, and
    /// no browser page can act through them.
    pub fn check(&self, origin: Option<&str>) -> Result<(), String> {
        let Some(origin) = origin else { return Ok(()) };
        let normalized = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed.contains(&normalized) || self.is_own(&normalized) {
            Ok(())
        } else {
            Err(origin.to_owned())
        }
    }

    fn is_own(&self, origin: &str) -> bool {
        let Some((scheme, authority)) = origin.split_once("://") else { return false };
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let (host, port) = split_authority(authority, default_port);
        if port != Some(self.listening.port()) {
            return false;
        }
        match host {
            "localhost" => true,
            host => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match host.parse::<IpAddr>() {
                    Ok(ip) => ip.is_loopback() || (ip == self.listening.ip() && !ip.is_unspecified()),
                    Err(_) => false,
                }
            }
        }
    }
}

/// `host[:port]` (with `[v6]` hosts); the port is `None` when it is not a number.
fn split_authority(authority: &str, default_port: u16) -> (&str, Option<u16>) {
    let (host, port) = match authority.rfind(':') {
        // A colon inside `[...]` belongs to an IPv6 address, not to a port.
        Some(colon) if !authority[colon..].contains(']') => {
            (&authority[..colon], Some(&authority[colon + 1..]))
        }
        _ => (authority, None),
    };
    let port = match port {
        Some(port) => port.parse().ok(),
        None => Some(default_port),
    };
    (host, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(listening: &str, allowed: &[&str]) -> OriginPolicy {
        let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        OriginPolicy::new(listening.parse().unwrap(), &allowed)
    }

    #[test]
    fn the_gateways_own_origins_are_allowed() {
        let own = policy("127.0.0.1:4000", &[]);
        for origin in
            ["http://localhost:4000", "http://127.0.0.1:4000", "https://[::1]:4000", "HTTP://LOCALHOST:4000/"]
        {
            assert!(own.check(Some(origin)).is_ok(), "{origin}");
        }
        assert!(own.check(None).is_ok(), "no Origin: not a browser");
        let on_lan = policy("192.168.1.20:80", &[]);
        assert!(on_lan.check(Some("http://192.168.1.20")).is_ok(), "the default port");
    }

    #[test]
    fn foreign_hosts_ports_and_schemes_are_refused() {
        let own = policy("127.0.0.1:4000", &[]);
        for origin in [
            "http://evil.example:4000",
            "http://localhost:4001",
            "http://localhost",
            "ftp://localhost:4000",
            "file://",
            "null",
            "http://127.0.0.1.evil.example:4000",
            "http://localhost:4000@evil.example",
        ] {
            assert!(own.check(Some(origin)).is_err(), "{origin}");
        }
        let anywhere = policy("0.0.0.0:4000", &[]);
        assert!(anywhere.check(Some("http://0.0.0.0:4000")).is_err(), "an unspecified address is no origin");
    }

    #[test]
    fn listed_origins_are_allowed_as_written() {
        let listed = policy("127.0.0.1:4000", &["https://chat.example", "http://10.0.0.5:8080/"]);
        assert!(listed.check(Some("https://chat.example")).is_ok());
        assert!(listed.check(Some("http://10.0.0.5:8080")).is_ok());
        assert!(listed.check(Some("http://chat.example")).is_err(), "the scheme is part of the origin");
    }
}
