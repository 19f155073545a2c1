//! Language-neutral test vectors, `protocol/vectors/frames.json`: generated
//! from the real encoder and checked here against the real decoder. The
//! cases are in `vectors/cases.rs`, the rendering in `vectors/render.rs`.
//!
//! Regenerate after a schema or case change:
//!   cargo test -p palaver-protocol --test vectors -- --ignored regenerate_vectors
//!
//! Frames are written in the canonical proto3 JSON mapping (lowerCamelCase
//! names, enums by name, 64-bit integers as strings, bytes as base64, default
//! values omitted), so other languages can parse them with their stock JSON
//! parser (e.g. Java `JsonFormat`, Swift `init(jsonString:)`).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use palaver_protocol::pb;
use palaver_protocol::{body_name, DecodeError, FrameDecoder};
use prost_reflect::{DescriptorPool, MessageDescriptor};
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/frames.json");
const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../SPEC.md");
const MAX: usize = 64 * 1024;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const CMID: [u8; 16] = [
    0x01, 0x93, 0x0f, 0x3a, 0x7b, 0x2c, 0x7d, 0x4e, 0x8f, 0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76,
];

#[path = "vectors/cases.rs"]
mod cases;
#[path = "vectors/render.rs"]
mod render;

use cases::*;
use render::*;

// ---------------------------------------------------------------- tests ----

fn load() -> Value {
    let text = std::fs::read_to_string(VECTORS).expect("vectors/frames.json");
    serde_json::from_str(&text).expect("vectors/frames.json is JSON")
}

fn cases<'a>(doc: &'a Value, section: &str) -> &'a Vec<Value> {
    doc[section].as_array().unwrap()
}

fn str_field<'a>(case: &'a Value, field: &str) -> &'a str {
    case[field].as_str().unwrap()
}

/// Decodes a whole buffer, both in one call and one byte at a time.
fn decode_both_ways(bytes: &[u8], max: usize) -> Result<Vec<pb::Frame>, DecodeError> {
    let mut whole = Vec::new();
    FrameDecoder::new(max).decode(bytes, |f| whole.push(f))?;
    let mut dec = FrameDecoder::new(max);
    let mut bytewise = Vec::new();
    for b in bytes {
        dec.decode(std::slice::from_ref(b), |f| bytewise.push(f))?;
    }
    assert_eq!(whole, bytewise);
    assert_eq!(dec.pending_bytes(), 0);
    Ok(whole)
}

#[test]
#[ignore = "writes vectors/frames.json; run explicitly to regenerate"]
fn regenerate_vectors() {
    std::fs::create_dir_all(std::path::Path::new(VECTORS).parent().unwrap()).unwrap();
    std::fs::write(VECTORS, render()).unwrap();
}

#[test]
fn vectors_file_is_current() {
    let on_disk = std::fs::read_to_string(VECTORS).unwrap_or_default();
    assert!(
        on_disk == render(),
        "vectors/frames.json is stale; regenerate with: \
         cargo test -p palaver-protocol --test vectors -- --ignored regenerate_vectors"
    );
}

#[test]
fn valid_vectors_decode_to_their_json_and_reencode_to_their_hex() {
    let desc = frame_descriptor();
    let doc = load();
    let mut bodies = BTreeSet::new();
    for case in cases(&doc, "valid") {
        let name = str_field(case, "name");
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let frames = decode_both_ways(&bytes, MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(frames.len(), 1, "{name}");
        let expected = frame_from_json(&case["frame"], &desc);
        assert_eq!(frames[0], expected, "{name}");
        assert_eq!(encode_hex(&expected), str_field(case, "hex"), "{name}");
        if let Some(body) = &frames[0].body {
            bodies.insert(body_name(body));
        }
    }
    // Every body in the schema has at least one vector.
    let all = desc.oneofs().find(|o| o.name() == "body").unwrap();
    assert_eq!(bodies.len(), all.fields().count(), "covered: {bodies:?}");
}

#[test]
fn tolerated_vectors_decode_but_are_not_canonical() {
    let desc = frame_descriptor();
    let doc = load();
    for case in cases(&doc, "tolerated") {
        let name = str_field(case, "name");
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let frames = decode_both_ways(&bytes, MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            frames,
            vec![frame_from_json(&case["frame"], &desc)],
            "{name}"
        );
        assert_ne!(encode_hex(&frames[0]), str_field(case, "hex"), "{name}");
    }
}

#[test]
fn incomplete_vectors_wait_for_more_bytes() {
    let doc = load();
    for case in cases(&doc, "incomplete") {
        let name = str_field(case, "name");
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let mut dec = FrameDecoder::new(MAX);
        let mut n = 0;
        dec.decode(&bytes, |_| n += 1)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((n, dec.pending_bytes()), (0, bytes.len()), "{name}");
    }
}

#[test]
fn invalid_vectors_fail_with_their_error_code() {
    let doc = load();
    let invalid = cases(&doc, "invalid");
    assert!(invalid.len() >= 10);
    for case in invalid {
        let name = str_field(case, "name");
        let max = case["max_frame_len"].as_u64().unwrap() as usize;
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let err = decode_both_ways(&bytes, max).expect_err(name);
        let code = case["error_code"].as_u64().unwrap() as u32;
        assert_eq!(u32::from(err.error_code()), code, "{name}: {err}");
        assert_eq!(error_name(code), str_field(case, "error"), "{name}");
        assert!(
            matches!(str_field(case, "must_reject"), "all" | "server"),
            "{name}"
        );
    }
}

/// The cases marked `"server"` are exactly those a lenient stock parser
/// accepts: decoded while skipping every field whose wire type does not match
/// the schema, and without checking UTF-8, they parse; every `"all"` case
/// still fails that way.
#[test]
fn server_only_vectors_are_the_ones_a_lenient_parser_accepts() {
    let doc = load();
    let names: BTreeSet<&str> = cases(&doc, "invalid")
        .iter()
        .map(|c| str_field(c, "name"))
        .collect();
    for name in SERVER_MUST_REJECT {
        assert!(names.contains(name), "no invalid vector {name}");
    }
    let desc = frame_descriptor();
    for case in cases(&doc, "invalid") {
        let name = str_field(case, "name");
        let max = case["max_frame_len"].as_u64().unwrap() as usize;
        let bytes = hex::decode(str_field(case, "hex")).unwrap();
        let lenient = lenient_parse(&bytes, max, &desc);
        match str_field(case, "must_reject") {
            "server" => assert!(lenient, "{name}: a lenient parser should accept it"),
            _ => assert!(!lenient, "{name}: even a lenient parser must reject it"),
        }
    }
}

/// A model of a lenient stock protobuf parser: framing as SPEC §2, then a
/// walk over the tags that keeps a schema field with an unexpected wire type
/// as an unknown field (Python's parser does: it accepts the four
/// `wrong-wire-type-*` vectors) and does not check UTF-8 (some parsers do
/// not). Returns whether it accepts `bytes` as one frame.
fn lenient_parse(bytes: &[u8], max: usize, desc: &MessageDescriptor) -> bool {
    let mut prefix = 0u64;
    let mut at = 0;
    loop {
        let Some(&b) = bytes.get(at) else {
            return false;
        };
        prefix |= u64::from(b & 0x7f) << (7 * at);
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at == 5 {
            return false;
        }
    }
    if prefix > u64::from(u32::MAX) || prefix as usize > max {
        return false;
    }
    let body = &bytes[at..];
    body.len() == prefix as usize && lenient_message(body, Some(desc))
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Walks one message; `desc` is None for unknown (skipped) content.
fn lenient_message(bytes: &[u8], desc: Option<&MessageDescriptor>) -> bool {
    use prost_reflect::Kind;
    let mut at = 0;
    let mut groups = Vec::new();
    while at < bytes.len() {
        let Some(tag) = read_varint(bytes, &mut at) else {
            return false;
        };
        let (number, wire_type) = (tag >> 3, tag & 7);
        if number == 0 {
            return false;
        }
        match wire_type {
            0 => {
                if read_varint(bytes, &mut at).is_none() {
                    return false;
                }
            }
            1 | 5 => {
                at += if wire_type == 1 { 8 } else { 4 };
                if at > bytes.len() {
                    return false;
                }
            }
            2 => {
                let Some(len) = read_varint(bytes, &mut at) else {
                    return false;
                };
                let Some(end) = at.checked_add(len as usize).filter(|e| *e <= bytes.len()) else {
                    return false;
                };
                // A nested message the schema knows (only when the wire type
                // matches it, and not inside an unknown group) is walked too.
                let field = desc
                    .filter(|_| groups.is_empty())
                    .and_then(|d| d.get_field(number as u32));
                if let Some(Kind::Message(inner)) = field.map(|f| f.kind()) {
                    if !lenient_message(&bytes[at..end], Some(&inner)) {
                        return false;
                    }
                }
                at = end;
            }
            3 => groups.push(number),
            4 => {
                if groups.pop() != Some(number) {
                    return false;
                }
            }
            _ => return false,
        }
    }
    groups.is_empty()
}

/// SPEC.md's worked example must show exactly the bytes the encoder writes.
#[test]
fn spec_example_session_uses_the_vector_bytes() {
    let spec = std::fs::read_to_string(SPEC).expect("SPEC.md at the repository root");
    for case in session_cases() {
        let hex = encode_hex(&case.frame);
        assert!(
            spec.contains(&hex),
            "SPEC.md lacks the bytes of {}: {hex}",
            case.name
        );
    }
}

/// SPEC.md documents every message (a `###` heading naming it), every field
/// (a table row naming it) and every enum of the schema.
#[test]
fn spec_covers_every_message_field_and_enum() {
    let spec = std::fs::read_to_string(SPEC).expect("SPEC.md at the repository root");
    let pool = DescriptorPool::decode(palaver_protocol::FILE_DESCRIPTOR_SET).unwrap();
    let reference = spec
        .split_once("\n## 17. Message reference\n")
        .expect("SPEC.md section 17")
        .1;
    let reference = reference.split("\n## ").next().unwrap();
    let headings: Vec<&str> = reference
        .lines()
        .filter(|l| l.starts_with("### "))
        .collect();
    for message in pool.all_messages() {
        let name = message.name();
        let heading = headings
            .iter()
            .find(|h| {
                // "### Ping / Pong (both directions)" names Ping and Pong.
                let title = h[4..].split(" (").next().unwrap_or_default();
                title.split(" / ").any(|w| w.trim() == name)
            })
            .unwrap_or_else(|| panic!("SPEC.md has no heading for message {name}"));
        // The section under that heading lists every field.
        let section: String = reference
            .split_once(&format!("\n{heading}\n"))
            .unwrap()
            .1
            .lines()
            .take_while(|l| !l.starts_with("### "))
            .collect::<Vec<_>>()
            .join("\n");
        for field in message.fields() {
            if field.containing_oneof().is_some() {
                continue; // the Frame body fields are listed in prose
            }
            assert!(
                section.contains(&format!("| {} |", field.name())),
                "SPEC.md section for {name} lacks field {}",
                field.name()
            );
        }
    }
    let body_oneof = frame_descriptor().oneofs().next().expect("Frame.body");
    for body in body_oneof.fields() {
        assert!(
            spec.contains(&format!("{} {}", body.name(), body.number())),
            "SPEC.md lacks body field number {} {}",
            body.name(),
            body.number()
        );
    }
    for e in pool.all_enums() {
        assert!(spec.contains(e.name()), "SPEC.md lacks enum {}", e.name());
    }
}
