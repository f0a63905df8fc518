//! E2EE test identities and a signed federation client: devices with real
//! ed25519 keys that sign their device keys, one-time and fallback keys as
//! a client would (ed25519-dalek over Courier's canonical JSON, without
//! `signatures` and `unsigned`), cross-signing keys, and `FedClient`, which
//! sends X-Matrix-signed requests from a fake origin to a relay's
//! federation listener over real TLS.

use std::sync::Arc;
use std::time::Duration;

use courier::canonical_json::to_canonical_bytes;
use courier::keys::ServerSigningKey;
use courier::signing::encode_base64;
use courier::xmatrix::{RequestToSign, sign_request};
use ed25519_dalek::{Signer, SigningKey};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName as TlsName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::TestRelay;

/// Signs `value` in place: `signatures[entity][key_id]` over the canonical
/// JSON of the object without `signatures` and `unsigned`.
pub fn sign(value: &mut Value, entity: &str, key_id: &str, key: &SigningKey) {
    let mut unsigned = value.clone();
    let object = unsigned.as_object_mut().expect("an object to sign");
    object.remove("signatures");
    object.remove("unsigned");
    let bytes = to_canonical_bytes(&unsigned).expect("canonical JSON");
    let signature = encode_base64(&key.sign(&bytes).to_bytes());
    let signatures = value
        .as_object_mut()
        .expect("object")
        .entry("signatures")
        .or_insert_with(|| json!({}));
    signatures
        .as_object_mut()
        .expect("signatures object")
        .entry(entity)
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("entity object")
        .insert(key_id.to_owned(), json!(signature));
}

/// Unpadded base64 of an ed25519 public key.
pub fn public_key(key: &SigningKey) -> String {
    encode_base64(key.verifying_key().as_bytes())
}

/// A key from a one-byte seed (tests want distinct, repeatable keys).
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A local device with its access token and ed25519 identity key.
pub struct TestDevice {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
    pub ed25519: SigningKey,
    pub curve25519: String,
}

impl TestDevice {
    /// Registers the device on `relay` over the RPC.
    pub async fn register(relay: &TestRelay, localpart: &str, device_id: &str, seed: u8) -> Self {
        let user_id = format!("@{localpart}:{}", relay.server_name);
        let token = format!("token-{localpart}-{device_id}");
        relay.register_device(&user_id, device_id, &token).await;
        TestDevice {
            user_id,
            device_id: device_id.to_owned(),
            token,
            ed25519: key(seed),
            curve25519: encode_base64(&[seed.wrapping_add(100); 32]),
        }
    }

    pub fn ed25519_id(&self) -> String {
        format!("ed25519:{}", self.device_id)
    }

    /// The device's unsigned `device_keys` object.
    pub fn device_keys_unsigned(&self) -> Value {
        json!({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", self.device_id): self.curve25519,
                self.ed25519_id(): public_key(&self.ed25519),
            },
        })
    }

    /// The device's self-signed `device_keys` object.
    pub fn device_keys(&self) -> Value {
        let mut keys = self.device_keys_unsigned();
        sign(&mut keys, &self.user_id, &self.ed25519_id(), &self.ed25519);
        keys
    }

    /// A signed `signed_curve25519` key object (`fallback: true` when asked).
    pub fn key_object(&self, n: u8, fallback: bool) -> Value {
        let mut object = json!({ "key": encode_base64(&[n; 32]) });
        if fallback {
            object["fallback"] = json!(true);
        }
        sign(
            &mut object,
            &self.user_id,
            &self.ed25519_id(),
            &self.ed25519,
        );
        object
    }

    /// `{"signed_curve25519:<id>": key}` for each `n` of `ns`.
    pub fn one_time_keys(&self, ns: impl IntoIterator<Item = u8>) -> Value {
        let mut out = serde_json::Map::new();
        for n in ns {
            out.insert(
                format!("signed_curve25519:AAAA{n:03}"),
                self.key_object(n, false),
            );
        }
        Value::Object(out)
    }
}

/// A cross-signing key object of `user_id` for `usage`, unsigned.
pub fn cross_signing_key(user_id: &str, usage: &str, key: &SigningKey) -> Value {
    let public = public_key(key);
    json!({
        "user_id": user_id,
        "usage": [usage],
        "keys": { format!("ed25519:{public}"): public },
    })
}

/// A reply from the federation listener.
pub struct Reply {
    pub status: u16,
    pub json: Value,
}

/// X-Matrix-signed requests from a fake origin to a relay over real TLS.
pub struct FedClient {
    connector: TlsConnector,
    addr: std::net::SocketAddr,
    destination: String,
    pub origin: String,
    pub key: ServerSigningKey,
}

impl FedClient {
    /// A client for `relay` signing as `origin` with `key` (the relay must
    /// already trust that key).
    pub fn new(relay: &TestRelay, origin: &str, key: ServerSigningKey) -> FedClient {
        courier::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let ca = super::relay::repo_root().join("certs/dev-ca.crt");
        for cert in CertificateDer::pem_file_iter(&ca).expect("dev CA readable") {
            roots
                .add(cert.expect("dev CA parses"))
                .expect("dev CA added");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        FedClient {
            connector: TlsConnector::from(Arc::new(config)),
            addr: relay.federation_addr,
            destination: relay.server_name.clone(),
            origin: origin.to_owned(),
            key,
        }
    }

    /// Sends a signed request (or an unsigned one when `signed` is false).
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
        signed: bool,
    ) -> Reply {
        let tcp = TcpStream::connect(self.addr).await.expect("tcp connect");
        let tls = self
            .connector
            .connect(TlsName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("TLS handshake with the relay");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http handshake");
        tokio::spawn(connection);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header("Host", "localhost");
        if signed {
            let header = sign_request(
                &self.key,
                &RequestToSign {
                    method,
                    uri: target,
                    origin: &self.origin,
                    destination: &self.destination,
                    content: body,
                },
            )
            .expect("signable")
            .to_header_value();
            builder = builder.header("Authorization", header);
        }
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let request = builder
            .body(Full::new(Bytes::from(bytes)))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .expect("answer within 30 s")
            .expect("answer");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }
}
