//! Server discovery (SPEC §6): from a destination's server name to the
//! addresses to connect to, the TLS name to verify (and send as SNI) and the
//! `Host` header. It follows the spec's table in order: IP literal, explicit
//! port, `/.well-known/matrix/server` (cached per its headers, failures
//! cached with backoff), SRV `_matrix-fed._tcp` then `_matrix._tcp`, and
//! finally port 8448. It never fails because `.well-known` failed: that only
//! moves on to SRV.
//!
//! Every resolution runs under one total deadline
//! (`federation.discovery_timeout_ms`): `.well-known` gets at most half of
//! it for all its redirect hops and the body together, SRV targets (at most
//! [`MAX_SRV_TARGETS`]) are resolved concurrently, and a resolution that
//! runs out of time is a `Discovery` error the sender backs off on. The
//! `.well-known` cache is bounded in entries ([`WELL_KNOWN_CACHE_ENTRIES`]),
//! least recently used first, fresh or not.
//!
//! Discovery does not connect to the addresses it returns and does not check
//! them against the denylist: the connector does both, for every address.
//! The X-Matrix `destination` stays the server name whatever this returns.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use rustls_pki_types::ServerName as TlsName;
use tokio::time::Instant;

use crate::federation::outbound::client_error::ClientError;
use crate::federation::outbound::connector::{DirectConnector, Endpoint};
use crate::federation::outbound::dns::{DnsError, DnsResolver, lookup_host, order_srv};
use crate::federation::outbound::lru::LruMap;
use crate::federation::outbound::well_known;
use crate::identifiers::{Host, ServerName};

/// The default federation port.
pub const DEFAULT_PORT: u16 = 8448;
/// `.well-known` outcomes (answers and failures) remembered at most; the
/// least recently used goes first, even when still fresh.
pub const WELL_KNOWN_CACHE_ENTRIES: usize = 10_000;
/// SRV targets resolved at most per service (RFC 2782 order); the rest are
/// ignored, so a record set cannot multiply the lookups.
pub const MAX_SRV_TARGETS: usize = 8;

/// A remembered `.well-known` outcome.
#[derive(Debug, Clone)]
struct WellKnownEntry {
    /// The delegated server name, or None after a failure.
    delegated: Option<ServerName>,
    expires: Instant,
    /// Consecutive failures (for the failure backoff).
    failures: u32,
}

/// Resolves server names; shared by every connection.
pub struct Discovery {
    resolver: Arc<dyn DnsResolver>,
    well_known_client: Client<DirectConnector, Empty<Bytes>>,
    well_known_port: u16,
    /// The whole `.well-known` fetch (every hop and the body).
    well_known_timeout: Duration,
    /// The whole resolution.
    deadline: Duration,
    cache: Mutex<LruMap<String, WellKnownEntry>>,
}

impl Discovery {
    /// `deadline` bounds each resolution; `.well-known` gets at most half
    /// of it and at most `fetch_timeout`.
    pub(crate) fn new(
        resolver: Arc<dyn DnsResolver>,
        well_known_client: Client<DirectConnector, Empty<Bytes>>,
        well_known_port: u16,
        fetch_timeout: Duration,
        deadline: Duration,
    ) -> Self {
        Discovery {
            resolver,
            well_known_client,
            well_known_port,
            well_known_timeout: fetch_timeout.min(deadline / 2),
            deadline,
            cache: Mutex::new(LruMap::new(WELL_KNOWN_CACHE_ENTRIES)),
        }
    }

    /// Resolves `server_name` per SPEC §6.1, within the discovery deadline.
    pub async fn resolve(&self, server_name: &ServerName) -> Result<Endpoint, ClientError> {
        let until = Instant::now() + self.deadline;
        let endpoint =
            match tokio::time::timeout_at(until, self.resolve_inner(server_name, until)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(ClientError::Discovery {
                        destination: server_name.as_str().to_owned(),
                        reason: format!("timed out after {:?}", self.deadline),
                    });
                }
            };
        tracing::debug!(
            destination = %server_name,
            addrs = ?endpoint.addrs,
            tls_name = ?endpoint.tls_name,
            host = %endpoint.host_header,
            "resolved"
        );
        Ok(endpoint)
    }

    async fn resolve_inner(
        &self,
        server_name: &ServerName,
        until: Instant,
    ) -> Result<Endpoint, ClientError> {
        let destination = server_name.as_str();
        // Step 1: an IP literal.
        if let Some(ip) = ip_literal(server_name) {
            return Ok(ip_endpoint(ip, server_name.port(), server_name.as_str()));
        }
        let hostname = server_name.hostname();
        // Step 2: a hostname with an explicit port.
        if let Some(port) = server_name.port() {
            let addrs = self.addresses(destination, hostname, port).await?;
            return Ok(Endpoint {
                addrs,
                tls_name: dns_tls_name(destination, hostname)?,
                host_header: server_name.as_str().to_owned(),
            });
        }
        // Step 3: .well-known delegation.
        if let Some(delegated) = self.well_known(hostname).await {
            if let Some(ip) = ip_literal(&delegated) {
                return Ok(ip_endpoint(ip, delegated.port(), delegated.as_str()));
            }
            let delegated_host = delegated.hostname();
            if let Some(port) = delegated.port() {
                let addrs = self.addresses(destination, delegated_host, port).await?;
                return Ok(Endpoint {
                    addrs,
                    tls_name: dns_tls_name(destination, delegated_host)?,
                    host_header: delegated.as_str().to_owned(),
                });
            }
            return self
                .srv_or_default(destination, delegated_host, until)
                .await;
        }
        // Steps 4–6: SRV on the original hostname, then 8448.
        self.srv_or_default(destination, hostname, until).await
    }

    /// SRV `_matrix-fed._tcp`, then `_matrix._tcp`, then `hostname:8448`;
    /// TLS name and `Host` are `hostname` throughout. Target lookups still
    /// unanswered a quarter of the deadline before `until` are skipped, so
    /// the targets that did answer are used.
    async fn srv_or_default(
        &self,
        destination: &str,
        hostname: &str,
        until: Instant,
    ) -> Result<Endpoint, ClientError> {
        let targets_until = until.checked_sub(self.deadline / 4).unwrap_or(until);
        let tls_name = dns_tls_name(destination, hostname)?;
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let name = format!("{service}.{hostname}");
            let records = match self.resolver.lookup_srv(&name).await {
                Ok(records) => {
                    order_srv(records, crate::federation::sender::backoff::jitter_sample)
                }
                Err(DnsError::NotFound(_)) => continue,
                Err(error) => return Err(discovery_error(destination, error)),
            };
            if records.is_empty() {
                // Only "." targets: the service is explicitly not offered.
                continue;
            }
            // Every target at once (the first few, in SRV order); the
            // addresses keep that order.
            let mut lookups = tokio::task::JoinSet::new();
            for (index, record) in records.iter().take(MAX_SRV_TARGETS).enumerate() {
                let resolver = self.resolver.clone();
                let target = record.target.clone();
                lookups.spawn(async move {
                    let lookup = lookup_host(resolver.as_ref(), &target);
                    let answer = match tokio::time::timeout_at(targets_until, lookup).await {
                        Ok(answer) => answer,
                        Err(_) => Err(DnsError::Failed {
                            name: target.clone(),
                            reason: "timed out".to_owned(),
                        }),
                    };
                    (index, answer)
                });
            }
            let mut answers = Vec::with_capacity(lookups.len());
            while let Some(joined) = lookups.join_next().await {
                match joined {
                    Ok(answer) => answers.push(answer),
                    Err(error) => answers.push((
                        usize::MAX,
                        Err(DnsError::Failed {
                            name: name.clone(),
                            reason: format!("lookup task failed: {error}"),
                        }),
                    )),
                }
            }
            answers.sort_by_key(|(index, _)| *index);
            let mut addrs = Vec::new();
            let mut last_error = None;
            for (index, answer) in answers {
                match (answer, records.get(index)) {
                    (Ok(ips), Some(record)) => {
                        addrs.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, record.port)))
                    }
                    (Ok(_), None) => {}
                    (Err(error), _) => last_error = Some(error),
                }
            }
            if addrs.is_empty() {
                let error = last_error.unwrap_or_else(|| DnsError::NotFound(name.clone()));
                return Err(discovery_error(destination, error));
            }
            return Ok(Endpoint {
                addrs,
                tls_name,
                host_header: hostname.to_owned(),
            });
        }
        let addrs = self.addresses(destination, hostname, DEFAULT_PORT).await?;
        Ok(Endpoint {
            addrs,
            tls_name,
            host_header: hostname.to_owned(),
        })
    }

    async fn lookup_ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        lookup_host(self.resolver.as_ref(), host).await
    }

    async fn addresses(
        &self,
        destination: &str,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, ClientError> {
        let ips = self
            .lookup_ips(host)
            .await
            .map_err(|e| discovery_error(destination, e))?;
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    /// The delegated server name from `.well-known`, cached; None when the
    /// lookup failed or the answer was invalid (discovery moves on).
    async fn well_known(&self, hostname: &str) -> Option<ServerName> {
        let now = Instant::now();
        let previous_failures = {
            let mut cache = crate::sync::lock(&self.cache);
            match cache.get(&hostname.to_owned()) {
                Some(entry) if entry.expires > now => return entry.delegated.clone(),
                Some(entry) => entry.failures,
                None => 0,
            }
        };
        let outcome =
            match tokio::time::timeout(self.well_known_timeout, self.fetch_well_known(hostname))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timed out after {:?}", self.well_known_timeout)),
            };
        let now = Instant::now();
        let entry = match outcome {
            Ok((delegated, period)) => {
                tracing::debug!(hostname, %delegated, ?period, "well-known delegation");
                WellKnownEntry {
                    delegated: Some(delegated),
                    expires: now + period,
                    failures: 0,
                }
            }
            Err(reason) => {
                let failures = previous_failures.saturating_add(1);
                let period = well_known::failure_period(failures);
                tracing::debug!(hostname, %reason, ?period, "no valid well-known");
                WellKnownEntry {
                    delegated: None,
                    expires: now + period,
                    failures,
                }
            }
        };
        let delegated = entry.delegated.clone();
        crate::sync::lock(&self.cache).insert(hostname.to_owned(), entry);
        delegated
    }

    /// GETs `https://<hostname>:<well_known_port>/.well-known/matrix/server`,
    /// following redirects without loops.
    async fn fetch_well_known(&self, hostname: &str) -> Result<(ServerName, Duration), String> {
        let authority = if self.well_known_port == 443 {
            hostname.to_owned()
        } else {
            format!("{hostname}:{}", self.well_known_port)
        };
        let mut uri: Uri = format!("https://{authority}/.well-known/matrix/server")
            .parse()
            .map_err(|e| format!("bad well-known URI: {e}"))?;
        let mut seen = HashSet::new();
        for _ in 0..=well_known::MAX_REDIRECTS {
            if !seen.insert(uri.to_string()) {
                return Err(format!("redirect loop at {uri}"));
            }
            let request = http::Request::get(uri.clone())
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            // The caller bounds all hops and the body together.
            let response =
                self.well_known_client.request(request).await.map_err(|e| {
                    crate::federation::outbound::client_error::describe_hyper_error(&e)
                })?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or("redirect without Location")?;
                uri = follow(&uri, location)?;
                continue;
            }
            if status != StatusCode::OK {
                return Err(format!("status {status}"));
            }
            let period = well_known::cache_period(response.headers(), SystemTime::now());
            let body = Limited::new(response.into_body(), well_known::MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading body: {e}"))?
                .to_bytes();
            let delegated = well_known::parse_body(&body)?;
            return Ok((delegated, period));
        }
        Err("too many redirects".to_owned())
    }
}

/// Resolves a `Location` against the current URI; only https is followed.
fn follow(current: &Uri, location: &str) -> Result<Uri, String> {
    let next: Uri = if location.starts_with('/') {
        let authority = current.authority().ok_or("no authority")?;
        format!("https://{authority}{location}")
            .parse()
            .map_err(|e| format!("bad Location: {e}"))?
    } else {
        location.parse().map_err(|e| format!("bad Location: {e}"))?
    };
    if next.scheme_str() != Some("https") || next.authority().is_none() {
        return Err(format!("refusing redirect to {location}"));
    }
    Ok(next)
}

fn ip_literal(name: &ServerName) -> Option<IpAddr> {
    match name.host() {
        Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        Host::Dns(_) => None,
    }
}

fn ip_endpoint(ip: IpAddr, port: Option<u16>, host_header: &str) -> Endpoint {
    Endpoint {
        addrs: vec![SocketAddr::new(ip, port.unwrap_or(DEFAULT_PORT))],
        tls_name: TlsName::IpAddress(ip.into()),
        host_header: host_header.to_owned(),
    }
}

fn dns_tls_name(destination: &str, hostname: &str) -> Result<TlsName<'static>, ClientError> {
    TlsName::try_from(hostname.to_owned()).map_err(|e| ClientError::Discovery {
        destination: destination.to_owned(),
        reason: format!("{hostname} is not a valid TLS name: {e}"),
    })
}

fn discovery_error(destination: &str, error: DnsError) -> ClientError {
    ClientError::Discovery {
        destination: destination.to_owned(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fresh entries are evicted too: a flood of new names (every one with a
    /// 48 h `.well-known` answer) never grows the cache past its bound.
    #[test]
    fn more_fresh_well_known_entries_than_the_bound_keep_the_cache_at_the_bound() {
        let mut cache = LruMap::new(WELL_KNOWN_CACHE_ENTRIES);
        let expires = Instant::now() + well_known::MAX_CACHE;
        for n in 0..WELL_KNOWN_CACHE_ENTRIES * 2 + 7 {
            let delegated = if n % 2 == 0 {
                ServerName::parse(&format!("d{n}.example:8448")).ok()
            } else {
                None // failures count against the bound as well
            };
            cache.insert(
                format!("r{n}.evil.example"),
                WellKnownEntry {
                    delegated,
                    expires,
                    failures: 0,
                },
            );
            assert!(cache.len() <= WELL_KNOWN_CACHE_ENTRIES);
        }
        assert_eq!(cache.len(), WELL_KNOWN_CACHE_ENTRIES);
        assert_eq!(cache.order_len(), WELL_KNOWN_CACHE_ENTRIES);
        // The newest names are the ones kept.
        let last = format!("r{}.evil.example", WELL_KNOWN_CACHE_ENTRIES * 2 + 6);
        assert!(cache.get(&last).is_some());
        assert!(cache.get(&"r0.evil.example".to_owned()).is_none());
    }
}
