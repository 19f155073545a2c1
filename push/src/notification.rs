//! A push to one device, and its rendering as each provider's payload.

use std::time::Duration;

use serde_json::{json, Map, Value};

/// The provider a device token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    Apns,
    Fcm,
}

/// The APNs environment a token was issued in (a sandbox token is
/// `BadDeviceToken` in production and the other way round).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ApnsEnvironment {
    #[default]
    Production,
    Sandbox,
}

/// Delivery priority: `High` wakes the device now (APNs 10, FCM HIGH);
/// `Normal` lets the OS batch it for power (APNs 5, FCM NORMAL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    High,
    Normal,
}

/// What the push shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Conversation id and seq only: message bodies are opaque to the server
    /// (end-to-end encrypted apps fetch and decrypt in a notification
    /// service extension). APNs: an alert with `mutable-content` and a
    /// localizable placeholder; FCM: a data message.
    IdOnly,
    /// A preview the deployment allows showing (title optional).
    Preview { title: Option<String>, body: String },
    /// No alert: wakes the app to sync (APNs `background`, priority 5).
    Background,
}

/// One push to one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub platform: Platform,
    pub device_token: String,
    /// APNs: the app's bundle id (`apns-topic`); required for APNs.
    pub apns_topic: Option<String>,
    pub apns_environment: ApnsEnvironment,
    pub conversation_id: String,
    /// The latest message's seq in the conversation.
    pub seq: u64,
    /// Replaces an earlier push with the same id on the device (APNs
    /// `apns-collapse-id`, at most 64 bytes; FCM `collapse_key` and `tag`).
    /// Set per conversation, so a device shows one notification for it.
    pub collapse_id: Option<String>,
    /// The app badge (the user's unread count).
    pub badge: Option<u32>,
    pub content: Content,
    /// How long the provider keeps trying to reach the device; also bounds
    /// our retries. Zero: now or never.
    pub ttl: Duration,
    pub priority: Priority,
}

/// APNs payloads larger than this are refused with 413.
pub const APNS_MAX_PAYLOAD: usize = 4096;
/// APNs `apns-collapse-id` limit.
pub const APNS_MAX_COLLAPSE_ID: usize = 64;
/// FCM's limit for a message's payload.
pub const FCM_MAX_PAYLOAD: usize = 4096;
/// The localizable key of the id-only alert: the app's Localizable.strings
/// gives the text ("New message"), its service extension may replace it.
pub const ID_ONLY_LOC_KEY: &str = "PALAVER_NEW_MESSAGE";

impl Notification {
    /// The APNs `apns-push-type`.
    pub fn apns_push_type(&self) -> &'static str {
        match self.content {
            Content::Background => "background",
            _ => "alert",
        }
    }

    /// The APNs `apns-priority`: background pushes must be 5.
    pub fn apns_priority(&self) -> u8 {
        match (&self.content, self.priority) {
            (Content::Background, _) | (_, Priority::Normal) => 5,
            (_, Priority::High) => 10,
        }
    }

    /// The JSON body of an APNs request, at most [`APNS_MAX_PAYLOAD`] bytes
    /// (a preview is shortened to fit; ids that cannot fit are an error).
    pub fn apns_payload(&self) -> Result<Vec<u8>, String> {
        let render = |body: Option<&str>| {
            let mut aps = Map::new();
            match (&self.content, body) {
                (Content::Preview { title, .. }, Some(body)) => {
                    let mut alert = Map::new();
                    if let Some(title) = title {
                        alert.insert("title".into(), json!(title));
                    }
                    alert.insert("body".into(), json!(body));
                    aps.insert("alert".into(), Value::Object(alert));
                    aps.insert("sound".into(), json!("default"));
                }
                (Content::Background, _) => {
                    aps.insert("content-available".into(), json!(1));
                }
                _ => {
                    aps.insert("alert".into(), json!({ "loc-key": ID_ONLY_LOC_KEY }));
                    aps.insert("mutable-content".into(), json!(1));
                    aps.insert("sound".into(), json!("default"));
                }
            }
            if let Some(badge) = self.badge {
                aps.insert("badge".into(), json!(badge));
            }
            // Groups the conversation's notifications in Notification Center.
            aps.insert("thread-id".into(), json!(self.conversation_id));
            json!({
                "aps": aps,
                "palaver": { "conversation": self.conversation_id, "seq": self.seq },
            })
        };
        let body = match &self.content {
            Content::Preview { body, .. } => Some(body.as_str()),
            _ => None,
        };
        fit(APNS_MAX_PAYLOAD, body, |b| serde_json::to_vec(&render(b)).unwrap_or_default())
            .ok_or_else(|| format!("APNs payload over {APNS_MAX_PAYLOAD} bytes even without a preview (conversation id {} bytes)", self.conversation_id.len()))
    }

    /// The JSON body of an FCM v1 `messages:send` request.
    pub fn fcm_body(&self) -> Result<Vec<u8>, String> {
        let render = |body: Option<&str>| {
            let mut data = Map::new();
            data.insert("conversation".into(), json!(self.conversation_id));
            // FCM data values must be strings.
            data.insert("seq".into(), json!(self.seq.to_string()));
            if let Some(badge) = self.badge {
                data.insert("badge".into(), json!(badge.to_string()));
            }
            let mut android = Map::new();
            android.insert("ttl".into(), json!(format!("{}s", self.ttl.as_secs())));
            android.insert(
                "priority".into(),
                json!(match self.priority {
                    Priority::High if self.content != Content::Background => "HIGH",
                    _ => "NORMAL",
                }),
            );
            if let Some(collapse) = &self.collapse_id {
                android.insert("collapse_key".into(), json!(collapse));
            }
            let mut message = Map::new();
            message.insert("token".into(), json!(self.device_token));
            if let (Content::Preview { title, .. }, Some(body)) = (&self.content, body) {
                let mut notification = Map::new();
                if let Some(title) = title {
                    notification.insert("title".into(), json!(title));
                }
                notification.insert("body".into(), json!(body));
                message.insert("notification".into(), Value::Object(notification));
                let mut shown = Map::new();
                if let Some(collapse) = &self.collapse_id {
                    // Replaces the conversation's earlier notification.
                    shown.insert("tag".into(), json!(collapse));
                }
                if let Some(badge) = self.badge {
                    shown.insert("notification_count".into(), json!(badge));
                }
                android.insert("notification".into(), Value::Object(shown));
            }
            message.insert("android".into(), Value::Object(android));
            message.insert("data".into(), Value::Object(data));
            serde_json::to_vec(&json!({ "message": message })).unwrap_or_default()
        };
        let body = match &self.content {
            Content::Preview { body, .. } => Some(body.as_str()),
            _ => None,
        };
        // FCM's 4096 bytes count the payload; holding the whole body to it
        // is stricter and needs no second rendering.
        fit(FCM_MAX_PAYLOAD, body, render).ok_or_else(|| {
            format!("FCM message over {FCM_MAX_PAYLOAD} bytes even without a preview")
        })
    }
}

/// Renders with the preview `body` shortened (on a char boundary, with an
/// ellipsis) until the result is at most `limit` bytes; `None` if even the
/// empty preview is too large.
fn fit(
    limit: usize,
    body: Option<&str>,
    render: impl Fn(Option<&str>) -> Vec<u8>,
) -> Option<Vec<u8>> {
    let full = render(body);
    if full.len() <= limit {
        return Some(full);
    }
    let body = body?;
    // Binary search the longest prefix that fits.
    let bounds: Vec<usize> = body.char_indices().map(|(i, _)| i).collect();
    let (mut lo, mut hi) = (0usize, bounds.len());
    let mut best = None;
    while lo < hi {
        let mid = (lo + hi) / 2;
        let candidate = format!("{}…", &body[..bounds[mid]]);
        let out = render(Some(&candidate));
        if out.len() <= limit {
            best = Some(out);
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(content: Content) -> Notification {
        Notification {
            platform: Platform::Apns,
            device_token: "ab".repeat(32),
            apns_topic: Some("com.example.chat".into()),
            apns_environment: ApnsEnvironment::Production,
            conversation_id: "c1".into(),
            seq: 42,
            collapse_id: Some("c1".into()),
            badge: Some(3),
            content,
            ttl: Duration::from_secs(3600),
            priority: Priority::High,
        }
    }

    #[test]
    fn id_only_carries_ids_and_no_body() {
        let v: Value =
            serde_json::from_slice(&note(Content::IdOnly).apns_payload().unwrap()).unwrap();
        assert_eq!(v["aps"]["badge"], 3);
        assert_eq!(v["aps"]["mutable-content"], 1);
        assert_eq!(v["aps"]["alert"]["loc-key"], ID_ONLY_LOC_KEY);
        assert_eq!(v["palaver"]["seq"], 42);
        assert!(v["aps"]["alert"].get("body").is_none());
        let f: Value = serde_json::from_slice(&note(Content::IdOnly).fcm_body().unwrap()).unwrap();
        assert_eq!(f["message"]["data"]["seq"], "42");
        assert_eq!(f["message"]["data"]["badge"], "3");
        assert_eq!(f["message"]["android"]["ttl"], "3600s");
        assert_eq!(f["message"]["android"]["collapse_key"], "c1");
        assert!(f["message"].get("notification").is_none());
    }

    #[test]
    fn a_long_preview_is_shortened_to_fit() {
        let long = "é".repeat(5000);
        let n = note(Content::Preview {
            title: Some("Bob".into()),
            body: long,
        });
        let p = n.apns_payload().unwrap();
        assert!(
            p.len() <= APNS_MAX_PAYLOAD && p.len() > APNS_MAX_PAYLOAD - 16,
            "{}",
            p.len()
        );
        let v: Value = serde_json::from_slice(&p).unwrap();
        assert!(v["aps"]["alert"]["body"].as_str().unwrap().ends_with('…'));
        assert!(n.fcm_body().is_ok());
    }

    #[test]
    fn background_is_priority_5() {
        let n = note(Content::Background);
        assert_eq!((n.apns_push_type(), n.apns_priority()), ("background", 5));
        let v: Value = serde_json::from_slice(&n.apns_payload().unwrap()).unwrap();
        assert_eq!(v["aps"]["content-available"], 1);
    }
}
