//! The rules of the push requests (SPEC §20) that need no server state:
//! what a `RegisterPushToken` may hold and what a `MuteConversation` time
//! may be. The router checks requests with these, in SPEC §14's order; a
//! client may check before sending.

use crate::pb;

/// Longest `RegisterPushToken.token`, bytes; announced in
/// `Welcome.limits.max_push_token_bytes`. APNs device tokens are 64 hex
/// digits today (Apple says they may grow), FCM registration tokens about
/// 160 characters: the bound leaves room and caps what a user's tokens cost.
pub const MAX_PUSH_TOKEN_BYTES: usize = 1024;

/// Longest `RegisterPushToken.apns_topic` (a bundle id, possibly with a
/// suffix such as `.voip`), bytes.
pub const MAX_APNS_TOPIC_BYTES: usize = 255;

/// Longest `RegisterPushToken.locale` (a BCP 47 tag), bytes.
pub const MAX_LOCALE_BYTES: usize = 35;

/// Furthest a timed mute may reach beyond the server's clock (366 days);
/// longer is `forever`.
pub const MAX_MUTE_AHEAD_MS: i64 = 366 * 24 * 60 * 60 * 1000;

/// Checks a `RegisterPushToken` (SPEC §14, rows r1–r6); the message of the
/// first failing check (each is `INVALID_ARGUMENT`).
pub fn check_register(register: &pb::RegisterPushToken) -> Result<(), String> {
    let platform = match pb::PushPlatform::try_from(register.platform) {
        Ok(p @ (pb::PushPlatform::Apns | pb::PushPlatform::Fcm)) => p,
        _ => return Err(format!("platform {} is not APNS or FCM", register.platform)),
    };
    let token = &register.token;
    if token.is_empty() || token.len() > MAX_PUSH_TOKEN_BYTES {
        return Err(format!(
            "token must be 1..={MAX_PUSH_TOKEN_BYTES} bytes, got {}",
            token.len()
        ));
    }
    match platform {
        pb::PushPlatform::Apns => {
            if !token.len().is_multiple_of(2) || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("an APNs token must be the device token in hex digits".into());
            }
            match pb::ApnsEnvironment::try_from(register.apns_environment) {
                Ok(pb::ApnsEnvironment::Production | pb::ApnsEnvironment::Sandbox) => {}
                _ => {
                    return Err(format!(
                        "apns_environment {} is not PRODUCTION or SANDBOX",
                        register.apns_environment
                    ))
                }
            }
            let topic = &register.apns_topic;
            if topic.is_empty()
                || topic.len() > MAX_APNS_TOPIC_BYTES
                || !topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(format!(
                    "an APNs registration needs apns_topic, the app's bundle id: \
                     1..={MAX_APNS_TOPIC_BYTES} bytes of [A-Za-z0-9._-]"
                ));
            }
        }
        _ => {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("an FCM token must be printable ASCII without spaces".into());
            }
            if register.apns_environment != 0 || !register.apns_topic.is_empty() {
                return Err("apns_environment and apns_topic are for APNs only".into());
            }
        }
    }
    let locale = &register.locale;
    if locale.len() > MAX_LOCALE_BYTES
        || !locale
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(format!(
            "locale must be a BCP 47 tag: at most {MAX_LOCALE_BYTES} bytes of [A-Za-z0-9_-]"
        ));
    }
    Ok(())
}

/// What a `MuteConversation` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MuteRequest {
    /// Unmute (`muted_until_ms` 0, `forever` false).
    Unmute,
    /// Mute until this Unix time, ms.
    Until(i64),
    /// Mute until unmuted.
    Forever,
}

/// Checks a `MuteConversation`'s time against the server clock `now_ms`
/// (SPEC §14, rows m1–m3; each is `INVALID_ARGUMENT`), and says what it
/// asks for.
pub fn check_mute(mute: &pb::MuteConversation, now_ms: i64) -> Result<MuteRequest, String> {
    let until = mute.muted_until_ms;
    if mute.forever {
        if until != 0 {
            return Err("muted_until_ms must be 0 when forever is set".into());
        }
        return Ok(MuteRequest::Forever);
    }
    if until == 0 {
        return Ok(MuteRequest::Unmute);
    }
    if until <= now_ms {
        return Err(format!(
            "muted_until_ms {until} is not in the future (server time {now_ms}; \
             Unix milliseconds)"
        ));
    }
    if until - now_ms > MAX_MUTE_AHEAD_MS {
        return Err(format!(
            "muted_until_ms is more than 366 days ahead (server time {now_ms}); \
             use forever"
        ));
    }
    Ok(MuteRequest::Until(until))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apns() -> pb::RegisterPushToken {
        pb::RegisterPushToken {
            platform: pb::PushPlatform::Apns.into(),
            token: "ab".repeat(32),
            apns_environment: pb::ApnsEnvironment::Production.into(),
            apns_topic: "com.example.chat".into(),
            locale: "de-CH".into(),
        }
    }

    fn fcm() -> pb::RegisterPushToken {
        pb::RegisterPushToken {
            platform: pb::PushPlatform::Fcm.into(),
            token: "dGVzdA:APA91b-x_y".into(),
            ..Default::default()
        }
    }

    #[test]
    fn good_registrations_pass() {
        assert_eq!(check_register(&apns()), Ok(()));
        assert_eq!(check_register(&fcm()), Ok(()));
        let longest = pb::RegisterPushToken {
            token: "a".repeat(MAX_PUSH_TOKEN_BYTES),
            ..fcm()
        };
        assert_eq!(check_register(&longest), Ok(()));
    }

    #[test]
    fn bad_registrations_say_why() {
        let bad = |r: pb::RegisterPushToken, says: &str| {
            let e = check_register(&r).expect_err(says);
            assert!(e.contains(says), "{e:?} should mention {says:?}");
        };
        bad(
            pb::RegisterPushToken {
                platform: 0,
                ..apns()
            },
            "platform",
        );
        bad(
            pb::RegisterPushToken {
                platform: 9,
                ..apns()
            },
            "platform",
        );
        bad(
            pb::RegisterPushToken {
                token: String::new(),
                ..fcm()
            },
            "1..=1024",
        );
        bad(
            pb::RegisterPushToken {
                token: "a".repeat(MAX_PUSH_TOKEN_BYTES + 1),
                ..fcm()
            },
            "1..=1024",
        );
        bad(
            pb::RegisterPushToken {
                token: "xyz0".into(),
                ..apns()
            },
            "hex",
        );
        bad(
            pb::RegisterPushToken {
                token: "abc".into(),
                ..apns()
            },
            "hex",
        );
        bad(
            pb::RegisterPushToken {
                apns_topic: String::new(),
                ..apns()
            },
            "apns_topic",
        );
        bad(
            pb::RegisterPushToken {
                apns_topic: "com.example/../x".into(),
                ..apns()
            },
            "apns_topic",
        );
        bad(
            pb::RegisterPushToken {
                apns_environment: 0,
                ..apns()
            },
            "apns_environment",
        );
        bad(
            pb::RegisterPushToken {
                apns_topic: "com.example.chat".into(),
                ..fcm()
            },
            "APNs only",
        );
        bad(
            pb::RegisterPushToken {
                token: "has space".into(),
                ..fcm()
            },
            "printable",
        );
        bad(
            pb::RegisterPushToken {
                locale: "x".repeat(MAX_LOCALE_BYTES + 1),
                ..fcm()
            },
            "locale",
        );
        bad(
            pb::RegisterPushToken {
                locale: "de CH".into(),
                ..fcm()
            },
            "locale",
        );
    }

    #[test]
    fn mute_times() {
        let now = 1_767_225_600_000;
        let m = |until, forever| pb::MuteConversation {
            conversation_id: "dm:a:b".into(),
            muted_until_ms: until,
            forever,
        };
        assert_eq!(check_mute(&m(0, false), now), Ok(MuteRequest::Unmute));
        assert_eq!(check_mute(&m(0, true), now), Ok(MuteRequest::Forever));
        assert_eq!(
            check_mute(&m(now + 1, false), now),
            Ok(MuteRequest::Until(now + 1))
        );
        assert_eq!(
            check_mute(&m(now + MAX_MUTE_AHEAD_MS, false), now),
            Ok(MuteRequest::Until(now + MAX_MUTE_AHEAD_MS))
        );
        assert!(check_mute(&m(now + MAX_MUTE_AHEAD_MS + 1, false), now).is_err());
        assert!(
            check_mute(&m(now, false), now).is_err(),
            "not in the future"
        );
        // Seconds instead of milliseconds: 1970, refused.
        assert!(check_mute(&m(now / 1000, false), now).is_err());
        assert!(check_mute(&m(-5, false), now).is_err());
        assert!(check_mute(&m(now + 1, true), now).is_err());
    }
}
