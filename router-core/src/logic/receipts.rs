//! Receipts: Receipt (delivered/read marks, fanned out to the senders of
//! the covered messages who are still members, and the reader's devices).

use palaver_protocol::pb::{self, frame::Body, ErrorCode};

use super::{event, reject, Failure, Router};
use crate::api::Inbound;
use crate::bus::Output;
use crate::store::Store;

impl<S: Store> Router<S> {
    pub(super) fn receipt(
        &mut self,
        req: &Inbound,
        receipt: &pb::Receipt,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let kind = match pb::ReceiptKind::try_from(receipt.kind) {
            Ok(k @ (pb::ReceiptKind::Delivered | pb::ReceiptKind::Read)) => k,
            _ => {
                return reject(
                    ErrorCode::InvalidArgument,
                    format!("receipt kind {} is not DELIVERED or READ", receipt.kind),
                )
            }
        };
        let conversation_id = &receipt.conversation_id;
        if palaver_protocol::is_channel_id(conversation_id) {
            return self.channel_receipt(req, receipt, kind, out);
        }
        let reader = &req.from.user_id;
        self.check_member(conversation_id, reader)?;
        self.store
            .clear_push_pending(reader, Some(conversation_id))?;
        // Receipts beyond the last message are clamped to it.
        let last_seq = self
            .store
            .last_seqs(std::slice::from_ref(conversation_id))?[0];
        let up_to_seq = receipt.up_to_seq.min(last_seq);
        if up_to_seq == 0 {
            return Ok(());
        }
        if kind == pb::ReceiptKind::Read {
            // READ implies DELIVERED; only the READ update is sent.
            self.store.advance_receipt(
                conversation_id,
                reader,
                pb::ReceiptKind::Delivered,
                up_to_seq,
            )?;
        }
        let Some(previous) =
            self.store
                .advance_receipt(conversation_id, reader, kind, up_to_seq)?
        else {
            return Ok(());
        };
        let mut users: Vec<String> = self
            .store
            .senders_between(conversation_id, previous, up_to_seq)?
            .into_iter()
            .filter(|u| u != reader)
            .collect();
        // Senders who left the group (or were removed) since get nothing
        // more of it (SPEC §8, §11): only current members are told.
        if !users.is_empty() && palaver_protocol::is_group_id(conversation_id) {
            let current = self.store.members_among(conversation_id, &users)?;
            let mut current = current.into_iter();
            users.retain(|_| current.next().unwrap_or(false));
        }
        users.push(reader.clone());
        let update = event(Body::ReceiptUpdate(pb::ReceiptUpdate {
            conversation_id: conversation_id.clone(),
            user_id: reader.clone(),
            kind: kind as i32,
            up_to_seq,
        }));
        Ok(self.fan_out(&users, Some(&req.from.addr), &update, out)?)
    }
}
