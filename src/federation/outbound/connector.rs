//! Connecting to a peer: the `tower::Service<Uri>` connectors that
//! `hyper_util`'s pooled client calls for every new connection. The
//! federation connector connects to the endpoint (addresses and TLS name)
//! the client resolved for the URI authority; the direct connector
//! (for `.well-known` fetches) resolves the URI host itself. Both refuse
//! denylisted addresses before opening any socket, try each address in turn
//! within the connect timeout, and run TLS with the name discovery chose
//! (SNI omitted for IP addresses) and ALPN h2/http1.1. Certificate checks
//! are never disabled. Every federation connection carries its authority's
//! closer ([`Closers`]): when the client closes an authority after a
//! transport failure, its connections read end-of-stream at once, so the
//! pool drops them, idle or not, and their sockets are released.
//!
//! This module does not sign or send requests (client) and does not decide
//! where a server name points (discovery).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName as TlsName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::federation::outbound::client_error::ClientError;
use crate::federation::outbound::denylist::Denylist;
use crate::federation::outbound::dns::{DnsResolver, lookup_host};
use crate::federation::outbound::lru::LruMap;

/// Where and how to reach a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Addresses to try in order.
    pub addrs: Vec<SocketAddr>,
    /// The name the certificate must be valid for; an IP address means no SNI.
    pub tls_name: TlsName<'static>,
    /// The `Host` header to send.
    pub host_header: String,
}

/// Endpoints by the URI authority the connector will be asked for.
pub(crate) type EndpointMap = Arc<std::sync::Mutex<LruMap<String, Endpoint>>>;

/// A TLS connection to a peer, telling the pool whether h2 was negotiated.
/// Once its closer fires it reads end-of-stream and refuses writes.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    closer: Option<Closer>,
}

/// The "close now" signal of one connection (ready for good once fired).
struct Closer {
    fired: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl TlsConn {
    fn new(stream: TlsStream<TcpStream>) -> Self {
        TlsConn {
            stream,
            closer: None,
        }
    }

    /// Whether the closer fired; registers the waker otherwise.
    fn closed(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.closer {
            None => false,
            // The future checks the token first on every poll, so it stays
            // ready once it has been.
            Some(closer) => closer.fired.as_mut().poll(cx).is_ready(),
        }
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed after a failure",
    )
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let (_, session) = self.stream.get_ref();
        if session.alpn_protocol() == Some(b"h2") {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed(cx) {
            // End of stream: the connection task ends and drops the socket.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// One closer per authority (bounded, least recently used evicted): every
/// connection opened to the authority listens to it; `close_all` fires it
/// and starts a new one for later connections.
pub struct Closers {
    tokens: std::sync::Mutex<LruMap<String, CancellationToken>>,
}

impl Closers {
    pub(crate) fn new(capacity: usize) -> Self {
        Closers {
            tokens: std::sync::Mutex::new(LruMap::new(capacity)),
        }
    }

    fn closer(&self, authority: &str) -> Closer {
        let mut tokens = crate::sync::lock(&self.tokens);
        let key = authority.to_owned();
        let token = match tokens.get(&key) {
            Some(token) => token.clone(),
            None => {
                let token = CancellationToken::new();
                tokens.insert(key, token.clone());
                token
            }
        };
        Closer {
            fired: Box::pin(token.cancelled_owned()),
        }
    }

    /// Closes every open connection to `authority` (idle or busy).
    pub(crate) fn close_all(&self, authority: &str) {
        let token = crate::sync::lock(&self.tokens).remove(&authority.to_owned());
        if let Some(token) = token {
            tracing::debug!(authority, "closing connections after a failure");
            token.cancel();
        }
    }
}

/// Opens TLS connections to already-resolved addresses.
pub struct Dialer {
    pub(crate) denylist: Denylist,
    pub(crate) tls: TlsConnector,
    pub(crate) connect_timeout: Duration,
}

impl Dialer {
    /// Connects to the first reachable allowed address in `addrs` and runs
    /// TLS for `tls_name`. `destination` names the peer in errors and logs.
    pub async fn dial(
        &self,
        destination: &str,
        addrs: &[SocketAddr],
        tls_name: &TlsName<'static>,
    ) -> Result<TlsConn, ClientError> {
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|addr| {
                let denied = self.denylist.is_denied(addr.ip());
                if denied {
                    tracing::warn!(destination, address = %addr, "refusing a denylisted address");
                    metrics::counter!("courier_federation_denied_addresses_total").increment(1);
                }
                !denied
            })
            .collect();
        if allowed.is_empty() {
            return Err(ClientError::Denied {
                destination: destination.to_owned(),
            });
        }
        let mut last_error = String::from("no address");
        for addr in allowed {
            let attempt = async {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                self.tls.connect(tls_name.clone(), tcp).await
            };
            match tokio::time::timeout(self.connect_timeout, attempt).await {
                Ok(Ok(stream)) => return Ok(TlsConn::new(stream)),
                Ok(Err(error)) => {
                    tracing::debug!(destination, address = %addr, %error, "connect failed");
                    last_error = format!("{addr}: {error}");
                }
                Err(_) => {
                    tracing::debug!(destination, address = %addr, "connect timed out");
                    last_error = format!("{addr}: timed out");
                }
            }
        }
        Err(ClientError::Connect {
            destination: destination.to_owned(),
            reason: last_error,
        })
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<TokioIo<TlsConn>, ClientError>> + Send>>;

/// Connects to the endpoint the client resolved for the URI authority.
#[derive(Clone)]
pub struct FederationConnector {
    pub(crate) endpoints: EndpointMap,
    pub(crate) closers: Arc<Closers>,
    pub(crate) dialer: Arc<Dialer>,
}

impl tower::Service<Uri> for FederationConnector {
    type Response = TokioIo<TlsConn>;
    type Error = ClientError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let endpoint = crate::sync::lock(&this.endpoints)
                .get(&authority.to_owned())
                .cloned()
                .ok_or_else(|| ClientError::Connect {
                    destination: authority.to_owned(),
                    reason: "no resolved endpoint for this authority".to_owned(),
                })?;
            let mut conn = this
                .dialer
                .dial(authority, &endpoint.addrs, &endpoint.tls_name)
                .await?;
            conn.closer = Some(this.closers.closer(authority));
            Ok(TokioIo::new(conn))
        })
    }
}

/// Connects to `https://host[:port]` as written (for `.well-known`): the
/// host's addresses, the URI port or 443, TLS name = host.
#[derive(Clone)]
pub struct DirectConnector {
    pub(crate) resolver: Arc<dyn DnsResolver>,
    pub(crate) dialer: Arc<Dialer>,
}

impl tower::Service<Uri> for DirectConnector {
    type Response = TokioIo<TlsConn>;
    type Error = ClientError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let (ips, tls_name) = match bare.parse::<IpAddr>() {
                Ok(ip) => (vec![ip], TlsName::IpAddress(ip.into())),
                Err(_) => {
                    let ips = lookup_host(this.resolver.as_ref(), &host)
                        .await
                        .map_err(|e| ClientError::Discovery {
                            destination: host.clone(),
                            reason: e.to_string(),
                        })?;
                    let name =
                        TlsName::try_from(host.clone()).map_err(|e| ClientError::Discovery {
                            destination: host.clone(),
                            reason: e.to_string(),
                        })?;
                    (ips, name)
                }
            };
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| (ip, port).into()).collect();
            let conn = this.dialer.dial(&host, &addrs, &tls_name).await?;
            Ok(TokioIo::new(conn))
        })
    }
}
