//! NATS subject names. A PubSub topic or BroadcastChannel name may hold any character, and
//! NATS gives `.`, `*`, `>` and whitespace meaning, so names are escaped into one token.

/// The subject carrying a topic's broadcasts and BroadcastChannel posts between nodes.
pub fn topic(name: &str) -> String {
    format!("roomvisor.topic.{}", escape(name))
}

/// The subject a node answers room calls on.
pub fn node_calls(node: &str) -> String {
    format!("roomvisor.node.{}.call", escape(node))
}

/// Where nodes say they are alive, for presence (a node's entries go when it goes quiet).
pub fn presence_alive() -> String {
    "roomvisor.presence.alive".to_owned()
}

/// Keeps `[A-Za-z0-9_:-]`, writes every other byte as `%XX`; never empty.
fn escape(name: &str) -> String {
    if name.is_empty() {
        return "%".to_owned();
    }
    let mut token = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b':' | b'-') {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("%{byte:02X}"));
        }
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_one_safe_token() {
        assert_eq!(topic("room:general"), "roomvisor.topic.room:general");
        assert_eq!(topic("a.b *>"), "roomvisor.topic.a%2Eb%20%2A%3E");
        assert_eq!(topic(""), "roomvisor.topic.%");
        assert_ne!(topic("a.b"), topic("a%2Eb"), "the escape character is escaped too");
        assert_eq!(node_calls("gw-1"), "roomvisor.node.gw-1.call");
    }
}
