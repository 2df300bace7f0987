//! TLS on the HTTP listeners (`http.tls_cert` and `http.tls_key`): the
//! server's certificate chain and key, read from PEM files and checked at
//! load, and the handshake of each connection. A reload (SIGHUP, or
//! `reload_smtp_configuration`) reads both files again, so that a renewed
//! certificate is served to the connections made after it; turning TLS on or
//! off takes a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::MailmuxServer;

/// The listeners' certificate chain and key, read and checked.
#[derive(Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

/// Which file a loading error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    Cert,
    Key,
}

impl Identity {
    /// Reads `cert` (PEM certificates, the server's own first, then the
    /// chain) and `key` (one PEM private key: PKCS#8, PKCS#1 or SEC1). The
    /// error names the file at fault and never holds the key.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, (File, String)> {
        let read = |path: &Path, file: File| {
            std::fs::read(path).map_err(|e| (file, format!("cannot read {}: {e}", path.display())))
        };
        let cert_pem = read(cert, File::Cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (File::Cert, format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err((
                File::Cert,
                format!("{} holds no PEM certificate", cert.display()),
            ));
        }
        let key_pem = read(key, File::Key)?;
        // The parser's error names the PEM section, never its bytes.
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            (
                File::Key,
                format!("{} holds no PEM private key: {e}", key.display()),
            )
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| (File::Cert, e.to_string()))?
            .with_no_client_auth()
            // Fails when the key is not one rustls can sign with, or is not
            // the key of the chain's first certificate.
            .with_single_cert(chain, private)
            .map_err(|e| {
                (
                    File::Key,
                    format!(
                        "{} is not the key of the first certificate in {}: {e}",
                        key.display(),
                        cert.display()
                    ),
                )
            })?;
        // The listeners speak HTTP/1.1 only.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            server: Arc::new(server),
        })
    }
}

/// Two identities are the same setting when they name the same files: a
/// reload that read new contents from them needs no restart.
impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert && self.key == other.key
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The handshakes of a listener that started with TLS: each uses the
/// identity of the configuration in force, or the one it started with if a
/// reload took TLS out (which only a restart applies).
#[derive(Clone)]
pub struct Handshakes {
    server: MailmuxServer,
    started: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for Handshakes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshakes").finish_non_exhaustive()
    }
}

impl Handshakes {
    /// `None` when the configuration in force has no TLS.
    pub fn of(server: &MailmuxServer) -> Option<Handshakes> {
        let started = server.config().daemon.http.tls.as_ref()?.server.clone();
        Some(Handshakes {
            server: server.clone(),
            started,
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self.server.config();
        let current = config.daemon.http.tls.as_ref().map(|t| t.server.clone());
        TlsAcceptor::from(current.unwrap_or_else(|| self.started.clone()))
    }
}
