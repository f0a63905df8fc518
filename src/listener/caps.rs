//! The caps of one listener on things held at once (open connections,
//! requests in flight): a [`Budget`] counts them for the whole listener and
//! per peer address, checks both and takes a unit under one lock, and gives
//! it back when the [`Admission`] is dropped. An IPv6 peer counts by its
//! /64. It decides nothing about what a refusal looks like on the wire.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Which cap refused an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Listener,
    Peer,
}

/// A count with a cap for the whole listener and one per peer address,
/// checked and taken together under one lock. Entries for a peer exist only
/// while it holds something, so the map never has more than `total_cap`.
pub struct Budget {
    total_cap: usize,
    per_peer_cap: usize,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One unit of a [`Budget`], given back on drop.
pub struct Admission {
    budget: Arc<Budget>,
    peer: IpAddr,
}

impl Budget {
    pub fn new(total_cap: usize, per_peer_cap: usize) -> Budget {
        Budget {
            total_cap,
            per_peer_cap,
            state: Mutex::new(BudgetState::default()),
        }
    }

    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let peer = peer_key(ip);
        let mut state = crate::sync::lock(&self.state);
        if state.total >= self.total_cap {
            return Err(Refusal::Listener);
        }
        let held = state.per_peer.get(&peer).copied().unwrap_or(0);
        if held >= self.per_peer_cap {
            return Err(Refusal::Peer);
        }
        state.total += 1;
        state.per_peer.insert(peer, held + 1);
        Ok(Admission {
            budget: self.clone(),
            peer,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = crate::sync::lock(&self.budget.state);
        state.total = state.total.saturating_sub(1);
        if let Some(held) = state.per_peer.get_mut(&self.peer) {
            *held -= 1;
            if *held == 0 {
                state.per_peer.remove(&self.peer);
            }
        }
    }
}

/// The address a per-peer cap counts by: IPv4 as is (also when IPv4-mapped),
/// IPv6 by its /64, the smallest block one site is usually given.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn budget_caps_per_peer_and_in_total_and_gives_back_on_drop() {
        let budget = Arc::new(Budget::new(3, 2));
        let a1 = budget.try_admit(ip("10.0.0.1")).expect("first");
        let a2 = budget
            .try_admit(ip("10.0.0.1"))
            .expect("second from the same peer");
        assert_eq!(budget.try_admit(ip("10.0.0.1")).err(), Some(Refusal::Peer));
        let b1 = budget.try_admit(ip("10.0.0.2")).expect("another peer");
        assert_eq!(
            budget.try_admit(ip("10.0.0.3")).err(),
            Some(Refusal::Listener)
        );
        drop(a1);
        let a3 = budget.try_admit(ip("10.0.0.1")).expect("a slot came back");
        drop((a2, a3, b1));
        let state = budget.state.lock().expect("not poisoned");
        assert_eq!(state.total, 0);
        assert!(state.per_peer.is_empty(), "no entry outlives its holders");
    }

    #[test]
    fn ipv6_peers_count_per_slash_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa::1")),
            peer_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(peer_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_key(ip("192.0.2.7")), ip("192.0.2.7"));
        let budget = Arc::new(Budget::new(10, 1));
        let _held = budget.try_admit(ip("2001:db8::1")).expect("first");
        assert_eq!(
            budget.try_admit(ip("2001:db8::2")).err(),
            Some(Refusal::Peer)
        );
    }
}
