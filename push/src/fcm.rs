//! The FCM HTTP v1 client: OAuth2 with a service account, then
//! `POST /v1/projects/<project>/messages:send` over HTTP/2.
//!
//! The access token comes from the service account's token endpoint in
//! exchange for a signed RS256 assertion (`iss` = client email, `scope` =
//! firebase.messaging, `aud` = the token URI, an hour at most) and is cached
//! until shortly before it expires: one exchange an hour, whatever the rate.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::conn::{ConnConfig, H2Connection, Response, TransportError, Url};
use crate::tls::TrustRoots;
use crate::{retry_after, unix_ms, Attempt, PushError};

pub const FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fields of a Google service-account key file this client needs.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub project_id: Option<String>,
    pub private_key_id: Option<String>,
    pub private_key: String,
    pub client_email: String,
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Parses the JSON key file's contents.
    pub fn from_json(json: &[u8]) -> Result<Self, PushError> {
        let account: ServiceAccount = serde_json::from_slice(json).map_err(|e| {
            PushError::Config(format!(
                "not a Google service-account key ({e}); give the JSON key downloaded from \
                 the Firebase console (Project settings → Service accounts)"
            ))
        })?;
        if let Some(kind) = &account.kind {
            if kind != "service_account" {
                return Err(PushError::Config(format!(
                    "the key's type is {kind:?}, not \"service_account\""
                )));
            }
        }
        Ok(account)
    }

    /// Reads and parses the JSON key file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, PushError> {
        let json = std::fs::read(path).map_err(|e| {
            PushError::Config(format!(
                "cannot read the FCM service-account key {}: {e} (the JSON key from the \
                 Firebase console, Project settings → Service accounts)",
                path.display()
            ))
        })?;
        Self::from_json(&json)
            .map_err(|PushError::Config(m)| PushError::Config(format!("{}: {m}", path.display())))
    }
}

/// How to reach FCM and sign in.
#[derive(Clone, Debug)]
pub struct FcmConfig {
    /// [`FCM_ENDPOINT`] or a test server's URL.
    pub endpoint: String,
    pub account: ServiceAccount,
    /// The Firebase project; the service account's `project_id` if unset.
    pub project_id: Option<String>,
    /// The token endpoint; the service account's `token_uri` if unset.
    pub token_uri: Option<String>,
    /// An access token is replaced this long before it expires.
    pub refresh_margin: Duration,
    /// Assertion lifetime (Google's limit: an hour).
    pub assertion_lifetime: Duration,
    pub trust: TrustRoots,
    pub conn: ConnConfig,
}

impl FcmConfig {
    pub fn new(endpoint: impl Into<String>, account: ServiceAccount) -> Self {
        Self {
            endpoint: endpoint.into(),
            account,
            project_id: None,
            token_uri: None,
            refresh_margin: Duration::from_secs(5 * 60),
            assertion_lifetime: Duration::from_secs(3600),
            trust: TrustRoots::WebPki,
            conn: ConnConfig::default(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub scope: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

struct AccessToken {
    bearer: Arc<str>,
    refresh_at: Instant,
}

/// Counters of one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FcmStats {
    pub connects: u64,
    pub drops: u64,
    /// Assertions exchanged for an access token.
    pub token_exchanges: u64,
}

/// The FCM client for one project. Cheap to clone.
#[derive(Clone)]
pub struct FcmClient {
    inner: Arc<Inner>,
}

struct Inner {
    send_conn: H2Connection,
    /// The token endpoint's own connection (usually another host), also
    /// kept open: it is used once an hour.
    token_conn: H2Connection,
    token_url: Url,
    send_path: String,
    key: EncodingKey,
    config: FcmConfig,
    /// Single-flight: concurrent requests wait for one exchange.
    token: tokio::sync::Mutex<Option<AccessToken>>,
    exchanges: AtomicU64,
}

impl FcmClient {
    /// Checks the configuration (the key parses, the project is known).
    /// The first exchange happens with the first push.
    pub fn new(config: FcmConfig) -> Result<Self, PushError> {
        let account = &config.account;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|e| {
            PushError::Config(format!(
                "the service account {}'s private_key is not an RSA private key in PEM ({e})",
                account.client_email
            ))
        })?;
        let project = config
            .project_id
            .clone()
            .or_else(|| account.project_id.clone())
            .ok_or_else(|| {
                PushError::Config(
                    "FCM: no project id (set it, or use a key with project_id)".into(),
                )
            })?;
        let token_uri = config
            .token_uri
            .clone()
            .unwrap_or_else(|| account.token_uri.clone());
        let token_url = Url::parse(&token_uri)?;
        let send_url = Url::parse(&config.endpoint)?;
        Ok(Self {
            inner: Arc::new(Inner {
                send_conn: H2Connection::new(send_url, &config.trust, config.conn.clone())?,
                token_conn: H2Connection::new(
                    token_url.clone(),
                    &config.trust,
                    config.conn.clone(),
                )?,
                token_url,
                send_path: format!("/v1/projects/{project}/messages:send"),
                key,
                config,
                token: tokio::sync::Mutex::new(None),
                exchanges: AtomicU64::new(0),
            }),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.config.endpoint
    }

    pub fn stats(&self) -> FcmStats {
        let c = self.inner.send_conn.stats();
        FcmStats {
            connects: c.connects.load(Ordering::Relaxed),
            drops: c.drops.load(Ordering::Relaxed),
            token_exchanges: self.inner.exchanges.load(Ordering::Relaxed),
        }
    }

    fn assertion(&self) -> Result<String, String> {
        let inner = &self.inner;
        let account = &inner.config.account;
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let lifetime = inner
            .config
            .assertion_lifetime
            .min(Duration::from_secs(3600));
        let claims = AssertionClaims {
            iss: account.client_email.clone(),
            scope: FCM_SCOPE.into(),
            aud: inner.token_url.with_path(&inner.token_url.path),
            iat,
            exp: iat + lifetime.as_secs(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = account.private_key_id.clone();
        jsonwebtoken::encode(&header, &claims, &inner.key).map_err(|e| {
            format!(
                "cannot sign the OAuth assertion for {}: {e}",
                account.client_email
            )
        })
    }

    /// The cached access token, exchanged anew when near expiry or when
    /// `stale` (the one FCM just refused) is still the cached one.
    async fn access_token(&self, stale: Option<&Arc<str>>) -> Result<Arc<str>, Attempt> {
        let mut slot = self.inner.token.lock().await;
        if let Some(t) = &*slot {
            let refused = stale.is_some_and(|s| Arc::ptr_eq(s, &t.bearer));
            if !refused && Instant::now() < t.refresh_at {
                return Ok(t.bearer.clone());
            }
        }
        let token = self.exchange().await?;
        let bearer = token.bearer.clone();
        *slot = Some(token);
        Ok(bearer)
    }

    async fn exchange(&self) -> Result<AccessToken, Attempt> {
        let inner = &self.inner;
        let assertion = self
            .assertion()
            .map_err(|reason| Attempt::Failed { reason })?;
        let form = format!(
            "grant_type={}&assertion={assertion}",
            form_encode(JWT_BEARER_GRANT)
        );
        let request = Request::post(inner.token_url.with_path(&inner.token_url.path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(())
            .map_err(|e| Attempt::Failed {
                reason: format!("token request: {e}"),
            })?;
        let started = Instant::now();
        let response = inner
            .token_conn
            .request(request, Bytes::from(form))
            .await
            .map_err(|e| Attempt::Retry {
                after: None,
                reason: format!("OAuth token: {e}"),
            })?;
        inner.exchanges.fetch_add(1, Ordering::Relaxed);
        if response.status != 200 {
            let text = String::from_utf8_lossy(&response.body).into_owned();
            let reason = format!(
                "OAuth token exchange for {} at {} refused: HTTP {} {text}",
                inner.config.account.client_email,
                inner.token_url.with_path(&inner.token_url.path),
                response.status
            );
            return Err(if response.status >= 500 || response.status == 429 {
                Attempt::Retry {
                    after: retry_after(response.header("retry-after")),
                    reason,
                }
            } else {
                // invalid_grant and friends: the key or the account is wrong.
                Attempt::Failed { reason }
            });
        }
        let answer: TokenAnswer =
            serde_json::from_slice(&response.body).map_err(|e| Attempt::Retry {
                after: None,
                reason: format!("OAuth token answer unreadable: {e}"),
            })?;
        let lifetime = Duration::from_secs(answer.expires_in);
        let refresh_at = started + lifetime.saturating_sub(inner.config.refresh_margin);
        tracing::debug!(expires_in = answer.expires_in, "FCM access token obtained");
        Ok(AccessToken {
            bearer: format!("Bearer {}", answer.access_token).into(),
            refresh_at,
        })
    }

    /// Sends one message (`body` from [`crate::Notification::fcm_body`]);
    /// a 401 for an access token the server no longer takes is answered by
    /// one exchange and one more try.
    pub async fn send(&self, body: Bytes) -> Attempt {
        let mut refused: Option<Arc<str>> = None;
        loop {
            let bearer = match self.access_token(refused.as_ref()).await {
                Ok(b) => b,
                Err(attempt) => return attempt,
            };
            let response = match self.post(&bearer, body.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    return Attempt::Retry {
                        after: None,
                        reason: e.to_string(),
                    }
                }
            };
            let attempt = classify(&response);
            if response.status == 401 && refused.is_none() && attempt_is_auth(&response) {
                refused = Some(bearer);
                continue;
            }
            return attempt;
        }
    }

    async fn post(&self, bearer: &str, body: Bytes) -> Result<Response, TransportError> {
        let inner = &self.inner;
        let request = Request::post(inner.send_conn.url().with_path(&inner.send_path))
            .header("authorization", bearer)
            .header("content-type", "application/json; charset=UTF-8")
            .body(())
            .map_err(|e| TransportError::Lost {
                endpoint: inner.send_conn.url().authority(),
                reason: format!("request not buildable: {e}"),
            })?;
        inner.send_conn.request(request, body).await
    }
}

/// A 401 about our access token (not THIRD_PARTY_AUTH_ERROR, which is about
/// the APNs/web-push credentials uploaded to Firebase).
fn attempt_is_auth(response: &Response) -> bool {
    fcm_error(&response.body).0.as_deref() != Some("THIRD_PARTY_AUTH_ERROR")
}

#[derive(Deserialize)]
struct StatusBody {
    error: StatusError,
}

#[derive(Deserialize)]
struct StatusError {
    message: Option<String>,
    status: Option<String>,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

/// (FcmError errorCode, google.rpc status, message) of an error body.
fn fcm_error(body: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let Ok(parsed) = serde_json::from_slice::<StatusBody>(body) else {
        return (None, None, None);
    };
    let code = parsed.error.details.iter().find_map(|d| {
        let is_fcm = d["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"));
        is_fcm
            .then(|| d["errorCode"].as_str().map(str::to_owned))
            .flatten()
    });
    (code, parsed.error.status, parsed.error.message)
}

/// Google's documented answers, as what to do next.
fn classify(response: &Response) -> Attempt {
    if response.status == 200 {
        #[derive(Deserialize)]
        struct Sent {
            name: Option<String>,
        }
        let id = serde_json::from_slice::<Sent>(&response.body)
            .ok()
            .and_then(|s| s.name);
        return Attempt::Delivered { id };
    }
    let (code, status, message) = fcm_error(&response.body);
    let after = retry_after(response.header("retry-after"));
    let reason = format!(
        "{} {}{}",
        response.status,
        code.as_deref().or(status.as_deref()).unwrap_or("error"),
        message.map(|m| format!(": {m}")).unwrap_or_default()
    );
    match (response.status, code.as_deref()) {
        (_, Some("UNREGISTERED")) | (404, None) => Attempt::TokenInvalid {
            since_ms: unix_ms(),
            reason,
        },
        (_, Some("QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL")) => {
            Attempt::Retry { after, reason }
        }
        (429, _) | (500..=599, _) => Attempt::Retry { after, reason },
        // INVALID_ARGUMENT, SENDER_ID_MISMATCH, THIRD_PARTY_AUTH_ERROR,
        // and anything else: sending it again will not help.
        _ => Attempt::Failed { reason },
    }
}

/// `application/x-www-form-urlencoded` for a value (the JWT is already
/// URL-safe base64 and dots).
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` (for the test server).
pub fn form_decode(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |c: u8| (c as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_round_trip() {
        let enc = form_encode(JWT_BEARER_GRANT);
        assert_eq!(enc, "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer");
        let pairs = form_decode(&format!("grant_type={enc}&assertion=a.b_c-d"));
        assert_eq!(pairs[0], ("grant_type".into(), JWT_BEARER_GRANT.into()));
        assert_eq!(pairs[1], ("assertion".into(), "a.b_c-d".into()));
        assert_eq!(form_decode("x=%4"), vec![("x".into(), "%4".into())]);
    }

    #[test]
    fn a_bad_service_account_says_what_to_give() {
        let e = ServiceAccount::from_json(b"{}").unwrap_err().to_string();
        assert!(e.contains("service-account key"), "{e}");
        let e = ServiceAccount::from_file(Path::new("/nonexistent/sa.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/sa.json"), "{e}");
    }
}
