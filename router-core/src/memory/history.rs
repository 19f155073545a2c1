//! A conversation's history window: chunks of messages with their dedup
//! index (sender, client_msg_id), bounded by the window whatever the traffic.

use std::collections::{HashMap, VecDeque};

use palaver_protocol::pb;

/// Messages per history chunk. Bounds the work of any one append: no
/// structure in a conversation's history ever moves more than one chunk.
pub(super) const CHUNK: usize = 256;

/// A conversation's history window as a ring of fixed-size chunks, each with
/// its own (sender, client_msg_id) → offset index. Dedup is tied to the window: an id
/// is remembered while its message is stored (and within the dedup TTL), and
/// forgotten with it, so memory is bounded by `history_window` (+ one chunk) messages
/// whatever the traffic. Chunks after the first are allocated at full
/// capacity, and the chunk evicted from the front is recycled for the next
/// one, so steady-state appends never rehash, reallocate or copy a window.
#[derive(Default)]
pub(super) struct History {
    /// All chunks but the last are full (`CHUNK` messages).
    chunks: VecDeque<Chunk>,
    /// Messages already evicted from the front chunk.
    head: usize,
    /// Messages in the window.
    len: usize,
    /// The last evicted chunk, cleared, kept for reuse.
    spare: Option<Chunk>,
    /// Random keys for client_msg_id fingerprints: an id is hashed once per
    /// append, whatever the number of chunks probed.
    keys: std::hash::RandomState,
}

/// Chunk index: keyed fingerprint of (sender, client_msg_id) → (offset in
/// `messages`, dedup expiry ms). The fingerprint is already a hash.
type FingerprintMap = HashMap<u64, (usize, i64), std::hash::BuildHasherDefault<Fingerprint>>;

#[derive(Default)]
struct Chunk {
    messages: Vec<pb::Message>,
    ids: FingerprintMap,
    /// Entries whose fingerprint another id of this chunk already has
    /// (a 64-bit collision; almost always empty). Matches are always
    /// confirmed against the stored message's id.
    collided: Vec<(usize, i64)>,
}

impl Chunk {
    fn with_capacity(n: usize) -> Self {
        Chunk {
            messages: Vec::with_capacity(n),
            ids: FingerprintMap::with_capacity_and_hasher(n, Default::default()),
            collided: Vec::new(),
        }
    }
}

/// Identity hasher for keys that are already keyed hashes.
#[derive(Default)]
struct Fingerprint(u64);

impl std::hash::Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl History {
    /// Dedup entries indexed and chunks held (tests check both stay bounded).
    #[cfg(test)]
    pub(super) fn footprint(&self) -> (usize, usize) {
        let indexed = self
            .chunks
            .iter()
            .map(|c| c.ids.len() + c.collided.len())
            .sum();
        (indexed, self.chunks.len())
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn get(&self, i: usize) -> Option<&pb::Message> {
        if i >= self.len {
            return None;
        }
        let at = self.head + i;
        self.chunks.get(at / CHUNK)?.messages.get(at % CHUNK)
    }

    pub(super) fn front(&self) -> Option<&pb::Message> {
        self.get(0)
    }

    pub(super) fn range(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = &pb::Message> {
        let end = range.end.min(self.len);
        (range.start.min(end)..end).filter_map(move |i| self.get(i))
    }

    pub(super) fn range_from(&self, start: usize) -> impl Iterator<Item = &pb::Message> {
        self.range(start..self.len)
    }

    /// The stored message `sender` sent with this client_msg_id, if it is
    /// in the window and its dedup entry has not expired at `now_ms`.
    pub(super) fn find(
        &self,
        sender: &str,
        client_msg_id: &[u8],
        now_ms: i64,
    ) -> Option<&pb::Message> {
        use std::hash::BuildHasher;
        let fp = self.keys.hash_one((sender, client_msg_id));
        // Newest first: retries are usually recent, and an id stored again
        // after its first message left the window maps to the live one.
        for (ci, chunk) in self.chunks.iter().enumerate().rev() {
            let hit = chunk
                .ids
                .get(&fp)
                .into_iter()
                .chain(chunk.collided.iter().rev())
                .copied()
                .find(|&(offset, _)| {
                    // Evicted entries (front chunk, before head) are skipped.
                    !(ci == 0 && offset < self.head)
                        && chunk.messages.get(offset).is_some_and(|m| {
                            m.client_msg_id == client_msg_id && m.sender_user_id == sender
                        })
                });
            if let Some((offset, expires)) = hit {
                // The newest entry for this id decides.
                return (expires > now_ms).then(|| &chunk.messages[offset]);
            }
        }
        None
    }

    pub(super) fn push_back(&mut self, message: pb::Message, dedup_expires_ms: i64) {
        let need_chunk = self.chunks.back().is_none_or(|c| c.messages.len() == CHUNK);
        if need_chunk {
            let chunk = match self.spare.take() {
                Some(chunk) => chunk,
                // The first chunk grows on demand (small conversations stay
                // small); later ones are allocated whole, once.
                None if self.chunks.is_empty() => Chunk::default(),
                None => Chunk::with_capacity(CHUNK),
            };
            self.chunks.push_back(chunk);
        }
        use std::hash::BuildHasher;
        let fp = self.keys.hash_one((
            message.sender_user_id.as_str(),
            message.client_msg_id.as_slice(),
        ));
        let chunk = self.chunks.back_mut().expect("chunk pushed");
        let entry = (chunk.messages.len(), dedup_expires_ms);
        let other_id = chunk.ids.get(&fp).is_some_and(|&(offset, _)| {
            let other = &chunk.messages[offset];
            other.client_msg_id != message.client_msg_id
                || other.sender_user_id != message.sender_user_id
        });
        if other_id {
            chunk.collided.push(entry);
        } else {
            // New, or the same id again (its older entry left the window).
            chunk.ids.insert(fp, entry);
        }
        chunk.messages.push(message);
        self.len += 1;
    }

    pub(super) fn pop_front(&mut self) {
        if self.len == 0 {
            return;
        }
        self.len -= 1;
        self.head += 1;
        // Free the message's payload now; the slot goes with its chunk.
        if let Some(front) = self.chunks.front_mut() {
            if let Some(m) = front.messages.get_mut(self.head - 1) {
                *m = pb::Message::default();
            }
        }
        if self.head == CHUNK || self.len == 0 {
            let mut chunk = self.chunks.pop_front().expect("front chunk");
            self.head = 0;
            chunk.messages.clear();
            chunk.ids.clear();
            chunk.collided.clear();
            if chunk.messages.capacity() >= CHUNK {
                self.spare = Some(chunk);
            }
        }
    }
}
