//! `palaver decode`: length-delimited frames from hex text.

use palaver_protocol::{pb, FrameDecoder};

/// Decodes hex text (whitespace, `0x` prefixes and `:`/`,` separators
/// ignored) into frames. Returns the frames and how many trailing bytes
/// did not form a complete frame.
pub fn decode_hex(text: &str) -> anyhow::Result<(Vec<pb::Frame>, usize)> {
    let cleaned: String = text
        .split_whitespace()
        .map(|w| w.trim_start_matches("0x"))
        .collect::<String>()
        .chars()
        .filter(|c| *c != ':' && *c != ',')
        .collect();
    let bytes = hex::decode(&cleaned).map_err(|e| {
        anyhow::anyhow!("input is not hex ({e}); pass hex digits, e.g. 06080162020807")
    })?;
    let mut decoder = FrameDecoder::new(u32::MAX as usize);
    let mut frames = Vec::new();
    decoder
        .decode(&bytes, |f| frames.push(f))
        .map_err(|e| anyhow::anyhow!("after {} frame(s): {e}", frames.len()))?;
    Ok((frames, decoder.pending_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_frames_and_reports_tail() {
        let (frames, tail) = decode_hex("06 08 01 62 02 08 07 0x05").unwrap();
        assert_eq!(frames.len(), 1);
        assert!(matches!(
            frames[0].body,
            Some(pb::frame::Body::Ping(pb::Ping { nonce: 7 }))
        ));
        assert_eq!(tail, 1);
        assert!(decode_hex("zz").is_err());
        assert!(decode_hex("02 08 80").is_err());
    }
}
