//! Certificates for a deployment's mutual TLS, made on the spot: a CA and
//! certificates it signs, written as PEM files that `tas-server` and
//! `duet` take as `--tls-ca`, `--tls-cert`, `--tls-key`.
//!
//! Why here: the tests need a CA and certificates for the arbiter, two VMs'
//! pairs and an operator (and a second, unrelated CA), and `duet demo`
//! needs the same for its own arbiter; generating them (with rcgen) keeps
//! every run's keys fresh and no private key in the repository.
//!
//! The names follow [`tas_server::tls`]'s conventions: every certificate
//! carries its name as a DNS subjectAltName *and* as its common name (etcd
//! takes the user name from the CN).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tas_server::tls::TlsFiles;

pub use tas_server::tls::{vm_name, ARBITER_NAME, OPERATOR_NAME};

/// A CA that signs certificates into one directory.
pub struct Authority {
    dir: PathBuf,
    ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A new CA called `label`, its certificate written to
    /// `dir/label-ca.pem` (the private key stays in memory).
    pub fn new(dir: &Path, label: &str) -> anyhow::Result<Authority> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("duet {label} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca = dir.join(format!("{label}-ca.pem"));
        std::fs::write(&ca, cert.pem())
            .with_context(|| format!("cannot write {}", ca.display()))?;
        Ok(Authority {
            dir: dir.to_owned(),
            ca,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate's file.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// A certificate for `name` (DNS SAN and CN), usable as a TLS client
    /// and, if `server` or if it names a VM's pair (a backup is the log
    /// channel's TLS server), as a server too; written to `dir/name.pem`
    /// and `dir/name.key`. Returns the three files to pass as `--tls-*`.
    pub fn issue(&self, name: &str, server: bool) -> anyhow::Result<TlsFiles> {
        let mut sans = vec![name.to_owned()];
        if server {
            // etcd's own gateway dials its members on loopback with the
            // server certificate; clients verify the name, not these.
            sans.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
        }
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server || name.ends_with(".vm.duet") {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = TlsFiles {
            ca: self.ca.clone(),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem())
            .with_context(|| format!("cannot write {}", files.cert.display()))?;
        write_private(&files.key, key.serialize_pem().as_bytes())
            .with_context(|| format!("cannot write {}", files.key.display()))?;
        Ok(files)
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// The `--tls-ca`, `--tls-cert`, `--tls-key` arguments for `files`.
pub fn args(files: &TlsFiles) -> Vec<std::ffi::OsString> {
    vec![
        "--tls-ca".into(),
        files.ca.clone().into(),
        "--tls-cert".into(),
        files.cert.clone().into(),
        "--tls-key".into(),
        files.key.clone().into(),
    ]
}
