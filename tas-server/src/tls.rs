//! Mutual TLS for the arbiter: loading the credentials, and who a verified
//! peer certificate says the peer is.
//!
//! Why: without it anyone who reaches the arbiter can claim any VM's pair
//! (making both its sides halt) or list every VM. With it both ends prove
//! who they are with certificates from one CA per deployment, and the
//! arbiter grants a VM's claims only to that VM's pair ([`crate::auth`]).
//!
//! # Conventions (shared with the log channel's TLS)
//!
//! - One CA per deployment, in PEM: `--tls-ca FILE`. Each end presents a
//!   certificate chain and key of its own: `--tls-cert FILE --tls-key FILE`.
//!   The three flags come all together or not at all ([`TlsFiles::from_flags`]).
//! - The arbiter's server certificate carries the DNS name
//!   [`ARBITER_NAME`] (`arbiter.duet`), which clients verify whatever
//!   address they dialled.
//! - Both sides of VM `V` present a client certificate whose
//!   subjectAltName holds the DNS name `V.vm.duet` ([`vm_name`]); an
//!   operator's holds [`OPERATOR_NAME`] (`operator.duet`). For etcd, which
//!   takes the user name from the certificate's common name, the CN is the
//!   same name.
//!
//! The crypto provider is *ring*, named explicitly rather than taken from a
//! process default, so that a second provider linked in by another crate
//! can never make building a config panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

pub use rustls::{ClientConfig, ServerConfig};

/// The DNS name in the arbiter's server certificate.
pub const ARBITER_NAME: &str = "arbiter.duet";
/// The DNS name in an operator's client certificate.
pub const OPERATOR_NAME: &str = "operator.duet";
/// What follows the VM id in the DNS name of a pair's certificate.
pub const VM_SUFFIX: &str = ".vm.duet";

/// The DNS name that a certificate for `vm_id`'s pair carries.
pub fn vm_name(vm_id: &str) -> String {
    format!("{vm_id}{VM_SUFFIX}")
}

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some but not all of the three flags were given.
    #[error("give --tls-ca, --tls-cert and --tls-key together (missing: {0})")]
    Incomplete(String),
    /// A file could not be read or holds no valid PEM of the kind needed.
    #[error("cannot read {what} from {}", path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// The file parsed but holds no certificate.
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    /// The CA file holds a certificate that cannot be a trust anchor.
    #[error("{} is not a usable CA certificate", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
    /// The certificate and key do not make a usable identity (a key that
    /// does not match, an unsupported algorithm).
    #[error("{} and {} are not a usable certificate and key", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("cannot verify clients against {}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// The cause.
        source: rustls::server::VerifierBuilderError,
    },
    /// The crypto provider refused the protocol versions (not expected).
    #[error("the TLS provider refused its defaults")]
    Provider(#[source] rustls::Error),
}

/// The three files of one end's TLS credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The deployment's CA certificate (PEM).
    pub ca: PathBuf,
    /// This end's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// This end's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files from `--tls-ca`, `--tls-cert`, `--tls-key`: `None` if no
    /// flag was given, an error naming the missing ones if only some were.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    (ca.is_none(), "--tls-ca"),
                    (cert.is_none(), "--tls-cert"),
                    (key.is_none(), "--tls-key"),
                ]
                .iter()
                .filter(|(absent, _)| *absent)
                .map(|(_, flag)| *flag)
                .collect();
                Err(TlsError::Incomplete(missing.join(", ")))
            }
        }
    }

    fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Pem {
                what,
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(path.to_owned()));
        }
        Ok(certs)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in Self::certs(&self.ca, "the CA certificate")? {
            roots.add(cert).map_err(|source| TlsError::BadCa {
                path: self.ca.clone(),
                source,
            })?;
        }
        Ok(roots)
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = Self::certs(&self.cert, "a certificate")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| TlsError::Pem {
            what: "a private key",
            path: self.key.clone(),
            source,
        })?;
        Ok((chain, key))
    }

    fn identity_error(&self, source: rustls::Error) -> TlsError {
        TlsError::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }

    /// The arbiter's config: present `cert`, and require every client to
    /// present a certificate chaining to `ca` (a client without one is
    /// refused in the handshake).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: self.ca.clone(),
                    source,
                })?;
        let (chain, key) = self.identity()?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Provider)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| self.identity_error(e))?;
        Ok(Arc::new(config))
    }

    /// A client's config: trust only `ca` (the server must prove it is
    /// [`ARBITER_NAME`], or whatever name the caller verifies), and present
    /// `cert`.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let (chain, key) = self.identity()?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Provider)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| self.identity_error(e))?;
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DNS names in the subjectAltName of a (verified) certificate, in
/// order; empty if it has none or does not parse (then it names nobody).
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

/// The first TLS error in `error`'s chain of causes, looking inside I/O
/// errors too (rustls reports a failed handshake or a received alert as an
/// `io::Error` whose inner error is the `rustls::Error`).
///
/// Why: a TLS failure means a wrong or missing credential, which retrying
/// cannot fix, while an I/O failure around it may be a network that comes
/// back; callers use this to tell the two apart.
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    chain(error).find_map(|e| {
        e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// What to tell about a TLS failure somewhere in `error`'s causes, if there
/// is one: [`explain`] of its rustls error or, when a layer in between
/// kept only the text (hyper and tonic, for an alert received after the
/// handshake), that text with the same hint. rustls reports every broken or
/// refused TLS exchange as `InvalidData`; a network failure never is.
pub fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(tls) = rustls_error(error) {
        return Some(explain(tls));
    }
    chain(error).find_map(|e| {
        let io = e.downcast_ref::<std::io::Error>()?;
        (io.kind() == std::io::ErrorKind::InvalidData).then(|| with_hint(io.to_string(), None))
    })
}

/// What a client should be told about a TLS failure with the arbiter: the
/// rustls reason and, where it is clear, what to fix.
pub fn explain(error: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    let hint = match error {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            Some("the arbiter's certificate is not from our CA (--tls-ca)")
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            Some("the arbiter's certificate does not name arbiter.duet")
        }
        E::InvalidMessage(_) => Some(
            "the arbiter did not answer in TLS: does it run with --tls-ca/--tls-cert/--tls-key?",
        ),
        _ => None,
    };
    with_hint(error.to_string(), hint)
}

/// `reason` with `hint`, or with the hint for the alert it names.
fn with_hint(reason: String, hint: Option<&str>) -> String {
    let alert = |name: &str| reason.contains(&format!("alert: {name}"));
    let hint = hint.or_else(|| {
        if alert("CertificateRequired") {
            Some("the arbiter requires a client certificate (--tls-cert, --tls-key)")
        } else if alert("UnknownCA") || alert("BadCertificate") || alert("DecryptError") {
            Some("the arbiter does not accept our certificate: is it from the arbiter's CA?")
        } else {
            None
        }
    });
    match hint {
        Some(hint) => format!("{reason} ({hint})"),
        None => reason,
    }
}
