//! The property the `decode_frames` fuzz target checks, shared with the
//! regression test that replays the committed corpus on every `cargo test`
//! (`protocol/tests/fuzz_corpus.rs`), so a crash found by fuzzing stays fixed.
//!
//! Input layout: byte 0 picks the max frame length, bytes 1..=8 seed the
//! chunk sizes, the rest is the stream. Checks that nothing panics, that the
//! chunked decode matches a one-shot decode, that an idle decoder holds no
//! memory, and that every decoded frame survives a re-encode.

use palaver_protocol::{encode_frame, pb, DecodeError, FrameDecoder};

fn decode(
    max: usize,
    parts: &mut dyn Iterator<Item = &[u8]>,
) -> (Vec<pb::Frame>, Result<(), DecodeError>, FrameDecoder) {
    let mut dec = FrameDecoder::new(max);
    let mut frames = Vec::new();
    for part in parts {
        if let Err(e) = dec.decode(part, |f| frames.push(f)) {
            return (frames, Err(e), dec);
        }
    }
    (frames, Ok(()), dec)
}

/// Panics if `data` breaks a decoder property.
pub fn check_decode(data: &[u8]) {
    if data.len() < 9 {
        return;
    }
    let max = match data[0] {
        0 => usize::MAX,
        n => usize::from(n) * 64,
    };
    let mut seed = u64::from_le_bytes(data[1..9].try_into().unwrap());
    let stream = &data[9..];

    let (whole, whole_result, _) = decode(max, &mut std::iter::once(stream));

    let mut rest = stream;
    let mut chunked_parts = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        // xorshift: chunk sizes 1..=16, sometimes the whole remainder.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = if seed % 8 == 0 {
            rest.len()
        } else {
            (seed % 16) as usize + 1
        };
        let (head, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        Some(head)
    });
    let (frames, result, dec) = decode(max, &mut chunked_parts);

    assert_eq!(frames, whole);
    assert_eq!(result, whole_result);
    if result.is_err() || dec.pending_bytes() == 0 {
        assert_eq!(dec.buffer_capacity(), 0);
    }
    for f in frames {
        let mut again = Vec::new();
        encode_frame(&f, &mut again);
        let (back, r, _) = decode(usize::MAX, &mut std::iter::once(&again[..]));
        assert_eq!(r, Ok(()));
        assert_eq!(back, vec![f]);
    }
}
