//! The pair's own certificate authority and node certificates.
//!
//! `castor certs --dir DIR --nodes primary,backup` writes, in `DIR`, what the
//! daemons load: `ca.pem` (the CA certificate every node trusts) and for each
//! node `NODE.pem` and `NODE.key`. The CA's private key is never written
//! there: it goes to the CA directory (`DIR/ca/` unless `--ca-dir` names
//! another), mode 0700, as `ca.key` beside a copy of `ca.pem`. No daemon
//! reads it; it is needed only to issue certificates, so it belongs offline.
//! A node's certificate names it (DNS subject alternative name = the node
//! name); each daemon is told which name its peer must have.
//!
//! Every certificate expires (`--days`, a year by default). Every file is
//! written atomically: a temporary file in the same directory (created with
//! its final mode, 0600 for keys, so a key is never readable by others even
//! for an instant and whatever file it replaces), fsynced, renamed over the
//! final name, and the directory fsynced.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

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
    /// A certificate outside its validity period.
    #[error("{path}: {what}; make new certificates with `castor certs`")]
    Validity {
        /// The file.
        path: PathBuf,
        /// Expired when, or valid from when.
        what: String,
    },
    /// A validity outside 1..=MAX_DAYS days.
    #[error("--days {0}: a certificate must be valid for 1 to {MAX_DAYS} days")]
    BadDays(u32),
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

/// Validity of the certificates when `--days` is not given.
pub const DEFAULT_DAYS: u32 = 365;
/// The longest validity `castor certs` accepts (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// Name of the CA directory inside `--dir` when no `--ca-dir` is given.
pub const CA_SUBDIR: &str = "ca";
/// File name of the CA certificate (in the node directory and the CA directory).
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA's private key (in the CA directory only).
pub const CA_KEY: &str = "ca.key";
/// How far back a certificate's validity starts, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Checks a validity in days: 1 to [`MAX_DAYS`].
pub fn check_days(days: u32) -> Result<(), CertError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(CertError::BadDays(days))
    }
}

/// The files a node loads from a `castor certs` directory: its certificate,
/// its private key and the CA certificate — nothing else.
pub fn node_files(dir: &Path, node: &str) -> [PathBuf; 3] {
    [
        dir.join(format!("{node}.pem")),
        dir.join(format!("{node}.key")),
        dir.join(CA_CERT),
    ]
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically with file mode `mode`: a new temporary
/// file in the same directory, created with `mode` (never widened, never
/// chmod-ed afterwards), written and fsynced, renamed over `path`, and the
/// directory fsynced. Whatever `path` was before (even a world-readable
/// file), it ends as this new file with this mode.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), CertError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io(dir))
}

/// What `castor certs` makes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory the daemons load (`--certs`): `ca.pem`, `NODE.pem`, `NODE.key`.
    pub dir: PathBuf,
    /// Where the CA's private key goes; `dir/ca` when `None`.
    pub ca_dir: Option<PathBuf>,
    /// The node names.
    pub nodes: Vec<String>,
    /// Validity of every certificate, from now, in days.
    pub days: u32,
    /// Replace an existing CA.
    pub force: bool,
}

impl Options {
    /// The defaults: the CA in `dir/ca`, [`DEFAULT_DAYS`], no overwrite.
    pub fn new(dir: &Path, nodes: &[String]) -> Self {
        Options {
            dir: dir.to_path_buf(),
            ca_dir: None,
            nodes: nodes.to_vec(),
            days: DEFAULT_DAYS,
            force: false,
        }
    }

    /// The CA directory these options write to.
    pub fn ca_dir(&self) -> PathBuf {
        self.ca_dir
            .clone()
            .unwrap_or_else(|| self.dir.join(CA_SUBDIR))
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Created {
    /// The files the nodes load, all in the node directory: `ca.pem` and
    /// every `NODE.pem` / `NODE.key`.
    pub node_files: Vec<PathBuf>,
    /// The CA's private key (outside what the nodes load; keep it offline).
    pub ca_key: PathBuf,
    /// The copy of the CA certificate beside its key.
    pub ca_cert: PathBuf,
    /// When every certificate written expires.
    pub not_after: SystemTime,
    /// A CA key of the old layout (`DIR/ca.key`) that `--force` removed.
    pub removed_legacy_ca_key: Option<PathBuf>,
}

/// Creates a CA and a certificate for each node in `dir`, with the defaults
/// of [`Options::new`] (and `force`).
pub fn create(dir: &Path, nodes: &[String], force: bool) -> Result<Created, CertError> {
    create_with(&Options {
        force,
        ..Options::new(dir, nodes)
    })
}

/// Creates a CA and a certificate for each node as `opts` says.
///
/// Written in this order, each file atomically: the CA key and its copy of
/// the CA certificate, then the node certificates and keys, then `ca.pem` in
/// the node directory last (the file whose presence means "done" and which
/// is refused without `force`).
pub fn create_with(opts: &Options) -> Result<Created, CertError> {
    for n in &opts.nodes {
        check_name(n)?;
    }
    check_days(opts.days)?;
    let dir = &opts.dir;
    let ca_dir = opts.ca_dir();
    create_dir(dir, 0o755)?;
    let ca_pem = dir.join(CA_CERT);
    if ca_pem.exists() && !opts.force {
        return Err(CertError::Exists(ca_pem));
    }
    let ca_key_path = ca_dir.join(CA_KEY);
    if ca_key_path.exists() && !opts.force {
        return Err(CertError::Exists(ca_key_path));
    }
    let now = SystemTime::now();
    let not_before = now - BACKDATE;
    let not_after = now + Duration::from_secs(u64::from(opts.days) * 86_400);
    let validity = |p: &mut CertificateParams| {
        p.not_before = OffsetDateTime::from(not_before);
        p.not_after = OffsetDateTime::from(not_after);
    };

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
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;

    create_dir(&ca_dir, 0o700)?;
    write_atomic(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600)?;
    let ca_copy = ca_dir.join(CA_CERT);
    write_atomic(&ca_copy, ca_cert.pem().as_bytes(), 0o644)?;

    let issuer = Issuer::new(ca_params, ca_key);
    let mut written = Vec::new();
    for n in &opts.nodes {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![n.clone()])?;
        p.distinguished_name.push(DnType::CommonName, n.as_str());
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p);
        let cert = p.signed_by(&key, &issuer)?;
        let [c, k, _] = node_files(dir, n);
        write_atomic(&c, cert.pem().as_bytes(), 0o644)?;
        write_atomic(&k, key.serialize_pem().as_bytes(), 0o600)?;
        written.extend([c, k]);
    }
    write_atomic(&ca_pem, ca_cert.pem().as_bytes(), 0o644)?;
    written.insert(0, ca_pem);

    // The layout before the CA key moved out: a stale secret where the nodes load.
    let legacy = dir.join(CA_KEY);
    let removed_legacy_ca_key = if legacy != ca_key_path && legacy.exists() {
        fs::remove_file(&legacy).map_err(io(&legacy))?;
        sync_dir(dir)?;
        Some(legacy)
    } else {
        None
    };
    Ok(Created {
        node_files: written,
        ca_key: ca_key_path,
        ca_cert: ca_copy,
        not_after,
        removed_legacy_ca_key,
    })
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

/// When `cert` (read from `path`) stops being valid, as seconds since the
/// Unix epoch (negative before 1970), and when it starts.
pub fn validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(i64, i64), CertError> {
    let (_, x) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: format!("not an X.509 certificate: {e}"),
        })?;
    let v = x.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Refuses a node's own certificate that is expired or not yet valid at
/// `now` (a clear error at start-up rather than refused handshakes), and
/// warns when it expires within 30 days.
pub fn check_validity(
    path: &Path,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<(), CertError> {
    let (from, until) = validity(path, cert)?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let date = |t: i64| {
        OffsetDateTime::from_unix_timestamp(t)
            .map_or_else(|_| format!("{t} s after 1970"), |d| d.date().to_string())
    };
    if now > until {
        return Err(CertError::Validity {
            path: path.to_path_buf(),
            what: format!("the certificate expired on {}", date(until)),
        });
    }
    if now < from {
        return Err(CertError::Validity {
            path: path.to_path_buf(),
            what: format!(
                "the certificate is valid only from {} (is this clock right?)",
                date(from)
            ),
        });
    }
    let days_left = (until - now) / 86_400;
    if days_left < 30 {
        tracing::warn!(
            file = %path.display(),
            days_left,
            "this node's certificate expires soon; make new certificates with `castor certs`"
        );
    }
    Ok(())
}

/// `t` as a UTC date, `YYYY-MM-DD`.
pub fn date(t: SystemTime) -> String {
    OffsetDateTime::from(t).date().to_string()
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let data = fs::read(path).map_err(io(path))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key: {e}"),
    })
}
