//! An APNs test server: Apple's provider API as documented (token-based
//! auth, `POST /3/device/<token>`, the `apns-*` headers, the status codes
//! and reasons), scripted per device token.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::json;

use super::server::{self, Answer, Handler, Incoming, Running, TestCa};
use crate::apns::{ApnsConfig, ProviderClaims};
use crate::notification::{APNS_MAX_COLLAPSE_ID, APNS_MAX_PAYLOAD};
use crate::{PushError, TrustRoots};

/// What the server accepts.
#[derive(Clone, Debug)]
pub struct ApnsServerConfig {
    pub team_id: String,
    pub key_id: String,
    /// The provider key's public half (SPKI PEM): signatures are checked
    /// against it.
    pub public_key_pem: String,
    /// Topics (bundle ids) the key may push to; any if empty.
    pub topics: Vec<String>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced to clients.
    pub max_concurrent_streams: u32,
    /// Tokens older than this: 403 ExpiredProviderToken (Apple: an hour).
    pub token_max_age: Duration,
    /// A new token on a connection sooner than this after the one in force
    /// on it: 429 TooManyProviderTokenUpdates (Apple: 20 minutes).
    pub min_token_renewal: Duration,
    /// Requests recorded at most (counters go on past it).
    pub max_recorded: usize,
}

impl ApnsServerConfig {
    pub fn new(team_id: &str, key_id: &str, public_key_pem: &str) -> Self {
        Self {
            team_id: team_id.into(),
            key_id: key_id.into(),
            public_key_pem: public_key_pem.into(),
            topics: Vec::new(),
            max_concurrent_streams: 1000,
            token_max_age: crate::apns::TOKEN_MAX_AGE,
            min_token_renewal: crate::apns::TOKEN_MIN_REFRESH,
            max_recorded: 100_000,
        }
    }
}

/// A scripted answer for one request to a device token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApnsReply {
    /// 200 with `apns-id`.
    Accept,
    /// `status` with `{"reason": reason}` (and `timestamp` for 410), and
    /// `Retry-After` seconds if given.
    Error {
        status: u16,
        reason: String,
        timestamp_ms: Option<i64>,
        retry_after: Option<u64>,
    },
    /// Close the connection without answering.
    DropConnection,
    /// Never answer (the connection stays open): a silent server.
    Stall,
}

impl ApnsReply {
    pub fn error(status: u16, reason: &str) -> Self {
        ApnsReply::Error {
            status,
            reason: reason.into(),
            timestamp_ms: None,
            retry_after: None,
        }
    }
    /// 410 Unregistered: the token has been invalid since `timestamp_ms`.
    pub fn unregistered(timestamp_ms: i64) -> Self {
        ApnsReply::Error {
            status: 410,
            reason: "Unregistered".into(),
            timestamp_ms: Some(timestamp_ms),
            retry_after: None,
        }
    }
    pub fn bad_device_token() -> Self {
        Self::error(400, "BadDeviceToken")
    }
    pub fn too_many_requests(retry_after: Option<u64>) -> Self {
        ApnsReply::Error {
            status: 429,
            reason: "TooManyRequests".into(),
            timestamp_ms: None,
            retry_after,
        }
    }
    pub fn unavailable(retry_after: Option<u64>) -> Self {
        ApnsReply::Error {
            status: 503,
            reason: "ServiceUnavailable".into(),
            timestamp_ms: None,
            retry_after,
        }
    }
    pub fn internal_error() -> Self {
        Self::error(500, "InternalServerError")
    }
}

/// One request as the server saw it, and what it answered.
#[derive(Clone, Debug)]
pub struct ApnsReceived {
    /// Which connection (1, 2, … in accept order).
    pub connection: u64,
    pub device_token: String,
    /// Every header but `authorization`, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// The provider token (JWT), if one was sent.
    pub jwt: Option<String>,
    /// Its claims, if its signature verified.
    pub claims: Option<(String, u64)>,
    pub payload: serde_json::Value,
    pub payload_len: usize,
    /// The answer: status and reason (None for 200 and dropped).
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub at: Instant,
}

impl ApnsReceived {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    scripts: HashMap<String, VecDeque<ApnsReply>>,
    received: Vec<ApnsReceived>,
    requests: u64,
    delivered: u64,
    /// Tokens whose signature verified (Apple validates a token once).
    verified: HashMap<String, Result<(String, u64), String>>,
    /// The token in force, and since when.
    /// Per connection: the token in force on it, and since when. Apple
    /// wants one provider token per connection, renewed no more than once
    /// every 20 minutes; separate connections (several provider servers
    /// sharing one key, each signing its own token) do not refuse each
    /// other's tokens.
    current: HashMap<u64, (String, Instant)>,
    tokens_accepted: u64,
    renewals_refused: u64,
    /// Tokens seen, to count distinct ones.
    seen: HashSet<String>,
}

struct Apns {
    config: ApnsServerConfig,
    key: DecodingKey,
    state: Mutex<State>,
}

/// The running server; stops when dropped.
pub struct ApnsTestServer {
    inner: Arc<Apns>,
    running: Running,
    ca: TestCa,
}

impl ApnsTestServer {
    /// Starts on a free loopback port, on the current tokio runtime.
    pub async fn start(config: ApnsServerConfig) -> Result<Self, PushError> {
        let key = DecodingKey::from_ec_pem(config.public_key_pem.as_bytes())
            .map_err(|e| PushError::Config(format!("test server: public key: {e}")))?;
        let ca = TestCa::new();
        let inner = Arc::new(Apns {
            key,
            state: Mutex::new(State::default()),
            config,
        });
        let bind_error = |e: std::io::Error| PushError::Config(format!("test server: bind: {e}"));
        let listener = server::bind().await.map_err(bind_error)?;
        let running = server::start(
            listener,
            &ca,
            inner.config.max_concurrent_streams,
            inner.clone(),
        )
        .map_err(bind_error)?;
        Ok(Self { inner, running, ca })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.running.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// The CA to trust ([`TrustRoots::Pem`]).
    pub fn ca_pem(&self) -> &str {
        &self.ca.ca_pem
    }

    /// Writes into `dir` what a deployment hands `palaver-push
    /// --providers` (or a gateway's `[push] providers`) for this server:
    /// the `.p8` key (`key`'s private half; this server checks its public
    /// half), the server's CA, and `push.toml` naming both with this
    /// server's team and key ids and its URL as APNs production. Returns
    /// the path of `push.toml`.
    pub fn write_providers(
        &self,
        dir: &std::path::Path,
        key: &super::TestKeyPair,
    ) -> std::io::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        let (key_file, ca_file) = (dir.join("AuthKey.p8"), dir.join("apns-ca.pem"));
        std::fs::write(&key_file, &key.private_pem)?;
        std::fs::write(&ca_file, self.ca_pem())?;
        let providers = dir.join("push.toml");
        std::fs::write(
            &providers,
            format!(
                "[apns]\nkey_file = {key_file:?}\nkey_id = {:?}\nteam_id = {:?}\n\
                 environments = [\"production\"]\nproduction_url = \"{}\"\nca_file = {ca_file:?}\n",
                self.inner.config.key_id,
                self.inner.config.team_id,
                self.url(),
            ),
        )?;
        Ok(providers)
    }

    /// A client config pointing here and trusting this server's CA.
    pub fn client_config(
        &self,
        key_id: &str,
        private_key_pem: &str,
    ) -> Result<ApnsConfig, PushError> {
        let mut config = ApnsConfig::new(
            self.url(),
            &self.inner.config.team_id,
            key_id,
            private_key_pem.as_bytes(),
        )?;
        config.trust = TrustRoots::Pem(self.ca.ca_pem.as_bytes().to_vec());
        Ok(config)
    }

    /// Answers for the next requests to `device_token`, in order; after
    /// them, [`ApnsReply::Accept`].
    pub fn script(&self, device_token: &str, replies: impl IntoIterator<Item = ApnsReply>) {
        self.state()
            .scripts
            .entry(device_token.into())
            .or_default()
            .extend(replies);
    }

    /// Every request recorded so far.
    pub fn received(&self) -> Vec<ApnsReceived> {
        self.state().received.clone()
    }

    /// Requests to `device_token` answered 200.
    pub fn delivered_to(&self, device_token: &str) -> usize {
        self.state()
            .received
            .iter()
            .filter(|r| r.device_token == device_token && r.status == Some(200))
            .count()
    }

    /// Requests answered 200, all tokens.
    pub fn delivered(&self) -> u64 {
        self.state().delivered
    }

    pub fn requests(&self) -> u64 {
        self.state().requests
    }

    /// TLS connections accepted.
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

    /// Provider tokens taken into force (the first, then each renewal).
    pub fn tokens_accepted(&self) -> u64 {
        self.state().tokens_accepted
    }

    /// Renewals refused with 429 TooManyProviderTokenUpdates.
    pub fn renewals_refused(&self) -> u64 {
        self.state().renewals_refused
    }

    /// Distinct provider tokens presented.
    pub fn distinct_tokens(&self) -> usize {
        self.state().seen.len()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn reject(status: u16, reason: &str) -> (u16, String) {
    (status, reason.to_owned())
}

impl Apns {
    /// Apple's checks, in the order its documentation lists the failures.
    fn check(
        &self,
        req: &Incoming<'_>,
        state: &mut State,
        token: &str,
        jwt: Option<&str>,
    ) -> Result<(), (u16, String)> {
        let parts = req.parts;
        if parts.method != http::Method::POST {
            return Err(reject(405, "MethodNotAllowed"));
        }
        if !parts.uri.path().starts_with("/3/device/") {
            return Err(reject(404, "BadPath"));
        }
        let jwt = jwt.ok_or_else(|| reject(403, "MissingProviderToken"))?;
        let verified = state
            .verified
            .entry(jwt.to_owned())
            .or_insert_with(|| self.verify(jwt))
            .clone();
        state.seen.insert(jwt.to_owned());
        let (_, iat) = verified.map_err(|_| reject(403, "InvalidProviderToken"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now.saturating_sub(iat) > self.config.token_max_age.as_secs() {
            return Err(reject(403, "ExpiredProviderToken"));
        }
        match state.current.get(&req.connection) {
            Some((current, _)) if current == jwt => {}
            Some((_, since)) if since.elapsed() < self.config.min_token_renewal => {
                state.renewals_refused += 1;
                return Err(reject(429, "TooManyProviderTokenUpdates"));
            }
            _ => {
                state
                    .current
                    .insert(req.connection, (jwt.to_owned(), Instant::now()));
                state.tokens_accepted += 1;
            }
        }
        let topic = req
            .header("apns-topic")
            .ok_or_else(|| reject(400, "MissingTopic"))?;
        if !self.config.topics.is_empty() && !self.config.topics.iter().any(|t| t == topic) {
            return Err(reject(400, "TopicDisallowed"));
        }
        let push_type = req.header("apns-push-type").unwrap_or("");
        const TYPES: [&str; 8] = [
            "alert",
            "background",
            "voip",
            "complication",
            "fileprovider",
            "mdm",
            "liveactivity",
            "location",
        ];
        if !TYPES.contains(&push_type) {
            return Err(reject(400, "InvalidPushType"));
        }
        match req.header("apns-priority") {
            None | Some("5") | Some("1") => {}
            Some("10") if push_type != "background" => {}
            Some(_) => return Err(reject(400, "BadPriority")),
        }
        if req
            .header("apns-collapse-id")
            .is_some_and(|c| c.len() > APNS_MAX_COLLAPSE_ID)
        {
            return Err(reject(400, "BadCollapseId"));
        }
        if req
            .header("apns-expiration")
            .is_some_and(|e| e.parse::<u64>().is_err())
        {
            return Err(reject(400, "BadExpirationDate"));
        }
        if req.header("apns-id").is_some_and(|id| !is_uuid(id)) {
            return Err(reject(400, "BadMessageId"));
        }
        if token.is_empty() {
            return Err(reject(400, "MissingDeviceToken"));
        }
        if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(reject(400, "BadDeviceToken"));
        }
        if req.oversized || req.body.len() > APNS_MAX_PAYLOAD {
            return Err(reject(413, "PayloadTooLarge"));
        }
        if req.body.is_empty() {
            return Err(reject(400, "PayloadEmpty"));
        }
        Ok(())
    }

    fn verify(&self, jwt: &str) -> Result<(String, u64), String> {
        let header = jsonwebtoken::decode_header(jwt).map_err(|e| e.to_string())?;
        if header.alg != Algorithm::ES256
            || header.kid.as_deref() != Some(self.config.key_id.as_str())
        {
            return Err("alg/kid".into());
        }
        let mut validation = Validation::new(Algorithm::ES256);
        // A provider token has only iss and iat; age is checked per request.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        validation.set_issuer(&[&self.config.team_id]);
        let data = jsonwebtoken::decode::<ProviderClaims>(jwt, &self.key, &validation)
            .map_err(|e| e.to_string())?;
        Ok((data.claims.iss, data.claims.iat))
    }
}

impl Handler for Apns {
    fn handle(&self, req: Incoming<'_>) -> Answer {
        let token = req
            .parts
            .uri
            .path()
            .strip_prefix("/3/device/")
            .unwrap_or("")
            .to_owned();
        let jwt = req
            .header("authorization")
            .and_then(|a| {
                a.strip_prefix("bearer ")
                    .or_else(|| a.strip_prefix("Bearer "))
            })
            .map(str::to_owned);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.requests += 1;
        let checked = self.check(&req, &mut state, &token, jwt.as_deref());
        let claims = jwt
            .as_ref()
            .and_then(|j| state.verified.get(j))
            .and_then(|v| v.clone().ok());
        let reply = match checked {
            Err((status, reason)) => ApnsReply::Error {
                status,
                reason,
                timestamp_ms: None,
                retry_after: None,
            },
            Ok(()) => state
                .scripts
                .get_mut(&token)
                .and_then(VecDeque::pop_front)
                .unwrap_or(ApnsReply::Accept),
        };
        let (status, reason) = match &reply {
            ApnsReply::Accept => (Some(200), None),
            ApnsReply::Error { status, reason, .. } => (Some(*status), Some(reason.clone())),
            ApnsReply::DropConnection | ApnsReply::Stall => (None, None),
        };
        if status == Some(200) {
            state.delivered += 1;
        }
        if state.received.len() < self.config.max_recorded {
            let headers = req
                .headers()
                .iter()
                .filter(|(n, _)| n.as_str() != "authorization")
                .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            state.received.push(ApnsReceived {
                connection: req.connection,
                device_token: token,
                headers,
                jwt,
                claims,
                payload: serde_json::from_slice(req.body).unwrap_or(serde_json::Value::Null),
                payload_len: req.body.len(),
                status,
                reason,
                at: Instant::now(),
            });
        }
        drop(state);
        match reply {
            ApnsReply::DropConnection => Answer::DropConnection,
            ApnsReply::Stall => Answer::Stall,
            ApnsReply::Accept => Answer::Respond {
                status: 200,
                headers: vec![(
                    "apns-id",
                    req.header("apns-id")
                        .map_or_else(crate::sender::uuid_v4, str::to_owned),
                )],
                body: bytes::Bytes::new(),
            },
            ApnsReply::Error {
                status,
                reason,
                timestamp_ms,
                retry_after,
            } => {
                let mut body = json!({ "reason": reason });
                if let Some(ts) = timestamp_ms {
                    body["timestamp"] = json!(ts);
                }
                let mut answer = Answer::json(status, &body);
                if let (Some(secs), Answer::Respond { headers, .. }) = (retry_after, &mut answer) {
                    headers.push(("retry-after", secs.to_string()));
                }
                answer
            }
        }
    }
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}
