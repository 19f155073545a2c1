//! The push part of the store (SPEC §20): device registrations, mutes, and
//! what the fan-out and the push worker read ([`PushStore`]).

use palaver_protocol::pb;

use super::{StoreResult, UserSessions};

/// A push service (SPEC §20).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PushPlatform {
    Apns,
    Fcm,
}

/// Which APNs endpoint a token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApnsEnvironment {
    Production,
    Sandbox,
}

/// One device's push registration (SPEC §20): where the push worker sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushToken {
    pub platform: PushPlatform,
    /// APNs: the device token in hex; FCM: the registration token. At most
    /// [`palaver_protocol::push::MAX_PUSH_TOKEN_BYTES`].
    pub token: String,
    /// APNs only (`None` for FCM).
    pub apns_environment: Option<ApnsEnvironment>,
    /// APNs only: the app's bundle id, the `apns-topic` (empty for FCM).
    pub apns_topic: String,
    /// BCP 47 tag; may be empty.
    pub locale: String,
    /// Router time of the registration, Unix epoch ms: an invalidation
    /// from a provider counts only if it is later
    /// ([`PushStore::invalidate_push_token`]).
    pub registered_ms: i64,
}

impl PushToken {
    /// The registration a `RegisterPushToken` asks for at `registered_ms`;
    /// `None` when the request breaks SPEC §20's rules
    /// ([`palaver_protocol::push::check_register`] says which).
    pub fn from_request(request: &pb::RegisterPushToken, registered_ms: i64) -> Option<Self> {
        palaver_protocol::push::check_register(request).ok()?;
        let platform = match pb::PushPlatform::try_from(request.platform).ok()? {
            pb::PushPlatform::Apns => PushPlatform::Apns,
            pb::PushPlatform::Fcm => PushPlatform::Fcm,
            pb::PushPlatform::Unspecified => return None,
        };
        let apns_environment = match pb::ApnsEnvironment::try_from(request.apns_environment) {
            Ok(pb::ApnsEnvironment::Production) => Some(ApnsEnvironment::Production),
            Ok(pb::ApnsEnvironment::Sandbox) => Some(ApnsEnvironment::Sandbox),
            _ => None,
        };
        Some(PushToken {
            platform,
            token: request.token.clone(),
            apns_environment,
            apns_topic: request.apns_topic.clone(),
            locale: request.locale.clone(),
            registered_ms,
        })
    }
}

/// A device of a user and its registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceToken {
    pub device_id: String,
    pub token: PushToken,
}

/// A user's mute of a conversation (SPEC §20).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mute {
    /// Until this time, Unix epoch ms (no mute from then on).
    Until(i64),
    /// Until unmuted.
    Forever,
}

impl Mute {
    /// Whether the mute still holds at `now_ms`.
    pub fn holds_at(self, now_ms: i64) -> bool {
        match self {
            Mute::Forever => true,
            Mute::Until(until) => until > now_ms,
        }
    }
}

/// What [`PushStore::register_push_token`] did besides storing the token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    /// Other devices of the user that lost their registration: the one
    /// that held the same token (the app was reinstalled under a new device
    /// id), and the oldest ones past the per-user cap. Ascending.
    pub dropped_devices: Vec<String>,
    /// Devices of other users that held the same token, as (user, device):
    /// another account signed in on the same app install (a shared phone),
    /// whose pushes must not reach this one's screen.
    pub dropped_elsewhere: Vec<(String, String)>,
}

/// The recipients of a message as its fan-out needs them
/// ([`PushStore::recipients`]): their sessions, and who may need a push.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recipients {
    /// Exactly what [`SessionStore::sessions_of_users`] returns.
    pub sessions: UserSessions,
    /// Per user asked about, in input order: `Some(device ids online now,
    /// ascending)` when the user has a device with a push registration and
    /// no live session (a push may be due: a phone asleep while a desktop
    /// is online still gets one); `None` when every registered device is
    /// online, or the user registered none.
    pub push_due: Vec<Option<Vec<String>>>,
}

/// Largest badge [`PushStore::push_context`] reports.
pub const MAX_BADGE: u32 = 999;

/// Most conversations [`PushStore::push_context`] sums the unread
/// messages of.
pub const BADGE_CONVERSATIONS: usize = 64;

/// What the push worker needs to decide one push event
/// ([`PushStore::push_context`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushContext {
    /// The user's registrations, ascending by device id.
    pub tokens: Vec<DeviceToken>,
    /// The conversation is muted for the user now.
    pub muted: bool,
    /// The user's READ mark in the conversation is at or past the event's
    /// seq (read on some device meanwhile: no push).
    pub already_read: bool,
    /// The app badge: unread messages (last seq − READ mark) summed over
    /// the user's conversations with a pending push (the event's among
    /// them), at most [`BADGE_CONVERSATIONS`] of them (which ones, when
    /// there are more, is the store's choice), capped at [`MAX_BADGE`]. A pending push mark is set when a message finds the
    /// user with a device to push and cleared when the user connects or
    /// sends a Receipt for the conversation, so these are the conversations
    /// that got messages since the user last looked: bounded work per event
    /// and no counter to keep on the message path.
    pub badge: u32,
}

impl PushContext {
    /// The registrations to push for an event: those whose device was not
    /// online ([`crate::bus::PushEvent::online_device_ids`]), none when the
    /// conversation is muted or the message was already read.
    pub fn targets<'a>(&'a self, online_device_ids: &[String]) -> Vec<&'a DeviceToken> {
        if self.muted || self.already_read {
            return Vec::new();
        }
        self.tokens
            .iter()
            .filter(|t| !online_device_ids.contains(&t.device_id))
            .collect()
    }
}

/// Push registrations per (user, device) and mutes per (user,
/// conversation): what the router writes for the push requests (SPEC §20)
/// and the push worker reads. Keyed by user (Redis: one hash tag per
/// user); every write is atomic per user.
pub trait PushStore {
    /// Stores `token` as `device_id`'s registration, atomically per user,
    /// replacing the device's previous one. Another device of the user
    /// holding the same token (platform and token equal) loses its
    /// registration; then, while the user has more than `max_devices`
    /// registrations, the oldest (least `registered_ms`, then least device
    /// id; never `device_id`'s) is dropped.
    ///
    /// A token has one owner: a device of another user that held it loses
    /// its registration too (Redis: through a per-token owner key, after
    /// the user's own write, only if that device still holds the token;
    /// two users registering one token at the same instant may both keep
    /// it until either registers again). The owner keys are kept only for
    /// registered tokens: replacing, unregistering or invalidating a
    /// registration releases its token's.
    fn register_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &PushToken,
        max_devices: usize,
    ) -> StoreResult<Registered>;

    /// Removes the device's registration; whether it had one.
    fn unregister_push_token(&mut self, user_id: &str, device_id: &str) -> StoreResult<bool>;

    /// The user's registrations, ascending by device id.
    fn push_tokens(&mut self, user_id: &str) -> StoreResult<Vec<DeviceToken>>;

    /// A provider said `token` is no longer valid at `invalidated_ms` (APNs
    /// 410 with its timestamp, FCM UNREGISTERED at the time of the answer).
    /// Removes the device's registration, atomically, only if it still
    /// holds exactly `token` and was registered before `invalidated_ms`:
    /// a re-registration (a new token, or the same one registered again
    /// after the provider's time) wins. Whether it removed it.
    fn invalidate_push_token(
        &mut self,
        user_id: &str,
        device_id: &str,
        token: &str,
        invalidated_ms: i64,
    ) -> StoreResult<bool>;

    /// Sets (`Some`) or clears (`None`) the user's mute of the
    /// conversation, atomically per user. Mutes that no longer hold at
    /// `now_ms` are dropped first. A mute of a conversation that is not
    /// muted while the user has `max_mutes` mutes is refused: nothing
    /// changes and the answer is false. Otherwise true (an unmute always).
    fn set_mute(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        mute: Option<Mute>,
        now_ms: i64,
        max_mutes: usize,
    ) -> StoreResult<bool>;

    /// The user's mute of the conversation that holds at `now_ms`.
    fn mute_of(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Mute>>;

    /// The fan-out read of a message: every user's live sessions, as
    /// [`SessionStore::sessions_of_users`], and whether a push may be due
    /// ([`Recipients::push_due`]). One pipelined round trip in Redis, the
    /// same one the sessions alone take (plus the dead-gateway check they
    /// need anyway): the message path pays one more command per recipient
    /// in it, not one more round trip.
    fn recipients<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<Recipients>;

    /// The push worker's one read for an event of `user_id` about
    /// `conversation_id` at `seq`, at `now_ms` ([`PushContext`]). Two
    /// pipelined round trips in Redis (the user's keys with the
    /// conversation's READ mark, then the badge's conversations).
    fn push_context(
        &mut self,
        user_id: &str,
        conversation_id: &str,
        seq: u64,
        now_ms: i64,
    ) -> StoreResult<PushContext>;
}
