//! An FCM test server: the OAuth2 token endpoint (JWT-bearer grant with a
//! service account's RS256 assertion) and HTTP v1 `messages:send`, as
//! Google documents them, scripted per registration token.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use super::server::{self, Answer, Handler, Incoming, Running, TestCa};
use crate::fcm::{
    form_decode, AssertionClaims, FcmConfig, ServiceAccount, FCM_SCOPE, JWT_BEARER_GRANT,
};
use crate::notification::FCM_MAX_PAYLOAD;
use crate::{PushError, TrustRoots};

/// What the server accepts.
#[derive(Clone, Debug)]
pub struct FcmServerConfig {
    pub project_id: String,
    /// The service account allowed to send (`iss` of assertions).
    pub client_email: String,
    /// Its public key (SPKI PEM): assertion signatures are checked with it.
    pub public_key_pem: String,
    /// `expires_in` of the access tokens issued.
    pub token_lifetime: Duration,
    pub max_concurrent_streams: u32,
    pub max_recorded: usize,
}

impl FcmServerConfig {
    pub fn new(project_id: &str, client_email: &str, public_key_pem: &str) -> Self {
        Self {
            project_id: project_id.into(),
            client_email: client_email.into(),
            public_key_pem: public_key_pem.into(),
            token_lifetime: Duration::from_secs(3600),
            max_concurrent_streams: 100,
            max_recorded: 100_000,
        }
    }
}

/// A scripted answer for one send to a registration token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FcmReply {
    /// 200 with the message name.
    Accept,
    /// An error with the FcmError `error_code` (its HTTP status and
    /// google.rpc status as documented), `Retry-After` seconds if given.
    Error {
        error_code: String,
        retry_after: Option<u64>,
    },
    DropConnection,
    /// Never answer (the connection stays open): a silent server.
    Stall,
}

impl FcmReply {
    pub fn error(error_code: &str) -> Self {
        FcmReply::Error {
            error_code: error_code.into(),
            retry_after: None,
        }
    }
    pub fn unregistered() -> Self {
        Self::error("UNREGISTERED")
    }
    pub fn quota_exceeded(retry_after: Option<u64>) -> Self {
        FcmReply::Error {
            error_code: "QUOTA_EXCEEDED".into(),
            retry_after,
        }
    }
    pub fn unavailable(retry_after: Option<u64>) -> Self {
        FcmReply::Error {
            error_code: "UNAVAILABLE".into(),
            retry_after,
        }
    }
}

/// One send as the server saw it, and what it answered.
#[derive(Clone, Debug)]
pub struct FcmReceived {
    pub connection: u64,
    /// `message.token`, if the body had one.
    pub token: Option<String>,
    pub message: Value,
    /// None: the connection was dropped.
    pub status: Option<u16>,
    /// The FcmError code or google.rpc status answered.
    pub error: Option<String>,
}

#[derive(Default)]
struct State {
    scripts: HashMap<String, VecDeque<FcmReply>>,
    received: Vec<FcmReceived>,
    /// Access token → expiry.
    access: HashMap<String, Instant>,
    exchanges: u64,
    exchanges_refused: u64,
    delivered: u64,
    next_id: u64,
}

struct Fcm {
    config: FcmServerConfig,
    key: DecodingKey,
    token_url: String,
    state: Mutex<State>,
}

/// The running server; stops when dropped.
pub struct FcmTestServer {
    inner: Arc<Fcm>,
    running: Running,
    ca: TestCa,
}

fn status_of(code: &str) -> (u16, &'static str) {
    match code {
        "UNREGISTERED" => (404, "NOT_FOUND"),
        "INVALID_ARGUMENT" => (400, "INVALID_ARGUMENT"),
        "SENDER_ID_MISMATCH" => (403, "PERMISSION_DENIED"),
        "QUOTA_EXCEEDED" => (429, "RESOURCE_EXHAUSTED"),
        "UNAVAILABLE" => (503, "UNAVAILABLE"),
        "THIRD_PARTY_AUTH_ERROR" => (401, "UNAUTHENTICATED"),
        _ => (500, "INTERNAL"),
    }
}

fn rpc_error(status: u16, rpc_status: &str, message: &str, fcm_code: Option<&str>) -> Value {
    let mut error = json!({ "code": status, "message": message, "status": rpc_status });
    if let Some(code) = fcm_code {
        error["details"] = json!([{ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code }]);
    }
    json!({ "error": error })
}

impl FcmTestServer {
    pub async fn start(config: FcmServerConfig) -> Result<Self, PushError> {
        let key = DecodingKey::from_rsa_pem(config.public_key_pem.as_bytes())
            .map_err(|e| PushError::Config(format!("test server: public key: {e}")))?;
        let ca = TestCa::new();
        let bind_error = |e: std::io::Error| PushError::Config(format!("test server: bind: {e}"));
        let listener = server::bind().await.map_err(bind_error)?;
        // The assertions' audience names the port.
        let token_url = format!(
            "https://{}/token",
            listener.local_addr().map_err(bind_error)?
        );
        let inner = Arc::new(Fcm {
            key,
            config,
            token_url,
            state: Mutex::new(State::default()),
        });
        let running = server::start(
            listener,
            &ca,
            inner.config.max_concurrent_streams,
            inner.clone(),
        )
        .map_err(bind_error)?;
        Ok(Self { inner, running, ca })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.running.addr)
    }

    /// The token endpoint (`token_uri`, the assertions' audience).
    pub fn token_url(&self) -> &str {
        &self.inner.token_url
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.ca_pem
    }

    /// A service-account key file's JSON naming this server's token
    /// endpoint, with `private_key_pem` as its key.
    pub fn service_account_json(&self, private_key_pem: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": self.inner.config.project_id,
            "private_key_id": "test-key-1",
            "private_key": private_key_pem,
            "client_email": self.inner.config.client_email,
            "client_id": "1",
            "token_uri": self.inner.token_url,
        })
        .to_string()
    }

    /// A client config pointing here, trusting this server's CA.
    pub fn client_config(&self, private_key_pem: &str) -> Result<FcmConfig, PushError> {
        let account =
            ServiceAccount::from_json(self.service_account_json(private_key_pem).as_bytes())?;
        let mut config = FcmConfig::new(self.url(), account);
        config.trust = TrustRoots::Pem(self.ca.ca_pem.as_bytes().to_vec());
        Ok(config)
    }

    pub fn script(&self, token: &str, replies: impl IntoIterator<Item = FcmReply>) {
        self.state()
            .scripts
            .entry(token.into())
            .or_default()
            .extend(replies);
    }

    pub fn received(&self) -> Vec<FcmReceived> {
        self.state().received.clone()
    }

    pub fn delivered_to(&self, token: &str) -> usize {
        self.state()
            .received
            .iter()
            .filter(|r| r.token.as_deref() == Some(token) && r.status == Some(200))
            .count()
    }

    pub fn delivered(&self) -> u64 {
        self.state().delivered
    }

    /// Access tokens issued.
    pub fn token_exchanges(&self) -> u64 {
        self.state().exchanges
    }

    /// Exchanges refused (bad assertion).
    pub fn exchanges_refused(&self) -> u64 {
        self.state().exchanges_refused
    }

    /// Invalidates every access token issued (as a revocation would).
    pub fn revoke_access_tokens(&self) {
        self.state().access.clear();
    }

    pub fn connections(&self) -> u64 {
        self.running.connections.load(Ordering::Relaxed)
    }

    /// Connections refused during an outage.
    pub fn refused(&self) -> u64 {
        self.running.refused.load(Ordering::Relaxed)
    }

    /// Starts (`true`) or ends an outage: open connections are closed and
    /// new ones refused; port, CA, scripts and records stay.
    pub fn set_down(&self, down: bool) {
        self.running.set_down(down);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn oauth_error(error: &str, description: &str) -> Answer {
    Answer::json(
        400,
        &json!({ "error": error, "error_description": description }),
    )
}

impl Handler for Fcm {
    fn handle(&self, req: Incoming<'_>) -> Answer {
        let path = req.parts.uri.path().to_owned();
        if req.parts.method != http::Method::POST {
            return Answer::json(
                405,
                &rpc_error(405, "METHOD_NOT_ALLOWED", "POST only", None),
            );
        }
        if path == "/token" {
            return self.token(&req);
        }
        self.send(&req, &path)
    }
}

impl Fcm {
    fn token(&self, req: &Incoming<'_>) -> Answer {
        let refused = |error: &str, description: &str| {
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .exchanges_refused += 1;
            oauth_error(error, description)
        };
        if !req
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
        {
            return refused("invalid_request", "Bad Request");
        }
        let form: HashMap<String, String> = form_decode(&String::from_utf8_lossy(req.body))
            .into_iter()
            .collect();
        if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT) {
            return refused("unsupported_grant_type", "Invalid grant_type");
        }
        let Some(assertion) = form.get("assertion") else {
            return refused("invalid_request", "Missing required parameter: assertion");
        };
        match jsonwebtoken::decode_header(assertion) {
            Ok(h) if h.alg == Algorithm::RS256 => {}
            _ => return refused("invalid_grant", "Invalid JWT: alg must be RS256"),
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.token_url]);
        validation.set_issuer(&[&self.config.client_email]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
        validation.leeway = 0;
        let claims =
            match jsonwebtoken::decode::<AssertionClaims>(assertion, &self.key, &validation) {
                Ok(d) => d.claims,
                Err(e) => {
                    let why = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                            "Invalid JWT Signature.".to_owned()
                        }
                        other => format!("Invalid JWT: {other:?}"),
                    };
                    return refused("invalid_grant", &why);
                }
            };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if claims.exp.saturating_sub(claims.iat) > 3600 || claims.iat > now + 60 {
            return refused("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.");
        }
        if !claims.scope.split(' ').any(|s| s == FCM_SCOPE) {
            return refused("invalid_scope", "firebase.messaging scope missing");
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.exchanges += 1;
        let token = format!(
            "ya29.test-{}-{:016x}",
            state.exchanges,
            rand::random::<u64>()
        );
        state
            .access
            .insert(token.clone(), Instant::now() + self.config.token_lifetime);
        Answer::json(
            200,
            &json!({ "access_token": token, "expires_in": self.config.token_lifetime.as_secs(), "token_type": "Bearer" }),
        )
    }

    fn send(&self, req: &Incoming<'_>, path: &str) -> Answer {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let message: Value = serde_json::from_slice(req.body).unwrap_or(Value::Null);
        let token = message["message"]["token"].as_str().map(str::to_owned);
        let reply = match self.check(req, path, &message, &state) {
            Err((status, rpc, msg, code)) => {
                let body = rpc_error(status, rpc, &msg, code);
                self.record(
                    &mut state,
                    req,
                    token,
                    message,
                    Some(status),
                    Some(code.unwrap_or(rpc).to_owned()),
                );
                return Answer::json(status, &body);
            }
            Ok(token) => state
                .scripts
                .get_mut(&token)
                .and_then(VecDeque::pop_front)
                .unwrap_or(FcmReply::Accept),
        };
        match reply {
            FcmReply::DropConnection => {
                self.record(&mut state, req, token, message, None, None);
                Answer::DropConnection
            }
            FcmReply::Stall => {
                self.record(&mut state, req, token, message, None, None);
                Answer::Stall
            }
            FcmReply::Accept => {
                state.delivered += 1;
                state.next_id += 1;
                let name = format!(
                    "projects/{}/messages/0:{}",
                    self.config.project_id, state.next_id
                );
                self.record(&mut state, req, token, message, Some(200), None);
                Answer::json(200, &json!({ "name": name }))
            }
            FcmReply::Error {
                error_code,
                retry_after,
            } => {
                let (status, rpc) = status_of(&error_code);
                self.record(
                    &mut state,
                    req,
                    token,
                    message,
                    Some(status),
                    Some(error_code.clone()),
                );
                let mut answer = Answer::json(
                    status,
                    &rpc_error(status, rpc, "scripted", Some(&error_code)),
                );
                if let (Some(secs), Answer::Respond { headers, .. }) = (retry_after, &mut answer) {
                    headers.push(("retry-after", secs.to_string()));
                }
                answer
            }
        }
    }

    /// Google's checks: credentials, project, then the message.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        req: &Incoming<'_>,
        path: &str,
        message: &Value,
        state: &State,
    ) -> Result<String, (u16, &'static str, String, Option<&'static str>)> {
        let bearer = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "));
        let valid = bearer
            .and_then(|b| state.access.get(b))
            .is_some_and(|exp| Instant::now() < *exp);
        if !valid {
            return Err((
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.".into(),
                None,
            ));
        }
        let Some(project) = path
            .strip_prefix("/v1/projects/")
            .and_then(|p| p.strip_suffix("/messages:send"))
        else {
            return Err((404, "NOT_FOUND", format!("no such method {path}"), None));
        };
        if project != self.config.project_id {
            return Err((
                403,
                "PERMISSION_DENIED",
                "SenderId mismatch".into(),
                Some("SENDER_ID_MISMATCH"),
            ));
        }
        let invalid = |m: &str| {
            (
                400,
                "INVALID_ARGUMENT",
                m.to_owned(),
                Some("INVALID_ARGUMENT"),
            )
        };
        let m = &message["message"];
        if !m.is_object() {
            return Err(invalid("Invalid JSON payload: no message"));
        }
        let token = m["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("message.token is required"))?;
        if let Some(ttl) = m["android"].get("ttl") {
            let ok = ttl
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .is_some_and(|n| n.parse::<f64>().is_ok_and(|v| v >= 0.0));
            if !ok {
                return Err(invalid("Invalid value at 'message.android.ttl'"));
            }
        }
        if let Some(p) = m["android"].get("priority") {
            if !matches!(p.as_str(), Some("NORMAL" | "HIGH")) {
                return Err(invalid("Invalid value at 'message.android.priority'"));
            }
        }
        if let Some(data) = m.get("data") {
            let ok = data
                .as_object()
                .is_some_and(|o| o.values().all(Value::is_string));
            if !ok {
                return Err(invalid(
                    "Invalid value at 'message.data': values must be strings",
                ));
            }
        }
        let size = ["data", "notification"]
            .iter()
            .filter_map(|k| m.get(*k))
            .map(|v| v.to_string().len())
            .sum::<usize>()
            + m["android"]
                .get("notification")
                .map_or(0, |v| v.to_string().len());
        if req.oversized || size > FCM_MAX_PAYLOAD {
            return Err(invalid("Message is too big"));
        }
        Ok(token.to_owned())
    }

    fn record(
        &self,
        state: &mut State,
        req: &Incoming<'_>,
        token: Option<String>,
        message: Value,
        status: Option<u16>,
        error: Option<String>,
    ) {
        if state.received.len() < self.config.max_recorded {
            state.received.push(FcmReceived {
                connection: req.connection,
                token,
                message,
                status,
                error,
            });
        }
    }
}
