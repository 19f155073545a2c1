//! What a deployment configures, as the worker reads it (TOML or any serde
//! format), and the [`Sender`] built from it: the worker does not assemble
//! clients itself.
//!
//! ```toml
//! [apns]
//! key_file = "/etc/palaver/AuthKey_ABC123DEFG.p8"
//! key_id = "ABC123DEFG"
//! team_id = "DEF123GHIJ"
//! environments = ["production", "sandbox"]   # the default: both
//!
//! [fcm]
//! service_account_file = "/etc/palaver/firebase-sa.json"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::runtime::Handle;

use crate::apns::{ApnsClient, ApnsConfig, APNS_PRODUCTION, APNS_SANDBOX};
use crate::fcm::{FcmClient, FcmConfig, ServiceAccount, FCM_ENDPOINT};
use crate::sender::{Route, Sender, SenderConfig};
use crate::tls::TrustRoots;
use crate::{ApnsEnvironment, PushError};

/// The providers a deployment has credentials for; none is a valid
/// configuration (the worker then only counts what it would have sent).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    pub apns: Option<ApnsSettings>,
    pub fcm: Option<FcmSettings>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
    /// Apple's `AuthKey_<KEYID>.p8`.
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    /// Which endpoints to serve (tokens say which they belong to).
    #[serde(default = "both_environments")]
    pub environments: Vec<Environment>,
    /// Overrides of the endpoints (a proxy, a test server).
    pub production_url: Option<String>,
    pub sandbox_url: Option<String>,
    /// A PEM file of CAs to trust instead of the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Provider token renewal, minutes (20–59; default 50).
    pub token_refresh_minutes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Sandbox,
}

fn both_environments() -> Vec<Environment> {
    vec![Environment::Production, Environment::Sandbox]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
    /// The Firebase service-account JSON key.
    pub service_account_file: PathBuf,
    /// Defaults to the key's `project_id`.
    pub project_id: Option<String>,
    /// Overrides (a proxy, a test server).
    pub url: Option<String>,
    pub token_uri: Option<String>,
    pub ca_file: Option<PathBuf>,
}

impl ProvidersConfig {
    pub fn is_empty(&self) -> bool {
        self.apns.is_none() && self.fcm.is_none()
    }

    /// Loads the keys, checks them, and starts a [`Sender`] on `runtime`
    /// with a client per configured route (listed in the second value, for
    /// the worker's start-up line).
    pub fn build(
        &self,
        sender: SenderConfig,
        runtime: &Handle,
    ) -> Result<(Sender, Vec<Route>), PushError> {
        let mut builder = Sender::builder(sender);
        let mut routes = Vec::new();
        if let Some(a) = &self.apns {
            let trust = a
                .ca_file
                .clone()
                .map_or(TrustRoots::WebPki, TrustRoots::PemFile);
            let mut environments = a.environments.clone();
            environments.dedup();
            if environments.is_empty() {
                return Err(PushError::Config(
                    "[apns] environments is empty: give production, sandbox or both".into(),
                ));
            }
            for env in environments {
                let (url, environment) = match env {
                    Environment::Production => (
                        a.production_url
                            .clone()
                            .unwrap_or_else(|| APNS_PRODUCTION.into()),
                        ApnsEnvironment::Production,
                    ),
                    Environment::Sandbox => (
                        a.sandbox_url.clone().unwrap_or_else(|| APNS_SANDBOX.into()),
                        ApnsEnvironment::Sandbox,
                    ),
                };
                let mut config =
                    ApnsConfig::from_key_file(url, &a.team_id, &a.key_id, &a.key_file)?;
                config.trust = trust.clone();
                if let Some(m) = a.token_refresh_minutes {
                    config.token_refresh = Duration::from_secs(m * 60);
                }
                builder = builder.apns(environment, ApnsClient::new(config)?);
                routes.push(Route::Apns(environment));
            }
        }
        if let Some(f) = &self.fcm {
            let account = ServiceAccount::from_file(&f.service_account_file)?;
            let mut config = FcmConfig::new(
                f.url.clone().unwrap_or_else(|| FCM_ENDPOINT.into()),
                account,
            );
            config.project_id = f.project_id.clone();
            config.token_uri = f.token_uri.clone();
            if let Some(ca) = &f.ca_file {
                config.trust = TrustRoots::PemFile(ca.clone());
            }
            builder = builder.fcm(FcmClient::new(config)?);
            routes.push(Route::Fcm);
        }
        Ok((builder.start(runtime), routes))
    }
}
