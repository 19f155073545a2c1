//! `PushStore` on disk: push registrations per (user, device), mutes per
//! (user, conversation) and each token's one owner, kept across restarts
//! (a phone registers once; a restart of the single-node server must not
//! silence it). The rules are those of `memory/push.rs`, over tables; the
//! online check reads the inner session registry.

use std::collections::BTreeMap;

use crate::store::{
    ApnsEnvironment, DeviceToken, Mute, PushContext, PushPlatform, PushStore, PushToken,
    Recipients, Registered, StoreResult, BADGE_CONVERSATIONS, MAX_BADGE,
};

use super::*;

/// (user, device) → (platform, token, APNs environment, topic, locale,
/// registered ms). Platform 1 APNs, 2 FCM; environment 0 none, 1
/// production, 2 sandbox.
type Registration<'a> = (u8, &'a str, u8, &'a str, &'a str, i64);
pub(super) const PUSH_TOKENS: TableDefinition<(&str, &str), Registration<'static>> =
    TableDefinition::new("push_tokens");
/// (user, conversation) → muted until, ms (`i64::MAX`: for ever).
pub(super) const PUSH_MUTES: TableDefinition<(&str, &str), i64> =
    TableDefinition::new("push_mutes");
/// (platform, token) → (user, device): the token's one owner.
pub(super) const PUSH_OWNERS: TableDefinition<(u8, &str), (&str, &str)> =
    TableDefinition::new("push_owners");

fn platform_code(p: PushPlatform) -> u8 {
    match p {
        PushPlatform::Apns => 1,
        PushPlatform::Fcm => 2,
    }
}

fn encode_registration(t: &PushToken) -> Registration<'_> {
    let env = match t.apns_environment {
        None => 0,
        Some(ApnsEnvironment::Production) => 1,
        Some(ApnsEnvironment::Sandbox) => 2,
    };
    (
        platform_code(t.platform),
        &t.token,
        env,
        &t.apns_topic,
        &t.locale,
        t.registered_ms,
    )
}

fn decode_registration(r: Registration<'_>) -> DiskResult<PushToken> {
    let platform = match r.0 {
        1 => PushPlatform::Apns,
        2 => PushPlatform::Fcm,
        _ => return Err(DiskError::Corrupt("push_tokens")),
    };
    let apns_environment = match r.2 {
        0 => None,
        1 => Some(ApnsEnvironment::Production),
        2 => Some(ApnsEnvironment::Sandbox),
        _ => return Err(DiskError::Corrupt("push_tokens")),
    };
    Ok(PushToken {
        platform,
        token: r.1.to_owned(),
        apns_environment,
        apns_topic: r.3.to_owned(),
        locale: r.4.to_owned(),
        registered_ms: r.5,
    })
}

fn encode_mute(m: Mute) -> i64 {
    match m {
        Mute::Forever => i64::MAX,
        Mute::Until(t) => t,
    }
}

fn decode_mute(v: i64) -> Mute {
    if v == i64::MAX {
        Mute::Forever
    } else {
        Mute::Until(v)
    }
}

/// A user's registrations, by device.
fn registrations(txn: &WriteTransaction, user_id: &str) -> DiskResult<BTreeMap<String, PushToken>> {
    let table = txn.open_table(PUSH_TOKENS)?;
    let next = after(user_id);
    let mut out = BTreeMap::new();
    for entry in table.range((user_id, "")..(next.as_str(), ""))? {
        let (key, value) = entry?;
        out.insert(
            key.value().1.to_owned(),
            decode_registration(value.value())?,
        );
    }
    Ok(out)
}

/// Removes (user, device)'s registration; its owner entry goes if it names
/// them. Returns the registration removed.
fn remove_registration(
    txn: &WriteTransaction,
    user_id: &str,
    device_id: &str,
) -> DiskResult<Option<PushToken>> {
    let removed = {
        let mut table = txn.open_table(PUSH_TOKENS)?;
        let removed = table.remove((user_id, device_id))?;
        match removed {
            Some(v) => Some(decode_registration(v.value())?),
            None => None,
        }
    };
    if let Some(t) = &removed {
        let mut owners = txn.open_table(PUSH_OWNERS)?;
        let key = (platform_code(t.platform), t.token.as_str());
        let named = owners
            .get(key)?
            .is_some_and(|o| o.value() == (user_id, device_id));
        if named {
            owners.remove(key)?;
        }
    }
    Ok(removed)
}

fn mute_of(
    txn: &WriteTransaction,
    user_id: &str,
    conversation_id: &str,
    now_ms: i64,
) -> DiskResult<Option<Mute>> {
    let table = txn.open_table(PUSH_MUTES)?;
    let mute = table
        .get((user_id, conversation_id))?
        .map(|v| decode_mute(v.value()))
        .filter(|m| m.holds_at(now_ms));
    Ok(mute)
}

fn read_mark(txn: &WriteTransaction, conversation_id: &str, user_id: &str) -> DiskResult<u64> {
    let receipts = txn.open_table(RECEIPTS)?;
    let kind = palaver_protocol::pb::ReceiptKind::Read as i32;
    let mark = receipts
        .get((conversation_id, user_id, kind))?
        .map_or(0, |v| v.value());
    Ok(mark)
}

impl PushStore for DiskStore {
    fn register_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &PushToken,
        max_devices: usize,
    ) -> StoreResult<Registered> {
        self.write(|txn| {
            let devices = registrations(txn, user_id)?;
            // The same token on another device of the user: that device's
            // registration ends (the app was reinstalled).
            let mut dropped: Vec<String> = devices
                .iter()
                .filter(|(device, t)| {
                    *device != device_id && t.platform == token.platform && t.token == token.token
                })
                .map(|(device, _)| device.clone())
                .collect();
            for device in &dropped {
                remove_registration(txn, user_id, device)?;
            }
            remove_registration(txn, user_id, device_id)?;
            txn.open_table(PUSH_TOKENS)?
                .insert((user_id, device_id), encode_registration(token))?;
            // Past the cap, the oldest other registrations go.
            let mut rest: Vec<(i64, String)> = registrations(txn, user_id)?
                .into_iter()
                .filter(|(device, _)| device != device_id)
                .map(|(device, t)| (t.registered_ms, device))
                .collect();
            rest.sort();
            let over = (rest.len() + 1).saturating_sub(max_devices.max(1));
            for (_, device) in rest.into_iter().take(over) {
                remove_registration(txn, user_id, &device)?;
                dropped.push(device);
            }
            dropped.sort_unstable();
            // The token's previous owner, if another user, loses it.
            let key = (platform_code(token.platform), token.token.as_str());
            let previous = txn
                .open_table(PUSH_OWNERS)?
                .get(key)?
                .map(|o| (o.value().0.to_owned(), o.value().1.to_owned()));
            let mut dropped_elsewhere = Vec::new();
            if let Some((owner, owner_device)) = previous {
                if owner != user_id {
                    let holds = txn
                        .open_table(PUSH_TOKENS)?
                        .get((owner.as_str(), owner_device.as_str()))?
                        .map(|v| decode_registration(v.value()))
                        .transpose()?
                        .is_some_and(|t| t.platform == token.platform && t.token == token.token);
                    if holds {
                        remove_registration(txn, &owner, &owner_device)?;
                        dropped_elsewhere.push((owner, owner_device));
                    }
                }
            }
            txn.open_table(PUSH_OWNERS)?
                .insert(key, (user_id, device_id))?;
            Ok(Registered {
                dropped_devices: dropped,
                dropped_elsewhere,
            })
        })
    }

    fn unregister_push_token(&mut self, user_id: &str, device_id: &str) -> StoreResult<bool> {
        self.write(|txn| Ok(remove_registration(txn, user_id, device_id)?.is_some()))
    }

    fn push_tokens(&mut self, user_id: &str) -> StoreResult<Vec<DeviceToken>> {
        self.read(|txn| {
            Ok(registrations(txn, user_id)?
                .into_iter()
                .map(|(device_id, token)| DeviceToken { device_id, token })
                .collect())
        })
    }

    fn invalidate_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        invalidated_ms: i64,
    ) -> StoreResult<bool> {
        self.write(|txn| {
            let stale = txn
                .open_table(PUSH_TOKENS)?
                .get((user_id, device_id))?
                .map(|v| decode_registration(v.value()))
                .transpose()?
                .is_some_and(|t| t.token == token && t.registered_ms < invalidated_ms);
            if stale {
                remove_registration(txn, user_id, device_id)?;
            }
            Ok(stale)
        })
    }

    fn set_mute(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        mute: Option<Mute>,
        now_ms: i64,
        max_mutes: usize,
    ) -> StoreResult<bool> {
        self.write(|txn| {
            let mut table = txn.open_table(PUSH_MUTES)?;
            // Mutes that ran out go (they bound the count).
            let next = after(user_id);
            let mut held = 0usize;
            let mut expired = Vec::new();
            for entry in table.range((user_id, "")..(next.as_str(), ""))? {
                let (key, value) = entry?;
                if decode_mute(value.value()).holds_at(now_ms) {
                    held += 1;
                } else {
                    expired.push(key.value().1.to_owned());
                }
            }
            for conversation in &expired {
                table.remove((user_id, conversation.as_str()))?;
            }
            Ok(match mute {
                None => {
                    table.remove((user_id, conversation_id))?;
                    true
                }
                Some(mute) => {
                    let present = table
                        .get((user_id, conversation_id))?
                        .is_some_and(|v| decode_mute(v.value()).holds_at(now_ms));
                    if !present && held >= max_mutes {
                        false
                    } else {
                        table.insert((user_id, conversation_id), encode_mute(mute))?;
                        true
                    }
                }
            })
        })
    }

    fn mute_of(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Mute>> {
        self.read(|txn| mute_of(txn, user_id, conversation_id, now_ms))
    }

    fn recipients<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<Recipients> {
        let sessions = self.sessions.sessions_of_users(user_ids)?;
        let registered: Vec<Vec<String>> = self.read(|txn| {
            let table = txn.open_table(PUSH_TOKENS)?;
            user_ids
                .iter()
                .map(|u| {
                    let u = u.as_ref();
                    let next = after(u);
                    let mut devices = Vec::new();
                    for entry in table.range((u, "")..(next.as_str(), ""))? {
                        devices.push(entry?.0.value().1.to_owned());
                    }
                    Ok(devices)
                })
                .collect()
        })?;
        let push_due = user_ids
            .iter()
            .zip(registered)
            .map(|(u, devices)| {
                if devices.is_empty() {
                    return None;
                }
                let online = self.sessions.online_device_ids(u.as_ref());
                let asleep = devices.iter().any(|d| !online.contains(d));
                asleep.then_some(online)
            })
            .collect();
        Ok(Recipients { sessions, push_due })
    }

    fn push_context(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> StoreResult<PushContext> {
        self.read(|txn| {
            let tokens = registrations(txn, user_id)?
                .into_iter()
                .map(|(device_id, token)| DeviceToken { device_id, token })
                .collect();
            let muted = mute_of(txn, user_id, conversation_id, now_ms)?.is_some();
            let already_read = read_mark(txn, conversation_id, user_id)? >= seq;
            // The event's conversation always counts, and first; then the
            // other conversations with a pending push, in order.
            let mut counted = vec![conversation_id.to_owned()];
            {
                let pending = txn.open_table(PUSH_PENDING)?;
                let next = after(user_id);
                for entry in pending.range((user_id, "")..(next.as_str(), ""))? {
                    if counted.len() >= BADGE_CONVERSATIONS {
                        break;
                    }
                    let c = entry?.0.value().1.to_owned();
                    if c != conversation_id {
                        counted.push(c);
                    }
                }
            }
            let seqs = txn.open_table(SEQS)?;
            let mut badge: u64 = 0;
            for c in &counted {
                let last = seqs.get(c.as_str())?.map_or(0, |v| v.value());
                badge += last.saturating_sub(read_mark(txn, c, user_id)?);
            }
            Ok(PushContext {
                tokens,
                muted,
                already_read,
                badge: badge.min(u64::from(MAX_BADGE)) as u32,
            })
        })
    }
}
