//! Matrix identifiers Courier checks at its edges: server names and user IDs
//! (SPEC §9). It owns parsing and validation only; it does not know which
//! server is "us" or which users exist.

use std::fmt;

/// Longest server name we accept. The grammar allows a 255-character DNS name
/// plus a port; the spec recommends 230, but peers in the wild are longer.
const MAX_SERVER_NAME_LEN: usize = 255 + 6;
/// The spec's limit on a whole user ID, in bytes.
const MAX_USER_ID_LEN: usize = 255;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("server name {0:?} does not match the server-name grammar")]
    BadServerName(String),
    #[error("user ID {0:?} is not of the form @localpart:server_name")]
    BadUserId(String),
}

/// A server name as in user IDs: `hostname[:port]`, validated against the
/// grammar of SPEC §9.1. Compared case-sensitively.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerName(String);

/// The host part of a server name, classified for discovery (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host<'a> {
    Ipv4(std::net::Ipv4Addr),
    /// The address without brackets.
    Ipv6(std::net::Ipv6Addr),
    Dns(&'a str),
}

impl ServerName {
    /// Parses and validates a server name.
    pub fn parse(raw: &str) -> Result<Self, IdentifierError> {
        if raw.is_empty() || raw.len() > MAX_SERVER_NAME_LEN || split_host_port(raw).is_none() {
            return Err(IdentifierError::BadServerName(raw.to_owned()));
        }
        Ok(ServerName(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hostname part (IPv6 literals keep their brackets), without port.
    pub fn hostname(&self) -> &str {
        split_host_port(&self.0).map(|(h, _)| h).unwrap_or(&self.0)
    }

    /// The explicit port, if the name has one.
    pub fn port(&self) -> Option<u16> {
        split_host_port(&self.0).and_then(|(_, p)| p)
    }

    /// The name as DNS, TLS and discovery see it: the hostname lower-cased
    /// without a trailing dot, and the port only when it is not the
    /// federation default (8448). `EVIL.example`, `evil.example.` and
    /// `evil.example:8448` all reach the same host with the same
    /// certificate, so deny lists, rate limits and failure caches key on
    /// this form; identity (signatures, user IDs) stays case-sensitive.
    pub fn normalized(&self) -> String {
        let host = self.normalized_host();
        match self.port() {
            Some(port) if port != 8448 => format!("{host}:{port}"),
            _ => host,
        }
    }

    /// The hostname alone, lower-cased, without trailing dots.
    pub fn normalized_host(&self) -> String {
        let host = self.hostname();
        // Trailing dots go (so the form is idempotent); a name that is only
        // dots keeps them (the grammar allows it).
        let host = match host.trim_end_matches('.') {
            "" => host,
            stripped => stripped,
        };
        host.to_ascii_lowercase()
    }

    /// Whether a configured pattern (`origin_deny`, `origin_allow`) names
    /// this server: compared in normalized form; a pattern without a port
    /// matches every port of its host, one with a port only that port.
    pub fn matches_pattern(&self, pattern: &str) -> bool {
        let Ok(pattern) = ServerName::parse(pattern.trim()) else {
            return false;
        };
        if pattern.port().is_none() {
            pattern.normalized_host() == self.normalized_host()
        } else {
            pattern.normalized() == self.normalized()
        }
    }

    /// The host, classified as an IP literal or a DNS name.
    pub fn host(&self) -> Host<'_> {
        classify_host(self.hostname()).unwrap_or(Host::Dns(self.hostname()))
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn classify_host(hostname: &str) -> Option<Host<'_>> {
    if let Some(inner) = hostname.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        if inner.len() < 2 || inner.len() > 45 {
            return None;
        }
        return inner.parse().ok().map(Host::Ipv6);
    }
    let all_digits_and_dots = hostname.chars().all(|c| c.is_ascii_digit() || c == '.');
    if all_digits_and_dots && hostname.split('.').count() == 4 {
        return hostname.parse().ok().map(Host::Ipv4);
    }
    let dns_ok = !hostname.is_empty()
        && hostname.len() <= 255
        && hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    dns_ok.then_some(Host::Dns(hostname))
}

/// Splits `host[:port]` into a valid host and an optional port in 1..=65535.
fn split_host_port(raw: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if raw.starts_with('[') {
        let close = raw.find(']')?;
        let (host, rest) = raw.split_at(close + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        }
    };
    classify_host(host)?;
    let port = match port {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let n: u16 = p.parse().ok()?;
            if n == 0 {
                return None;
            }
            Some(n)
        }
    };
    Some((host, port))
}

/// A user ID `@localpart:server_name`. The localpart is accepted in its
/// historical form (any character but `:` and NUL); the server part must be a
/// valid server name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId {
    raw: String,
    /// Byte offset of the first `:`.
    colon: usize,
}

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, IdentifierError> {
        let bad = || IdentifierError::BadUserId(raw.to_owned());
        if raw.len() > MAX_USER_ID_LEN || !raw.starts_with('@') {
            return Err(bad());
        }
        let colon = raw.find(':').ok_or_else(bad)?;
        let localpart = &raw[1..colon];
        if localpart.contains('\0') {
            return Err(bad());
        }
        ServerName::parse(&raw[colon + 1..]).map_err(|_| bad())?;
        Ok(UserId {
            raw: raw.to_owned(),
            colon,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn localpart(&self) -> &str {
        &self.raw[1..self.colon]
    }

    /// The server name: everything after the first `:`.
    pub fn server_name(&self) -> &str {
        &self.raw[self.colon + 1..]
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_the_spec_parse() {
        for ok in [
            "matrix.org",
            "matrix.org:8888",
            "1.2.3.4",
            "1.2.3.4:1234",
            "[1234:5678::abcd]",
            "[1234:5678::abcd]:5678",
            "localhost:38448",
        ] {
            assert!(ServerName::parse(ok).is_ok(), "{ok} should parse");
        }
        for bad in [
            "",
            "a:0",
            "a:65536",
            "a:",
            "a b",
            "[::1",
            "[zz::1]",
            "a:1:2",
            "ex_ample.org",
        ] {
            assert!(ServerName::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn normalized_names_fold_case_trailing_dot_and_default_port() {
        let n = |raw: &str| ServerName::parse(raw).expect("valid").normalized();
        assert_eq!(n("EVIL.example"), "evil.example");
        assert_eq!(n("evil.example."), "evil.example");
        assert_eq!(n("evil.example:8448"), "evil.example");
        assert_eq!(n("Evil.Example.:8449"), "evil.example:8449");
        assert_eq!(n("[::1]:8448"), "[::1]");
        let name = ServerName::parse("EVIL.example.:9000").expect("valid");
        assert!(name.matches_pattern("evil.example"));
        assert!(name.matches_pattern("evil.EXAMPLE:9000"));
        assert!(!name.matches_pattern("evil.example:9001"));
        assert!(!name.matches_pattern("other.example"));
        assert!(!name.matches_pattern("not a name"));
    }

    #[test]
    fn server_name_parts() {
        let s = ServerName::parse("[::1]:8448").expect("valid");
        assert_eq!(s.hostname(), "[::1]");
        assert_eq!(s.port(), Some(8448));
        assert_eq!(s.host(), Host::Ipv6("::1".parse().expect("ip")));
        let d = ServerName::parse("example.org").expect("valid");
        assert_eq!(d.host(), Host::Dns("example.org"));
        assert_eq!(d.port(), None);
    }

    #[test]
    fn user_id_server_is_after_first_colon() {
        let u = UserId::parse("@alice:localhost:8448").expect("valid");
        assert_eq!(u.localpart(), "alice");
        assert_eq!(u.server_name(), "localhost:8448");
        assert!(UserId::parse("alice:example.org").is_err());
        assert!(UserId::parse("@alice").is_err());
        assert!(UserId::parse("@alice:bad host").is_err());
        assert!(UserId::parse(&format!("@{}:example.org", "a".repeat(250))).is_err());
    }
}
