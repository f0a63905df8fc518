//! The outbound IP denylist: which resolved addresses the federation client
//! refuses to connect to, so that a crafted server name, SRV record or
//! `.well-known` delegation cannot point Courier at its own network (SSRF).
//! It only classifies addresses; the connector applies it to every address
//! before opening a socket. `federation.ip_allow` opens exceptions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Ranges never contacted unless `ip_allow` covers the address.
const DENIED_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network", unspecified
    (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),   // carrier-grade NAT
    (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local (cloud metadata)
    (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation TEST-NET-1
    (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast
    (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation TEST-NET-2
    (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation TEST-NET-3
    (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, broadcast
];

const DENIED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    // IPv4-compatible (`::a.b.c.d`, deprecated by RFC 4291): nothing public
    // lives there, and a host that routes it to IPv4 would reach whatever
    // IPv4 address it carries, so the whole /96 is refused. (It also
    // covers `::` and `::1` above.)
    (Ipv6Addr::UNSPECIFIED, 96),
    // IPv4-translated (`::ffff:0:a.b.c.d`, RFC 2765 SIIT): likewise.
    (Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0), 96),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),     // discard-only
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),    // documentation (2024)
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),     // unique local
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),    // link-local
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),    // site-local (deprecated)
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),     // multicast
];

/// The denylist with its configured exceptions.
#[derive(Debug, Clone)]
pub struct Denylist {
    denied: Vec<IpNet>,
    allowed: Vec<IpNet>,
}

impl Denylist {
    /// The built-in ranges, opened by `allow` (from `federation.ip_allow`).
    pub fn new(allow: &[IpNet]) -> Self {
        let v4 = DENIED_V4.iter().map(|&(addr, len)| {
            IpNet::V4(Ipv4Net::new(addr, len).expect("prefix lengths above are at most 32"))
        });
        let v6 = DENIED_V6.iter().map(|&(addr, len)| {
            IpNet::V6(Ipv6Net::new(addr, len).expect("prefix lengths above are at most 128"))
        });
        Denylist {
            denied: v4.chain(v6).collect(),
            allowed: allow.to_vec(),
        }
    }

    /// Whether connecting to `ip` is refused. IPv4-mapped (`::ffff:10.0.0.1`)
    /// and NAT64 (`64:ff9b::10.0.0.1`) addresses are judged as the IPv4
    /// address they carry; IPv4-compatible (`::10.0.0.1`) and
    /// IPv4-translated (`::ffff:0:10.0.0.1`) addresses are refused outright
    /// (unless `ip_allow` covers them as IPv6).
    pub fn is_denied(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.denied.iter().any(|net| net.contains(&ip))
    }
}

/// Maps IPv4-in-IPv6 forms to the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
                if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                    let [a, b] = s[6].to_be_bytes();
                    let [c, d] = s[7].to_be_bytes();
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                } else {
                    IpAddr::V6(v6)
                }
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test literal is an IP")
    }

    #[test]
    fn private_loopback_link_local_and_special_ranges_are_denied() {
        let list = Denylist::new(&[]);
        for denied in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.7",
            "198.51.100.7",
            "203.0.113.7",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            // IPv4-compatible and IPv4-translated forms, whatever they carry.
            "::7f00:1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "::ffff:0:7f00:1",
            "::ffff:0:8.8.8.8",
        ] {
            assert!(list.is_denied(ip(denied)), "{denied} must be denied");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let list = Denylist::new(&[]);
        for allowed in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "2a01:4f8::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!list.is_denied(ip(allowed)), "{allowed} must pass");
        }
    }

    #[test]
    fn ip_allow_opens_exceptions_only_where_it_covers() {
        let allow: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().expect("net"),
            "::1/128".parse().expect("net"),
        ];
        let list = Denylist::new(&allow);
        assert!(!list.is_denied(ip("127.0.0.1")));
        assert!(!list.is_denied(ip("::1")));
        assert!(!list.is_denied(ip("::ffff:127.0.0.1")));
        assert!(list.is_denied(ip("10.0.0.1")));
        assert!(list.is_denied(ip("169.254.169.254")));
    }
}
