//! The pair's own certificate authority and node certificates.
//!
//! `castor certs --dir DIR --nodes primary,backup` writes `ca.pem` (the CA
//! certificate every node trusts), `ca.key`, and for each node `NODE.pem`
//! and `NODE.key`. A node's certificate names it (DNS subject alternative
//! name = the node name); each daemon is told which name its peer must have.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors making or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        err: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Refusing to overwrite.
    #[error("{0} already exists; pass --force to replace the pair's certificates")]
    Exists(PathBuf),
    /// A node name that cannot be a DNS name.
    #[error("node name '{0}' is not usable as a DNS name (letters, digits, '-' and '.', at most 253 characters)")]
    BadName(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CertError + '_ {
    move |err| CertError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Checks that `name` can be a certificate's DNS name.
pub fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(CertError::BadName(name.to_string()))
    }
}

fn write_file(path: &Path, data: &str, secret: bool) -> Result<(), CertError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))
}

/// Creates a CA and a certificate for each node in `dir`.
pub fn create(dir: &Path, nodes: &[String], force: bool) -> Result<Vec<PathBuf>, CertError> {
    for n in nodes {
        check_name(n)?;
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() && !force {
        return Err(CertError::Exists(ca_pem));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "castor pair CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let mut written = vec![ca_pem.clone(), dir.join("ca.key")];
    write_file(&ca_pem, &ca_cert.pem(), false)?;
    write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);
    for n in nodes {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![n.clone()])?;
        p.distinguished_name.push(DnType::CommonName, n.as_str());
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer)?;
        let (c, k) = (dir.join(format!("{n}.pem")), dir.join(format!("{n}.key")));
        write_file(&c, &cert.pem(), false)?;
        write_file(&k, &key.serialize_pem(), true)?;
        written.extend([c, k]);
    }
    Ok(written)
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = fs::read(path).map_err(io(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let data = fs::read(path).map_err(io(path))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key: {e}"),
    })
}
