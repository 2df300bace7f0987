//! OAuth2 access tokens for relays that authenticate with SASL XOAUTH2
//! (Microsoft 365, Gmail): the validated `[relays.oauth]` settings, the
//! provider presets, and [`OAuthClient`], which gets tokens with the `oauth2`
//! crate over reqwest, caches each until shortly before it expires, and
//! refreshes it when the SMTP server refuses it.
//!
//! Secrets (the client secret, the refresh token, the access token) stay in
//! [`Secret`]s; errors and logs name the token endpoint, never a secret. A
//! refresh token (or client secret) given as a file is read again at every
//! refresh, so rotating the file needs no restart. A refresh token the
//! provider rotates is kept in memory until the file changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mailmux_actors::{FetchToken, Secret, TokenSource};
use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// How long a token is assumed to live when the provider does not say.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// A token is refreshed this long before it expires, at most (a fifth of
/// its lifetime for short-lived ones).
const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// The longest a token is cached, whatever the provider says: a lifetime
/// past what the clock can count must not overflow it.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long one token request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest answer read from a token endpoint: a token response is a
/// few kilobytes; past this the request fails rather than fill memory for
/// the rest of [`REQUEST_TIMEOUT`].
const MAX_ANSWER: usize = 256 * 1024;

/// A secret given in the configuration, or a file to read it from.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretFrom {
    Value(Secret),
    File(PathBuf),
}

impl SecretFrom {
    /// The secret now (a file is read again each time).
    fn read(&self) -> Result<String, String> {
        match self {
            SecretFrom::Value(s) => Ok(s.expose().to_owned()),
            SecretFrom::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let text = text.trim_end_matches(['\r', '\n']).to_owned();
                if text.is_empty() {
                    return Err(format!("{} is empty", path.display()));
                }
                Ok(text)
            }
        }
    }

    fn fingerprint(&self, h: &mut Sha256) {
        match self {
            SecretFrom::Value(s) => {
                h.update(b"value\0");
                h.update(s.expose().as_bytes());
            }
            SecretFrom::File(p) => {
                h.update(b"file\0");
                h.update(p.display().to_string().as_bytes());
            }
        }
        h.update(b"\0");
    }
}

/// Which OAuth2 grant gets the tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// A refresh token from a one-time consent (delegated access).
    RefreshToken(SecretFrom),
    /// The application's own identity (Microsoft's app-only SMTP).
    ClientCredentials,
}

impl Grant {
    pub fn as_str(&self) -> &'static str {
        match self {
            Grant::RefreshToken(_) => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// A relay's validated `[relays.oauth]`.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthSettings {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<SecretFrom>,
    pub grant: Grant,
    pub scopes: Vec<String>,
}

/// A provider's token endpoint and scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Microsoft,
    Google,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "microsoft" => Some(Provider::Microsoft),
            "google" => Some(Provider::Google),
            _ => None,
        }
    }

    /// The token endpoint; Microsoft's names the tenant (`organizations`
    /// when none is given, which the client-credentials grant refuses).
    pub fn token_url(self, tenant: Option<&str>) -> String {
        match self {
            Provider::Microsoft => format!(
                "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                tenant.unwrap_or("organizations")
            ),
            Provider::Google => "https://oauth2.googleapis.com/token".into(),
        }
    }

    /// The scopes SMTP submission needs under `grant`.
    pub fn scopes(self, grant: &Grant) -> Vec<String> {
        match (self, grant) {
            (Provider::Microsoft, Grant::ClientCredentials) => {
                vec!["https://outlook.office365.com/.default".into()]
            }
            (Provider::Microsoft, Grant::RefreshToken(_)) => vec![
                "https://outlook.office.com/SMTP.Send".into(),
                "offline_access".into(),
            ],
            (Provider::Google, _) => vec!["https://mail.google.com/".into()],
        }
    }
}

/// Whether `url` may carry a secret: `https`, or `http` to a loopback host.
pub fn may_carry_secrets(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let loopback = || {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback())
    };
    match url.scheme() {
        "https" => true,
        "http" => loopback(),
        _ => false,
    }
}

/// Whether `url` may carry secrets: `https`, or `http` to a loopback host.
pub fn token_url_ok(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            if may_carry_secrets(&parsed) {
                Ok(())
            } else {
                Err(format!(
                    "{url:?} is plain http: a token URL must be https (http only on a loopback host)"
                ))
            }
        }
        other => Err(format!("{url:?}: scheme {other:?} is not https")),
    }
}

/// What the client holds between requests.
#[derive(Debug, Default)]
struct Cache {
    /// The current access token and when to stop using it.
    token: Option<(Secret, Instant)>,
    /// A refresh token the provider rotated, with the configured one it
    /// replaced (a change of the file wins over it).
    rotated: Option<(String, Secret)>,
}

/// Gets, caches and refreshes one relay's access tokens.
#[derive(Debug)]
pub struct OAuthClient {
    settings: OAuthSettings,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Cache>,
}

impl OAuthClient {
    pub fn new(settings: OAuthSettings) -> Result<Self, String> {
        token_url_ok(&settings.token_url)?;
        let http = reqwest::Client::builder()
            // The token endpoint answers itself; a redirect could send the
            // secrets elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(OAuthClient {
            settings,
            http,
            cache: tokio::sync::Mutex::new(Cache::default()),
        })
    }

    /// The relay's token source over this client.
    pub fn source(settings: OAuthSettings) -> Result<TokenSource, String> {
        let mut h = Sha256::new();
        for part in [
            settings.token_url.as_str(),
            settings.client_id.as_str(),
            settings.grant.as_str(),
        ] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        for scope in &settings.scopes {
            h.update(scope.as_bytes());
            h.update(b"\0");
        }
        if let Some(s) = &settings.client_secret {
            s.fingerprint(&mut h);
        }
        if let Grant::RefreshToken(r) = &settings.grant {
            r.fingerprint(&mut h);
        }
        let label = reqwest::Url::parse(&settings.token_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "the token endpoint".into());
        let client = Arc::new(OAuthClient::new(settings)?);
        Ok(TokenSource::new(label, h.finalize().into(), client))
    }

    /// Asks the token endpoint for a new access token.
    async fn request(&self, cache: &mut Cache) -> Result<(Secret, Duration), String> {
        let s = &self.settings;
        let token_url = TokenUrl::new(s.token_url.clone()).map_err(|e| e.to_string())?;
        let mut client = BasicClient::new(ClientId::new(s.client_id.clone()))
            .set_token_uri(token_url)
            // Microsoft and Google both take the secret in the body.
            .set_auth_type(AuthType::RequestBody);
        if let Some(secret) = &s.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.read()?));
        }
        let scopes = s.scopes.iter().map(|sc| Scope::new(sc.clone()));
        let response = match &s.grant {
            Grant::ClientCredentials => client
                .exchange_client_credentials()
                .add_scopes(scopes)
                .request_async(&Bounded(&self.http))
                .await
                .map_err(describe)?,
            Grant::RefreshToken(from) => {
                let configured = from.read()?;
                let current = match &cache.rotated {
                    Some((replaced, rotated)) if *replaced == configured => {
                        rotated.expose().to_owned()
                    }
                    _ => configured.clone(),
                };
                let response = client
                    .exchange_refresh_token(&RefreshToken::new(current.clone()))
                    .add_scopes(scopes)
                    .request_async(&Bounded(&self.http))
                    .await
                    .map_err(describe)?;
                if let Some(new) = response.refresh_token()
                    && new.secret() != &current
                {
                    cache.rotated = Some((configured, Secret::new(new.secret().clone())));
                }
                response
            }
        };
        let lifetime = response
            .expires_in()
            .unwrap_or(DEFAULT_LIFETIME)
            .min(MAX_LIFETIME);
        Ok((
            Secret::new(response.access_token().secret().clone()),
            lifetime,
        ))
    }
}

/// reqwest as oauth2's HTTP client, reading at most [`MAX_ANSWER`] of the
/// answer (oauth2's own reqwest client reads it whole, however long).
struct Bounded<'a>(&'a reqwest::Client);

type HttpError = oauth2::HttpClientError<reqwest::Error>;

impl<'c> oauth2::AsyncHttpClient<'c> for Bounded<'_> {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request).map_err(Box::new)?;
            let mut response = self.0.execute(request).await.map_err(Box::new)?;
            let mut answer = oauth2::http::Response::builder()
                .status(response.status())
                .version(response.version());
            for (name, value) in response.headers() {
                answer = answer.header(name, value);
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(Box::new)? {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return Err(HttpError::Other(format!(
                        "the answer passed {} KiB; a token response is a few",
                        MAX_ANSWER / 1024
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            answer.body(body).map_err(HttpError::Http)
        })
    }
}

/// A token request's failure, in words that hold no secret.
fn describe<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    e: oauth2::RequestTokenError<RE, T>,
) -> String {
    match e {
        oauth2::RequestTokenError::ServerResponse(r) => {
            format!("the token endpoint refused: {r}")
        }
        oauth2::RequestTokenError::Request(e) => {
            let mut text = format!("request failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
        oauth2::RequestTokenError::Parse(e, _) => {
            format!("the token endpoint's answer is not a token response: {e}")
        }
        oauth2::RequestTokenError::Other(e) => e,
    }
}

#[async_trait::async_trait]
impl FetchToken for OAuthClient {
    async fn token(&self, fresh: bool) -> Result<Secret, String> {
        let mut cache = self.cache.lock().await;
        if !fresh
            && let Some((token, until)) = &cache.token
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        cache.token = None;
        let (token, lifetime) = self.request(&mut cache).await?;
        let ahead = REFRESH_AHEAD.min(lifetime / 5);
        cache.token = Some((token.clone(), Instant::now() + lifetime - ahead));
        tracing::debug!(
            endpoint = %self.settings.token_url,
            lifetime_s = lifetime.as_secs(),
            "OAuth2 access token obtained"
        );
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_urls_must_be_https_except_on_loopback() {
        assert!(token_url_ok("https://login.microsoftonline.com/x/oauth2/v2.0/token").is_ok());
        assert!(token_url_ok("http://127.0.0.1:8080/token").is_ok());
        assert!(token_url_ok("http://localhost/token").is_ok());
        assert!(token_url_ok("http://[::1]:9/token").is_ok());
        assert!(token_url_ok("http://oauth.example.com/token").is_err());
        assert!(token_url_ok("ftp://127.0.0.1/token").is_err());
        assert!(token_url_ok("not a url").is_err());
    }

    #[test]
    fn presets() {
        assert_eq!(
            Provider::Microsoft.token_url(Some("contoso.onmicrosoft.com")),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            Provider::Microsoft.scopes(&Grant::ClientCredentials),
            ["https://outlook.office365.com/.default"]
        );
        assert_eq!(
            Provider::Google.scopes(&Grant::ClientCredentials),
            ["https://mail.google.com/"]
        );
    }
}
