//! Mutual TLS for Duet's connections: credentials from PEM files, the
//! rustls configurations built from them, the name conventions, and the
//! issuing of a deployment's certificates.
//!
//! The log channel uses this module (see [`crate::channel::Security`]), and
//! so does the arbiter's client and server, so that every connection of a
//! deployment is authenticated the same way:
//!
//! - one CA per deployment (a PEM file); every certificate is signed by it,
//!   and it is the only root anyone trusts;
//! - the primary and the backup of VM id `V` present a certificate whose
//!   subjectAltName holds the DNS name `V.vm.duet` ([`vm_name`]); both may
//!   share one certificate or each have its own;
//! - the arbiter presents [`ARBITER_NAME`] (plus, optionally, a real host
//!   name or IP address), an operator's client [`OPERATOR_NAME`];
//! - TLS 1.3 only, client certificates required, the `ring` provider passed
//!   explicitly (nothing depends on a process-wide default provider).
//!
//! Use:
//!
//! ```no_run
//! use logchannel::tls::{self, TlsFiles};
//! # fn main() -> Result<(), tls::Error> {
//! let id = TlsFiles {
//!     ca: "ca.pem".into(),
//!     cert: "vm1.pem".into(),
//!     key: "vm1-key.pem".into(),
//! }
//! .load()?;
//! // Dialling the arbiter (or a backup): verify its name against the CA.
//! let client = id.client_config()?;
//! let name = tls::server_name(tls::ARBITER_NAME)?;
//! // Accepting: only clients whose certificate names VM "vm1".
//! let server = id.server_config(&[&tls::vm_name("vm1")])?;
//! // Accepting any client of the CA, then deciding per request:
//! let any = id.server_config(&[])?;
//! # let _ = (client, name, server, any);
//! # Ok(()) }
//! ```
//!
//! A server that accepted with `server_config(&[])` reads the client's
//! certificate from the connection (`peer_certificates()`) and asks
//! [`cert_has_name`] whether it names the VM a request is about.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
pub use tokio_rustls;

/// The DNS suffix of a VM's name: VM `V` is `V.vm.duet`.
pub const VM_DOMAIN: &str = "vm.duet";
/// The name in the arbiter's server certificate.
pub const ARBITER_NAME: &str = "arbiter.duet";
/// The name in an operator's client certificate.
pub const OPERATOR_NAME: &str = "operator.duet";

/// The DNS name that the certificates of VM `vm_id`'s pair carry.
pub fn vm_name(vm_id: &str) -> String {
    format!("{vm_id}.{VM_DOMAIN}")
}

/// Errors of loading credentials, building configurations and issuing
/// certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    /// A CA certificate was refused as a trust anchor.
    #[error("{} is not a usable CA certificate: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The key does not fit the certificate, or is of an unsupported kind.
    #[error("the key {} does not go with the certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// A name that cannot be a TLS server name (VM ids become DNS labels).
    #[error(
        "{0:?} cannot be used as a TLS name (a VM id must be a DNS label: letters, digits, '-')"
    )]
    BadName(String),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Issuing a certificate failed.
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// Writing or reading an issued file failed.
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
}

/// Where a side's credentials are (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The deployment's CA certificate (PEM): the only trusted root.
    pub ca: PathBuf,
    /// This side's certificate (PEM), optionally followed by intermediates.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks the three files: the CA parses as a trust anchor,
    /// the certificate file holds a certificate, and the key is the
    /// certificate's. Done once at start, so that bad credentials fail
    /// there with the file's name rather than at the first connection.
    pub fn load(&self) -> Result<TlsIdentity, Error> {
        fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> Error + '_ {
            move |source| Error::Pem {
                path: path.to_path_buf(),
                source,
            }
        }
        let mut roots = RootCertStore::empty();
        let mut any = false;
        for ca in CertificateDer::pem_file_iter(&self.ca).map_err(pem(&self.ca))? {
            let ca = ca.map_err(pem(&self.ca))?;
            roots.add(ca).map_err(|source| Error::BadCa {
                path: self.ca.clone(),
                source,
            })?;
            any = true;
        }
        if !any {
            return Err(Error::NoCertificate {
                path: self.ca.clone(),
            });
        }
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .map_err(pem(&self.cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem(&self.cert))?;
        if chain.is_empty() {
            return Err(Error::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(pem(&self.key))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |source| Error::KeyMismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            },
        )?;
        Ok(TlsIdentity {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            provider,
        })
    }
}

/// Loaded credentials: the CA as the only root, this side's certificate
/// chain and key. Cheap to clone; builds the rustls configurations.
#[derive(Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for TlsIdentity {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// A client configuration: TLS 1.3, the server verified against the CA
    /// (the name to verify is given per connection, as a
    /// [`server_name`]), this side's certificate presented when asked.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, Error> {
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// A server configuration: TLS 1.3, this side's certificate presented,
    /// and a client certificate required, signed by the CA and, unless
    /// `expected_client_names` is empty, carrying one of these DNS names in
    /// its subjectAltName. Another VM's certificate from the same CA is so
    /// refused during the handshake, before a byte of Duet's protocol.
    pub fn server_config(
        &self,
        expected_client_names: &[&str],
    ) -> Result<Arc<ServerConfig>, Error> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| Error::Config(e.to_string()))?;
        let names = expected_client_names
            .iter()
            .map(|n| server_name(n))
            .collect::<Result<Vec<_>, _>>()?;
        let verifier: Arc<dyn ClientCertVerifier> = if names.is_empty() {
            inner
        } else {
            Arc::new(NamedClientVerifier { inner, names })
        };
        let config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// This side's certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trusted roots (the deployment's CA).
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The crypto provider every configuration here uses (`ring`).
    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }
}

/// `name` as a TLS server name, or [`Error::BadName`].
pub fn server_name(name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_string()).map_err(|_| Error::BadName(name.to_string()))
}

/// True if `cert` carries the DNS name `name` in its subjectAltName (the
/// same check, by webpki, that a client makes of a server). It does not
/// check the signature: ask it of certificates a verifier has accepted.
pub fn cert_has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let (Ok(parsed), Ok(name)) = (ParsedCertificate::try_from(cert), server_name(name)) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}

/// WebPKI client verification, then the name check: the client's
/// certificate must carry one of `names`. The CA check alone would let
/// the pair of one VM pose as another's.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let mut first = None;
        for name in &self.names {
            match rustls::client::verify_server_name(&parsed, name) {
                Ok(()) => return Ok(verified),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        // `names` is never empty here, so there is an error to give.
        Err(first.unwrap_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Turns a failed TLS handshake (or a read that hit an alert) with `peer`
/// into one line an operator can act on; `peer` names the other side.
pub fn explain(e: &rustls::Error, peer: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            format!("the {peer}'s certificate is not signed by this side's CA ({e})")
        }
        E::InvalidCertificate(C::NotValidForNameContext { expected, presented }) => {
            // webpki shows each name in its debug form, `DnsName("x")`.
            let names: Vec<&str> = presented
                .iter()
                .map(|p| {
                    p.strip_prefix("DnsName(\"")
                        .and_then(|r| r.strip_suffix("\")"))
                        .unwrap_or(p)
                })
                .collect();
            format!(
                "the {peer}'s certificate is for another name: {} was expected, it is only valid for {}",
                expected.to_str(),
                if names.is_empty() { "no name".to_string() } else { names.join(", ") }
            )
        }
        E::InvalidCertificate(C::NotValidForName) => {
            format!("the {peer}'s certificate is for another name")
        }
        E::NoCertificatesPresented => format!("the {peer} presented no certificate"),
        E::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateRequired
            | A::AccessDenied
            | A::UnsupportedCertificate),
        ) => format!(
            "the {peer} rejected our certificate ({a:?}): is it from another CA, or for another VM id?"
        ),
        other => other.to_string(),
    }
}

/// The CA's subject: a fixed prefix and a digest of its public key. Two
/// deployments' CAs so never share a subject (with one subject, a
/// certificate of the other CA would fail as a bad signature instead of
/// an unknown issuer), and a kept CA key gives back its CA's subject, so
/// that it can issue more certificates later (an issuer is its subject
/// and its key) without parsing `ca.pem`.
fn ca_name(key: &rcgen::KeyPair) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.public_key_raw());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("Duet deployment CA {hex}")
}

/// What [`issue`] wrote.
#[derive(Debug, Clone, Default)]
pub struct Issued {
    /// True if a new CA was made; false if the one in the directory signed.
    pub new_ca: bool,
    /// Every file written, certificates and keys.
    pub files: Vec<PathBuf>,
}

/// Issues a deployment's credentials into `out` (created if missing), as
/// `duet certs` and `duet demo` do:
///
/// - `ca.pem`, `ca-key.pem`: the CA; made if `out` has none, else reused
///   (both files must be there), so that more VMs can be added later;
/// - `V.pem`, `V-key.pem` for each VM id `V`: SAN `V.vm.duet`, for TLS
///   server and client use (one pair, both sides);
/// - `arbiter.pem`, `arbiter-key.pem`: SAN [`ARBITER_NAME`] and each of
///   `arbiter_hosts` (DNS names or IP addresses), for server use;
/// - `operator.pem`, `operator-key.pem`: SAN [`OPERATOR_NAME`], for client
///   use.
///
/// Keys are written with mode 0600. Certificates are valid from the start
/// of last year for ten years.
pub fn issue(out: &Path, vm_ids: &[String], arbiter_hosts: &[String]) -> Result<Issued, Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::File { path, source }
    };
    std::fs::create_dir_all(out).map_err(file_err(out))?;
    for id in vm_ids {
        // The id must make a valid name, and must not leave the directory.
        if id.is_empty() || id.contains(['/', '.']) {
            return Err(Error::BadName(id.clone()));
        }
        server_name(&vm_name(id))?;
    }
    let this_year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 31_556_952) as i32;
    let validity = |p: &mut CertificateParams| {
        p.not_before = rcgen::date_time_ymd(this_year - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(this_year + 9, 1, 1);
    };

    let ca_params = |key: &KeyPair| {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, ca_name(key));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p);
        p
    };
    let (ca_cert, ca_key) = (out.join("ca.pem"), out.join("ca-key.pem"));
    let mut issued = Issued::default();
    let ca_key_pair = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let pem = std::fs::read_to_string(&ca_key).map_err(file_err(&ca_key))?;
            KeyPair::from_pem(&pem)?
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let cert = ca_params(&key).self_signed(&key)?;
            write_file(&ca_cert, cert.pem().as_bytes(), 0o644)?;
            write_file(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
            issued.new_ca = true;
            issued.files.extend([ca_cert.clone(), ca_key.clone()]);
            key
        }
        (true, false) => {
            return Err(Error::File {
                path: ca_key,
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "ca.pem is here but its key is not: bring ca-key.pem back to issue more certificates",
                ),
            })
        }
        (false, true) => {
            return Err(Error::File {
                path: ca_cert,
                source: io::Error::new(io::ErrorKind::NotFound, "ca-key.pem is here but ca.pem is not"),
            })
        }
    };
    let issuer = Issuer::new(ca_params(&ca_key_pair), ca_key_pair);

    let mut leaf = |stem: &str, names: Vec<String>, usages: &[ExtendedKeyUsagePurpose]| {
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (c, k) = (
            out.join(format!("{stem}.pem")),
            out.join(format!("{stem}-key.pem")),
        );
        write_file(&c, cert.pem().as_bytes(), 0o644)?;
        write_file(&k, key.serialize_pem().as_bytes(), 0o600)?;
        issued.files.extend([c, k]);
        Ok::<_, Error>(())
    };
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    for id in vm_ids {
        leaf(id, vec![vm_name(id)], &[ServerAuth, ClientAuth])?;
    }
    let mut arbiter = vec![ARBITER_NAME.to_string()];
    arbiter.extend(arbiter_hosts.iter().cloned());
    leaf("arbiter", arbiter, &[ServerAuth])?;
    leaf("operator", vec![OPERATOR_NAME.to_string()], &[ClientAuth])?;
    Ok(issued)
}

/// Writes `bytes` to `path` with `mode` (also when it already exists, so
/// that a key never keeps looser permissions than asked).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::File {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(dir: &Path, vms: &[&str]) -> Issued {
        let vms: Vec<String> = vms.iter().map(|s| s.to_string()).collect();
        issue(dir, &vms, &["127.0.0.1".into(), "arb.example".into()]).unwrap()
    }

    fn files(dir: &Path, stem: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    #[test]
    fn issued_certificates_carry_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let issued = deployment(dir.path(), &["vm1", "vm2"]);
        assert!(issued.new_ca);
        let vm1 = files(dir.path(), "vm1").load().unwrap();
        let cert = &vm1.cert_chain()[0];
        assert!(cert_has_name(cert, "vm1.vm.duet"));
        assert!(!cert_has_name(cert, "vm2.vm.duet"));
        assert!(!cert_has_name(cert, "vm1"));
        assert!(!cert_has_name(cert, ARBITER_NAME));
        let arb = files(dir.path(), "arbiter").load().unwrap();
        assert!(cert_has_name(&arb.cert_chain()[0], ARBITER_NAME));
        assert!(cert_has_name(&arb.cert_chain()[0], "arb.example"));
        let op = files(dir.path(), "operator").load().unwrap();
        assert!(cert_has_name(&op.cert_chain()[0], OPERATOR_NAME));
        assert!(!cert_has_name(&[0u8; 8][..].into(), "vm1.vm.duet"));
    }

    #[test]
    fn keys_are_private_and_the_ca_is_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        deployment(dir.path(), &["vm1"]);
        for name in [
            "ca-key.pem",
            "vm1-key.pem",
            "arbiter-key.pem",
            "operator-key.pem",
        ] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let again = deployment(dir.path(), &["vm3"]);
        assert!(!again.new_ca);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        // vm3's certificate, issued later, is signed by the same CA: a
        // verifier built from vm1's files accepts it.
        let vm1 = files(dir.path(), "vm1").load().unwrap();
        let vm3 = files(dir.path(), "vm3").load().unwrap();
        let verifier = named_verifier(&vm1, &["vm3.vm.duet"]);
        verifier
            .verify_client_cert(&vm3.cert_chain()[0], &[], UnixTime::now())
            .unwrap();
        // A CA whose key went offline cannot issue more.
        std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
        assert!(issue(dir.path(), &["vm4".into()], &[]).is_err());
    }

    fn named_verifier(id: &TlsIdentity, names: &[&str]) -> NamedClientVerifier {
        NamedClientVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(id.roots(), id.provider())
                .build()
                .unwrap(),
            names: names.iter().map(|n| server_name(n).unwrap()).collect(),
        }
    }

    #[test]
    fn the_client_name_check_refuses_another_vm_of_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        deployment(dir.path(), &["vm1", "vm2"]);
        let other = tempfile::tempdir().unwrap();
        deployment(other.path(), &["vm1"]);
        let vm1 = files(dir.path(), "vm1").load().unwrap();
        let vm2 = files(dir.path(), "vm2").load().unwrap();
        let foreign = files(other.path(), "vm1").load().unwrap();
        let now = UnixTime::now();
        let check = named_verifier(&vm1, &["vm1.vm.duet"]);
        check
            .verify_client_cert(&vm1.cert_chain()[0], &[], now)
            .unwrap();
        let e = check
            .verify_client_cert(&vm2.cert_chain()[0], &[], now)
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{e:?}"
        );
        assert!(
            explain(&e, "primary").contains("is only valid for vm2.vm.duet"),
            "{}",
            explain(&e, "primary")
        );
        // The right name from another CA fails the CA check first.
        let e = check
            .verify_client_cert(&foreign.cert_chain()[0], &[], now)
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e:?}"
        );
        // Any of several names will do.
        named_verifier(&vm1, &["vm9.vm.duet", "vm2.vm.duet"])
            .verify_client_cert(&vm2.cert_chain()[0], &[], now)
            .unwrap();
    }

    #[test]
    fn bad_files_and_names_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        deployment(dir.path(), &["vm1", "vm2"]);
        let mut f = files(dir.path(), "vm1");
        f.key = dir.path().join("vm2-key.pem");
        let e = f.load().unwrap_err();
        assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
        let mut f = files(dir.path(), "vm1");
        f.ca = dir.path().join("missing.pem");
        let e = f.load().unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let mut f = files(dir.path(), "vm1");
        f.cert = dir.path().join("vm1-key.pem");
        assert!(matches!(f.load(), Err(Error::NoCertificate { .. })));
        for id in ["", "a/b", "a.b", "bad_id!"] {
            assert!(issue(dir.path(), &[id.into()], &[]).is_err(), "{id:?}");
        }
        assert!(server_name(&vm_name("vm_1 x")).is_err());
    }
}
