//! Fair shares between clients: how many sockets one address may hold open, so a few
//! machines cannot take every socket (and through them every room) from everyone else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::util::LockExt;

#[derive(Debug, Clone)]
pub struct SocketsPerAddress {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open socket of an address; the count goes down when it drops.
#[derive(Debug)]
pub struct SocketPass {
    address: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SocketsPerAddress {
    pub fn new(max: usize) -> SocketsPerAddress {
        SocketsPerAddress { max, open: Arc::default() }
    }

    /// A pass for one more socket from `address`, or `None` at its limit.
    pub fn admit(&self, address: IpAddr) -> Option<SocketPass> {
        let mut open = self.open.lock_or_recover();
        let count = open.entry(address).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SocketPass { address, open: self.open.clone() })
    }
}

impl Drop for SocketPass {
    fn drop(&mut self) {
        let mut open = self.open.lock_or_recover();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_and_others_theirs() {
        let quota = SocketsPerAddress::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = quota.admit(a).expect("first");
        let _second = quota.admit(a).expect("second");
        assert!(quota.admit(a).is_none(), "a third from the same address");
        assert!(quota.admit(b).is_some(), "another address is not affected");
        drop(first);
        assert!(quota.admit(a).is_some(), "a closed socket frees its place");
        assert_eq!(quota.open.lock_or_recover().len(), 1, "addresses with no socket are forgotten");
    }
}
