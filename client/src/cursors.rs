//! Per-conversation receive positions: dedup by (conversation, seq), in-order
//! release to the app, gap detection (SPEC §6, §7), and the history epoch
//! each position belongs to (SPEC §7 "History epochs"): a position from an
//! earlier epoch is ahead of a server that lost its history, and would make
//! every new message look like a repeat.

use std::collections::{BTreeMap, HashMap};

use crate::types::ChatMessage;

/// What the app was handed (or must be told) after one arrival.
// Nearly every value is a Message: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Release {
    Message(ChatMessage),
    /// Seqs the server no longer has (found after a Sync): skipped.
    Unavailable {
        from_seq: u64,
        to_seq: u64,
    },
}

#[derive(Debug, Default)]
struct Conv {
    /// Everything up to here is held (released to the app or acked as ours).
    contiguous: u64,
    /// The server history epoch `contiguous` counts in (0: not known yet).
    epoch: u64,
    /// Arrived above a gap, waiting for the gap to fill. `None`: a seq this
    /// device sent (its SendAck came), nothing to hand the app.
    held: BTreeMap<u64, Option<ChatMessage>>,
}

/// How an arrival relates to what is held.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Arrival {
    /// Released, or held above a gap it did not open.
    Taken,
    /// Held above a gap: the caller Syncs.
    Gap,
    /// At or below what is held: a repeat (at-least-once), or a server that
    /// lost its history; a Sync tells which (its epoch).
    Repeat,
}

/// The receive side of every conversation this client knows.
#[derive(Debug, Default)]
pub(crate) struct Cursors {
    convs: HashMap<String, Conv>,
    /// The newest epoch a server announced (0: none yet); conversations
    /// met from now on count in it.
    epoch: u64,
}

impl Cursors {
    /// Positions saved earlier: (conversation, seq, epoch).
    pub fn from_saved(saved: impl IntoIterator<Item = (String, u64, u64)>) -> Cursors {
        let mut c = Cursors::default();
        for (id, seq, epoch) in saved {
            let conv = c.convs.entry(id).or_default();
            if seq >= conv.contiguous {
                conv.contiguous = seq;
                conv.epoch = epoch;
            }
        }
        c
    }

    /// Makes the conversation known (a Sync listed it) so later Syncs carry
    /// its cursor.
    pub fn know(&mut self, conversation_id: &str) {
        if !self.convs.contains_key(conversation_id) {
            self.convs.insert(
                conversation_id.to_string(),
                Conv {
                    epoch: self.epoch,
                    ..Conv::default()
                },
            );
        }
    }

    pub fn contiguous(&self, conversation_id: &str) -> u64 {
        self.convs.get(conversation_id).map_or(0, |c| c.contiguous)
    }

    /// The epoch of a conversation's position (0: not known).
    pub fn epoch_of(&self, conversation_id: &str) -> u64 {
        self.convs.get(conversation_id).map_or(0, |c| c.epoch)
    }

    /// A server announced `epoch` (a SyncBatch). Positions of another,
    /// earlier epoch are of a history the server no longer has: they start
    /// again from 0, and what was held above them is dropped (returned
    /// first, sorted). Positions of no known epoch take this one (returned
    /// second, so they are saved with it). 0 (not announced) changes nothing.
    pub fn adopt_epoch(&mut self, epoch: u64) -> (Vec<String>, Vec<String>) {
        let (mut reset, mut adopted) = (Vec::new(), Vec::new());
        if epoch == 0 {
            return (reset, adopted);
        }
        self.epoch = epoch;
        for (id, conv) in &mut self.convs {
            if conv.epoch == epoch {
                continue;
            }
            if conv.epoch == 0 {
                adopted.push(id.clone());
            } else {
                reset.push(id.clone());
                conv.contiguous = 0;
                conv.held.clear();
            }
            conv.epoch = epoch;
        }
        reset.sort();
        adopted.sort();
        (reset, adopted)
    }

    /// (conversation, highest contiguous seq) for every known conversation,
    /// sorted by id so requests are deterministic.
    pub fn positions(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .convs
            .iter()
            .map(|(id, c)| (id.clone(), c.contiguous))
            .collect();
        v.sort();
        v
    }

    /// Conversations with messages held above a gap.
    pub fn gapped(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .convs
            .iter()
            .filter(|(_, c)| !c.held.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        v.sort();
        v
    }

    /// A message arrived (Deliver, SyncBatch). Returns what to hand the app
    /// now, and how it relates to what is held.
    pub fn on_message(&mut self, m: ChatMessage) -> (Vec<Release>, Arrival) {
        let seq = m.seq;
        let id = m.conversation_id.clone();
        self.arrive(&id, seq, Some(m))
    }

    /// This device's own message was stored at `seq` (SendAck): count it as
    /// held without handing it to the app.
    pub fn on_own(&mut self, conversation_id: &str, seq: u64) -> (Vec<Release>, Arrival) {
        self.arrive(conversation_id, seq, None)
    }

    fn arrive(
        &mut self,
        conversation_id: &str,
        seq: u64,
        m: Option<ChatMessage>,
    ) -> (Vec<Release>, Arrival) {
        let epoch = self.epoch;
        let conv = self
            .convs
            .entry(conversation_id.to_string())
            .or_insert_with(|| Conv {
                epoch,
                ..Conv::default()
            });
        if seq == 0 || seq <= conv.contiguous || conv.held.contains_key(&seq) {
            return (Vec::new(), Arrival::Repeat);
        }
        if seq > conv.contiguous + 1 {
            conv.held.insert(seq, m);
            return (Vec::new(), Arrival::Gap);
        }
        let mut out = Vec::new();
        conv.contiguous = seq;
        out.extend(m.map(Release::Message));
        Self::drain_contiguous(conv, &mut out);
        (out, Arrival::Taken)
    }

    fn drain_contiguous(conv: &mut Conv, out: &mut Vec<Release>) {
        while let Some(m) = conv.held.remove(&(conv.contiguous + 1)) {
            conv.contiguous += 1;
            out.extend(m.map(Release::Message));
        }
    }

    /// A Sync that started while `conversation_id` had a gap finished and
    /// the gap is still there: the server no longer has those seqs (its
    /// history window, SPEC §7). Skip them and release what is held.
    pub fn give_up_gap(&mut self, conversation_id: &str) -> Vec<Release> {
        let mut out = Vec::new();
        let Some(conv) = self.convs.get_mut(conversation_id) else {
            return out;
        };
        while let Some((&first, _)) = conv.held.iter().next() {
            if first > conv.contiguous + 1 {
                out.push(Release::Unavailable {
                    from_seq: conv.contiguous + 1,
                    to_seq: first - 1,
                });
                conv.contiguous = first - 1;
            }
            Self::drain_contiguous(conv, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ContentKind;

    fn msg(conv: &str, seq: u64) -> ChatMessage {
        ChatMessage {
            conversation_id: conv.into(),
            seq,
            message_id: format!("m{seq}"),
            sender_user_id: "bob".into(),
            sender_device_id: "d".into(),
            client_msg_id: vec![0; 16],
            kind: ContentKind::Text,
            body: vec![],
            reply_to_seq: 0,
            media: None,
            server_time_ms: 0,
        }
    }

    fn seqs(r: &[Release]) -> Vec<u64> {
        r.iter()
            .filter_map(|r| match r {
                Release::Message(m) => Some(m.seq),
                Release::Unavailable { .. } => None,
            })
            .collect()
    }

    #[test]
    fn in_order_arrivals_pass_and_repeats_drop() {
        let mut c = Cursors::default();
        assert_eq!(seqs(&c.on_message(msg("dm:a:b", 1)).0), vec![1]);
        assert_eq!(seqs(&c.on_message(msg("dm:a:b", 2)).0), vec![2]);
        assert_eq!(c.on_message(msg("dm:a:b", 2)), (vec![], Arrival::Repeat));
        assert_eq!(c.on_message(msg("dm:a:b", 1)), (vec![], Arrival::Repeat));
        assert_eq!(c.contiguous("dm:a:b"), 2);
    }

    #[test]
    fn a_gap_holds_later_messages_until_filled() {
        let mut c = Cursors::default();
        c.on_message(msg("g", 1));
        let (out, arrival) = c.on_message(msg("g", 4));
        assert!(out.is_empty() && arrival == Arrival::Gap);
        assert_eq!(c.gapped(), vec!["g".to_string()]);
        // Own message at 3 (SendAck) is held silently.
        assert_eq!(c.on_own("g", 3), (vec![], Arrival::Gap));
        let (out, arrival) = c.on_message(msg("g", 2));
        assert_eq!(arrival, Arrival::Taken);
        assert_eq!(seqs(&out), vec![2, 4], "3 is ours: not handed over");
        assert_eq!(c.contiguous("g"), 4);
        assert!(c.gapped().is_empty());
        // The held repeat of 4 is dropped too.
        assert_eq!(c.on_message(msg("g", 4)), (vec![], Arrival::Repeat));
    }

    #[test]
    fn a_final_gap_is_skipped_and_reported() {
        let mut c = Cursors::from_saved([("g".to_string(), 2, 0)]);
        c.on_message(msg("g", 5));
        c.on_message(msg("g", 8));
        let out = c.give_up_gap("g");
        assert_eq!(
            out.iter()
                .map(|r| match r {
                    Release::Message(m) => format!("m{}", m.seq),
                    Release::Unavailable { from_seq, to_seq } => format!("u{from_seq}-{to_seq}"),
                })
                .collect::<Vec<_>>(),
            vec!["u3-4", "m5", "u6-7", "m8"]
        );
        assert_eq!(c.contiguous("g"), 8);
        assert_eq!(c.positions(), vec![("g".to_string(), 8)]);
    }

    #[test]
    fn positions_of_an_earlier_epoch_start_again_and_unknown_ones_adopt() {
        let mut c = Cursors::from_saved([
            ("old".to_string(), 540, 7),
            ("legacy".to_string(), 3, 0),
            ("same".to_string(), 9, 8),
        ]);
        c.on_message(msg("old", 545)); // held above a gap
        assert_eq!(c.adopt_epoch(0), (vec![], vec![]), "0: not announced");
        let (reset, adopted) = c.adopt_epoch(8);
        assert_eq!(reset, vec!["old".to_string()]);
        assert_eq!(adopted, vec!["legacy".to_string()]);
        assert_eq!(c.contiguous("old"), 0);
        assert!(
            c.gapped().is_empty(),
            "what was held above the old position is gone"
        );
        assert_eq!((c.contiguous("same"), c.epoch_of("same")), (9, 8));
        assert_eq!((c.contiguous("legacy"), c.epoch_of("legacy")), (3, 8));
        // The new history's seq 1 is now news, not a repeat.
        assert_eq!(seqs(&c.on_message(msg("old", 1)).0), vec![1]);
        // Conversations met later count in the announced epoch.
        c.on_message(msg("new", 1));
        assert_eq!(c.epoch_of("new"), 8);
        assert_eq!(c.adopt_epoch(8), (vec![], vec![]));
    }
}
