//! Push requests (SPEC §20): RegisterPushToken and UnregisterPushToken for
//! the requesting device, MuteConversation for the requesting user. Each is
//! answered to the requesting connection only.

use palaver_protocol::pb::{self, frame::Body, ErrorCode};
use palaver_protocol::push::{check_mute, check_register, MuteRequest};

use super::{reject, reply, Failure, Router};
use crate::api::Inbound;
use crate::bus::Output;
use crate::store::{Mute, PushToken, Store};

impl<S: Store> Router<S> {
    pub(super) fn register_push_token(
        &mut self,
        req: &Inbound,
        register: &pb::RegisterPushToken,
        out: &mut Output,
    ) -> Result<(), Failure> {
        if let Err(message) = check_register(register) {
            return reject(ErrorCode::InvalidArgument, message);
        }
        let now_ms = self.clock.now_ms();
        let Some(token) = PushToken::from_request(register, now_ms) else {
            return reject(ErrorCode::InvalidArgument, "not a valid push registration");
        };
        let registered = self.store.register_push_token(
            &req.from.user_id,
            &req.from.device_id,
            &token,
            self.config.max_push_devices_per_user,
        )?;
        if !registered.dropped_devices.is_empty() || !registered.dropped_elsewhere.is_empty() {
            tracing::debug!(
                user = %req.from.user_id,
                device = %req.from.device_id,
                dropped = ?registered.dropped_devices,
                other_users = ?registered.dropped_elsewhere,
                "push registration replaced other devices' registrations"
            );
        }
        out.frames.push(reply(
            req,
            Body::PushTokenRegistered(pb::PushTokenRegistered {
                registered_ms: now_ms,
            }),
        ));
        Ok(())
    }

    pub(super) fn unregister_push_token(
        &mut self,
        req: &Inbound,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let was_registered = self
            .store
            .unregister_push_token(&req.from.user_id, &req.from.device_id)?;
        out.frames.push(reply(
            req,
            Body::PushTokenUnregistered(pb::PushTokenUnregistered { was_registered }),
        ));
        Ok(())
    }

    /// Checks in SPEC §14's order: the time (m1–m3), the conversation
    /// (c1–c4), then the per-user cap (QUOTA_EXCEEDED).
    pub(super) fn mute_conversation(
        &mut self,
        req: &Inbound,
        mute: &pb::MuteConversation,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let now_ms = self.clock.now_ms();
        let wanted = match check_mute(mute, now_ms) {
            Ok(MuteRequest::Unmute) => None,
            Ok(MuteRequest::Until(until)) => Some(Mute::Until(until)),
            Ok(MuteRequest::Forever) => Some(Mute::Forever),
            Err(message) => return reject(ErrorCode::InvalidArgument, message),
        };
        let conversation_id = &mute.conversation_id;
        let user = &req.from.user_id;
        self.check_member(conversation_id, user)?;
        let max = self.config.max_mutes_per_user;
        if !self
            .store
            .set_mute(user, conversation_id, wanted, now_ms, max)?
        {
            return reject(
                ErrorCode::QuotaExceeded,
                format!(
                    "you have {max} conversations muted, the most there may be; \
                     unmute one first"
                ),
            );
        }
        let (muted_until_ms, forever) = match wanted {
            None => (0, false),
            Some(Mute::Until(until)) => (until, false),
            Some(Mute::Forever) => (0, true),
        };
        out.frames.push(reply(
            req,
            Body::ConversationMuted(pb::ConversationMuted {
                conversation_id: conversation_id.clone(),
                muted_until_ms,
                forever,
            }),
        ));
        Ok(())
    }
}
