//! Rendering the vectors document: canonical proto3 JSON frames, hex, and
//! the document written by hand in a readable order.

use palaver_protocol::pb;
use palaver_protocol::{encode_frame, DecodeError, FrameDecoder};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::Value;

use super::*;

pub(super) fn frame_descriptor() -> MessageDescriptor {
    DescriptorPool::decode(palaver_protocol::FILE_DESCRIPTOR_SET)
        .expect("descriptor set")
        .get_message_by_name("palaver.v1.Frame")
        .expect("Frame in descriptor set")
}

/// Canonical proto3 JSON of a frame, fields in schema order.
pub(super) fn frame_json(f: &pb::Frame, desc: &MessageDescriptor) -> String {
    let dynamic = DynamicMessage::decode(desc.clone(), f.encode_to_vec().as_slice()).unwrap();
    serde_json::to_string(&dynamic).unwrap()
}

pub(super) fn frame_from_json(v: &Value, desc: &MessageDescriptor) -> pb::Frame {
    let dynamic = DynamicMessage::deserialize(desc.clone(), v.clone())
        .unwrap_or_else(|e| panic!("{v} is not proto3 JSON of a Frame: {e}"));
    pb::Frame::decode(dynamic.encode_to_vec().as_slice()).unwrap()
}

pub(super) fn encode_hex(f: &pb::Frame) -> String {
    let mut out = Vec::new();
    encode_frame(f, &mut out);
    hex::encode(out)
}

pub(super) fn decode_error(hex: &str, max: usize) -> DecodeError {
    let mut dec = FrameDecoder::new(max);
    dec.decode(&hex::decode(hex).unwrap(), |_| {})
        .expect_err("invalid case must fail")
}

pub(super) fn error_name(code: u32) -> &'static str {
    pb::ErrorCode::try_from(code as i32)
        .expect("known code")
        .as_str_name()
}

pub(super) fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

pub(super) fn object(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("      {}: {v}", q(k)))
        .collect();
    format!("    {{\n{}\n    }}", body.join(",\n"))
}

pub(super) fn array(items: Vec<String>) -> String {
    format!("[\n{}\n  ]", items.join(",\n"))
}

/// The whole vectors document. Written by hand (not via serde_json::Value)
/// so that keys stay in a readable order and each frame is on one line.
pub(super) fn render() -> String {
    let desc = frame_descriptor();
    let valid = valid_cases()
        .iter()
        .map(|c| {
            object(&[
                ("name", q(c.name)),
                ("hex", q(&encode_hex(&c.frame))),
                ("frame", frame_json(&c.frame, &desc)),
                ("note", q(c.note)),
            ])
        })
        .collect();
    let tolerated = tolerated_cases()
        .iter()
        .map(|c| {
            object(&[
                ("name", q(c.name)),
                ("hex", q(c.hex)),
                ("frame", frame_json(&c.frame, &desc)),
                ("note", q(c.note)),
            ])
        })
        .collect();
    let incomplete = incomplete_cases()
        .iter()
        .map(|c| object(&[("name", q(c.name)), ("hex", q(c.hex)), ("note", q(c.note))]))
        .collect();
    let invalid = invalid_cases()
        .iter()
        .map(|c| {
            let code = u32::from(decode_error(c.hex, c.max_frame_len).error_code());
            object(&[
                ("name", q(c.name)),
                ("hex", q(c.hex)),
                (
                    "max_frame_len",
                    c.max_frame_len.min(u32::MAX as usize).to_string(),
                ),
                ("error_code", code.to_string()),
                ("error", q(error_name(code))),
                ("must_reject", q(must_reject(c.name))),
                ("note", q(c.note)),
            ])
        })
        .collect();
    format!(
        "{{\n  \"description\": {},\n  \"protocol_version\": 1,\n  \"default_max_frame_len\": {MAX},\n  \"valid\": {},\n  \"tolerated\": {},\n  \"incomplete\": {},\n  \"invalid\": {}\n}}\n",
        q("Palaver v1 frame test vectors (see SPEC.md). hex = one frame in length-delimited form (varint32 length, then the encoded palaver.v1.Frame). \
valid: decodes to `frame` (canonical proto3 JSON) and `frame` encodes back to exactly `hex` (fields in field-number order, defaults omitted). \
tolerated: decodes to `frame`, but its canonical encoding differs. \
incomplete: a valid stream prefix; a decoder must wait for more bytes, not fail. \
invalid: a decoder with max_frame_len (default_max_frame_len when absent) must reject the bytes; error_code is the Error.code to send before closing; \
must_reject: \"all\" = every receiver must reject them, \"server\" = a server must, a client may accept them (schema checks stock protobuf parsers do not all make, SPEC §2)."),
        array(valid),
        array(tolerated),
        array(incomplete),
        array(invalid),
    )
}
