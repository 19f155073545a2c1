//! The outbox: messages accepted from the app and not yet acknowledged.
//! Each is resent with the same `client_msg_id` on every connection until
//! its SendAck (SPEC §6 dedups the repeats). One Send per conversation is in
//! flight at a time, oldest first, so a conversation stores messages in the
//! order the app sent them even when a Send is refused for a while
//! (RATE_LIMITED, UNAVAILABLE) or a connection drops between two of them.

use std::collections::{BTreeMap, HashSet};

use crate::types::OutgoingMessage;

#[derive(Debug)]
struct Entry {
    msg: OutgoingMessage,
    /// Request id of the Send on the current connection.
    in_flight: Option<u32>,
    /// Do not send before this time (after a retryable refusal).
    not_before: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// By `created_order`.
    entries: BTreeMap<u64, Entry>,
}

impl Outbox {
    pub fn from_saved(saved: Vec<OutgoingMessage>) -> Outbox {
        let mut o = Outbox::default();
        for m in saved {
            o.push(m);
        }
        o
    }

    pub fn push(&mut self, msg: OutgoingMessage) {
        // Never two entries for one id (an app re-adding a stored message).
        if self.find(&msg.client_msg_id).is_some() {
            return;
        }
        self.entries.insert(
            msg.created_order,
            Entry {
                msg,
                in_flight: None,
                not_before: 0,
            },
        );
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn highest_order(&self) -> Option<u64> {
        self.entries.keys().next_back().copied()
    }

    fn find(&self, client_msg_id: &[u8]) -> Option<u64> {
        self.entries
            .iter()
            .find(|(_, e)| e.msg.client_msg_id == client_msg_id)
            .map(|(k, _)| *k)
    }

    /// The messages to send now: the oldest of each conversation, if it is
    /// not in flight and not waiting out a refusal. At most `max` of them.
    pub fn ready(&self, now: u64, max: usize) -> Vec<OutgoingMessage> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in self.entries.values() {
            if out.len() >= max {
                break;
            }
            if !seen.insert(e.msg.conversation_id.as_str()) {
                continue; // not the oldest of its conversation
            }
            if e.in_flight.is_none() && e.not_before <= now {
                out.push(e.msg.clone());
            }
        }
        out
    }

    /// Earliest time a waiting head-of-conversation becomes sendable.
    pub fn next_retry_at(&self, now: u64) -> Option<u64> {
        let mut seen = HashSet::new();
        self.entries
            .values()
            .filter(|e| seen.insert(e.msg.conversation_id.as_str()))
            .filter(|e| e.in_flight.is_none() && e.not_before > now)
            .map(|e| e.not_before)
            .min()
    }

    pub fn mark_sent(&mut self, client_msg_id: &[u8], request_id: u32) {
        if let Some(k) = self.find(client_msg_id) {
            if let Some(e) = self.entries.get_mut(&k) {
                e.in_flight = Some(request_id);
            }
        }
    }

    /// Acknowledged or refused for good: leaves the outbox.
    pub fn remove(&mut self, client_msg_id: &[u8]) -> Option<OutgoingMessage> {
        let k = self.find(client_msg_id)?;
        self.entries.remove(&k).map(|e| e.msg)
    }

    /// Refused for now: send again (same id) at `not_before`.
    pub fn retry_later(&mut self, client_msg_id: &[u8], not_before: u64) {
        if let Some(k) = self.find(client_msg_id) {
            if let Some(e) = self.entries.get_mut(&k) {
                e.in_flight = None;
                e.not_before = not_before;
            }
        }
    }

    /// The connection is gone: nothing is in flight any more.
    pub fn connection_lost(&mut self) {
        for e in self.entries.values_mut() {
            e.in_flight = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ContentKind;

    fn m(order: u64, conv: &str) -> OutgoingMessage {
        OutgoingMessage {
            client_msg_id: vec![order as u8; 16],
            conversation_id: conv.into(),
            kind: ContentKind::Text,
            body: vec![],
            reply_to_seq: 0,
            media: None,
            created_order: order,
            mention_user_ids: Default::default(),
        }
    }

    #[test]
    fn one_in_flight_per_conversation_oldest_first() {
        let mut o = Outbox::from_saved(vec![m(2, "a"), m(1, "a"), m(3, "b")]);
        let ready: Vec<u64> = o.ready(0, 10).iter().map(|m| m.created_order).collect();
        assert_eq!(ready, vec![1, 3]);
        o.mark_sent(&[1; 16], 7);
        o.mark_sent(&[3; 16], 8);
        assert!(o.ready(0, 10).is_empty());
        o.remove(&[1; 16]);
        assert_eq!(o.ready(0, 10)[0].created_order, 2);
        // A refusal keeps the head waiting; nothing behind it overtakes.
        o.retry_later(&[2; 16], 1000);
        assert!(o.ready(999, 10).is_empty());
        assert_eq!(o.next_retry_at(0), Some(1000));
        assert_eq!(o.ready(1000, 10).len(), 1);
        // A lost connection makes in-flight entries sendable again.
        o.connection_lost();
        assert_eq!(o.ready(1000, 10).len(), 2);
        assert_eq!(o.ready(1000, 1).len(), 1);
        o.push(m(3, "b"));
        assert_eq!(o.len(), 2, "same id twice is one entry");
    }
}
