//! DNS for server discovery: SRV and address lookups behind a small trait,
//! so that discovery can be driven by the real resolver (hickory, the
//! system's nameservers or `federation.nameservers`) or by answers a test
//! injects. This module resolves names; it does not decide what to do with
//! the answers (discovery) or whether to connect to them (denylist).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// The future a resolver returns.
pub type DnsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DnsError>> + Send + 'a>>;

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name has no record of that type (NXDOMAIN or no data): discovery
    /// falls through to its next step.
    #[error("no records found for {0}")]
    NotFound(String),
    /// The lookup itself failed (timeout, SERVFAIL, no nameserver).
    #[error("looking up {name}: {reason}")]
    Failed { name: String, reason: String },
}

/// One SRV answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target host name, without the trailing dot.
    pub target: String,
}

/// SRV and A/AAAA lookups.
pub trait DnsResolver: Send + Sync + 'static {
    /// The SRV records of `name` (for example `_matrix-fed._tcp.example.org`).
    fn lookup_srv<'a>(&'a self, name: &'a str) -> DnsFuture<'a, Vec<SrvRecord>>;
    /// The IPv6 and IPv4 addresses of `host` (CNAMEs followed).
    fn lookup_ip<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>>;
}

/// The real resolver (hickory).
pub struct HickoryResolver {
    resolver: TokioResolver,
}

impl HickoryResolver {
    /// Uses `nameservers` (UDP and TCP on the given ports) when non-empty,
    /// else the system configuration (`/etc/resolv.conf`). Without a usable
    /// system configuration it starts anyway with no nameserver (logged):
    /// IP-literal and `localhost` destinations still work, every other
    /// lookup fails and those destinations back off.
    pub fn new(nameservers: &[SocketAddr]) -> Result<Self, DnsError> {
        let failed = |reason: String| DnsError::Failed {
            name: "<resolver configuration>".to_owned(),
            reason,
        };
        let builder = if nameservers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                Err(error) => {
                    tracing::error!(%error, "no usable system DNS configuration; set federation.nameservers");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(vec![]),
                        TokioRuntimeProvider::default(),
                    )
                }
            }
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let resolver = builder.build().map_err(|e| failed(e.to_string()))?;
        Ok(HickoryResolver { resolver })
    }
}

/// Absolute form of a host name, so no search domain is appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn map_error(name: &str, error: hickory_resolver::net::NetError) -> DnsError {
    if error.is_no_records_found() || error.is_nx_domain() {
        DnsError::NotFound(name.to_owned())
    } else {
        DnsError::Failed {
            name: name.to_owned(),
            reason: error.to_string(),
        }
    }
}

impl DnsResolver for HickoryResolver {
    fn lookup_srv<'a>(&'a self, name: &'a str) -> DnsFuture<'a, Vec<SrvRecord>> {
        Box::pin(async move {
            let lookup = self
                .resolver
                .srv_lookup(fqdn(name))
                .await
                .map_err(|e| map_error(name, e))?;
            let records: Vec<SrvRecord> = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::SRV(srv) => Some(SrvRecord {
                        priority: srv.priority,
                        weight: srv.weight,
                        port: srv.port,
                        target: srv.target.to_ascii().trim_end_matches('.').to_owned(),
                    }),
                    _ => None,
                })
                .collect();
            if records.is_empty() {
                return Err(DnsError::NotFound(name.to_owned()));
            }
            Ok(records)
        })
    }

    fn lookup_ip<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>> {
        Box::pin(async move {
            let lookup = self
                .resolver
                .lookup_ip(fqdn(host))
                .await
                .map_err(|e| map_error(host, e))?;
            let ips: Vec<IpAddr> = lookup.iter().collect();
            if ips.is_empty() {
                return Err(DnsError::NotFound(host.to_owned()));
            }
            Ok(ips)
        })
    }
}

/// The addresses of `host`: an IP literal as itself, `localhost` names as
/// loopback without asking DNS (RFC 6761; the denylist still refuses them
/// unless `ip_allow` opens loopback), anything else through `resolver`.
pub async fn lookup_host(resolver: &dyn DnsResolver, host: &str) -> Result<Vec<IpAddr>, DnsError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Ok(vec![
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ]);
    }
    resolver.lookup_ip(host).await
}

/// Orders SRV records as RFC 2782 asks: by priority, then within one
/// priority a weighted random order (`unit` draws one sample in [0, 1) per
/// pick). Records whose target is `.` ("no service") are dropped.
pub fn order_srv(mut records: Vec<SrvRecord>, mut unit: impl FnMut() -> f64) -> Vec<SrvRecord> {
    records.retain(|r| !r.target.is_empty() && r.target != ".");
    records.sort_by_key(|r| r.priority);
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|r| r.priority == first.priority)
            .count();
        let mut group: Vec<SrvRecord> = rest[..same].to_vec();
        rest = &rest[same..];
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            let index = if total == 0 {
                0
            } else {
                let target = (unit().clamp(0.0, 0.999_999_999) * total as f64) as u64;
                let mut running = 0;
                group
                    .iter()
                    .position(|r| {
                        running += u64::from(r.weight);
                        running > target
                    })
                    .unwrap_or(0)
            };
            ordered.push(group.remove(index));
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(priority: u16, weight: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port: 8448,
            target: target.to_owned(),
        }
    }

    #[test]
    fn srv_records_are_ordered_by_priority_then_weight() {
        let records = vec![
            srv(20, 0, "c"),
            srv(10, 1, "a"),
            srv(10, 99, "b"),
            srv(5, 0, "."),
        ];
        // A sample of 0.5 lands in b's (heavier) share first.
        let ordered = order_srv(records.clone(), || 0.5);
        let names: Vec<&str> = ordered.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(names, vec!["b", "a", "c"]);
        // A sample of 0 picks the first record of the group.
        let ordered = order_srv(records, || 0.0);
        let names: Vec<&str> = ordered.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
    }
}

#[cfg(test)]
mod resolver_tests {
    use super::*;

    #[tokio::test]
    async fn the_no_nameserver_fallback_builds_and_fails_lookups_cleanly() {
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![]),
            TokioRuntimeProvider::default(),
        )
        .build();
        let resolver = HickoryResolver {
            resolver: resolver.expect("builds"),
        };
        let error = resolver
            .lookup_ip("example.org")
            .await
            .expect_err("no servers");
        assert!(
            matches!(error, DnsError::Failed { .. } | DnsError::NotFound(_)),
            "{error:?}"
        );
    }
}
