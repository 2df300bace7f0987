//! An IMAP account and its login: the connection (plain, STARTTLS or TLS
//! from the first byte, with the platform's roots and any extra ones) and
//! the authentication (a password, or SASL XOAUTH2 with a relay's OAuth2
//! tokens). Shared by the Sent copy, which files into the account, and the
//! reader of bounce and complaint reports, which reads from it. IMAP is
//! spoken by `async-imap`.

use std::sync::Arc;

use async_imap::{Client, Session};
use mailmux_actors::net::Unanswered;
use mailmux_actors::{Secret, TokenSource};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// Transport security of the IMAP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapTls {
    /// TLS from the first byte (port 993).
    Implicit,
    /// STARTTLS, required (port 143).
    Starttls,
    /// Plain text: loopback only.
    None,
}

impl ImapTls {
    pub fn as_str(self) -> &'static str {
        match self {
            ImapTls::Implicit => "implicit",
            ImapTls::Starttls => "starttls",
            ImapTls::None => "none",
        }
    }
}

/// How a session logs in.
#[derive(Debug, Clone, PartialEq)]
pub enum ImapAuth {
    Password(Secret),
    /// SASL XOAUTH2 with the relay's access tokens.
    Xoauth2(TokenSource),
}

/// Where an IMAP account is and how to log in to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImapAccount {
    pub host: String,
    pub port: u16,
    pub tls: ImapTls,
    pub username: String,
    pub auth: ImapAuth,
    /// Extra trusted root certificates (PEM), beside the platform's.
    pub ca_pem: Option<Vec<u8>>,
}

/// The IMAP server's socket: reads bounded between two commands of ours.
type Socket = Unanswered<TcpStream>;
type Stream = Either<Socket, TlsStream<Socket>>;

/// A logged-in session.
pub type ImapSession = Session<Stream>;

/// The most an IMAP server may send between two commands of ours: the
/// answers mailmux reads (a greeting, the LIST of the folders, APPEND's
/// tagged reply, a report's first 256 KiB) are small. async-imap would otherwise buffer up to 512 MiB
/// of an answer that never ends, and parse the whole of it again at each
/// read: with 4 MiB allowed, one such greeting kept a copier busy past 30 s
/// (debug build); with 1 MiB it is cut off at once.
const MAX_UNANSWERED: usize = 1 << 20;

/// Connects to the account and logs in. `fresh` asks the OAuth2 token
/// source for a new token rather than a cached one (after a failed try).
pub async fn login(a: &ImapAccount, fresh: bool) -> Result<ImapSession, String> {
    let tcp = TcpStream::connect((a.host.as_str(), a.port))
        .await
        .map_err(|e| format!("connect to {}:{}: {e}", a.host, a.port))?;
    let _ = tcp.set_nodelay(true);
    let tcp = Unanswered::new(tcp, MAX_UNANSWERED);
    let stream: Stream = match a.tls {
        ImapTls::Implicit => Either::Right(tls(a, tcp).await?),
        _ => Either::Left(tcp),
    };
    let mut client = Client::new(stream);
    client
        .read_response()
        .await
        .map_err(|e| format!("greeting: {e}"))?
        .ok_or("the server closed the connection before its greeting")?;
    if a.tls == ImapTls::Starttls {
        client
            .run_command_and_check_ok("STARTTLS", None)
            .await
            .map_err(|e| format!("STARTTLS: {e}"))?;
        let Either::Left(tcp) = client.into_inner() else {
            return Err("STARTTLS on a TLS connection".into());
        };
        client = Client::new(Either::Right(tls(a, tcp).await?));
    }
    match &a.auth {
        ImapAuth::Password(p) => client
            .login(&a.username, p.expose())
            .await
            .map_err(|(e, _)| format!("LOGIN: {e}")),
        ImapAuth::Xoauth2(source) => {
            let token = source.token(fresh).await.map_err(|e| {
                format!(
                    "cannot get an OAuth2 access token from {}: {e}",
                    source.label()
                )
            })?;
            client
                .authenticate(
                    "XOAUTH2",
                    XOAuth2 {
                        sasl: format!(
                            "user={}\x01auth=Bearer {}\x01\x01",
                            a.username,
                            token.expose()
                        ),
                    },
                )
                .await
                .map_err(|(e, _)| format!("AUTHENTICATE XOAUTH2: {e}"))
        }
    }
}

/// The SASL XOAUTH2 answer. It holds a bearer token: never logged.
struct XOAuth2 {
    sasl: String,
}

impl async_imap::Authenticator for XOAuth2 {
    type Response = String;

    fn process(&mut self, _challenge: &[u8]) -> String {
        // A challenge after the first answer is the server's error: an
        // empty answer ends the exchange.
        std::mem::take(&mut self.sasl)
    }
}

async fn tls(a: &ImapAccount, tcp: Socket) -> Result<TlsStream<Socket>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let host = a.host.as_str();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = match &a.ca_pem {
        Some(pem) => {
            let roots = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("TLS: ca_file: {e}"))?;
            rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
        }
        None => rustls_platform_verifier::Verifier::new(provider.clone()),
    }
    .map_err(|e| format!("TLS: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("TLS: {host:?}: {e}"))?;
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))
}
