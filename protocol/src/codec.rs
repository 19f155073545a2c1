//! Frame codec: the protobuf standard length-delimited form (a base-128 varint
//! holding the encoded length, at most 5 bytes / `u32`, then one encoded
//! `Frame`) — what Java's `writeDelimitedTo` and Swift's `BinaryDelimited`
//! speak.
//!
//! The decoder is built for a gateway holding hundreds of thousands of idle
//! connections: it owns no buffer while no partial frame is pending, decodes
//! whole frames straight out of the caller's input slice, and copies only an
//! incomplete tail (growing with the bytes actually received, never on the
//! promise of a length prefix).

use prost::Message;

use crate::pb;

/// Longest length prefix accepted: a varint carrying a `u32`.
pub const MAX_PREFIX_LEN: usize = 5;

/// Why a byte stream is not a valid sequence of frames. After any of these the
/// stream cannot be trusted: send an `Error` with [`DecodeError::error_code`]
/// and close the connection. Non-exhaustive: framing may gain checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces more bytes than the current maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u32, max: usize },
    /// The length prefix is longer than 5 bytes or its value exceeds `u32`.
    #[error("length prefix is not a varint32 (longer than 5 bytes or above u32::MAX)")]
    BadLengthPrefix,
    /// The frame bytes are not a valid protobuf `Frame` (wrong wire type,
    /// truncated field, invalid UTF-8 in a string, ...).
    #[error("frame is not a valid palaver.v1.Frame: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

impl DecodeError {
    /// The protocol error code to send for this failure (`Error.code` is
    /// its `u32`: `u32::from(code)`).
    pub fn error_code(&self) -> pb::ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => pb::ErrorCode::FrameTooLarge,
            DecodeError::BadLengthPrefix | DecodeError::Protobuf(_) => {
                pb::ErrorCode::MalformedFrame
            }
        }
    }
}

/// Appends `frame` in length-delimited form to `out`. Reserves the exact size
/// once; allocates nothing else.
pub fn encode_frame(frame: &pb::Frame, out: &mut Vec<u8>) {
    let len = frame.encoded_len();
    out.reserve(prost::length_delimiter_len(len) + len);
    // A Vec grows on demand, so encoding into it cannot run out of capacity.
    let encoded = frame.encode_length_delimited(out);
    debug_assert!(encoded.is_ok());
}

/// Number of bytes [`encode_frame`] appends for `frame` (prefix included).
pub fn encoded_frame_len(frame: &pb::Frame) -> usize {
    let len = frame.encoded_len();
    prost::length_delimiter_len(len) + len
}

/// Result of reading a length prefix from the front of a slice.
enum Prefix {
    /// `(prefix_len, frame_len)`
    Complete(usize, u32),
    /// The slice ends inside the varint (and it is still valid so far).
    Incomplete,
}

/// Reads a varint32 length prefix. Non-minimal encodings are accepted (as
/// protobuf parsers do) as long as they fit in 5 bytes and a `u32`.
fn read_prefix(bytes: &[u8]) -> Result<Prefix, DecodeError> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(MAX_PREFIX_LEN) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value)
                .map(|v| Prefix::Complete(i + 1, v))
                .map_err(|_| DecodeError::BadLengthPrefix);
        }
    }
    if bytes.len() >= MAX_PREFIX_LEN {
        // Five bytes read and the continuation bit is still set.
        Err(DecodeError::BadLengthPrefix)
    } else {
        // Fewer than 5 bytes hold at most 28 bits: cannot overflow yet.
        Ok(Prefix::Incomplete)
    }
}

/// Incremental decoder for one connection's inbound byte stream.
///
/// Feed it whatever the socket returned, in chunks of any size (one byte at a
/// time works). While no partial frame is pending it holds no allocation.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame_len: usize,
    /// Bytes of one incomplete frame (its prefix, then part of its body).
    /// Empty with capacity 0 whenever no frame is pending.
    partial: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder rejecting frames whose encoded `Frame` (prefix excluded) is
    /// longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameDecoder {
            max_frame_len,
            partial: Vec::new(),
        }
    }

    /// Changes the maximum for frames whose prefix has not been read yet.
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len;
    }

    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Bytes of an incomplete frame held between calls.
    pub fn pending_bytes(&self) -> usize {
        self.partial.len()
    }

    /// Heap bytes currently held (0 when idle); for memory accounting.
    pub fn buffer_capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Decodes every complete frame in `input` (after any pending partial
    /// frame), calling `on_frame` for each in order, and keeps an incomplete
    /// tail for the next call.
    ///
    /// On error, frames before the bad one have already been passed to
    /// `on_frame`; the pending buffer is released and the stream must be
    /// abandoned (send an `Error` frame and close).
    pub fn decode(
        &mut self,
        input: &[u8],
        mut on_frame: impl FnMut(pb::Frame),
    ) -> Result<(), DecodeError> {
        let result = self.decode_inner(input, &mut on_frame);
        if result.is_err() {
            self.partial = Vec::new();
        }
        result
    }

    fn decode_inner(
        &mut self,
        mut input: &[u8],
        on_frame: &mut impl FnMut(pb::Frame),
    ) -> Result<(), DecodeError> {
        if !self.partial.is_empty() {
            let used = self.continue_partial(input, on_frame)?;
            input = &input[used..];
            if !self.partial.is_empty() {
                // `input` was used up without completing the frame.
                return Ok(());
            }
        }
        // Fast path: whole frames straight from the caller's slice.
        while !input.is_empty() {
            match read_prefix(input)? {
                Prefix::Incomplete => {
                    self.append_partial(input, MAX_PREFIX_LEN);
                    return Ok(());
                }
                Prefix::Complete(prefix_len, len) => {
                    self.check_len(len)?;
                    let total = prefix_len + len as usize;
                    if input.len() < total {
                        self.append_partial(input, total);
                        return Ok(());
                    }
                    on_frame(pb::Frame::decode(&input[prefix_len..total])?);
                    input = &input[total..];
                }
            }
        }
        Ok(())
    }

    /// Extends the pending partial frame from `input`; returns how many bytes
    /// of `input` it consumed. Leaves `partial` empty (and deallocated) if the
    /// frame completed.
    fn continue_partial(
        &mut self,
        input: &[u8],
        on_frame: &mut impl FnMut(pb::Frame),
    ) -> Result<usize, DecodeError> {
        let mut used = 0;
        // Finish the prefix first, one byte at a time (at most 5 bytes).
        let (prefix_len, len) = loop {
            match read_prefix(&self.partial)? {
                Prefix::Complete(prefix_len, len) => break (prefix_len, len),
                Prefix::Incomplete => {
                    let Some(&b) = input.get(used) else {
                        return Ok(used);
                    };
                    self.partial.push(b);
                    used += 1;
                }
            }
        };
        self.check_len(len)?;
        let total = prefix_len + len as usize;
        let take = (total - self.partial.len()).min(input.len() - used);
        self.append_partial(&input[used..used + take], total);
        used += take;
        if self.partial.len() == total {
            let frame = pb::Frame::decode(&self.partial[prefix_len..]);
            self.partial = Vec::new();
            on_frame(frame?);
        }
        Ok(used)
    }

    fn check_len(&self, len: u32) -> Result<(), DecodeError> {
        if len as usize > self.max_frame_len {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        Ok(())
    }

    /// Appends to `partial`, growing capacity geometrically (so byte-at-a-time
    /// input stays linear) but never beyond `cap_limit`, the frame's full size:
    /// memory follows the bytes actually received.
    fn append_partial(&mut self, bytes: &[u8], cap_limit: usize) {
        let want = self.partial.len() + bytes.len();
        if want > self.partial.capacity() {
            let doubled = (self.partial.capacity() * 2).max(16).min(cap_limit);
            let new_cap = want.max(doubled);
            self.partial.reserve_exact(new_cap - self.partial.len());
        }
        self.partial.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::frame::Body;

    fn ping(request_id: u32, nonce: u64) -> pb::Frame {
        pb::Frame {
            request_id,
            body: Some(Body::Ping(pb::Ping { nonce })),
        }
    }

    fn decode_all(dec: &mut FrameDecoder, input: &[u8]) -> Result<Vec<pb::Frame>, DecodeError> {
        let mut out = Vec::new();
        dec.decode(input, |f| out.push(f))?;
        Ok(out)
    }

    #[test]
    fn encodes_standard_length_delimited_form() {
        let mut out = vec![0xAA]; // appends, keeps what was there
        encode_frame(&ping(1, 7), &mut out);
        // len 6: field 1 varint 1; field 12 (0x62) len 2 { field 1 varint 7 }
        assert_eq!(out, [0xAA, 0x06, 0x08, 0x01, 0x62, 0x02, 0x08, 0x07]);
        assert_eq!(encoded_frame_len(&ping(1, 7)), 7);
    }

    #[test]
    fn decodes_whole_frames_without_buffering() {
        let mut bytes = Vec::new();
        encode_frame(&ping(1, 1), &mut bytes);
        encode_frame(&ping(2, 2), &mut bytes);
        let mut dec = FrameDecoder::new(1024);
        let frames = decode_all(&mut dec, &bytes).unwrap();
        assert_eq!(frames, vec![ping(1, 1), ping(2, 2)]);
        assert_eq!(dec.pending_bytes(), 0);
        assert_eq!(dec.buffer_capacity(), 0);
    }

    #[test]
    fn one_byte_at_a_time_and_buffer_released_after_completion() {
        let big = pb::Frame {
            request_id: 9,
            body: Some(Body::Send(pb::Send {
                conversation_id: "dm:a:b".into(),
                client_msg_id: vec![1; 16],
                body: vec![0x5a; 3000],
                ..Default::default()
            })),
        };
        let mut bytes = Vec::new();
        encode_frame(&big, &mut bytes);
        encode_frame(&ping(3, 3), &mut bytes);
        let mut dec = FrameDecoder::new(64 * 1024);
        let mut frames = Vec::new();
        let mut max_cap = 0;
        for b in &bytes {
            dec.decode(std::slice::from_ref(b), |f| frames.push(f))
                .unwrap();
            max_cap = max_cap.max(dec.buffer_capacity());
        }
        assert_eq!(frames, vec![big.clone(), ping(3, 3)]);
        assert_eq!(dec.pending_bytes(), 0);
        assert_eq!(dec.buffer_capacity(), 0);
        // Never more than the largest frame's size.
        assert!(max_cap <= encoded_frame_len(&big), "{max_cap}");
    }

    #[test]
    fn partial_tail_then_rest_with_more_frames() {
        let mut bytes = Vec::new();
        for i in 0..5 {
            encode_frame(&ping(i, u64::from(i) * 1000), &mut bytes);
        }
        let mut dec = FrameDecoder::new(1024);
        let first = decode_all(&mut dec, &bytes[..10]).unwrap();
        assert_eq!(first.len(), 1);
        assert!(dec.pending_bytes() > 0);
        let rest = decode_all(&mut dec, &bytes[10..]).unwrap();
        assert_eq!(rest.len(), 4);
        assert_eq!(rest[0], ping(1, 1000));
        assert_eq!(dec.buffer_capacity(), 0);
    }

    #[test]
    fn partial_buffer_grows_with_received_bytes_not_with_the_prefix() {
        let mut dec = FrameDecoder::new(64 * 1024);
        // Prefix announcing 60000 bytes, then 3 bytes of body.
        let mut bytes = Vec::new();
        prost::encoding::encode_varint(60_000, &mut bytes);
        bytes.extend_from_slice(&[0x08, 0x01, 0x0a]);
        decode_all(&mut dec, &bytes).unwrap();
        assert_eq!(dec.pending_bytes(), bytes.len());
        assert!(dec.buffer_capacity() < 64, "{}", dec.buffer_capacity());
    }

    #[test]
    fn idle_decoder_is_small() {
        let dec = FrameDecoder::new(64 * 1024);
        assert!(std::mem::size_of::<FrameDecoder>() <= 32);
        assert_eq!(dec.buffer_capacity(), 0);
        assert_eq!(dec.pending_bytes(), 0);
    }

    #[test]
    fn empty_frame_is_decodable() {
        let mut dec = FrameDecoder::new(16);
        let frames = decode_all(&mut dec, &[0x00, 0x00]).unwrap();
        assert_eq!(frames, vec![pb::Frame::default(), pb::Frame::default()]);
    }

    #[test]
    fn length_over_max_rejected_at_prefix() {
        let mut dec = FrameDecoder::new(100);
        // 101 announced, no body bytes sent yet: rejected right away.
        let err = decode_all(&mut dec, &[101]).unwrap_err();
        assert_eq!(err, DecodeError::FrameTooLarge { len: 101, max: 100 });
        assert_eq!(u32::from(err.error_code()), 1001);
        assert_eq!(dec.buffer_capacity(), 0);
        // Exactly the max is fine (pending).
        let mut dec = FrameDecoder::new(100);
        decode_all(&mut dec, &[100]).unwrap();
        assert_eq!(dec.pending_bytes(), 1);
    }

    #[test]
    fn length_over_max_rejected_when_prefix_split_across_chunks() {
        let mut dec = FrameDecoder::new(100);
        decode_all(&mut dec, &[0x80]).unwrap();
        let err = decode_all(&mut dec, &[0x01]).unwrap_err(); // 128
        assert_eq!(err, DecodeError::FrameTooLarge { len: 128, max: 100 });
    }

    #[test]
    fn over_long_and_overflowing_prefixes_rejected() {
        for bad in [
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x00][..],
            &[0xff, 0xff, 0xff, 0xff, 0x1f],
            &[0xff, 0xff, 0xff, 0xff, 0xff],
        ] {
            let mut dec = FrameDecoder::new(usize::MAX);
            let err = decode_all(&mut dec, bad).unwrap_err();
            assert_eq!(err, DecodeError::BadLengthPrefix, "{bad:x?}");
            assert_eq!(u32::from(err.error_code()), 1000);
            // Same bytes one at a time.
            let mut dec = FrameDecoder::new(usize::MAX);
            let mut failed = None;
            for b in bad {
                if let Err(e) = dec.decode(std::slice::from_ref(b), |_| {}) {
                    failed = Some(e);
                    break;
                }
            }
            assert_eq!(failed, Some(DecodeError::BadLengthPrefix), "{bad:x?}");
        }
    }

    #[test]
    fn non_minimal_prefix_accepted() {
        let mut dec = FrameDecoder::new(100);
        // Length 0 written in two bytes.
        let frames = decode_all(&mut dec, &[0x80, 0x00]).unwrap();
        assert_eq!(frames, vec![pb::Frame::default()]);
    }

    #[test]
    fn garbage_protobuf_is_malformed_and_earlier_frames_survive() {
        let mut bytes = Vec::new();
        encode_frame(&ping(1, 1), &mut bytes);
        bytes.extend_from_slice(&[0x02, 0x08, 0x80]); // truncated varint field
        let mut dec = FrameDecoder::new(100);
        let mut frames = Vec::new();
        let err = dec.decode(&bytes, |f| frames.push(f)).unwrap_err();
        assert!(matches!(err, DecodeError::Protobuf(_)));
        assert_eq!(u32::from(err.error_code()), 1000);
        assert_eq!(frames, vec![ping(1, 1)]);
        assert_eq!(dec.buffer_capacity(), 0);
    }

    #[test]
    fn lowering_the_max_applies_to_the_next_prefix() {
        let mut dec = FrameDecoder::new(100);
        dec.set_max_frame_len(3);
        assert_eq!(dec.max_frame_len(), 3);
        assert!(decode_all(&mut dec, &[4]).is_err());
    }
}
