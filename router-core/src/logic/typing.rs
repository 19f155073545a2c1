//! Typing: a Typing indicator relayed to the conversation's other members.

use palaver_protocol::pb::{self, frame::Body};

use super::{access, event, Failure, Router};
use crate::api::Inbound;
use crate::bus::Output;
use crate::store::Store;

impl<S: Store> Router<S> {
    pub(super) fn typing(
        &mut self,
        req: &Inbound,
        typing: &pb::Typing,
        out: &mut Output,
    ) -> Result<(), Failure> {
        if palaver_protocol::is_channel_id(&typing.conversation_id) {
            return self.channel_typing(req, typing, out);
        }
        let group = self.group_of(&typing.conversation_id)?;
        let others: Vec<&str> = access(&typing.conversation_id, &req.from.user_id, group.as_ref())?
            .member_ids()
            .filter(|u| *u != req.from.user_id)
            .collect();
        let frame = event(Body::Typing(pb::Typing {
            conversation_id: typing.conversation_id.clone(),
            active: typing.active,
            user_id: req.from.user_id.clone(),
        }));
        Ok(self.fan_out(&others, None, &frame, out)?)
    }
}
