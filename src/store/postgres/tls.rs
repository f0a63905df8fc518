//! TLS to PostgreSQL: the connection string's `sslmode`
//! and the rustls connector the pool and the LISTEN connection share.
//!
//! `sslmode` is honoured as libpq names it, with one deliberate difference:
//! whenever TLS is used, the server certificate is verified (chain against
//! the public web roots plus `[federation] extra_ca`, and the host name), as
//! everywhere else in Courier.
//! - `disable`: never TLS.
//! - `prefer` (the default, as in libpq): TLS when the server offers it,
//!   else plaintext; over a unix socket the server never offers it.
//! - `require`, `verify-ca`, `verify-full`: TLS or no connection.
//!   (tokio-postgres knows only `require`; the two `verify-*` spellings
//!   are accepted and mean the same here, since verification is always on.)
//!
//! Not here: connecting (the pool in `mod.rs`, `wakeup.rs`), the
//! trust store itself (`crate::tls::root_store`).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::ring;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How a connection string asks for TLS, after normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
}

/// Parses a libpq-style connection string or `postgresql://` URL, mapping
/// `sslmode=verify-ca` and `verify-full` to `require` (verification is on
/// in every mode that uses TLS).
pub fn parse_conninfo(conninfo: &str) -> Result<(tokio_postgres::Config, TlsMode), StoreError> {
    let normalised = normalise_sslmode(conninfo);
    let config: tokio_postgres::Config =
        normalised.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Postgres(format!("invalid connection string: {e}"))
        })?;
    let mode = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => TlsMode::Disable,
        tokio_postgres::config::SslMode::Require => TlsMode::Require,
        // Prefer, and any mode a later tokio-postgres adds: TLS when offered.
        _ => TlsMode::Prefer,
    };
    Ok((config, mode))
}

/// Rewrites the value of every `sslmode` key that is `verify-ca` or
/// `verify-full` to `require`, in key=value strings (`sslmode = verify-full`)
/// and URL queries (`?sslmode=verify-full&…`) alike.
fn normalise_sslmode(conninfo: &str) -> String {
    const KEY: &str = "sslmode";
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(at) = rest.find(KEY) {
        let (before, after_key) = rest.split_at(at + KEY.len());
        out.push_str(before);
        rest = after_key;
        // Only a whole key: preceded by a separator or the start.
        let starts_key = before[..at]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || c == '?' || c == '&');
        let value_start = rest.trim_start();
        let Some(value) = value_start.strip_prefix('=') else {
            continue;
        };
        if !starts_key {
            continue;
        }
        let value = value.trim_start();
        let end = value
            .find(|c: char| c.is_whitespace() || c == '&')
            .unwrap_or(value.len());
        // libpq also accepts a single-quoted value.
        let word = value[..end].trim_matches('\'');
        if matches!(word, "verify-full" | "verify-ca") {
            out.push_str("=require");
            rest = &value[end..];
        }
    }
    out.push_str(rest);
    out
}

/// The connector for the pool and the LISTEN connection: rustls (ring)
/// trusting the public roots and `extra_ca`, ALPN `postgresql`.
pub fn connector(extra_ca: &[PathBuf]) -> Result<MakeRustlsConnect, StoreError> {
    let roots = crate::tls::root_store(extra_ca)
        .map_err(|e| StoreError::Postgres(format!("database TLS trust store: {e}")))?;
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Postgres(format!("database TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_from_both_spellings() {
        let cases = [
            ("host=/run/pg user=courier", TlsMode::Prefer),
            ("host=db.example user=c sslmode=disable", TlsMode::Disable),
            ("host=db.example user=c sslmode=prefer", TlsMode::Prefer),
            ("host=db.example user=c sslmode=require", TlsMode::Require),
            (
                "host=db.example user=c sslmode = verify-full",
                TlsMode::Require,
            ),
            ("host=db.example sslmode=verify-ca user=c", TlsMode::Require),
            (
                "host=db.example sslmode='verify-full' user=c",
                TlsMode::Require,
            ),
            (
                "postgresql://c@db.example/courier?sslmode=require",
                TlsMode::Require,
            ),
            (
                "postgresql://c@db.example/courier?application_name=x&sslmode=verify-full",
                TlsMode::Require,
            ),
            (
                "postgresql://c@db.example/courier?sslmode=disable",
                TlsMode::Disable,
            ),
        ];
        for (conninfo, mode) in cases {
            let (config, got) = parse_conninfo(conninfo).expect(conninfo);
            assert_eq!(got, mode, "{conninfo}");
            assert!(!config.get_hosts().is_empty(), "{conninfo}");
        }
    }

    #[test]
    fn other_values_and_keys_are_left_alone() {
        assert_eq!(
            normalise_sslmode("host=x application_name=mysslmode=verify-full"),
            "host=x application_name=mysslmode=verify-full"
        );
        assert_eq!(
            normalise_sslmode("host=x sslmode=verify-fullish"),
            "host=x sslmode=verify-fullish"
        );
        assert!(parse_conninfo("host=x sslmode=bogus").is_err());
        assert!(parse_conninfo("host=x sslmode=allow").is_err());
    }

    #[test]
    fn a_require_url_builds_a_verifying_connector() {
        crate::tls::install_crypto_provider();
        let (_, mode) =
            parse_conninfo("host=db.example user=courier sslmode=require").expect("parse");
        assert_eq!(mode, TlsMode::Require);
        connector(&[]).expect("connector with the public roots");
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing-ca.crt");
        assert!(
            connector(&[missing]).is_err(),
            "an unreadable CA file is an error"
        );
    }
}
