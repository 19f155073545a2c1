//! Property tests for the codec: arbitrary frames survive encode/decode, any
//! chunking of a stream decodes to the same frames, arbitrary bytes never
//! panic the decoder and decode the same however they are chunked.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{encode_frame, encoded_frame_len, DecodeError, FrameDecoder};
use proptest::collection::vec;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

fn ids() -> impl Strategy<Value = Vec<String>> {
    vec("[a-z0-9_.@-]{1,8}", 0..4)
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..24)
}

fn cursor() -> impl Strategy<Value = pb::Cursor> {
    (text(), any::<u64>()).prop_map(|(conversation_id, after_seq)| pb::Cursor {
        conversation_id,
        after_seq,
    })
}

fn media() -> impl Strategy<Value = Option<pb::MediaRef>> {
    proptest::option::of((text(), text(), any::<u64>(), bytes()).prop_map(
        |(url, mime_type, size_bytes, sha256)| pb::MediaRef {
            url,
            mime_type,
            size_bytes,
            sha256,
        },
    ))
}

fn message() -> impl Strategy<Value = pb::Message> {
    (
        (text(), any::<u64>(), text(), text(), text()),
        (
            bytes(),
            any::<i32>(),
            bytes(),
            any::<u64>(),
            media(),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(
                (conversation_id, seq, message_id, sender_user_id, sender_device_id),
                (client_msg_id, kind, body, reply_to_seq, media, server_time_ms),
            )| pb::Message {
                conversation_id,
                seq,
                message_id,
                sender_user_id,
                sender_device_id,
                client_msg_id,
                kind,
                body,
                reply_to_seq,
                media,
                server_time_ms,
            },
        )
}

fn presence() -> impl Strategy<Value = pb::Presence> {
    (text(), any::<bool>(), any::<i64>()).prop_map(|(user_id, online, last_seen_ms)| pb::Presence {
        user_id,
        online,
        last_seen_ms,
    })
}

fn conversation() -> impl Strategy<Value = pb::Conversation> {
    (
        text(),
        any::<i32>(),
        text(),
        vec((text(), any::<i32>()), 0..4),
        any::<u64>(),
    )
        .prop_map(
            |(conversation_id, kind, title, members, last_seq)| pb::Conversation {
                conversation_id,
                kind,
                title,
                members: members
                    .into_iter()
                    .map(|(user_id, role)| pb::Member { user_id, role })
                    .collect(),
                last_seq,
                channel: Default::default(),
                member_count: Default::default(),
            },
        )
}

fn session_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (
            any::<u32>(),
            text(),
            text(),
            text(),
            text(),
            vec(cursor(), 0..3)
        )
            .prop_map(
                |(protocol_version, token, device_id, client_name, client_version, resume)| {
                    Body::Hello(pb::Hello {
                        protocol_version,
                        token,
                        device_id,
                        client_name,
                        client_version,
                        resume,
                    })
                }
            ),
        (
            (any::<u32>(), text(), text(), any::<u32>(), any::<i64>()),
            proptest::option::of(any::<[u32; 11]>()),
        )
            .prop_map(|((v, session_id, user_id, hb, t), limits)| {
                Body::Welcome(pb::Welcome {
                    protocol_version: v,
                    session_id,
                    user_id,
                    heartbeat_interval_ms: hb,
                    limits: limits.map(|l| pb::Limits {
                        max_frame_bytes: l[0],
                        max_body_bytes: l[1],
                        max_sends_per_second: l[2],
                        max_group_members: l[3],
                        max_batch: l[4],
                        max_requests_per_second: l[5],
                        max_requests_in_flight: l[6],
                        max_connections_per_account: l[7],
                        max_account_sends_per_second: l[8],
                        max_account_requests_per_second: l[9],
                        max_push_token_bytes: l[10],
                        max_channel_members: Default::default(),
                    }),
                    server_time_ms: t,
                })
            }),
        any::<u64>().prop_map(|nonce| Body::Ping(pb::Ping { nonce })),
        any::<u64>().prop_map(|nonce| Body::Pong(pb::Pong { nonce })),
        (any::<i32>(), any::<u32>(), text()).prop_map(|(reason, reconnect_delay_ms, message)| {
            Body::GoAway(pb::GoAway {
                reason,
                reconnect_delay_ms,
                message,
            })
        }),
        (any::<u32>(), text(), bytes()).prop_map(|(code, message, client_msg_id)| {
            Body::Error(pb::Error {
                code,
                message,
                client_msg_id,
            })
        }),
    ]
}

fn message_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (
            text(),
            bytes(),
            any::<i32>(),
            bytes(),
            any::<u64>(),
            media()
        )
            .prop_map(
                |(conversation_id, client_msg_id, kind, body, reply_to_seq, media)| {
                    Body::Send(pb::Send {
                        conversation_id,
                        client_msg_id,
                        kind,
                        body,
                        reply_to_seq,
                        media,
                        mention_user_ids: Default::default(),
                    })
                }
            ),
        (bytes(), text(), text(), any::<u64>(), any::<i64>()).prop_map(
            |(client_msg_id, message_id, conversation_id, seq, server_time_ms)| {
                Body::SendAck(pb::SendAck {
                    client_msg_id,
                    message_id,
                    conversation_id,
                    seq,
                    server_time_ms,
                })
            }
        ),
        proptest::option::of(message()).prop_map(|message| Body::Deliver(pb::Deliver { message })),
        (text(), any::<i32>(), any::<u64>()).prop_map(|(conversation_id, kind, up_to_seq)| {
            Body::Receipt(pb::Receipt {
                conversation_id,
                kind,
                up_to_seq,
            })
        }),
        (text(), text(), any::<i32>(), any::<u64>()).prop_map(
            |(conversation_id, user_id, kind, up_to_seq)| {
                Body::ReceiptUpdate(pb::ReceiptUpdate {
                    conversation_id,
                    user_id,
                    kind,
                    up_to_seq,
                })
            }
        ),
        (text(), any::<bool>(), text()).prop_map(|(conversation_id, active, user_id)| {
            Body::Typing(pb::Typing {
                conversation_id,
                active,
                user_id,
            })
        }),
    ]
}

fn other_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        ids().prop_map(|user_ids| Body::PresenceQuery(pb::PresenceQuery { user_ids })),
        vec(presence(), 0..3)
            .prop_map(|presences| Body::PresenceResult(pb::PresenceResult { presences })),
        (ids(), any::<bool>()).prop_map(|(user_ids, unsubscribe)| {
            Body::PresenceSubscribe(pb::PresenceSubscribe {
                user_ids,
                unsubscribe,
            })
        }),
        proptest::option::of(presence())
            .prop_map(|presence| Body::PresenceEvent(pb::PresenceEvent { presence })),
        (vec(cursor(), 0..3), any::<u32>())
            .prop_map(|(cursors, limit)| Body::Sync(pb::Sync { cursors, limit })),
        (
            vec(message(), 0..3),
            vec(conversation(), 0..2),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(messages, conversations, has_more, history_epoch)| {
                Body::SyncBatch(pb::SyncBatch {
                    messages,
                    conversations,
                    has_more,
                    history_epoch,
                })
            }),
        (text(), any::<u64>(), any::<u32>()).prop_map(|(conversation_id, before_seq, limit)| {
            Body::History(pb::History {
                conversation_id,
                before_seq,
                limit,
            })
        }),
        (text(), vec(message(), 0..3), any::<bool>(), any::<u64>()).prop_map(
            |(conversation_id, messages, has_more, history_epoch)| {
                Body::HistoryPage(pb::HistoryPage {
                    conversation_id,
                    messages,
                    has_more,
                    history_epoch,
                })
            }
        ),
        (any::<i32>(), text(), ids()).prop_map(|(kind, title, member_user_ids)| {
            Body::CreateConversation(pb::CreateConversation {
                kind,
                title,
                member_user_ids,
                channel: Default::default(),
            })
        }),
        proptest::option::of(conversation()).prop_map(|conversation| {
            Body::ConversationCreated(pb::ConversationCreated { conversation })
        }),
        (text(), ids(), ids(), ids()).prop_map(|(conversation_id, add, remove, promote)| {
            Body::ChangeMembers(pb::ChangeMembers {
                conversation_id,
                add_user_ids: add,
                remove_user_ids: remove,
                promote_user_ids: promote,
            })
        }),
        (proptest::option::of(conversation()), text(), ids(), ids()).prop_map(
            |(conversation, actor_user_id, added, removed)| {
                Body::MembersChanged(pb::MembersChanged {
                    conversation,
                    actor_user_id,
                    added_user_ids: added,
                    removed_user_ids: removed,
                })
            }
        ),
    ]
}

fn push_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<i32>(), text(), any::<i32>(), text(), text()).prop_map(
            |(platform, token, apns_environment, apns_topic, locale)| {
                Body::RegisterPushToken(pb::RegisterPushToken {
                    platform,
                    token,
                    apns_environment,
                    apns_topic,
                    locale,
                })
            }
        ),
        any::<i64>().prop_map(|registered_ms| {
            Body::PushTokenRegistered(pb::PushTokenRegistered { registered_ms })
        }),
        Just(Body::UnregisterPushToken(pb::UnregisterPushToken {})),
        any::<bool>().prop_map(|was_registered| {
            Body::PushTokenUnregistered(pb::PushTokenUnregistered { was_registered })
        }),
        (text(), any::<i64>(), any::<bool>()).prop_map(
            |(conversation_id, muted_until_ms, forever)| {
                Body::MuteConversation(pb::MuteConversation {
                    conversation_id,
                    muted_until_ms,
                    forever,
                })
            }
        ),
        (text(), any::<i64>(), any::<bool>()).prop_map(
            |(conversation_id, muted_until_ms, forever)| {
                Body::ConversationMuted(pb::ConversationMuted {
                    conversation_id,
                    muted_until_ms,
                    forever,
                })
            }
        ),
    ]
}

fn any_frame() -> impl Strategy<Value = pb::Frame> {
    (
        any::<u32>(),
        proptest::option::of(prop_oneof![
            session_body(),
            message_body(),
            other_body(),
            push_body()
        ]),
    )
        .prop_map(|(request_id, body)| pb::Frame { request_id, body })
}

/// Cuts `bytes` at the given (unsorted, possibly out of range) points.
fn chunks<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

/// Decodes chunk by chunk, stopping at the first error.
fn decode_chunked(
    max: usize,
    parts: &[&[u8]],
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

proptest! {
    #[test]
    fn frame_roundtrips(frame in any_frame()) {
        let mut bytes = Vec::new();
        encode_frame(&frame, &mut bytes);
        prop_assert_eq!(bytes.len(), encoded_frame_len(&frame));
        let (frames, result, dec) = decode_chunked(bytes.len(), &[&bytes]);
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(frames, vec![frame]);
        prop_assert_eq!(dec.buffer_capacity(), 0);
    }

    #[test]
    fn any_chunking_decodes_the_same_frames(
        frames in vec(any_frame(), 0..8),
        cuts in vec(any::<usize>(), 0..40),
    ) {
        let mut stream = Vec::new();
        let mut largest = 0;
        for f in &frames {
            encode_frame(f, &mut stream);
            largest = largest.max(encoded_frame_len(f));
        }
        let mut dec = FrameDecoder::new(64 * 1024);
        let mut decoded = Vec::new();
        for part in chunks(&stream, &cuts) {
            dec.decode(part, |f| decoded.push(f)).unwrap();
            // A pending frame never costs more than its own size.
            prop_assert!(dec.buffer_capacity() <= largest);
        }
        prop_assert_eq!(decoded, frames);
        prop_assert_eq!(dec.pending_bytes(), 0);
        prop_assert_eq!(dec.buffer_capacity(), 0);
    }

    #[test]
    fn arbitrary_bytes_decode_the_same_however_chunked(
        bytes in vec(any::<u8>(), 0..256),
        cuts in vec(any::<usize>(), 0..32),
        max in 0usize..300,
    ) {
        let (whole_frames, whole_result, _) = decode_chunked(max, &[&bytes]);
        let (frames, result, dec) = decode_chunked(max, &chunks(&bytes, &cuts));
        prop_assert_eq!(&frames, &whole_frames);
        prop_assert_eq!(&result, &whole_result);
        if result.is_err() {
            prop_assert_eq!(dec.buffer_capacity(), 0);
        }
        // Whatever decoded re-encodes to something that decodes the same.
        for f in frames {
            let mut again = Vec::new();
            encode_frame(&f, &mut again);
            let (back, r, _) = decode_chunked(usize::MAX, &[&again]);
            prop_assert_eq!(r, Ok(()));
            prop_assert_eq!(back, vec![f]);
        }
    }
}
