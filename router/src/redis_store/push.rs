//! `impl PushStore for RedisStore`: push registrations (`u:{<user>}:ptok`),
//! mutes (`u:{<user>}:mute`), the fan-out's recipients read (sessions and
//! registered devices in one pipeline) and the push worker's read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use palaver_protocol::pb;
use redis::Value;

use crate::api::SessionAddr;
use crate::store::{
    ApnsEnvironment, DeviceToken, Mute, PushContext, PushPlatform, PushStore, PushToken,
    Recipients, Registered, StoreResult, UserSessions, BADGE_CONVERSATIONS, MAX_BADGE,
};

use super::keys::{conv_key, decode_addr, push_owner_key, receipt_key, user_key};
use super::{corrupt, from_value, RedisStore};

/// A user's sessions with their device ids, ascending by device id.
type DeviceSessions = Vec<(String, SessionAddr)>;

/// Field separator of a stored registration (validated fields never hold it).
const SEP: char = '\x1f';

fn platform_name(p: PushPlatform) -> &'static str {
    match p {
        PushPlatform::Apns => "apns",
        PushPlatform::Fcm => "fcm",
    }
}

/// `<registered_ms>\x1f<platform>\x1f<environment>\x1f<topic>\x1f<locale>\x1f<token>`:
/// the token last, and the fields the scripts compare first.
fn encode_token(t: &PushToken) -> String {
    let environment = match t.apns_environment {
        Some(ApnsEnvironment::Production) => "production",
        Some(ApnsEnvironment::Sandbox) => "sandbox",
        None => "",
    };
    format!(
        "{}{SEP}{}{SEP}{environment}{SEP}{}{SEP}{}{SEP}{}",
        t.registered_ms,
        platform_name(t.platform),
        t.apns_topic,
        t.locale,
        t.token
    )
}

fn decode_token(v: &str) -> StoreResult<PushToken> {
    let bad = || corrupt(format!("push registration {v:?}"));
    let mut parts = v.splitn(6, SEP);
    let mut next = || parts.next().ok_or_else(bad);
    let registered_ms: i64 = next()?.parse().map_err(|_| bad())?;
    let platform = match next()? {
        "apns" => PushPlatform::Apns,
        "fcm" => PushPlatform::Fcm,
        _ => return Err(bad()),
    };
    let apns_environment = match next()? {
        "production" => Some(ApnsEnvironment::Production),
        "sandbox" => Some(ApnsEnvironment::Sandbox),
        "" => None,
        _ => return Err(bad()),
    };
    let apns_topic = next()?.to_owned();
    let locale = next()?.to_owned();
    let token = next()?.to_owned();
    Ok(PushToken {
        platform,
        token,
        apns_environment,
        apns_topic,
        locale,
        registered_ms,
    })
}

fn decode_tokens(v: Value) -> StoreResult<Vec<DeviceToken>> {
    let map: HashMap<String, String> = from_value(v)?;
    let mut tokens = map
        .into_iter()
        .map(|(device_id, v)| {
            Ok(DeviceToken {
                device_id,
                token: decode_token(&v)?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    tokens.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(tokens)
}

/// A mute's zset score as Redis returns it (`inf` for ever).
fn decode_mute(score: Option<String>, now_ms: i64) -> StoreResult<Option<Mute>> {
    let Some(score) = score else {
        return Ok(None);
    };
    let mute = if score == "inf" || score == "+inf" {
        Mute::Forever
    } else {
        let until: f64 = score
            .parse()
            .map_err(|_| corrupt(format!("mute score {score:?}")))?;
        Mute::Until(until as i64)
    };
    Ok(Some(mute).filter(|m| m.holds_at(now_ms)))
}

impl RedisStore {
    /// `push_owner.lua` `op` on `token`'s owner key for `owner`.
    fn owner_cmd(&self, op: &str, token: &PushToken, owner: &str) -> redis::Cmd {
        Self::evalsha(
            &self.scripts.push_owner,
            &[&push_owner_key(platform_name(token.platform), &token.token)],
            &[op.as_bytes(), owner.as_bytes()],
        )
    }

    /// Releases the owner key of a registration that ended (its stored
    /// value).
    fn release_owner(&mut self, user_id: &str, device_id: &str, value: &str) -> StoreResult<()> {
        let token = decode_token(value)?;
        let cmd = self.owner_cmd("release", &token, &format!("{user_id}{SEP}{device_id}"));
        self.pipeline(vec![cmd]).map(|_| ())
    }
}

impl PushStore for RedisStore {
    fn register_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &PushToken,
        max_devices: usize,
    ) -> StoreResult<Registered> {
        let cmd = Self::evalsha(
            &self.scripts.register_push,
            &[&user_key(user_id, "ptok")],
            &[
                device_id.as_bytes(),
                encode_token(token).as_bytes(),
                platform_name(token.platform).as_bytes(),
                token.token.as_bytes(),
                max_devices.to_string().as_bytes(),
            ],
        );
        let reply = self.pipeline(vec![cmd])?.pop().unwrap_or(Value::Nil);
        let (mut dropped, ended): (Vec<String>, Vec<String>) = from_value(reply)?;
        dropped.sort_unstable();
        // Then, in the tokens' slots: release what ended, claim this one.
        let owner = format!("{user_id}{SEP}{device_id}");
        let mut cmds = Vec::with_capacity(ended.len() + 1);
        for value in &ended {
            let ended = decode_token(value)?;
            cmds.push(self.owner_cmd("release", &ended, &owner));
        }
        cmds.push(self.owner_cmd("claim", token, &owner));
        let previous: String = from_value(self.pipeline(cmds)?.pop().unwrap_or(Value::Nil))?;
        // A device of another user that still holds the token loses it.
        let mut dropped_elsewhere = Vec::new();
        if let Some((other, other_device)) = previous.split_once(SEP) {
            if other != user_id {
                let cmd = Self::evalsha(
                    &self.scripts.invalidate_push,
                    &[&user_key(other, "ptok")],
                    &[
                        other_device.as_bytes(),
                        token.token.as_bytes(),
                        b"9e18",
                        platform_name(token.platform).as_bytes(),
                    ],
                );
                let removed: String =
                    from_value(self.pipeline(vec![cmd])?.pop().unwrap_or(Value::Nil))?;
                if !removed.is_empty() {
                    dropped_elsewhere.push((other.to_owned(), other_device.to_owned()));
                }
            }
        }
        Ok(Registered {
            dropped_devices: dropped,
            dropped_elsewhere,
        })
    }

    fn unregister_push_token(&mut self, user_id: &str, device_id: &str) -> StoreResult<bool> {
        let key = user_key(user_id, "ptok");
        let mut replies = self
            .pipeline(vec![
                redis::cmd("HGET").arg(&key).arg(device_id).clone(),
                redis::cmd("HDEL").arg(&key).arg(device_id).clone(),
            ])?
            .into_iter();
        let value: Option<String> = from_value(replies.next().unwrap_or(Value::Nil))?;
        let Some(value) = value else {
            return Ok(false);
        };
        self.release_owner(user_id, device_id, &value)?;
        Ok(true)
    }

    fn push_tokens(&mut self, user_id: &str) -> StoreResult<Vec<DeviceToken>> {
        let v: Value = self.query(redis::cmd("HGETALL").arg(user_key(user_id, "ptok")))?;
        decode_tokens(v)
    }

    fn invalidate_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        invalidated_ms: i64,
    ) -> StoreResult<bool> {
        let cmd = Self::evalsha(
            &self.scripts.invalidate_push,
            &[&user_key(user_id, "ptok")],
            &[
                device_id.as_bytes(),
                token.as_bytes(),
                invalidated_ms.to_string().as_bytes(),
                b"",
            ],
        );
        let reply = self.pipeline(vec![cmd])?.pop().unwrap_or(Value::Nil);
        let removed: String = from_value(reply)?;
        if removed.is_empty() {
            return Ok(false);
        }
        self.release_owner(user_id, device_id, &removed)?;
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
        let until = match mute {
            None => String::new(),
            Some(Mute::Forever) => "+inf".to_owned(),
            Some(Mute::Until(ms)) => ms.to_string(),
        };
        let cmd = Self::evalsha(
            &self.scripts.set_mute,
            &[&user_key(user_id, "mute")],
            &[
                conversation_id.as_bytes(),
                until.as_bytes(),
                now_ms.to_string().as_bytes(),
                max_mutes.to_string().as_bytes(),
            ],
        );
        let reply = self.pipeline(vec![cmd])?.pop().unwrap_or(Value::Nil);
        Ok(from_value::<i64>(reply)? == 1)
    }

    fn mute_of(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Mute>> {
        let score: Option<String> = self.query(
            redis::cmd("ZSCORE")
                .arg(user_key(user_id, "mute"))
                .arg(conversation_id),
        )?;
        decode_mute(score, now_ms)
    }

    /// One pipeline: `HGETALL u:{<user>}:sess` and `HKEYS u:{<user>}:ptok`
    /// per user; then the leases of the gateways found, as
    /// `sessions_of_users` reads them.
    fn recipients<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<Recipients> {
        let mut cmds = Vec::with_capacity(2 * user_ids.len());
        for u in user_ids {
            cmds.push(
                redis::cmd("HGETALL")
                    .arg(user_key(u.as_ref(), "sess"))
                    .clone(),
            );
            cmds.push(
                redis::cmd("HKEYS")
                    .arg(user_key(u.as_ref(), "ptok"))
                    .clone(),
            );
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut per_user: Vec<(DeviceSessions, Vec<String>)> = Vec::with_capacity(user_ids.len());
        let mut gateways: HashSet<Arc<str>> = HashSet::new();
        for _ in user_ids {
            let map: HashMap<String, String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let registered: Vec<String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let mut sessions = map
                .into_iter()
                .map(|(device_id, addr)| {
                    decode_addr(&addr)
                        .map(|addr| (device_id, addr))
                        .ok_or_else(|| corrupt(format!("session address {addr:?}")))
                })
                .collect::<StoreResult<Vec<_>>>()?;
            sessions.sort_by(|a, b| a.0.cmp(&b.0));
            gateways.extend(sessions.iter().map(|(_, a)| a.gateway_id.clone()));
            per_user.push((sessions, registered));
        }
        let dead = self.dead_gateways_among(&gateways)?;
        let mut recipients = Recipients {
            sessions: UserSessions::with_capacity(per_user.len()),
            push_due: Vec::with_capacity(per_user.len()),
        };
        for (mut sessions, registered) in per_user {
            sessions.retain(|(_, addr)| !dead.contains(&addr.gateway_id));
            let asleep = registered
                .iter()
                .any(|device| !sessions.iter().any(|(d, _)| d == device));
            recipients
                .push_due
                .push(asleep.then(|| sessions.iter().map(|(device, _)| device.clone()).collect()));
            recipients
                .sessions
                .push_user(sessions.into_iter().map(|(_, addr)| addr));
        }
        Ok(recipients)
    }

    fn push_context(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> StoreResult<PushContext> {
        let read_key = |conversation: &str| receipt_key(conversation, pb::ReceiptKind::Read);
        let cmds = vec![
            redis::cmd("HGETALL").arg(user_key(user_id, "ptok")).clone(),
            redis::cmd("ZSCORE")
                .arg(user_key(user_id, "mute"))
                .arg(conversation_id)
                .clone(),
            redis::cmd("HGET")
                .arg(read_key(conversation_id))
                .arg(user_id)
                .clone(),
            // Bounded whatever the user's number of pending conversations:
            // at most BADGE_CONVERSATIONS distinct ones (all when fewer).
            redis::cmd("SRANDMEMBER")
                .arg(user_key(user_id, "push"))
                .arg(BADGE_CONVERSATIONS)
                .clone(),
        ];
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut next = || replies.next().unwrap_or(Value::Nil);
        let tokens = decode_tokens(next())?;
        let muted = decode_mute(from_value(next())?, now_ms)?.is_some();
        let read: Option<u64> = from_value(next())?;
        let already_read = read.unwrap_or(0) >= seq;
        let mut pending: Vec<String> = from_value(next())?;
        pending.sort_unstable();
        let mut counted: Vec<&str> = vec![conversation_id];
        counted.extend(
            pending
                .iter()
                .map(String::as_str)
                .filter(|c| *c != conversation_id)
                .take(BADGE_CONVERSATIONS - 1),
        );
        let mut cmds = Vec::with_capacity(2 * counted.len());
        for conversation in &counted {
            cmds.push(redis::cmd("GET").arg(conv_key(conversation, "seq")).clone());
            cmds.push(
                redis::cmd("HGET")
                    .arg(read_key(conversation))
                    .arg(user_id)
                    .clone(),
            );
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut badge: u64 = 0;
        for _ in &counted {
            let last: Option<u64> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let read: Option<u64> = from_value(replies.next().unwrap_or(Value::Nil))?;
            badge += last.unwrap_or(0).saturating_sub(read.unwrap_or(0));
        }
        Ok(PushContext {
            tokens,
            muted,
            already_read,
            badge: badge.min(u64::from(MAX_BADGE)) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_round_trip_through_their_encoding() {
        let apns = PushToken {
            platform: PushPlatform::Apns,
            token: "ab".repeat(32),
            apns_environment: Some(ApnsEnvironment::Sandbox),
            apns_topic: "com.example.chat".into(),
            locale: "de-CH".into(),
            registered_ms: 1_767_225_600_000,
        };
        assert_eq!(decode_token(&encode_token(&apns)).unwrap(), apns);
        let fcm = PushToken {
            platform: PushPlatform::Fcm,
            token: "x:APA91b-_".into(),
            apns_environment: None,
            apns_topic: String::new(),
            locale: String::new(),
            registered_ms: -3,
        };
        assert_eq!(decode_token(&encode_token(&fcm)).unwrap(), fcm);
        assert!(decode_token("12\x1fweb\x1f\x1f\x1f\x1ftok").is_err());
        assert!(decode_token("nope").is_err());
    }

    #[test]
    fn mute_scores() {
        assert_eq!(
            decode_mute(Some("inf".into()), 5).unwrap(),
            Some(Mute::Forever)
        );
        assert_eq!(
            decode_mute(Some("9".into()), 5).unwrap(),
            Some(Mute::Until(9))
        );
        assert_eq!(decode_mute(Some("5".into()), 5).unwrap(), None, "ran out");
        assert_eq!(decode_mute(None, 5).unwrap(), None);
    }
}
