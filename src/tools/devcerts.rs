//! Development certificates: a throwaway CA and leaf certificates signed by
//! it, for loopback relays, the demo and the tests. Nothing here is for
//! production; operators bring real certificates.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// A CA and its key, both PEM.
pub struct DevCa {
    pub cert_pem: String,
    pub key_pem: String,
    params: CertificateParams,
    key: KeyPair,
}

/// A leaf certificate and key, PEM.
pub struct DevLeaf {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(24 * 3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(days as u64 * 24 * 3600)).into();
}

impl DevCa {
    /// A new CA named `common_name`, valid for ten years.
    pub fn generate(common_name: &str) -> Result<DevCa, DevCertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        name.push(DnType::OrganizationName, "Courier development");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 3650);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            params,
            key,
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid
    /// for five years.
    pub fn issue(&self, names: &[&str]) -> Result<DevLeaf, DevCertError> {
        let key = KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 1825);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(DevLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `dev-ca.crt`, `dev-ca.key`, `localhost.crt`, `localhost.key` into
/// `dir` (a leaf for localhost, 127.0.0.1 and ::1).
pub fn write_dev_certs(dir: &Path) -> Result<(), DevCertError> {
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| DevCertError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|source| DevCertError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let ca = DevCa::generate("Courier development CA")?;
    let leaf = ca.issue(&["localhost", "127.0.0.1", "::1"])?;
    write("dev-ca.crt", &ca.cert_pem)?;
    write("dev-ca.key", &ca.key_pem)?;
    write("localhost.crt", &leaf.cert_pem)?;
    write("localhost.key", &leaf.key_pem)?;
    Ok(())
}
