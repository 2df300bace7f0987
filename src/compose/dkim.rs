//! DKIM signing (RFC 6376, with Ed25519 keys RFC 8463): the `[[dkim]]` keys
//! of the configuration, and the `DKIM-Signature` fields each composed
//! message gets from those whose domain is its sender's. The signing itself
//! is mail-auth's (on aws-lc-rs, which rustls already brings); this module
//! owns which keys sign which message, and which fields they cover.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use sha2::Digest;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// The header fields signed when a key names none: those a reader sees or
/// a mailbox provider acts on. Each is named in the signature whether the
/// message has it or not, so that one added on the way breaks it; `From` is
/// listed twice for the same reason (RFC 6376, 5.4.2 and 8.15). The two
/// unsubscribe fields are among them, as RFC 8058 asks.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-ID",
    "Feedback-ID",
    "Auto-Submitted",
];

/// The rule of the composition error of a key that could not sign.
pub const SIGNING_FAILED: &str = "signing_failed";

/// One configured key: the domain and selector it signs as.
pub struct Signer {
    /// The signing domain (`d=`), lowercase: it signs mail whose sender's
    /// domain is this one or below it.
    pub domain: String,
    /// The selector (`s=`): the key's DNS record is
    /// `{selector}._domainkey.{domain}`.
    pub selector: String,
    /// The algorithm, for status and the shown configuration.
    pub algorithm: &'static str,
    /// The key's DNS TXT record, `v=DKIM1; k=…; p=…`: the public key as
    /// verifiers read it (RSA: SubjectPublicKeyInfo; Ed25519: the raw 32
    /// bytes, RFC 8463).
    pub record: String,
    signer: DkimSigner<DkimKey, Done>,
    /// SHA-256 of the key file, to tell a changed key at reload. Never shown.
    fingerprint: [u8; 32],
    headers: Vec<String>,
}

impl Signer {
    /// Reads the private key in `pem`: PKCS#8 (RSA or Ed25519) or PKCS#1
    /// (RSA). The error says what is wrong with the key, never what it holds.
    pub fn new(
        domain: &str,
        selector: &str,
        pem: &[u8],
        headers: Vec<String>,
    ) -> Result<Signer, String> {
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| format!("is not a PEM private key (PKCS#8, or PKCS#1 for RSA): {e}"))?;
        let (key, algorithm, record): (DkimKey, _, _) = match &der {
            PrivateKeyDer::Pkcs8(p) => {
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(p.secret_pkcs8_der()) {
                    Ok(ed) => {
                        // RFC 8463: the record holds the raw 32-byte key.
                        let record = record("ed25519", &ed.public_key());
                        (ed.into(), "ed25519-sha256", record)
                    }
                    Err(_) => rsa(der.clone_key())?,
                }
            }
            PrivateKeyDer::Pkcs1(_) => rsa(der.clone_key())?,
            _ => return Err("is an EC key: DKIM signs with RSA or Ed25519 keys".into()),
        };
        let domain = domain.to_ascii_lowercase();
        let signer = DkimSigner::from_key(key)
            .domain(domain.clone())
            .selector(selector)
            .headers(headers.iter().cloned())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Signer {
            domain,
            selector: selector.to_string(),
            algorithm,
            record,
            signer,
            fingerprint: sha2::Sha256::digest(pem).into(),
            headers,
        })
    }

    /// Reads `path` as a key for [`Signer::new`].
    pub fn read(
        domain: &str,
        selector: &str,
        path: &Path,
        headers: Vec<String>,
    ) -> Result<Signer, String> {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        Signer::new(domain, selector, &pem, headers)
            .map_err(|why| format!("the key file {} {why}", path.display()))
    }

    /// Whether this key signs mail from `sender_domain`: its own domain or
    /// one below it, as DMARC's relaxed alignment reads them. A sender's
    /// internationalised domain is compared in its ASCII form (A-labels),
    /// the form the key's domain is kept in.
    fn covers(&self, sender_domain: &str) -> bool {
        let Some(d) = crate::policy::rules::ascii_domain(sender_domain) else {
            return false;
        };
        d == self.domain
            || d.strip_suffix(&self.domain)
                .is_some_and(|rest| rest.ends_with('.'))
    }

    /// The key's DNS record as a zone file line: the owner name, `IN TXT`,
    /// and the record in quoted strings of at most 255 characters each, as
    /// DNS requires of one string (RFC 1035, 3.3.14).
    pub fn zone_line(&self) -> String {
        let strings: Vec<String> = self
            .record
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!(
            "{}._domainkey.{}. IN TXT {}",
            self.selector,
            self.domain,
            strings.join(" ")
        )
    }
}

/// An RSA key, and its DNS record: the public key as SubjectPublicKeyInfo,
/// which `openssl rsa -pubout` writes and verifiers expect (mail-auth gives
/// the bare RSAPublicKey; aws-lc-rs, which it signs with, wraps it).
fn rsa(der: PrivateKeyDer<'_>) -> Result<(DkimKey, &'static str, String), String> {
    use aws_lc_rs::encoding::AsDer;
    let key = RsaKey::<Sha256>::from_key_der(der)
        .map_err(|_| "is neither an RSA nor an Ed25519 private key mailmux can use".to_string())?;
    let spki = aws_lc_rs::rsa::PublicKey::from_der(&key.public_key())
        .ok()
        .and_then(|public| public.as_der().ok())
        .ok_or("is an RSA key whose public key could not be encoded")?;
    Ok((key.into(), "rsa-sha256", record("rsa", spki.as_ref())))
}

/// A DNS TXT record of a DKIM key (RFC 6376, 3.6.1).
fn record(k: &str, public_key: &[u8]) -> String {
    use base64::Engine;
    let p = base64::engine::general_purpose::STANDARD.encode(public_key);
    format!("v=DKIM1; k={k}; p={p}")
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Signer {
    fn eq(&self, other: &Self) -> bool {
        self.domain == other.domain
            && self.selector == other.selector
            && self.headers == other.headers
            && self.fingerprint == other.fingerprint
    }
}

/// Every configured key, in the order configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signers(pub Vec<Arc<Signer>>);

impl Signers {
    /// Whether signing mail from `sender` (an address as a call or the
    /// configuration writes it, `None` when the sender is not known yet) is
    /// slow enough to be kept off the async workers: an RSA key takes about
    /// 0.22 ms of CPU a message (2048 bits), Ed25519 about 15 µs. When the
    /// sender's domain cannot be told, any RSA key counts.
    pub fn is_slow_for(&self, sender: Option<&str>) -> bool {
        let mut rsa = self
            .0
            .iter()
            .filter(|s| s.algorithm == "rsa-sha256")
            .peekable();
        if rsa.peek().is_none() {
            return false;
        }
        let domain = sender.and_then(|s| {
            let (_, domain) = s.rsplit_once('@')?;
            Some(domain.trim_end_matches(|c: char| c == '>' || c.is_whitespace()))
        });
        rsa.any(|s| domain.is_none_or(|d| s.covers(d)))
    }

    /// `bytes` with a `DKIM-Signature` field in front for each key that
    /// covers `sender_domain` (none: unchanged), in the order of the keys.
    /// Each signs the message as composed; none covers another's field.
    pub fn sign(&self, sender_domain: &str, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
        let mut fields = Vec::new();
        for s in self.0.iter().filter(|s| s.covers(sender_domain)) {
            let signature = s.signer.sign(&bytes).map_err(|e| {
                format!(
                    "the DKIM key of {} (selector {}) could not sign the message: {e}",
                    s.domain, s.selector
                )
            })?;
            fields.push(signature.to_header());
        }
        if fields.is_empty() {
            return Ok(bytes);
        }
        let mut out =
            Vec::with_capacity(bytes.len() + fields.iter().map(String::len).sum::<usize>());
        for f in &fields {
            out.extend_from_slice(f.as_bytes());
        }
        out.extend_from_slice(&bytes);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key of `domain` labelled `algorithm` (the key itself is Ed25519).
    fn signer(domain: &str, algorithm: &'static str) -> Signer {
        Signer {
            domain: domain.into(),
            selector: "s".into(),
            algorithm,
            record: String::new(),
            signer: DkimSigner::from_key(DkimKey::from(
                Ed25519Key::from_pkcs8_der(&Ed25519Key::generate_pkcs8().unwrap()).unwrap(),
            ))
            .domain(domain)
            .selector("s")
            .headers(["From"]),
            fingerprint: [0; 32],
            headers: vec!["From".into()],
        }
    }

    #[test]
    fn a_key_covers_its_domain_and_those_below_it_only() {
        let s = signer("example.org", "ed25519-sha256");
        assert!(s.covers("example.org"));
        assert!(s.covers("EXAMPLE.org"));
        assert!(s.covers("mail.example.org"));
        assert!(!s.covers("badexample.org"));
        assert!(!s.covers("example.org.evil"));
        assert!(!s.covers("org"));

        let idn = signer("xn--bcher-kva.example", "ed25519-sha256");
        assert!(idn.covers("bücher.example"));
        assert!(idn.covers("Mail.BÜCHER.example"));
        assert!(idn.covers("xn--bcher-kva.example"));
        assert!(!idn.covers("bucher.example"));
    }

    #[test]
    fn only_an_rsa_key_that_signs_the_sender_sends_composing_to_the_pool() {
        let keys = Signers(vec![
            Arc::new(signer("fast.example", "ed25519-sha256")),
            Arc::new(signer("slow.example", "rsa-sha256")),
        ]);
        assert!(keys.is_slow_for(Some("a@slow.example")));
        assert!(keys.is_slow_for(Some("Alerts <a@news.SLOW.example>")));
        assert!(!keys.is_slow_for(Some("a@fast.example")));
        assert!(!keys.is_slow_for(Some("a@elsewhere.example")));
        // The sender not known yet: any RSA key counts.
        assert!(keys.is_slow_for(None));
        assert!(keys.is_slow_for(Some("no address")));
        assert!(
            !Signers(vec![Arc::new(signer("fast.example", "ed25519-sha256"))]).is_slow_for(None)
        );
    }

    #[test]
    fn a_key_that_is_not_one_is_refused_without_its_contents() {
        let err = Signer::new("example.org", "s", b"not a key at all", vec![]).unwrap_err();
        assert!(err.contains("PEM private key"), "{err}");
        let pem = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n";
        let err = Signer::new("example.org", "s", pem, vec![]).unwrap_err();
        assert!(!err.contains("c2VjcmV0"), "{err}");
        assert!(err.contains("neither an RSA nor an Ed25519"), "{err}");
    }
}
