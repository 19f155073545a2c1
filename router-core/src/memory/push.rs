//! `PushStore` for the memory store: push registrations per (user, device),
//! mutes per (user, conversation), the fan-out's push check and the push
//! worker's read.

use std::collections::{BTreeMap, HashMap};

use palaver_protocol::pb;

use crate::store::{
    DeviceToken, Mute, PushContext, PushPlatform, PushStore, PushToken, Recipients, Registered,
    StoreResult, UserSessions, BADGE_CONVERSATIONS, MAX_BADGE,
};

use super::{DeviceOnline, MemoryStore};

/// The push state of every user who registered a device or muted a
/// conversation. Bounded per user by the router's caps (devices, mutes)
/// and by the token length.
#[derive(Default)]
pub(super) struct PushState {
    /// user → device → registration.
    tokens: HashMap<String, BTreeMap<String, PushToken>>,
    /// user → conversation → mute.
    mutes: HashMap<String, HashMap<String, Mute>>,
    /// (platform, token) → the (user, device) registered with it: a token
    /// has one owner. One entry per registration.
    owners: HashMap<(PushPlatform, String), (String, String)>,
}

impl PushState {
    /// Forgets the owner entry of `token` if it names (user, device).
    fn release(&mut self, token: &PushToken, user_id: &str, device_id: &str) {
        let key = (token.platform, token.token.clone());
        if self
            .owners
            .get(&key)
            .is_some_and(|(u, d)| u == user_id && d == device_id)
        {
            self.owners.remove(&key);
        }
    }

    /// Removes the registration of (user, device) if it holds `token`;
    /// whether it did.
    fn remove_if_holding(&mut self, user_id: &str, device_id: &str, token: &PushToken) -> bool {
        let Some(devices) = self.tokens.get_mut(user_id) else {
            return false;
        };
        let holds = devices
            .get(device_id)
            .is_some_and(|t| t.platform == token.platform && t.token == token.token);
        if holds {
            devices.remove(device_id);
            if devices.is_empty() {
                self.tokens.remove(user_id);
            }
        }
        holds
    }
}

impl MemoryStore {
    /// The user's devices with a live session now, ascending (the durable
    /// store asks its inner session registry this too).
    pub fn online_device_ids(&self, user_id: &str) -> Vec<String> {
        let now_ms = self.lease_now_ms();
        let mut online: Vec<String> = self
            .presence
            .get(user_id)
            .map(|user| {
                user.devices
                    .iter()
                    .filter(|d: &&DeviceOnline| self.gateway_alive(&d.gateway_id, now_ms))
                    .map(|d| d.device_id.to_string())
                    .collect()
            })
            .unwrap_or_default();
        online.sort_unstable();
        online
    }

    /// Whether `user_id` has a registered device without a live session,
    /// and if so the devices online now (ascending).
    fn push_due(&self, user_id: &str) -> Option<Vec<String>> {
        let registered = self.push.tokens.get(user_id)?;
        let online = self.online_device_ids(user_id);
        let asleep = registered.keys().any(|device| !online.contains(device));
        asleep.then_some(online)
    }

    /// The READ mark of `user_id` in the conversation (0 when none).
    fn read_mark(&self, conversation_id: &str, user_id: &str) -> u64 {
        self.conversations.get(conversation_id).map_or(0, |c| {
            c.receipts
                .get(&(user_id.to_owned(), pb::ReceiptKind::Read as i32))
                .copied()
                .unwrap_or(0)
        })
    }
}

impl PushStore for MemoryStore {
    fn register_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &PushToken,
        max_devices: usize,
    ) -> StoreResult<Registered> {
        let push = &mut self.push;
        let devices = push.tokens.entry(user_id.to_owned()).or_default();
        let mut dropped: Vec<String> = devices
            .iter()
            .filter(|(device, t)| {
                *device != device_id && t.platform == token.platform && t.token == token.token
            })
            .map(|(device, _)| device.clone())
            .collect();
        // Registrations this one ends, whose tokens' owner entries go.
        let mut released: Vec<(String, PushToken)> = Vec::new();
        for device in &dropped {
            if let Some(t) = devices.remove(device) {
                released.push((device.clone(), t));
            }
        }
        if let Some(previous) = devices.insert(device_id.to_owned(), token.clone()) {
            released.push((device_id.to_owned(), previous));
        }
        while devices.len() > max_devices.max(1) {
            let oldest = devices
                .iter()
                .filter(|(device, _)| *device != device_id)
                .min_by(|a, b| (a.1.registered_ms, a.0).cmp(&(b.1.registered_ms, b.0)))
                .map(|(device, _)| device.clone());
            let Some(oldest) = oldest else { break };
            if let Some(t) = devices.remove(&oldest) {
                released.push((oldest.clone(), t));
            }
            dropped.push(oldest);
        }
        dropped.sort_unstable();
        for (device, t) in &released {
            push.release(t, user_id, device);
        }
        // The token's previous owner, if another user, loses it.
        let key = (token.platform, token.token.clone());
        let mut dropped_elsewhere = Vec::new();
        if let Some((owner, owner_device)) = push.owners.get(&key).cloned() {
            if owner != user_id && push.remove_if_holding(&owner, &owner_device, token) {
                dropped_elsewhere.push((owner, owner_device));
            }
        }
        push.owners
            .insert(key, (user_id.to_owned(), device_id.to_owned()));
        Ok(Registered {
            dropped_devices: dropped,
            dropped_elsewhere,
        })
    }

    fn unregister_push_token(&mut self, user_id: &str, device_id: &str) -> StoreResult<bool> {
        let Some(devices) = self.push.tokens.get_mut(user_id) else {
            return Ok(false);
        };
        let removed = devices.remove(device_id);
        if devices.is_empty() {
            self.push.tokens.remove(user_id);
        }
        if let Some(t) = &removed {
            self.push.release(t, user_id, device_id);
        }
        Ok(removed.is_some())
    }

    fn push_tokens(&mut self, user_id: &str) -> StoreResult<Vec<DeviceToken>> {
        Ok(self
            .push
            .tokens
            .get(user_id)
            .map(|devices| {
                devices
                    .iter()
                    .map(|(device_id, token)| DeviceToken {
                        device_id: device_id.clone(),
                        token: token.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn invalidate_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        invalidated_ms: i64,
    ) -> StoreResult<bool> {
        let Some(devices) = self.push.tokens.get_mut(user_id) else {
            return Ok(false);
        };
        let stale = devices
            .get(device_id)
            .is_some_and(|t| t.token == token && t.registered_ms < invalidated_ms);
        if !stale {
            return Ok(false);
        }
        let removed = devices.remove(device_id);
        if devices.is_empty() {
            self.push.tokens.remove(user_id);
        }
        if let Some(t) = &removed {
            self.push.release(t, user_id, device_id);
        }
        Ok(true)
    }

    fn set_mute(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        mute: Option<Mute>,
        now_ms: i64,
        max_mutes: usize,
    ) -> StoreResult<bool> {
        let mutes = self.push.mutes.entry(user_id.to_owned()).or_default();
        mutes.retain(|_, m| m.holds_at(now_ms));
        let done = match mute {
            None => {
                mutes.remove(conversation_id);
                true
            }
            Some(mute) => {
                if !mutes.contains_key(conversation_id) && mutes.len() >= max_mutes {
                    false
                } else {
                    mutes.insert(conversation_id.to_owned(), mute);
                    true
                }
            }
        };
        if mutes.is_empty() {
            self.push.mutes.remove(user_id);
        }
        Ok(done)
    }

    fn mute_of(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Mute>> {
        Ok(self
            .push
            .mutes
            .get(user_id)
            .and_then(|m| m.get(conversation_id))
            .copied()
            .filter(|m| m.holds_at(now_ms)))
    }

    fn recipients<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<Recipients> {
        let sessions: UserSessions = crate::store::SessionStore::sessions_of_users(self, user_ids)?;
        // Users without a registration (the common case) cost one lookup
        // and no allocation.
        let push_due = if self.push.tokens.is_empty() {
            vec![None; user_ids.len()]
        } else {
            user_ids.iter().map(|u| self.push_due(u.as_ref())).collect()
        };
        Ok(Recipients { sessions, push_due })
    }

    fn push_context(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> StoreResult<PushContext> {
        let tokens = self.push_tokens(user_id)?;
        let muted = self.mute_of(user_id, conversation_id, now_ms)?.is_some();
        let already_read = self.read_mark(conversation_id, user_id) >= seq;
        let mut pending: Vec<&String> = self
            .users
            .get(user_id)
            .map(|u| u.push_pending.iter().collect())
            .unwrap_or_default();
        pending.sort_unstable();
        // The event's conversation always counts, and first.
        let mut counted: Vec<&str> = vec![conversation_id];
        counted.extend(
            pending
                .into_iter()
                .map(String::as_str)
                .filter(|c| *c != conversation_id)
                .take(BADGE_CONVERSATIONS - 1),
        );
        let mut badge: u64 = 0;
        for conversation in counted {
            let last_seq = self
                .conversations
                .get(conversation)
                .map_or(0, |c| c.last_seq);
            badge += last_seq.saturating_sub(self.read_mark(conversation, user_id));
        }
        Ok(PushContext {
            tokens,
            muted,
            already_read,
            badge: badge.min(u64::from(MAX_BADGE)) as u32,
        })
    }
}
