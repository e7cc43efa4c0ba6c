//! The cluster's private PKI: one CA per cluster, one certificate per node (and per coordinator),
//! all on disk as PEM.
//!
//! Every QUIC connection in lockstep is mutual TLS against the cluster CA (see [`crate::Endpoint`]): a
//! process proves which node it is with a certificate the CA signed, and trusts nothing else. There
//! are no public CAs involved and no host-name conventions to configure: [`init_ca`] makes a fresh
//! CA in a directory, [`issue`] signs a certificate for a name, and [`TlsIdentity::load`] reads
//! what a process needs to take part.
//!
//! Layout of a certificate directory:
//!
//! | file          | what                                                         |
//! | ------------- | ------------------------------------------------------------ |
//! | `ca.pem`      | the CA certificate(s) every process trusts (may hold several, for rotation) |
//! | `ca.key`      | the CA's private key — needed only where certificates are issued; keep it off the nodes |
//! | `NAME.pem`    | the certificate of `NAME` (optionally followed by intermediates) |
//! | `NAME.key`    | its private key (PKCS#8)                                     |
//!
//! Keys are ECDSA P-256, written with mode 0600 and never overwritten: issuing refuses to replace
//! an existing file so that a typo cannot silently destroy a cluster's CA or a node's identity.
//! Certificates carry the name as common name and as a DNS SAN, plus `localhost`, `127.0.0.1` and
//! `::1` so single-host clusters and tests can dial loopback; both the server and the client
//! extended key usages are set because every node is both.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// File name of the CA certificate in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long an issued certificate is valid. Shorter than the CA's validity, so that a CA issued
/// with the defaults outlives the certificates it signs in its first five years.
pub const CERT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86_400);
/// Certificates start being valid this long before they are made, so that hosts whose clocks lag
/// the issuing host's accept them at once.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(86_400);

/// What can go wrong making or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: a cluster CA already exists; refusing to overwrite it (remove ca.pem and ca.key to start a new cluster)", .path.display())]
    CaExists { path: PathBuf },
    #[error("{}: already exists; refusing to overwrite it (remove it first to re-issue)", .path.display())]
    Exists { path: PathBuf },
    #[error("{}: no cluster CA here (create one with `lockstep certs init --dir DIR` first)", .path.display())]
    NoCa { path: PathBuf },
    #[error("invalid certificate name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", .path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl CertError {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            CertError::CaExists { .. } => "ca_exists",
            CertError::Exists { .. } => "cert_exists",
            CertError::NoCa { .. } => "no_ca",
            CertError::BadName { .. } => "bad_name",
            CertError::Io { .. } => "io",
            CertError::Pem { .. } => "bad_pem",
            CertError::Generate(_) => "generate",
        }
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        CertError::Io { path: path.to_owned(), source }
    }
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e.to_string())
    }
}

/// Creates a new cluster CA in `dir` (created if missing): `ca.pem` and `ca.key`. Refuses if either
/// file already exists.
pub fn init_ca(dir: &Path) -> Result<(), CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertError::CaExists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|e| CertError::io(dir, e))?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    // A per-CA suffix in the name: two clusters' CAs never share a subject, so a certificate from
    // the wrong cluster fails path building as "unknown issuer", the clearest error.
    let id: String = key.public_key_raw().iter().rev().take(6).map(|b| format!("{b:02x}")).collect();
    params.distinguished_name = distinguished_name(&format!("lockstep cluster CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;

    write_new(&key_path, key.serialize_pem().as_bytes(), true).map_err(|e| match e {
        CertError::Exists { path } => CertError::CaExists { path },
        other => other,
    })?;
    write_new(&cert_path, cert.pem().as_bytes(), false).map_err(|e| {
        // Do not leave half a CA behind: a key without its certificate would block the next try.
        let _ = fs::remove_file(&key_path);
        match e {
            CertError::Exists { path } => CertError::CaExists { path },
            other => other,
        }
    })
}

/// Issues `dir/{name}.pem` and `dir/{name}.key`, signed by the CA in `dir`. The certificate is
/// valid for `name`, `localhost`, `127.0.0.1` and `::1`, as both TLS server and client.
pub fn issue(dir: &Path, name: &str) -> Result<(), CertError> {
    validate_name(name)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    if !ca_cert_path.exists() {
        return Err(CertError::NoCa { path: ca_cert_path });
    }
    if !ca_key_path.exists() {
        return Err(CertError::NoCa { path: ca_key_path });
    }
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }

    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(|e| CertError::io(&ca_key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| CertError::Pem { path: ca_key_path.clone(), reason: format!("not a usable CA key: {e}") })?;
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(|e| CertError::io(&ca_cert_path, e))?;
    // The issuer is read from the CA certificate itself (subject, key identifier), so a CA made by
    // another tool works as well as one from init_ca.
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CertError::Pem {
        path: ca_cert_path.clone(),
        reason: format!("not a usable CA certificate: {e}"),
    })?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    let mut sans = vec![SanType::DnsName(name.try_into()?)];
    if name != "localhost" {
        sans.push(SanType::DnsName("localhost".try_into()?));
    }
    sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    sans.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, CERT_VALIDITY);
    let cert = params.signed_by(&key, &issuer)?;

    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false).inspect_err(|_| {
        let _ = fs::remove_file(&key_path);
    })
}

/// Names become file names and DNS SANs, and peers dial them as TLS server names: keep them to
/// what is safe as all three.
fn validate_name(name: &str) -> Result<(), CertError> {
    let bad = |reason: &str| Err(CertError::BadName { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return bad("only ASCII letters, digits, '-' and '.' are allowed");
    }
    if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) || name.contains("..") {
        return bad("must not start or end with '-' or '.', nor contain '..'");
    }
    if name == "ca" {
        return bad("\"ca\" is the CA's own file name");
    }
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return bad("not a valid DNS name");
    }
    if name.parse::<IpAddr>().is_ok() || name.rsplit('.').next().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return bad("must not look like an IP address (its last label must not be all digits)");
    }
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "lockstep");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(CLOCK_SKEW_ALLOWANCE);
    params.not_after = epoch + now + validity;
}

/// Writes a file that must not exist yet (`O_EXCL`, so a race cannot overwrite either); private
/// files are created with mode 0600 from the start rather than chmod-ed after.
fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<(), CertError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CertError::Exists { path: path.to_owned() },
        _ => CertError::io(path, e),
    })?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(|e| {
        let _ = fs::remove_file(path);
        CertError::io(path, e)
    })
}

/// What a process needs for mutual TLS: the CA certificate(s) it trusts, and its own certificate
/// chain and private key.
pub struct TlsIdentity {
    name: String,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("name", &self.name)
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            name: self.name.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Loads `dir/ca.pem` (trusted) and `dir/{name}.pem` + `dir/{name}.key` (presented). The CA key
    /// is not read.
    pub fn load(dir: &Path, name: &str) -> Result<Self, CertError> {
        let ca = dir.join(CA_CERT_FILE);
        if !ca.exists() {
            return Err(CertError::NoCa { path: ca });
        }
        Self::from_files(name, &ca, &dir.join(format!("{name}.pem")), &dir.join(format!("{name}.key")))
    }

    /// Loads an identity from explicit paths, for deployments that mount the CA and the node's
    /// credentials in different places. `name` is only a label for logs.
    pub fn from_files(name: &str, ca_pem: &Path, cert_pem: &Path, key_pem: &Path) -> Result<Self, CertError> {
        let roots = read_certs(ca_pem)?;
        let chain = read_certs(cert_pem)?;
        let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| pem_error(key_pem, "private key", e))?;
        Ok(TlsIdentity { name: name.to_owned(), roots, chain, key })
    }

    /// The name the identity was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA certificates this identity trusts.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The certificate chain this identity presents, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf certificate.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, "certificate", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificate", e))?;
    if certs.is_empty() {
        return Err(CertError::Pem { path: path.to_owned(), reason: "no certificate in the file".into() });
    }
    Ok(certs)
}

fn pem_error(path: &Path, what: &str, e: rustls_pki_types::pem::Error) -> CertError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => CertError::io(path, source),
        rustls_pki_types::pem::Error::NoItemsFound => {
            CertError::Pem { path: path.to_owned(), reason: format!("no {what} in the file") }
        }
        other => CertError::Pem { path: path.to_owned(), reason: format!("malformed PEM ({what}): {other}") },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::server::ParsedCertificate;

    /// A temporary directory removed on drop (no dependency for one struct).
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("lockstep-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn init_ca_creates_private_key_and_refuses_to_overwrite() {
        let dir = TempDir::new("certs-ca");
        init_ca(&dir.0).unwrap();
        let key_path = dir.0.join(CA_KEY_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let before = fs::read(&key_path).unwrap();
        let err = init_ca(&dir.0).unwrap_err();
        assert_eq!(err.error_type(), "ca_exists");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(&key_path).unwrap(), before, "the existing CA key is untouched");

        // Half a CA (only the key) is refused too.
        fs::remove_file(dir.0.join(CA_CERT_FILE)).unwrap();
        assert_eq!(init_ca(&dir.0).unwrap_err().error_type(), "ca_exists");
    }

    #[test]
    fn issued_certificates_chain_to_the_ca_and_name_the_node() {
        let dir = TempDir::new("certs-issue");
        init_ca(&dir.0).unwrap();
        issue(&dir.0, "node-0").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(dir.0.join("node-0.key")).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let id = TlsIdentity::load(&dir.0, "node-0").unwrap();
        assert_eq!(id.name(), "node-0");
        assert_eq!((id.roots().len(), id.chain().len()), (1, 1));
        assert!(!format!("{id:?}").contains("PRIVATE"));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(id.roots()[0].clone()).unwrap();
        let parsed = ParsedCertificate::try_from(&id.chain()[0]).unwrap();
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], UnixTime::now(), algs.all)
            .unwrap();
        for name in ["node-0", "localhost", "127.0.0.1", "::1"] {
            let server_name = ServerName::try_from(name).unwrap();
            rustls::client::verify_server_name(&parsed, &server_name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(rustls::client::verify_server_name(&parsed, &ServerName::try_from("node-1").unwrap()).is_err());

        // The common name is the node name.
        let (_, x509) = x509_parser::parse_x509_certificate(&id.chain()[0]).unwrap();
        let cn = x509.subject().iter_common_name().next().unwrap().as_str().unwrap();
        assert_eq!(cn, "node-0");

        // Re-issuing is refused, another name is fine.
        assert_eq!(issue(&dir.0, "node-0").unwrap_err().error_type(), "cert_exists");
        issue(&dir.0, "coordinator").unwrap();
    }

    #[test]
    fn certificates_from_another_ca_do_not_verify() {
        let (a, b) = (TempDir::new("certs-a"), TempDir::new("certs-b"));
        for dir in [&a, &b] {
            init_ca(&dir.0).unwrap();
            issue(&dir.0, "node-0").unwrap();
        }
        let ours = TlsIdentity::load(&a.0, "node-0").unwrap();
        let theirs = TlsIdentity::load(&b.0, "node-0").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ours.roots()[0].clone()).unwrap();
        let parsed = ParsedCertificate::try_from(&theirs.chain()[0]).unwrap();
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let err =
            rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], UnixTime::now(), algs.all)
                .unwrap_err();
        assert!(format!("{err}").contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn issue_rejects_bad_names_and_a_missing_ca() {
        let dir = TempDir::new("certs-bad");
        assert_eq!(issue(&dir.0, "node-0").unwrap_err().error_type(), "no_ca");
        init_ca(&dir.0).unwrap();
        for name in ["", "../evil", "a/b", "a b", "ca", "-x", "x.", "a..b", "10.0.0.1", "1234", "ünï", &"x".repeat(64)]
        {
            let err = issue(&dir.0, name).unwrap_err();
            assert_eq!(err.error_type(), "bad_name", "{name:?}: {err}");
        }
        for name in ["node-0", "gpu7.rack3", "Coordinator"] {
            issue(&dir.0, name).unwrap();
        }
    }

    #[test]
    fn load_reports_missing_and_malformed_files() {
        let dir = TempDir::new("certs-load");
        assert_eq!(TlsIdentity::load(&dir.0, "node-0").unwrap_err().error_type(), "no_ca");
        init_ca(&dir.0).unwrap();
        let err = TlsIdentity::load(&dir.0, "node-0").unwrap_err();
        assert_eq!(err.error_type(), "io");
        assert!(err.to_string().contains("node-0.pem"), "{err}");

        issue(&dir.0, "node-0").unwrap();
        fs::write(dir.0.join("node-0.key"), "not a key").unwrap();
        let err = TlsIdentity::load(&dir.0, "node-0").unwrap_err();
        assert_eq!(err.error_type(), "bad_pem");
        assert!(err.to_string().contains("no private key"), "{err}");
    }
}
