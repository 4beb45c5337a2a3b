use serde_json::{Value, json};

use super::*;
use crate::SecretKey;
use crate::copy::{SENT_COPY_CONTENT_TYPE, SentCopy};
use crate::envelope::{MAX_ENVELOPE_BYTES, seal_with_id};

/// 2026-01-01T00:00:00Z, the vectors' time.
const T0: u64 = 1_767_225_600;

/// A 1×1 transparent PNG (70 bytes).
const PNG_1X1: &str = "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8dfc3f01f0006a4028bc409d62b0000000049454e44ae426082";

fn id(byte: u8) -> MessageId {
    MessageId::from_bytes([byte; 16])
}

/// Distinct ids in ascending order of `n`.
fn numbered(n: u16) -> MessageId {
    let mut bytes = [0; 16];
    bytes[..2].copy_from_slice(&n.to_be_bytes());
    MessageId::from_bytes(bytes)
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn unhex(text: &str) -> Vec<u8> {
    data_encoding::HEXLOWER.decode(text.as_bytes()).unwrap()
}

fn identity(seed: u8) -> PublicKey {
    SecretKey::from_seed(&[seed; 32]).public_key()
}

fn decode(content_type: &str, body: &str) -> Result<ChatContent, ChatError> {
    ChatContent::decode(content_type, body.as_bytes())
}

fn code(content_type: &str, body: &str) -> &'static str {
    decode(content_type, body).unwrap_err().code()
}

fn png(len: usize) -> Vec<u8> {
    let mut data = unhex(PNG_1X1);
    data.resize(len, 0);
    data
}

fn profile(name: &str, avatar: Option<Avatar>) -> Profile {
    Profile {
        display_name: name.into(),
        avatar,
    }
}

fn receipt(kind: ReceiptKind, ids: impl IntoIterator<Item = MessageId>) -> Receipt {
    Receipt {
        kind,
        ids: ids.into_iter().collect(),
    }
}

fn examples() -> Vec<ChatContent> {
    vec![
        ChatContent::Receipt(receipt(ReceiptKind::Delivered, [id(1)])),
        ChatContent::Receipt(receipt(ReceiptKind::Read, (0..=255).map(id))),
        ChatContent::Edit(Edit {
            id: id(2),
            text: "fixed \u{1b}[31m \"quoted\" \\ typo\n".into(),
        }),
        ChatContent::Delete(Delete { id: id(3) }),
        ChatContent::Reaction(Reaction {
            id: id(4),
            emoji: "👍🏽".into(),
            remove: false,
        }),
        ChatContent::Reaction(Reaction {
            id: id(4),
            emoji: "👩\u{200d}👩\u{200d}👧".into(),
            remove: true,
        }),
        ChatContent::Reply(Reply {
            id: id(5),
            text: "yes".into(),
        }),
        ChatContent::Typing(Typing { typing: true }),
        ChatContent::Typing(Typing { typing: false }),
        ChatContent::Presence(Presence {
            state: PresenceState::Online,
        }),
        ChatContent::Presence(Presence {
            state: PresenceState::Away,
        }),
        ChatContent::Presence(Presence {
            state: PresenceState::Offline,
        }),
        ChatContent::Profile(profile("Alice Liddell", None)),
        ChatContent::Profile(profile(
            "Алиса 🐇",
            Some(Avatar {
                image_type: ImageType::Png,
                data: unhex(PNG_1X1),
            }),
        )),
        ChatContent::Profile(profile(
            "j",
            Some(Avatar {
                image_type: ImageType::Jpeg,
                data: b"\xff\xd8\xff\xe0 rest".to_vec(),
            }),
        )),
        ChatContent::Profile(profile(
            "w",
            Some(Avatar {
                image_type: ImageType::Webp,
                data: b"RIFF\x04\0\0\0WEBP".to_vec(),
            }),
        )),
        ChatContent::Timer(Timer { seconds: 0 }),
        ChatContent::Timer(Timer { seconds: 3600 }),
        ChatContent::Timer(Timer {
            seconds: MAX_TIMER_SECONDS,
        }),
    ]
}

#[test]
fn every_body_reads_back_as_written_and_names_its_content_type() {
    for content in examples() {
        let bytes = content.encode().unwrap();
        let again = ChatContent::decode(content.content_type(), &bytes).unwrap();
        assert_eq!(again, content);
        assert_eq!(again.encode().unwrap(), bytes, "one form");
        assert!(CONTENT_TYPES.contains(&content.content_type()));
        crate::envelope::check_content_type(content.content_type()).unwrap();
    }
    assert_eq!(
        String::from_utf8(
            ChatContent::Receipt(receipt(ReceiptKind::Read, [id(2), id(1)]))
                .encode()
                .unwrap()
        )
        .unwrap(),
        format!(r#"{{"ids":["{}","{}"],"kind":"read"}}"#, id(1), id(2)),
        "a receipt writes its ids ascending"
    );
    assert_eq!(
        Profile::decode(br#"{"avatar":null,"display_name":"a"}"#).unwrap(),
        profile("a", None)
    );
}

#[test]
fn a_body_is_decoded_only_under_its_own_content_type() {
    let edit = Edit {
        id: id(1),
        text: "x".into(),
    }
    .encode()
    .unwrap();
    assert_eq!(
        ChatContent::decode("text", &edit),
        Err(ChatError::NotChat("text".into()))
    );
    assert_eq!(
        ChatContent::decode(SENT_COPY_CONTENT_TYPE, &edit)
            .unwrap_err()
            .code(),
        "not_chat"
    );
    // A reply's body is an edit's shape, but an edit is not a reply and a delete has fewer
    // members.
    assert!(ChatContent::decode(REPLY_CONTENT_TYPE, &edit).is_ok());
    assert_eq!(
        ChatContent::decode(DELETE_CONTENT_TYPE, &edit)
            .unwrap_err()
            .code(),
        "malformed"
    );
}

#[test]
fn malformed_json_is_refused_for_every_type() {
    for content_type in CONTENT_TYPES {
        for body in [
            "",
            "null",
            "[]",
            "\"text\"",
            "1",
            "{}",
            "{\"id\":",
            " {}",
            "{\"zzz\":1}",
        ] {
            assert_eq!(
                code(content_type, body),
                "malformed",
                "{content_type} {body:?}"
            );
        }
        let too_large = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            ChatContent::decode(content_type, &too_large)
                .unwrap_err()
                .code(),
            "malformed"
        );
    }
}

#[test]
fn every_body_refuses_an_unknown_member_a_missing_member_and_a_non_canonical_form() {
    for content in examples() {
        let content_type = content.content_type();
        let bytes = content.encode().unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        let object = value.as_object().unwrap();
        let mut extra = object.clone();
        extra.insert("zz_extra".into(), json!(1));
        let extra = canonical::encode(&Value::Object(extra)).unwrap();
        assert_eq!(
            ChatContent::decode(content_type, &extra)
                .unwrap_err()
                .code(),
            "malformed",
            "{content_type} with an unknown member"
        );
        for member in object.keys() {
            let mut missing = object.clone();
            missing.remove(member);
            let missing = canonical::encode(&Value::Object(missing)).unwrap();
            assert_eq!(
                ChatContent::decode(content_type, &missing)
                    .unwrap_err()
                    .code(),
                "malformed",
                "{content_type} without {member}"
            );
        }
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        assert_eq!(
            ChatContent::decode(content_type, &pretty)
                .unwrap_err()
                .code(),
            "malformed"
        );
        let mut reversed = String::from("{");
        for (i, (name, member)) in object.iter().rev().enumerate() {
            if i > 0 {
                reversed.push(',');
            }
            reversed.push_str(&format!("{}:{}", json!(name), member));
        }
        reversed.push('}');
        if object.len() > 1 {
            assert_eq!(code(content_type, &reversed), "malformed", "{reversed}");
        }
    }
}

#[test]
fn ids_are_message_ids_in_their_text_form() {
    let good = format!(r#"{{"id":"{}"}}"#, id(0xab));
    assert!(decode(DELETE_CONTENT_TYPE, &good).is_ok());
    for bad in [
        "ABABABABABABABABABABABABABABABAB",
        "abababababababababababababababab00",
        "ababababababababababababababab",
        "zzabababababababababababababab",
        "",
    ] {
        assert_eq!(
            code(DELETE_CONTENT_TYPE, &format!(r#"{{"id":"{bad}"}}"#)),
            "malformed",
            "{bad}"
        );
    }
    assert_eq!(code(DELETE_CONTENT_TYPE, r#"{"id":7}"#), "malformed");
    assert_eq!(code(DELETE_CONTENT_TYPE, r#"{"id":null}"#), "malformed");
}

#[test]
fn a_receipt_names_1_to_256_distinct_ids_ascending_and_a_known_kind() {
    let ids = |ids: &[MessageId]| {
        let list: Vec<String> = ids.iter().map(|id| format!("\"{id}\"")).collect();
        format!(r#"{{"ids":[{}],"kind":"read"}}"#, list.join(","))
    };
    assert_eq!(code(RECEIPT_CONTENT_TYPE, &ids(&[])), "no_ids");
    let all: Vec<MessageId> = (0..=255u8).map(id).collect();
    assert!(decode(RECEIPT_CONTENT_TYPE, &ids(&all)).is_ok());
    let too_many: Vec<MessageId> = (0..=256u16).map(numbered).collect();
    assert_eq!(too_many.len(), 257);
    assert_eq!(
        decode(RECEIPT_CONTENT_TYPE, &ids(&too_many)),
        Err(ChatError::TooManyIds { count: 257 })
    );
    assert_eq!(
        decode(RECEIPT_CONTENT_TYPE, &ids(&[id(1), id(1)])),
        Err(ChatError::DuplicateId(id(1)))
    );
    assert_eq!(
        decode(RECEIPT_CONTENT_TYPE, &ids(&[id(2), id(1)])),
        Err(ChatError::UnsortedIds)
    );
    let seen = format!(r#"{{"ids":["{}"],"kind":"seen"}}"#, id(1));
    assert_eq!(code(RECEIPT_CONTENT_TYPE, &seen), "malformed");
    let not_a_list = format!(r#"{{"ids":"{}","kind":"read"}}"#, id(1));
    assert_eq!(code(RECEIPT_CONTENT_TYPE, &not_a_list), "malformed");
    assert_eq!(
        receipt(ReceiptKind::Read, []).encode(),
        Err(ChatError::NoIds),
        "a sender cannot write what a receiver refuses"
    );
    assert_eq!(
        receipt(ReceiptKind::Read, (0..=256u16).map(numbered)).encode(),
        Err(ChatError::TooManyIds { count: 257 })
    );
}

#[test]
fn an_edits_and_a_replys_text_is_1_to_64000_bytes_of_anything() {
    for content_type in [EDIT_CONTENT_TYPE, REPLY_CONTENT_TYPE] {
        let body = |text: &str| {
            canonical::encode(&json!({"id": id(1).to_string(), "text": text})).unwrap()
        };
        let read = |text: &str| ChatContent::decode(content_type, &body(text));
        assert_eq!(read(""), Err(ChatError::EmptyText));
        assert!(read(&"x".repeat(MAX_TEXT_BYTES)).is_ok());
        assert_eq!(
            read(&"x".repeat(MAX_TEXT_BYTES + 1)),
            Err(ChatError::TextTooLong {
                len: MAX_TEXT_BYTES + 1
            })
        );
        // Bytes, not characters: 16,000 four-byte characters fit, one more byte does not.
        assert!(read(&"🐇".repeat(MAX_TEXT_BYTES / 4)).is_ok());
        assert_eq!(
            read(&format!("{}x", "🐇".repeat(MAX_TEXT_BYTES / 4)))
                .unwrap_err()
                .code(),
            "text_too_long"
        );
        // Like a text message, any character: a client escapes them when it shows them.
        assert!(read("\u{0}\u{1b}\u{202e}\r\n").is_ok());
        // JSON cannot carry an unpaired surrogate.
        assert_eq!(
            code(
                content_type,
                &format!(r#"{{"id":"{}","text":"\ud800"}}"#, id(1))
            ),
            "malformed"
        );
        assert_eq!(
            code(content_type, &format!(r#"{{"id":"{}","text":5}}"#, id(1))),
            "malformed"
        );
    }
    assert_eq!(
        Edit {
            id: id(1),
            text: String::new()
        }
        .encode(),
        Err(ChatError::EmptyText)
    );
}

#[test]
fn the_longest_edit_and_reply_fit_an_envelope_and_its_sent_copy() {
    for content in [
        ChatContent::Edit(Edit {
            id: id(1),
            text: "x".repeat(MAX_TEXT_BYTES),
        }),
        ChatContent::Reply(Reply {
            id: id(1),
            text: "x".repeat(MAX_TEXT_BYTES),
        }),
    ] {
        fits_as_a_copy(&content);
    }
}

fn fits_as_a_copy(content: &ChatContent) {
    let body = content.encode().unwrap();
    for time in [T0, 99_999_999_999] {
        let max = SentCopy::max_body_len(content.content_type(), time).unwrap();
        assert!(
            body.len() <= max,
            "{} {} > {max}",
            content.content_type(),
            body.len()
        );
    }
    let copy = SentCopy {
        to: identity(9),
        content_type: content.content_type().into(),
        body: body.clone(),
    };
    let sender = SecretKey::from_seed(&[1; 32]);
    seal_with_id(
        &sender,
        &identity(2),
        SENT_COPY_CONTENT_TYPE,
        &copy.encode(),
        T0,
        id(1),
    )
    .unwrap();
}

#[test]
fn a_reaction_is_1_to_32_bytes_without_hidden_characters() {
    let body = |emoji: &str, remove: bool| {
        canonical::encode(&json!({"emoji": emoji, "id": id(1).to_string(), "remove": remove}))
            .unwrap()
    };
    let read = |emoji: &str| Reaction::decode(&body(emoji, false));
    assert!(read("👍").is_ok());
    assert!(read("+1").is_ok());
    assert!(read("❤\u{fe0f}").is_ok());
    assert!(read("🏴\u{e0067}\u{e0062}\u{e0065}\u{e006e}\u{e0067}\u{e007f}").is_ok());
    assert!(read(&"a".repeat(MAX_EMOJI_BYTES)).is_ok());
    assert_eq!(read(""), Err(ChatError::BadEmoji("empty")));
    assert_eq!(
        read(&"a".repeat(MAX_EMOJI_BYTES + 1)).unwrap_err().code(),
        "bad_emoji"
    );
    assert_eq!(read(&"👍".repeat(9)).unwrap_err().code(), "bad_emoji");
    for hidden in [
        '\u{0}', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}', '\u{061c}', '\u{200e}',
        '\u{200f}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{2028}', '\u{2029}', ' ',
        '\u{a0}', '\u{3000}', '\u{200b}', '\u{2060}', '\u{feff}',
    ] {
        assert!(is_hidden(hidden), "{hidden:?}");
        assert_eq!(
            read(&format!("👍{hidden}")).unwrap_err().code(),
            "bad_emoji",
            "{hidden:?}"
        );
    }
    for shown in ['\u{200d}', '\u{fe0f}', 'a', '👍'] {
        assert!(!is_hidden(shown), "{shown:?}");
    }
    assert_eq!(
        code(
            REACTION_CONTENT_TYPE,
            &format!(r#"{{"emoji":"x","id":"{}","remove":0}}"#, id(1))
        ),
        "malformed"
    );
    assert!(Reaction::decode(&body("x", true)).unwrap().remove);
}

#[test]
fn a_display_name_is_1_to_64_characters_without_hidden_ones_or_outer_spaces() {
    let read = |name: &str| {
        Profile::decode(&canonical::encode(&json!({"avatar": null, "display_name": name})).unwrap())
    };
    assert!(read("a").is_ok());
    assert!(read("Alice B. Liddell").is_ok());
    assert!(
        read(&"🐇".repeat(MAX_DISPLAY_NAME_CHARS)).is_ok(),
        "characters, not bytes"
    );
    assert_eq!(
        read(&"a".repeat(MAX_DISPLAY_NAME_CHARS + 1)),
        Err(ChatError::BadDisplayName("longer than 64 characters"))
    );
    assert_eq!(read(""), Err(ChatError::BadDisplayName("empty")));
    for bad in [
        " alice",
        "alice ",
        "al\nice",
        "al\tice",
        "ali\u{202e}ce",
        "al\u{200b}ice",
        "a\u{2028}b",
        "a\u{a0}b",
        "a\u{1b}[2Jb",
        "a\u{85}b",
    ] {
        assert_eq!(read(bad).unwrap_err().code(), "bad_display_name", "{bad:?}");
    }
    assert_eq!(
        code(PROFILE_CONTENT_TYPE, r#"{"avatar":null,"display_name":7}"#),
        "malformed"
    );
}

#[test]
fn an_avatar_is_a_small_image_of_its_type_in_base64() {
    let body = |image_type: &str, data: &str| {
        canonical::encode(
            &json!({"avatar": {"data": data, "type": image_type}, "display_name": "a"}),
        )
        .unwrap()
    };
    let b64 = |data: &[u8]| BASE64.encode(data);
    let read = |image_type: &str, data: &str| Profile::decode(&body(image_type, data));
    assert!(read("image/png", &b64(&png(MAX_AVATAR_BYTES))).is_ok());
    assert_eq!(
        read("image/png", &b64(&png(MAX_AVATAR_BYTES + 1))),
        Err(ChatError::BadAvatar("larger than 48000 bytes"))
    );
    assert_eq!(
        read("image/png", &b64(&png(MAX_AVATAR_BYTES + 1000)))
            .unwrap_err()
            .code(),
        "bad_avatar"
    );
    assert_eq!(read("image/png", ""), Err(ChatError::BadAvatar("empty")));
    assert_eq!(
        read("image/jpeg", &b64(&png(100))).unwrap_err(),
        ChatError::BadAvatar("the data is not an image of its type")
    );
    assert_eq!(
        read("image/webp", &b64(b"RIFF\0\0\0\0WEBX"))
            .unwrap_err()
            .code(),
        "bad_avatar"
    );
    assert_eq!(
        read("image/webp", &b64(b"RIFF\0\0\0\0WEB"))
            .unwrap_err()
            .code(),
        "bad_avatar"
    );
    assert_eq!(
        read("image/jpeg", &b64(b"\xff\xd8")).unwrap_err().code(),
        "bad_avatar"
    );
    assert_eq!(
        read("image/gif", &b64(b"GIF89a")).unwrap_err().code(),
        "malformed"
    );
    assert_eq!(
        read("IMAGE/PNG", &b64(&png(70))).unwrap_err().code(),
        "malformed"
    );
    // Not padded standard base64 in its one form.
    let good = b64(&png(70));
    assert!(read("image/png", &good).is_ok());
    for bad in [
        good.trim_end_matches('=').to_owned(),
        good.replace('+', "-"),
        format!("{good}\n"),
        format!(" {good}"),
        format!("{}B=", &good[..good.len() - 2]),
    ] {
        if bad != good {
            assert_eq!(
                read("image/png", &bad).unwrap_err(),
                ChatError::BadAvatar("the data is not padded standard base64"),
                "{bad}"
            );
        }
    }
    // The avatar object has exactly its members.
    let extra = canonical::encode(
        &json!({"avatar": {"data": good, "type": "image/png", "x": 1}, "display_name": "a"}),
    )
    .unwrap();
    assert_eq!(Profile::decode(&extra).unwrap_err().code(), "malformed");
    let without =
        canonical::encode(&json!({"avatar": {"data": good}, "display_name": "a"})).unwrap();
    assert_eq!(Profile::decode(&without).unwrap_err().code(), "malformed");
    // `avatar` must be there, as `null` when there is none.
    assert_eq!(
        code(PROFILE_CONTENT_TYPE, r#"{"display_name":"a"}"#),
        "malformed"
    );
    let sender_side = profile(
        "a",
        Some(Avatar {
            image_type: ImageType::Webp,
            data: png(10),
        }),
    );
    assert_eq!(sender_side.encode().unwrap_err().code(), "bad_avatar");
}

#[test]
fn the_largest_profile_fits_an_envelope_and_its_sent_copy() {
    let largest = ChatContent::Profile(profile(
        &"\u{10ffff}".repeat(MAX_DISPLAY_NAME_CHARS),
        Some(Avatar {
            image_type: ImageType::Jpeg,
            data: {
                let mut data = b"\xff\xd8\xff".to_vec();
                data.resize(MAX_AVATAR_BYTES, 0xff);
                data
            },
        }),
    ));
    fits_as_a_copy(&largest);
}

#[test]
fn a_timer_is_0_to_a_year_of_whole_seconds() {
    assert_eq!(MAX_TIMER_SECONDS, 31_536_000);
    let read = |seconds: &str| decode(TIMER_CONTENT_TYPE, &format!(r#"{{"seconds":{seconds}}}"#));
    assert_eq!(read("0"), Ok(ChatContent::Timer(Timer { seconds: 0 })));
    assert!(read("31536000").is_ok());
    assert_eq!(
        read("31536001"),
        Err(ChatError::TimerTooLong {
            seconds: 31_536_001
        })
    );
    assert_eq!(read("4294967295").unwrap_err().code(), "timer_too_long");
    for bad in [
        "4294967296",
        "-1",
        "1.0",
        "1e3",
        "01",
        "\"60\"",
        "null",
        "true",
    ] {
        assert_eq!(read(bad).unwrap_err().code(), "malformed", "{bad}");
    }
    assert_eq!(
        Timer {
            seconds: MAX_TIMER_SECONDS + 1
        }
        .encode()
        .unwrap_err()
        .code(),
        "timer_too_long"
    );
}

#[test]
fn typing_and_presence_take_only_their_values() {
    assert_eq!(
        decode(TYPING_CONTENT_TYPE, r#"{"typing":true}"#),
        Ok(ChatContent::Typing(Typing { typing: true }))
    );
    assert_eq!(code(TYPING_CONTENT_TYPE, r#"{"typing":1}"#), "malformed");
    assert_eq!(
        code(TYPING_CONTENT_TYPE, r#"{"typing":"true"}"#),
        "malformed"
    );
    assert_eq!(
        decode(PRESENCE_CONTENT_TYPE, r#"{"state":"away"}"#),
        Ok(ChatContent::Presence(Presence {
            state: PresenceState::Away
        }))
    );
    for bad in ["Online", "busy", "", "online "] {
        assert_eq!(
            code(PRESENCE_CONTENT_TYPE, &format!(r#"{{"state":"{bad}"}}"#)),
            "malformed"
        );
    }
    for content in examples() {
        assert_eq!(
            content.is_ephemeral(),
            matches!(
                content.content_type(),
                TYPING_CONTENT_TYPE | PRESENCE_CONTENT_TYPE
            )
        );
    }
}

#[test]
fn changes_name_their_targets() {
    assert_eq!(
        ChatContent::Receipt(receipt(ReceiptKind::Read, [id(2), id(1)])).change(),
        Some((ChangeKind::Receipt(ReceiptKind::Read), vec![id(1), id(2)]))
    );
    assert_eq!(
        ChatContent::Delete(Delete { id: id(3) }).change(),
        Some((ChangeKind::Delete, vec![id(3)]))
    );
    assert_eq!(ChatContent::Timer(Timer { seconds: 1 }).change(), None);
    assert_eq!(ChatContent::Typing(Typing { typing: true }).change(), None);
}

#[test]
fn which_content_types_are_messages_and_which_can_be_edited() {
    for shown in ["text", "file-offer", REPLY_CONTENT_TYPE, "kez.poll", "x"] {
        assert!(is_message(shown), "{shown}");
    }
    for not_shown in CONTENT_TYPES
        .iter()
        .copied()
        .filter(|content_type| *content_type != REPLY_CONTENT_TYPE)
        .chain([SENT_COPY_CONTENT_TYPE, crate::pair::SYNC_CONTENT_TYPE])
    {
        assert!(!is_message(not_shown), "{not_shown}");
    }
    assert!(is_editable("text") && is_editable(REPLY_CONTENT_TYPE));
    assert!(!is_editable("file-offer") && !is_editable("kez.poll"));
}

#[test]
fn only_the_sender_edits_or_deletes_and_only_a_text_or_reply() {
    let (alice, bob) = (identity(1), identity(2));
    for change in [ChangeKind::Edit, ChangeKind::Delete] {
        assert_eq!(may_change(&alice, "text", true, &alice, change), Ok(()));
        assert_eq!(
            may_change(&alice, REPLY_CONTENT_TYPE, true, &alice, change),
            Ok(())
        );
        assert_eq!(
            may_change(&alice, "text", true, &bob, change),
            Err(ChatError::NotTheSender),
            "a forged {change:?}"
        );
        assert_eq!(
            may_change(&alice, "file-offer", true, &alice, change),
            Err(ChatError::NotEditable)
        );
        assert_eq!(
            may_change(&alice, "kez.poll", true, &alice, change),
            Err(ChatError::NotEditable)
        );
        assert_eq!(
            may_change(&alice, "text", false, &alice, change),
            Err(ChatError::NotInConversation)
        );
        assert_eq!(
            may_change(&alice, EDIT_CONTENT_TYPE, true, &alice, change),
            Err(ChatError::NotAMessage)
        );
    }
}

#[test]
fn anyone_in_the_conversation_reacts_or_replies_to_a_shown_message() {
    let (alice, bob) = (identity(1), identity(2));
    for change in [ChangeKind::Reaction, ChangeKind::Reply] {
        for target in ["text", "file-offer", REPLY_CONTENT_TYPE, "kez.poll"] {
            assert_eq!(may_change(&alice, target, true, &bob, change), Ok(()));
            assert_eq!(may_change(&alice, target, true, &alice, change), Ok(()));
        }
        assert_eq!(
            may_change(&alice, "text", false, &bob, change),
            Err(ChatError::NotInConversation)
        );
        for target in [
            REACTION_CONTENT_TYPE,
            RECEIPT_CONTENT_TYPE,
            TIMER_CONTENT_TYPE,
        ] {
            assert_eq!(
                may_change(&alice, target, true, &bob, change),
                Err(ChatError::NotAMessage)
            );
        }
    }
}

#[test]
fn a_receipt_comes_from_the_messages_recipient() {
    let (alice, bob) = (identity(1), identity(2));
    for kind in [ReceiptKind::Delivered, ReceiptKind::Read] {
        let change = ChangeKind::Receipt(kind);
        assert_eq!(may_change(&alice, "text", true, &bob, change), Ok(()));
        assert_eq!(may_change(&alice, "file-offer", true, &bob, change), Ok(()));
        assert_eq!(
            may_change(&alice, "text", true, &alice, change),
            Err(ChatError::ReceiptFromSender)
        );
        assert_eq!(
            may_change(&alice, "text", false, &bob, change),
            Err(ChatError::NotInConversation)
        );
        assert_eq!(
            may_change(&alice, DELETE_CONTENT_TYPE, true, &bob, change),
            Err(ChatError::NotAMessage)
        );
    }
}

#[test]
fn a_message_expires_its_timer_after_its_envelope_time() {
    assert_eq!(expires_at(T0, Timer { seconds: 0 }), None);
    assert_eq!(expires_at(T0, Timer { seconds: 60 }), Some(T0 + 60));
    assert_eq!(
        expires_at(
            u64::MAX - 1,
            Timer {
                seconds: MAX_TIMER_SECONDS
            }
        ),
        Some(u64::MAX)
    );
    assert!(timer_replaces(T0 + 1, id(0), T0, id(9)));
    assert!(timer_replaces(T0, id(2), T0, id(1)));
    assert!(!timer_replaces(T0, id(1), T0, id(1)));
    assert!(!timer_replaces(T0 - 1, id(9), T0, id(0)));
    let timers = [
        (T0 + 100, id(1), Timer { seconds: 0 }),
        (T0, id(2), Timer { seconds: 60 }),
        (T0, id(1), Timer { seconds: 30 }),
    ];
    assert_eq!(timer_in_force(&timers, T0 - 1), Timer { seconds: 0 });
    assert_eq!(timer_in_force(&timers, T0), Timer { seconds: 60 });
    assert_eq!(timer_in_force(&timers, T0 + 99), Timer { seconds: 60 });
    assert_eq!(timer_in_force(&timers, T0 + 100), Timer { seconds: 0 });
    assert_eq!(timer_in_force(&[], T0), Timer { seconds: 0 });
}

#[test]
fn a_profiles_checks_run_in_the_documented_order() {
    assert_eq!(
        code(
            PROFILE_CONTENT_TYPE,
            r#"{"avatar":{"data":"%%%","type":"image/png"},"display_name":""}"#
        ),
        "bad_display_name"
    );
    assert_eq!(
        code(
            PROFILE_CONTENT_TYPE,
            r#"{"avatar":{"data":"%%%","type":"image/gif"},"display_name":""}"#
        ),
        "malformed"
    );
}

#[test]
fn every_error_has_a_distinct_code() {
    let errors = [
        ChatError::Malformed(String::new()),
        ChatError::NotChat(String::new()),
        ChatError::EmptyText,
        ChatError::TextTooLong { len: 0 },
        ChatError::NoIds,
        ChatError::TooManyIds { count: 0 },
        ChatError::DuplicateId(id(0)),
        ChatError::UnsortedIds,
        ChatError::BadEmoji(""),
        ChatError::BadDisplayName(""),
        ChatError::BadAvatar(""),
        ChatError::TimerTooLong { seconds: 0 },
        ChatError::NotInConversation,
        ChatError::NotAMessage,
        ChatError::NotEditable,
        ChatError::NotTheSender,
        ChatError::ReceiptFromSender,
    ];
    let codes: BTreeSet<&str> = errors.iter().map(ChatError::code).collect();
    assert_eq!(codes.len(), errors.len());
}

// ---- committed vectors (vectors/chat/, PROTOCOL.md §8.6) ----

struct Vector {
    name: &'static str,
    description: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

fn vector(
    name: &'static str,
    description: &'static str,
    content_type: &'static str,
    body: impl Into<Vec<u8>>,
) -> Vector {
    Vector {
        name,
        description,
        content_type,
        body: body.into(),
    }
}

fn vectors() -> Vec<Vector> {
    let (one, two) = (
        "26385a833a0f9f2fa045ea6ba851d242",
        "c4b6ee7f6d5e1c0a2f1a7e1d3b9c8a70",
    );
    let png = BASE64.encode(&unhex(PNG_1X1));
    vec![
        vector(
            "good-receipt",
            "bob read two of alice's messages",
            RECEIPT_CONTENT_TYPE,
            format!(r#"{{"ids":["{one}","{two}"],"kind":"read"}}"#),
        ),
        vector(
            "good-edit",
            "a new text for message one",
            EDIT_CONTENT_TYPE,
            format!(r#"{{"id":"{one}","text":"hello bob, at 8 \"sharp\"\n"}}"#),
        ),
        vector(
            "good-delete",
            "message one deleted for everyone",
            DELETE_CONTENT_TYPE,
            format!(r#"{{"id":"{one}"}}"#),
        ),
        vector(
            "good-reaction",
            "a thumbs up with a skin tone on message one",
            REACTION_CONTENT_TYPE,
            format!(r#"{{"emoji":"👍🏽","id":"{one}","remove":false}}"#),
        ),
        vector(
            "good-reply",
            "a reply quoting message one",
            REPLY_CONTENT_TYPE,
            format!(r#"{{"id":"{one}","text":"see you then"}}"#),
        ),
        vector(
            "good-typing",
            "the sender is typing",
            TYPING_CONTENT_TYPE,
            r#"{"typing":true}"#,
        ),
        vector(
            "good-presence",
            "the sender is away",
            PRESENCE_CONTENT_TYPE,
            r#"{"state":"away"}"#,
        ),
        vector(
            "good-profile",
            "a display name and a 1x1 PNG avatar",
            PROFILE_CONTENT_TYPE,
            format!(
                r#"{{"avatar":{{"data":"{png}","type":"image/png"}},"display_name":"Alice 🐇"}}"#
            ),
        ),
        vector(
            "good-profile-no-avatar",
            "a display name without an avatar",
            PROFILE_CONTENT_TYPE,
            r#"{"avatar":null,"display_name":"Alice"}"#,
        ),
        vector(
            "good-timer",
            "messages disappear a day after they were sent",
            TIMER_CONTENT_TYPE,
            r#"{"seconds":86400}"#,
        ),
        vector(
            "malformed-not-canonical",
            "members out of order",
            REACTION_CONTENT_TYPE,
            format!(r#"{{"id":"{one}","emoji":"👍","remove":false}}"#),
        ),
        vector(
            "malformed-unknown-member",
            "a delete with a member it does not have",
            DELETE_CONTENT_TYPE,
            format!(r#"{{"id":"{one}","reason":"oops"}}"#),
        ),
        vector(
            "malformed-missing-avatar",
            "a profile without its avatar member (null is required)",
            PROFILE_CONTENT_TYPE,
            r#"{"display_name":"Alice"}"#,
        ),
        vector(
            "no_ids",
            "a receipt naming no message",
            RECEIPT_CONTENT_TYPE,
            r#"{"ids":[],"kind":"delivered"}"#,
        ),
        vector(
            "duplicate_id",
            "a receipt naming message one twice",
            RECEIPT_CONTENT_TYPE,
            format!(r#"{{"ids":["{one}","{one}"],"kind":"read"}}"#),
        ),
        vector(
            "unsorted_ids",
            "a receipt's ids in descending order",
            RECEIPT_CONTENT_TYPE,
            format!(r#"{{"ids":["{two}","{one}"],"kind":"read"}}"#),
        ),
        vector(
            "empty_text",
            "an edit without text",
            EDIT_CONTENT_TYPE,
            format!(r#"{{"id":"{one}","text":""}}"#),
        ),
        vector(
            "bad_emoji-bidi",
            "a reaction holding a right-to-left override",
            REACTION_CONTENT_TYPE,
            format!("{{\"emoji\":\"\u{202e}x\",\"id\":\"{one}\",\"remove\":false}}"),
        ),
        vector(
            "bad_display_name-line-break",
            "a display name with a line feed",
            PROFILE_CONTENT_TYPE,
            r#"{"avatar":null,"display_name":"Alice\nBob"}"#,
        ),
        vector(
            "bad_avatar-type",
            "a PNG declared as a JPEG",
            PROFILE_CONTENT_TYPE,
            format!(
                r#"{{"avatar":{{"data":"{png}","type":"image/jpeg"}},"display_name":"Alice"}}"#
            ),
        ),
        vector(
            "timer_too_long",
            "a timer one second longer than a year",
            TIMER_CONTENT_TYPE,
            r#"{"seconds":31536001}"#,
        ),
    ]
}

/// The decoded form a vector's `expect.ok` shows: the body's members, with an avatar's data
/// in hex instead of base64.
fn decoded(content: &ChatContent) -> Value {
    match content {
        ChatContent::Receipt(receipt) => json!({"kind": receipt.kind, "ids": receipt.ids}),
        ChatContent::Edit(edit) => json!(edit),
        ChatContent::Delete(delete) => json!(delete),
        ChatContent::Reaction(reaction) => json!(reaction),
        ChatContent::Reply(reply) => json!(reply),
        ChatContent::Typing(typing) => json!(typing),
        ChatContent::Presence(presence) => json!(presence),
        ChatContent::Timer(timer) => json!(timer),
        ChatContent::Profile(profile) => json!({
            "display_name": profile.display_name,
            "avatar": profile.avatar.as_ref().map(|avatar| json!({
                "type": avatar.image_type,
                "data_hex": hex(&avatar.data),
            })),
        }),
    }
}

fn render(vector: &Vector) -> String {
    let expect = match ChatContent::decode(vector.content_type, &vector.body) {
        Ok(content) => json!({"ok": decoded(&content)}),
        Err(err) => json!({"error": err.code()}),
    };
    let value = json!({
        "name": vector.name,
        "description": vector.description,
        "content_type": vector.content_type,
        "body_hex": hex(&vector.body),
        "expect": expect,
    });
    serde_json::to_string_pretty(&value).unwrap() + "\n"
}

#[test]
fn committed_vectors_are_reproduced_and_name_each_failure() {
    let vectors = vectors();
    for content_type in CONTENT_TYPES {
        assert!(
            vectors.iter().any(
                |vector| vector.content_type == content_type && vector.name.starts_with("good")
            ),
            "a good vector for {content_type}"
        );
    }
    let rendered: Vec<(String, String)> = vectors
        .iter()
        .map(|vector| (vector.name.to_string(), render(vector)))
        .collect();
    crate::committed_vectors::check("chat", &rendered, |error| error);
}

#[test]
fn a_resend_request_has_one_form_and_bounded_ids() {
    let resend = Resend {
        ids: [id(2), id(1)].into_iter().collect(),
    };
    let body = resend.encode().unwrap();
    assert_eq!(
        String::from_utf8(body.clone()).unwrap(),
        format!("{{\"ids\":[\"{}\",\"{}\"]}}", id(1), id(2))
    );
    assert_eq!(Resend::decode(&body).unwrap(), resend);
    let unsorted = format!("{{\"ids\":[\"{}\",\"{}\"]}}", id(2), id(1));
    assert_eq!(
        Resend::decode(unsorted.as_bytes()).unwrap_err().code(),
        "unsorted_ids"
    );
    assert!(Resend::decode(b"{\"ids\":[]}").is_err());
    let too_many = Resend {
        ids: (0..=MAX_RESEND_IDS as u16).map(numbered).collect(),
    };
    assert!(too_many.encode().is_err());
    assert!(!is_message(RESEND_CONTENT_TYPE), "never shown as a message");
}
