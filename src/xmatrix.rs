//! The X-Matrix `Authorization` header (SPEC §4): parsing, printing, and
//! signing/verifying request objects.
//!
//! It owns the header grammar and the bytes of the signed request object. It
//! does not look up keys, check `destination` against our name, or map
//! errors to HTTP statuses (the inbound federation layer does).
//!
//! Architecture Invariant: the parser reads untrusted network input and never
//! panics; every malformed header is an [`XMatrixError`].

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::canonical_json::{
    CanonicalJsonError, NumberStyle, has_non_spec_numbers, write_canonical_with, write_string,
};
use crate::identifiers::ServerName;
use crate::keys::ServerSigningKey;
use crate::signing::verify_bytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XMatrixError {
    #[error("not an X-Matrix header")]
    NotXMatrix,
    #[error("malformed X-Matrix header: {0}")]
    Malformed(String),
    #[error("X-Matrix header lacks {0}")]
    Missing(&'static str),
    #[error("signing: {0}")]
    Signing(#[from] crate::signing::SigningError),
}

/// One parsed `Authorization: X-Matrix ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XMatrix {
    pub origin: String,
    pub destination: Option<String>,
    pub key: String,
    pub sig: String,
}

const SCHEME: &str = "X-Matrix";

fn is_ows(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// Splits a header value into its auth scheme and the rest, if the value
/// starts with the X-Matrix scheme (case-insensitive) followed by whitespace
/// or the end.
fn strip_scheme(header_value: &str) -> Option<&str> {
    let value = header_value.trim_matches(|c| c == ' ' || c == '\t');
    let head = value.get(..SCHEME.len())?;
    if !head.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    match rest.bytes().next() {
        None => Some(rest),
        Some(byte) if is_ows(byte) => Some(rest),
        Some(_) => None,
    }
}

/// Whether a header value uses the X-Matrix scheme (case-insensitive).
pub fn is_xmatrix(header_value: &str) -> bool {
    strip_scheme(header_value).is_some()
}

/// A cursor over the parameter list.
struct Params<'a> {
    bytes: &'a [u8],
    text: &'a str,
    position: usize,
}

impl<'a> Params<'a> {
    fn skip_ows(&mut self) {
        while self.bytes.get(self.position).copied().is_some_and(is_ows) {
            self.position += 1;
        }
    }

    /// Skips whitespace and empty list elements (`a=1, ,b=2`); returns
    /// whether a parameter follows.
    fn skip_separators(&mut self) -> bool {
        while let Some(&byte) = self.bytes.get(self.position) {
            if is_ows(byte) || byte == b',' {
                self.position += 1;
            } else {
                return true;
            }
        }
        false
    }

    /// Reads `name BWS "=" BWS value`; the name is lower-cased.
    fn next_param(&mut self) -> Result<(String, String), XMatrixError> {
        let start = self.position;
        while self
            .bytes
            .get(self.position)
            .is_some_and(|&b| b != b'=' && b != b',' && !is_ows(b))
        {
            self.position += 1;
        }
        let name = &self.text[start..self.position];
        if name.is_empty() {
            return Err(XMatrixError::Malformed("empty parameter name".to_owned()));
        }
        if !name.bytes().all(is_token_byte) {
            return Err(XMatrixError::Malformed(format!(
                "invalid parameter name {name:?}"
            )));
        }
        self.skip_ows();
        if self.bytes.get(self.position) != Some(&b'=') {
            return Err(XMatrixError::Malformed(format!(
                "parameter {name:?} has no value"
            )));
        }
        self.position += 1;
        self.skip_ows();
        let value = if self.bytes.get(self.position) == Some(&b'"') {
            self.quoted_string()?
        } else {
            self.token_value()
        };
        self.skip_ows();
        match self.bytes.get(self.position) {
            None | Some(b',') => Ok((name.to_ascii_lowercase(), value)),
            Some(_) => Err(XMatrixError::Malformed(format!(
                "unexpected text after parameter {name:?}"
            ))),
        }
    }

    /// An unquoted value: everything up to a comma, whitespace or quote. This
    /// is wider than RFC 9110's `token` on purpose: old servers send
    /// `key=ed25519:1`, and padded base64 contains `=`.
    fn token_value(&mut self) -> String {
        let start = self.position;
        while self
            .bytes
            .get(self.position)
            .is_some_and(|&b| b != b',' && b != b'"' && !is_ows(b))
        {
            self.position += 1;
        }
        self.text[start..self.position].to_owned()
    }

    /// A quoted-string starting at the opening quote; `\x` becomes `x`.
    fn quoted_string(&mut self) -> Result<String, XMatrixError> {
        self.position += 1;
        let mut value = String::new();
        let mut run_start = self.position;
        loop {
            match self.bytes.get(self.position) {
                None => {
                    return Err(XMatrixError::Malformed(
                        "unterminated quoted string".to_owned(),
                    ));
                }
                Some(b'"') => {
                    value.push_str(&self.text[run_start..self.position]);
                    self.position += 1;
                    return Ok(value);
                }
                Some(b'\\') => {
                    value.push_str(&self.text[run_start..self.position]);
                    self.position += 1;
                    // The escaped character may be multi-byte; take it whole.
                    let escaped = self.text[self.position..].chars().next().ok_or_else(|| {
                        XMatrixError::Malformed("unterminated quoted string".to_owned())
                    })?;
                    value.push(escaped);
                    self.position += escaped.len_utf8();
                    run_start = self.position;
                }
                Some(_) => self.position += 1,
            }
        }
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

impl XMatrix {
    /// Parses a header value (`X-Matrix origin="...",...`).
    pub fn parse(header_value: &str) -> Result<Self, XMatrixError> {
        let rest = strip_scheme(header_value).ok_or(XMatrixError::NotXMatrix)?;
        let mut params = Params {
            bytes: rest.as_bytes(),
            text: rest,
            position: 0,
        };
        let (mut origin, mut destination, mut key, mut sig) = (None, None, None, None);
        while params.skip_separators() {
            let (name, value) = params.next_param()?;
            let slot = match name.as_str() {
                "origin" => &mut origin,
                "destination" => &mut destination,
                "key" => &mut key,
                "sig" => &mut sig,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(XMatrixError::Malformed(format!(
                    "parameter {name:?} appears twice"
                )));
            }
        }
        let origin = origin.ok_or(XMatrixError::Missing("origin"))?;
        let key = key.ok_or(XMatrixError::Missing("key"))?;
        let sig = sig.ok_or(XMatrixError::Missing("sig"))?;
        ServerName::parse(&origin).map_err(|_| {
            XMatrixError::Malformed(format!("origin {origin:?} is not a server name"))
        })?;
        if key.is_empty() {
            return Err(XMatrixError::Malformed("empty key".to_owned()));
        }
        if sig.is_empty() {
            return Err(XMatrixError::Malformed("empty sig".to_owned()));
        }
        Ok(XMatrix {
            origin,
            destination,
            key,
            sig,
        })
    }

    /// Prints the header value, every parameter quoted.
    pub fn to_header_value(&self) -> String {
        let mut out = String::with_capacity(
            SCHEME.len() + 48 + self.origin.len() + self.key.len() + self.sig.len(),
        );
        out.push_str(SCHEME);
        push_param(&mut out, " origin=\"", &self.origin);
        if let Some(destination) = &self.destination {
            push_param(&mut out, ",destination=\"", destination);
        }
        push_param(&mut out, ",key=\"", &self.key);
        push_param(&mut out, ",sig=\"", &self.sig);
        out
    }
}

fn push_param(out: &mut String, prefix: &str, value: &str) {
    out.push_str(prefix);
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Parses every X-Matrix value among a request's `Authorization` headers
/// (other schemes are skipped). Any malformed X-Matrix header is an error;
/// none at all is [`XMatrixError::NotXMatrix`]; headers naming different
/// origins are [`XMatrixError::Malformed`] (SPEC §4.2, §4.3 steps 1–2).
pub fn parse_authorization_headers<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<XMatrix>, XMatrixError> {
    let mut headers: Vec<XMatrix> = Vec::new();
    for value in values.into_iter().filter(|value| is_xmatrix(value)) {
        let header = XMatrix::parse(value)?;
        if let Some(first) = headers.first()
            && first.origin != header.origin
        {
            return Err(XMatrixError::Malformed(
                "X-Matrix headers name different origins".to_owned(),
            ));
        }
        headers.push(header);
    }
    if headers.is_empty() {
        return Err(XMatrixError::NotXMatrix);
    }
    Ok(headers)
}

/// The request object that is signed (SPEC §4.1).
pub struct RequestToSign<'a> {
    pub method: &'a str,
    /// Raw request target (path and query as on the wire).
    pub uri: &'a str,
    pub origin: &'a str,
    pub destination: &'a str,
    /// The parsed body, only when the request has one.
    pub content: Option<&'a Value>,
}

impl RequestToSign<'_> {
    /// The canonical JSON of `{content?, destination, method, origin, uri}`,
    /// written directly (the keys are already in sorted order), so the body
    /// is never cloned.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, CanonicalJsonError> {
        self.canonical_bytes_with(NumberStyle::Spec)
    }

    /// The bytes Courier signs: the spec form, or, when the content holds
    /// floats or out-of-range integers (which Synapse accepts from clients),
    /// the form Synapse's Python `canonicaljson` produces, so that Synapse
    /// can verify it.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, CanonicalJsonError> {
        match self.content {
            Some(content) if has_non_spec_numbers(content) => {
                self.canonical_bytes_with(NumberStyle::Python)
            }
            _ => self.canonical_bytes(),
        }
    }

    /// `canonical_bytes` with a given number style.
    pub fn canonical_bytes_with(&self, style: NumberStyle) -> Result<Vec<u8>, CanonicalJsonError> {
        let mut out =
            Vec::with_capacity(128 + self.uri.len() + self.origin.len() + self.destination.len());
        out.push(b'{');
        if let Some(content) = self.content {
            out.extend_from_slice(b"\"content\":");
            write_canonical_with(content, style, &mut out)?;
            out.push(b',');
        }
        self.write_rest(&mut out);
        Ok(out)
    }

    /// The request object with the body's bytes as received in place of
    /// `content`'s canonical encoding: `{"content":<raw>,"destination":..,
    /// "method":..,"origin":..,"uri":..}`, the other fields written exactly
    /// as [`Self::canonical_bytes_with`] writes them. For a body that is
    /// canonical JSON these are the canonical bytes; `self.content` is
    /// ignored. `raw` must be one JSON value (the caller has checked), so
    /// where the content ends in these bytes is unambiguous.
    pub fn raw_content_bytes(&self, raw: Option<&[u8]>) -> Vec<u8> {
        let raw_len = raw.map_or(0, <[u8]>::len);
        let mut out = Vec::with_capacity(
            128 + raw_len + self.uri.len() + self.origin.len() + self.destination.len(),
        );
        out.push(b'{');
        if let Some(raw) = raw {
            out.extend_from_slice(b"\"content\":");
            out.extend_from_slice(raw);
            out.push(b',');
        }
        self.write_rest(&mut out);
        out
    }

    /// `"destination":..,"method":..,"origin":..,"uri":..}`.
    fn write_rest(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\"destination\":");
        write_string(self.destination, out);
        out.extend_from_slice(b",\"method\":");
        write_string(self.method, out);
        out.extend_from_slice(b",\"origin\":");
        write_string(self.origin, out);
        out.extend_from_slice(b",\"uri\":");
        write_string(self.uri, out);
        out.push(b'}');
    }
}

/// Signs the bytes of a request object; returns the header to send.
pub fn sign_signed_bytes(
    key: &ServerSigningKey,
    origin: &str,
    destination: &str,
    bytes: &[u8],
) -> XMatrix {
    XMatrix {
        origin: origin.to_owned(),
        destination: Some(destination.to_owned()),
        key: key.key_id().to_owned(),
        sig: key.sign_bytes(bytes),
    }
}

/// Signs a request; returns the header to send.
pub fn sign_request(
    key: &ServerSigningKey,
    request: &RequestToSign<'_>,
) -> Result<XMatrix, XMatrixError> {
    let bytes = request
        .signing_bytes()
        .map_err(crate::signing::SigningError::from)?;
    Ok(sign_signed_bytes(
        key,
        request.origin,
        request.destination,
        &bytes,
    ))
}

/// Verifies `header.sig` over `request` with `verify_key`.
///
/// The caller builds `request` with `origin` = `header.origin` and
/// `destination` = our own server name (SPEC §4.3 step 5); an origin that
/// differs from the header's is rejected here as well.
pub fn verify_request(
    header: &XMatrix,
    request: &RequestToSign<'_>,
    verify_key: &VerifyingKey,
) -> Result<(), XMatrixError> {
    if header.origin != request.origin {
        return Err(XMatrixError::Malformed(
            "header origin differs from the request origin".to_owned(),
        ));
    }
    let spec = request.canonical_bytes();
    let first_error = match &spec {
        Ok(bytes) => match verify_bytes(bytes, &header.sig, verify_key) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        },
        Err(error) => crate::signing::SigningError::from(error.clone()),
    };
    // Only content with floats or out-of-range integers has other forms a
    // peer may have signed: Synapse signs over Python canonicaljson's. The
    // lexical form of a number is lost in parsing (`-0` versus `-0.0`,
    // `10` versus `10.0`), so both Python-compatible forms are tried.
    if request.content.is_some_and(has_non_spec_numbers) {
        for style in [NumberStyle::Python, NumberStyle::SpecThenPython] {
            let bytes = request
                .canonical_bytes_with(style)
                .map_err(crate::signing::SigningError::from)?;
            if verify_bytes(&bytes, &header.sig, verify_key).is_ok() {
                return Ok(());
            }
        }
    }
    Err(first_error.into())
}

/// Verifies `header.sig` over the request object built around the body's raw
/// bytes ([`RequestToSign::raw_content_bytes`]): the fast path for a body
/// that the origin sent exactly as it signed it (Courier's sender sends
/// canonical JSON). A failure here says nothing yet; the caller falls back
/// to [`verify_request`] over the parsed body.
pub fn verify_request_raw(
    header: &XMatrix,
    request: &RequestToSign<'_>,
    raw: Option<&[u8]>,
    verify_key: &VerifyingKey,
) -> Result<(), XMatrixError> {
    if header.origin != request.origin {
        return Err(XMatrixError::Malformed(
            "header origin differs from the request origin".to_owned(),
        ));
    }
    verify_bytes(&request.raw_content_bytes(raw), &header.sig, verify_key)?;
    Ok(())
}
