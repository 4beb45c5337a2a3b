//! Chat content types: receipts, edits, deletions, reactions, replies, typing, presence,
//! profiles and disappearing-message timers (PROTOCOL.md §8.6).
//!
//! Each is the body of an ordinary envelope (§8.1) of its own content type, so it is signed by
//! the sending device and authenticated like any message: who sent it is the envelope's
//! verified sender, resolved to an identity by the receiver's verified chains (never a member of
//! the body). Every body is canonical JSON (§3) with exactly the members listed below, and has
//! exactly one byte form: [`ChatContent::decode`] parses the body, checks every member, encodes
//! what it read again and requires the same bytes. [`ChatContent::encode`] checks the same
//! rules first, so a sender cannot send what a receiver refuses.
//!
//! | content type | body | limits |
//! |---|---|---|
//! | `kez.receipt` | `{"ids": [id, …], "kind": "delivered" \| "read"}` | 1 to 256 ids, strictly ascending (so no duplicates) |
//! | `kez.edit` | `{"id": id, "text": string}` | text 1 to [`MAX_TEXT_BYTES`] bytes |
//! | `kez.delete` | `{"id": id}` | |
//! | `kez.reaction` | `{"emoji": string, "id": id, "remove": bool}` | emoji 1 to 32 bytes, no hidden character |
//! | `kez.reply` | `{"id": id, "text": string}` | as `kez.edit` |
//! | `kez.typing` | `{"typing": bool}` | ephemeral |
//! | `kez.presence` | `{"state": "online" \| "away" \| "offline"}` | ephemeral |
//! | `kez.profile` | `{"avatar": null \| {"data": base64, "type": image type}, "display_name": string}` | name 1 to 64 characters; avatar 1 to [`MAX_AVATAR_BYTES`] bytes |
//! | `kez.timer` | `{"seconds": integer}` | 0 (off) to [`MAX_TIMER_SECONDS`] |
//!
//! An `id` is a message id in its text form (32 lowercase hex digits, [`MessageId`]). Strings
//! are UTF-8 (JSON cannot carry anything else; an unpaired surrogate escape is refused).
//!
//! What a receiver does with each, and which are allowed at all, is decided by the pure
//! functions here: [`may_change`] (edits and deletions only by the target's sender, and only of
//! a text or a reply; reactions and replies to any shown message; receipts only from the
//! target's recipient; always within one conversation), [`is_message`] (which content types
//! are messages a person sees, and may be reacted or replied to), and [`timer_in_force`] with
//! [`expires_at`] (when a message under a timer disappears).

use std::collections::BTreeSet;

use data_encoding::BASE64;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::envelope::{MAX_ENVELOPE_BYTES, MessageId};
use crate::key::PublicKey;

/// The content type of a delivery or read receipt.
pub const RECEIPT_CONTENT_TYPE: &str = "kez.receipt";
/// The content type of an edit of an earlier text or reply.
pub const EDIT_CONTENT_TYPE: &str = "kez.edit";
/// The content type of a deletion for everyone (advisory).
pub const DELETE_CONTENT_TYPE: &str = "kez.delete";
/// The content type of a reaction (or its removal).
pub const REACTION_CONTENT_TYPE: &str = "kez.reaction";
/// The content type of a text message that replies to (quotes) another.
pub const REPLY_CONTENT_TYPE: &str = "kez.reply";
/// The content type of a typing notice (ephemeral).
pub const TYPING_CONTENT_TYPE: &str = "kez.typing";
/// The content type of a presence notice (ephemeral).
pub const PRESENCE_CONTENT_TYPE: &str = "kez.presence";
/// The content type of a display name and avatar.
pub const PROFILE_CONTENT_TYPE: &str = "kez.profile";
/// The content type of a conversation's disappearing-message timer.
pub const TIMER_CONTENT_TYPE: &str = "kez.timer";

/// The content type of a request to send messages again that did not decrypt (PROTOCOL.md
/// §15.4): a device that could not decrypt a forward-secret message asks the sending device,
/// over a new session, for those ids. Not a [`ChatContent`]: it never changes a message.
pub const RESEND_CONTENT_TYPE: &str = "kez.resend";
/// Most ids one resend request names.
pub const MAX_RESEND_IDS: usize = 64;

/// Every content type this module reads, in the order of PROTOCOL.md §8.6.
pub const CONTENT_TYPES: [&str; 9] = [
    RECEIPT_CONTENT_TYPE,
    EDIT_CONTENT_TYPE,
    DELETE_CONTENT_TYPE,
    REACTION_CONTENT_TYPE,
    REPLY_CONTENT_TYPE,
    TYPING_CONTENT_TYPE,
    PRESENCE_CONTENT_TYPE,
    PROFILE_CONTENT_TYPE,
    TIMER_CONTENT_TYPE,
];

/// Most ids one receipt names.
pub const MAX_RECEIPT_IDS: usize = 256;
/// Longest text of an edit or a reply, in bytes: a round number below the largest `text`
/// message a sender can copy to its other devices (65,061 bytes, §8.5), so that an edit or a
/// reply carries about what a text message does. Whether a given body fits its envelope is
/// the envelope's check (`too_large`) as for any message.
pub const MAX_TEXT_BYTES: usize = 64_000;
/// Longest reaction, in bytes (an emoji with modifiers and joiners fits).
pub const MAX_EMOJI_BYTES: usize = 32;
/// Longest display name, in characters (Unicode scalar values).
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;
/// Largest avatar image, in bytes (decoded). Its base64 (64,000 bytes) and the rest of the
/// largest profile still fit an envelope and its sent copy (§8.5); 48 KiB would not (its
/// base64 alone is 65,536 bytes, the whole envelope).
pub const MAX_AVATAR_BYTES: usize = 48_000;
/// Longest disappearing-message timer: one year of 365 days, in seconds.
pub const MAX_TIMER_SECONDS: u32 = 365 * 24 * 60 * 60;

/// Why a chat body is refused, or a change to a message is not allowed. Each variant has a
/// stable [`code`](Self::code) (PROTOCOL.md §8.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// Not canonical JSON, a member missing, unknown or of the wrong type, a value not in its
    /// list, or a body larger than an envelope.
    #[error("malformed chat body: {0}")]
    Malformed(String),
    /// A content type this module does not read.
    #[error("{0:?} is not a chat content type")]
    NotChat(String),
    /// An edit or a reply without text.
    #[error("the text is empty")]
    EmptyText,
    /// An edit's or a reply's text is longer than [`MAX_TEXT_BYTES`].
    #[error("the text is {len} bytes; the limit is {MAX_TEXT_BYTES}")]
    TextTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A receipt naming no message.
    #[error("a receipt names no message")]
    NoIds,
    /// A receipt naming more than [`MAX_RECEIPT_IDS`] messages.
    #[error("a receipt names {count} messages; the limit is {MAX_RECEIPT_IDS}")]
    TooManyIds {
        /// How many it names.
        count: usize,
    },
    /// A receipt naming a message twice.
    #[error("a receipt names message {0} twice")]
    DuplicateId(MessageId),
    /// A receipt whose ids are not in ascending order.
    #[error("a receipt's ids are not in ascending order")]
    UnsortedIds,
    /// A reaction that is empty, too long or holds a hidden character.
    #[error("not a reaction: {0}")]
    BadEmoji(&'static str),
    /// A display name that is empty, too long or holds a hidden character.
    #[error("not a display name: {0}")]
    BadDisplayName(&'static str),
    /// An avatar that is empty, too large, not base64 or not an image of its type.
    #[error("not an avatar: {0}")]
    BadAvatar(&'static str),
    /// A timer longer than [`MAX_TIMER_SECONDS`].
    #[error("a timer of {seconds} seconds; the limit is {MAX_TIMER_SECONDS} (a year)")]
    TimerTooLong {
        /// The seconds it names.
        seconds: u64,
    },
    /// The change names a message of another conversation.
    #[error("the message it names is not in this conversation")]
    NotInConversation,
    /// The change names a message that is not one a person sees (a receipt, an edit, ...).
    #[error("the message it names is not a message a person sees")]
    NotAMessage,
    /// An edit or deletion of a message that is neither a text nor a reply.
    #[error("only a text or a reply can be edited or deleted")]
    NotEditable,
    /// An edit or deletion by another identity than the message's sender.
    #[error("only the sender of a message can edit or delete it")]
    NotTheSender,
    /// A receipt by the identity that sent the message it names.
    #[error("a receipt must come from the message's recipient, not its sender")]
    ReceiptFromSender,
}

impl ChatError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::Malformed(_) => "malformed",
            ChatError::NotChat(_) => "not_chat",
            ChatError::EmptyText => "empty_text",
            ChatError::TextTooLong { .. } => "text_too_long",
            ChatError::NoIds => "no_ids",
            ChatError::TooManyIds { .. } => "too_many_ids",
            ChatError::DuplicateId(_) => "duplicate_id",
            ChatError::UnsortedIds => "unsorted_ids",
            ChatError::BadEmoji(_) => "bad_emoji",
            ChatError::BadDisplayName(_) => "bad_display_name",
            ChatError::BadAvatar(_) => "bad_avatar",
            ChatError::TimerTooLong { .. } => "timer_too_long",
            ChatError::NotInConversation => "not_in_conversation",
            ChatError::NotAMessage => "not_a_message",
            ChatError::NotEditable => "not_editable",
            ChatError::NotTheSender => "not_the_sender",
            ChatError::ReceiptFromSender => "receipt_from_sender",
        }
    }
}

/// What a receipt says about the messages it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// A device of the recipient stored them.
    Delivered,
    /// The recipient was shown them.
    Read,
}

/// `kez.receipt`: the sender's messages `ids` were delivered to, or read by, the recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The messages, 1 to [`MAX_RECEIPT_IDS`] (a set: written in ascending order).
    pub ids: BTreeSet<MessageId>,
}

/// `kez.edit`: the new text of the sender's earlier text or reply `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// The message edited.
    pub id: MessageId,
    /// Its new text, 1 to [`MAX_TEXT_BYTES`] bytes.
    pub text: String,
}

/// `kez.delete`: the sender's earlier text or reply `id` is deleted for everyone (advisory: a
/// receiver may have kept a copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delete {
    /// The message deleted.
    pub id: MessageId,
}

/// `kez.reaction`: the sender reacts to message `id` with `emoji`, or takes that reaction back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reaction {
    /// The message reacted to.
    pub id: MessageId,
    /// The reaction: 1 to [`MAX_EMOJI_BYTES`] bytes, no hidden character ([`is_hidden`]).
    pub emoji: String,
    /// `true`: the sender takes this reaction back.
    pub remove: bool,
}

/// `kez.reply`: a text message that quotes message `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// The message replied to.
    pub id: MessageId,
    /// The reply's text, 1 to [`MAX_TEXT_BYTES`] bytes.
    pub text: String,
}

/// `kez.typing`: the sender is typing in this conversation, or stopped (ephemeral: never stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Typing {
    /// Whether the sender is typing.
    pub typing: bool,
}

/// A person's availability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// Here.
    Online,
    /// Connected, not active.
    Away,
    /// Leaving.
    Offline,
}

/// `kez.presence`: the sender's availability (ephemeral: never stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Presence {
    /// Online, away or offline.
    pub state: PresenceState,
}

/// An avatar's image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageType {
    /// PNG.
    #[serde(rename = "image/png")]
    Png,
    /// JPEG.
    #[serde(rename = "image/jpeg")]
    Jpeg,
    /// WebP.
    #[serde(rename = "image/webp")]
    Webp,
}

impl ImageType {
    /// The media type (`image/png`, ...).
    pub fn media_type(self) -> &'static str {
        match self {
            ImageType::Png => "image/png",
            ImageType::Jpeg => "image/jpeg",
            ImageType::Webp => "image/webp",
        }
    }

    /// Whether `data` starts as an image of this type does: the PNG signature (8 bytes), the
    /// JPEG start of image and a marker (`FF D8 FF`), or `RIFF`, 4 bytes and `WEBP`.
    pub fn matches(self, data: &[u8]) -> bool {
        match self {
            ImageType::Png => data.starts_with(b"\x89PNG\r\n\x1a\n"),
            ImageType::Jpeg => data.starts_with(b"\xff\xd8\xff"),
            ImageType::Webp => data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP",
        }
    }
}

/// A profile's picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Avatar {
    /// Its format.
    pub image_type: ImageType,
    /// The image, 1 to [`MAX_AVATAR_BYTES`] bytes, starting as its type says
    /// ([`ImageType::matches`]). Decoding it is the client's, as for any image from a stranger.
    pub data: Vec<u8>,
}

/// `kez.profile`: the sender's display name and avatar. Sent to contacts; the sender's identity
/// is the envelope's, so a profile cannot be made to look like another identity's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// 1 to [`MAX_DISPLAY_NAME_CHARS`] characters, no hidden character ([`is_hidden`]), no
    /// whitespace at either end.
    pub display_name: String,
    /// The picture, if any.
    pub avatar: Option<Avatar>,
}

/// `kez.timer`: the conversation's disappearing-message timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timer {
    /// Messages disappear this long after their envelope time; 0: they do not.
    pub seconds: u32,
}

/// Any chat body, by content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatContent {
    /// `kez.receipt`.
    Receipt(Receipt),
    /// `kez.edit`.
    Edit(Edit),
    /// `kez.delete`.
    Delete(Delete),
    /// `kez.reaction`.
    Reaction(Reaction),
    /// `kez.reply`.
    Reply(Reply),
    /// `kez.typing`.
    Typing(Typing),
    /// `kez.presence`.
    Presence(Presence),
    /// `kez.profile`.
    Profile(Profile),
    /// `kez.timer`.
    Timer(Timer),
}

// The JSON forms of the types whose Rust form differs from their body.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptJson {
    kind: ReceiptKind,
    ids: Vec<MessageId>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AvatarJson {
    #[serde(rename = "type")]
    image_type: ImageType,
    data: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileJson {
    display_name: String,
    avatar: Option<AvatarJson>,
}

/// Whether `c` is a character a reaction or a display name must not hold: a control character
/// (Unicode Cc: U+0000–U+001F, U+007F–U+009F), a bidirectional formatting character (U+061C,
/// U+200E, U+200F, U+202A–U+202E, U+2066–U+2069), U+2028 or U+2029 (the characters §8.1 says
/// a client never outputs as themselves), white space (Unicode White_Space), or an invisible
/// U+200B ZERO WIDTH SPACE, U+2060 WORD JOINER or U+FEFF BYTE ORDER MARK. U+200D ZERO WIDTH
/// JOINER and the variation selectors are allowed: emoji sequences need them.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{200b}'
                | '\u{2060}'
                | '\u{feff}'
        )
}

fn check_text(text: &str) -> Result<(), ChatError> {
    if text.is_empty() {
        return Err(ChatError::EmptyText);
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(ChatError::TextTooLong { len: text.len() });
    }
    Ok(())
}

fn check_emoji(emoji: &str) -> Result<(), ChatError> {
    if emoji.is_empty() {
        return Err(ChatError::BadEmoji("empty"));
    }
    if emoji.len() > MAX_EMOJI_BYTES {
        return Err(ChatError::BadEmoji("longer than 32 bytes"));
    }
    if emoji.chars().any(is_hidden) {
        return Err(ChatError::BadEmoji(
            "holds a control, bidirectional, invisible or white space character",
        ));
    }
    Ok(())
}

fn check_display_name(name: &str) -> Result<(), ChatError> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(ChatError::BadDisplayName("empty"));
    }
    if chars > MAX_DISPLAY_NAME_CHARS {
        return Err(ChatError::BadDisplayName("longer than 64 characters"));
    }
    // Spaces inside a name are fine; at its ends they only help imitate another name.
    let hidden_inside = |c: char| c != ' ' && is_hidden(c);
    if name.chars().any(hidden_inside) {
        return Err(ChatError::BadDisplayName(
            "holds a control, bidirectional, invisible, line break or white space character other than a space",
        ));
    }
    if name.starts_with(' ') || name.ends_with(' ') {
        return Err(ChatError::BadDisplayName("starts or ends with a space"));
    }
    Ok(())
}

fn check_avatar(avatar: &Avatar) -> Result<(), ChatError> {
    if avatar.data.is_empty() {
        return Err(ChatError::BadAvatar("empty"));
    }
    if avatar.data.len() > MAX_AVATAR_BYTES {
        return Err(ChatError::BadAvatar("larger than 48000 bytes"));
    }
    if !avatar.image_type.matches(&avatar.data) {
        return Err(ChatError::BadAvatar("the data is not an image of its type"));
    }
    Ok(())
}

fn check_ids(ids: &[MessageId]) -> Result<(), ChatError> {
    if ids.is_empty() {
        return Err(ChatError::NoIds);
    }
    if ids.len() > MAX_RECEIPT_IDS {
        return Err(ChatError::TooManyIds { count: ids.len() });
    }
    for pair in ids.windows(2) {
        if pair[0] == pair[1] {
            return Err(ChatError::DuplicateId(pair[0]));
        }
        if pair[0] > pair[1] {
            return Err(ChatError::UnsortedIds);
        }
    }
    Ok(())
}

fn to_canonical<T: Serialize>(json: &T) -> Vec<u8> {
    canonical::encode(&serde_json::to_value(json).expect("a chat body serialises"))
        .expect("a chat body holds no number beyond 2^53-1")
}

/// Parses `bytes` as the canonical JSON of `T` (exactly its members): the first half of every
/// decode. The caller checks the values, then [`one_form`].
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ChatError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(ChatError::Malformed(format!(
            "{} bytes; no envelope carries more than {MAX_ENVELOPE_BYTES}",
            bytes.len()
        )));
    }
    let value = canonical::decode(bytes).map_err(|err| ChatError::Malformed(err.to_string()))?;
    if !value.is_object() {
        return Err(ChatError::Malformed("the body is not a JSON object".into()));
    }
    serde_json::from_value(value).map_err(|err| ChatError::Malformed(err.to_string()))
}

/// Requires `bytes` to be `encoded`, the body's one form: a member left out that has a default
/// (`"avatar"` without `null`) is refused here.
fn one_form(bytes: &[u8], encoded: &[u8]) -> Result<(), ChatError> {
    if bytes != encoded {
        return Err(ChatError::Malformed(
            "not the body's one canonical form (a member is missing)".into(),
        ));
    }
    Ok(())
}

macro_rules! plain_body {
    ($type:ty, $content_type:expr, |$value:ident| $check:expr) => {
        impl $type {
            /// This body's content type.
            pub const CONTENT_TYPE: &'static str = $content_type;

            /// Checks the rules of PROTOCOL.md §8.6 for this body.
            pub fn validate(&self) -> Result<(), ChatError> {
                let $value = self;
                $check
            }

            /// The body's bytes (canonical JSON), after [`Self::validate`].
            pub fn encode(&self) -> Result<Vec<u8>, ChatError> {
                self.validate()?;
                Ok(to_canonical(self))
            }

            /// Reads a body: canonical JSON with exactly this type's members, valid, in its one
            /// form.
            pub fn decode(bytes: &[u8]) -> Result<Self, ChatError> {
                let body: Self = parse(bytes)?;
                body.validate()?;
                one_form(bytes, &to_canonical(&body))?;
                Ok(body)
            }
        }
    };
}

plain_body!(Edit, EDIT_CONTENT_TYPE, |edit| check_text(&edit.text));
plain_body!(Delete, DELETE_CONTENT_TYPE, |_delete| Ok(()));
plain_body!(Reaction, REACTION_CONTENT_TYPE, |reaction| check_emoji(
    &reaction.emoji
));
plain_body!(Reply, REPLY_CONTENT_TYPE, |reply| check_text(&reply.text));
plain_body!(Typing, TYPING_CONTENT_TYPE, |_typing| Ok(()));
plain_body!(Presence, PRESENCE_CONTENT_TYPE, |_presence| Ok(()));
plain_body!(Timer, TIMER_CONTENT_TYPE, |timer| {
    if timer.seconds > MAX_TIMER_SECONDS {
        return Err(ChatError::TimerTooLong {
            seconds: u64::from(timer.seconds),
        });
    }
    Ok(())
});

impl Receipt {
    /// This body's content type.
    pub const CONTENT_TYPE: &'static str = RECEIPT_CONTENT_TYPE;

    /// Checks the rules of PROTOCOL.md §8.6: 1 to [`MAX_RECEIPT_IDS`] ids.
    pub fn validate(&self) -> Result<(), ChatError> {
        check_ids(&self.ids.iter().copied().collect::<Vec<_>>())
    }

    fn json(&self) -> ReceiptJson {
        ReceiptJson {
            kind: self.kind,
            ids: self.ids.iter().copied().collect(),
        }
    }

    /// The body's bytes (canonical JSON, ids ascending), after [`Self::validate`].
    pub fn encode(&self) -> Result<Vec<u8>, ChatError> {
        self.validate()?;
        Ok(to_canonical(&self.json()))
    }

    /// Reads a body: 1 to [`MAX_RECEIPT_IDS`] ids, strictly ascending.
    pub fn decode(bytes: &[u8]) -> Result<Self, ChatError> {
        // The whole array is parsed before it is counted: the envelope's size (65,536 bytes,
        // about 1,900 ids) bounds that work.
        let json: ReceiptJson = parse(bytes)?;
        check_ids(&json.ids)?;
        let receipt = Receipt {
            kind: json.kind,
            ids: json.ids.into_iter().collect(),
        };
        one_form(bytes, &to_canonical(&receipt.json()))?;
        Ok(receipt)
    }
}

/// `kez.resend`: the messages `ids` reached the asking device but did not decrypt; the
/// sending device is asked to seal them again for it, over the newest session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resend {
    /// The messages, 1 to [`MAX_RESEND_IDS`] (a set: written in ascending order).
    pub ids: BTreeSet<MessageId>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResendJson {
    ids: Vec<MessageId>,
}

impl Resend {
    /// This body's content type.
    pub const CONTENT_TYPE: &'static str = RESEND_CONTENT_TYPE;

    fn check(ids: &[MessageId]) -> Result<(), ChatError> {
        if ids.len() > MAX_RESEND_IDS {
            return Err(ChatError::Malformed(format!(
                "a resend request names {} messages; the limit is {MAX_RESEND_IDS}",
                ids.len()
            )));
        }
        check_ids(ids)
    }

    /// The body's bytes (canonical JSON, ids ascending).
    pub fn encode(&self) -> Result<Vec<u8>, ChatError> {
        let ids: Vec<MessageId> = self.ids.iter().copied().collect();
        Self::check(&ids)?;
        Ok(to_canonical(&ResendJson { ids }))
    }

    /// Reads a body: 1 to [`MAX_RESEND_IDS`] ids, strictly ascending.
    pub fn decode(bytes: &[u8]) -> Result<Self, ChatError> {
        let json: ResendJson = parse(bytes)?;
        Self::check(&json.ids)?;
        one_form(bytes, &to_canonical(&json))?;
        Ok(Resend {
            ids: json.ids.into_iter().collect(),
        })
    }
}

impl Profile {
    /// This body's content type.
    pub const CONTENT_TYPE: &'static str = PROFILE_CONTENT_TYPE;

    /// Checks the rules of PROTOCOL.md §8.6 for the display name and the avatar.
    pub fn validate(&self) -> Result<(), ChatError> {
        check_display_name(&self.display_name)?;
        if let Some(avatar) = &self.avatar {
            check_avatar(avatar)?;
        }
        Ok(())
    }

    fn json(&self) -> ProfileJson {
        ProfileJson {
            display_name: self.display_name.clone(),
            avatar: self.avatar.as_ref().map(|avatar| AvatarJson {
                image_type: avatar.image_type,
                data: BASE64.encode(&avatar.data),
            }),
        }
    }

    /// The body's bytes (canonical JSON, the avatar in padded standard base64), after
    /// [`Self::validate`].
    pub fn encode(&self) -> Result<Vec<u8>, ChatError> {
        self.validate()?;
        Ok(to_canonical(&self.json()))
    }

    /// Reads a body: a valid display name, and `null` or a valid avatar whose data is padded
    /// standard base64 (RFC 4648 §4) in its one form.
    pub fn decode(bytes: &[u8]) -> Result<Self, ChatError> {
        let json: ProfileJson = parse(bytes)?;
        check_display_name(&json.display_name)?;
        let avatar = match json.avatar {
            None => None,
            Some(avatar) => {
                // Checked before decoding, so no more than the limit is ever decoded.
                if avatar.data.len() > BASE64.encode_len(MAX_AVATAR_BYTES) {
                    return Err(ChatError::BadAvatar("larger than 48000 bytes"));
                }
                let data = BASE64
                    .decode(avatar.data.as_bytes())
                    .map_err(|_| ChatError::BadAvatar("the data is not padded standard base64"))?;
                Some(Avatar {
                    image_type: avatar.image_type,
                    data,
                })
            }
        };
        let profile = Profile {
            display_name: json.display_name,
            avatar,
        };
        profile.validate()?;
        one_form(bytes, &to_canonical(&profile.json()))?;
        Ok(profile)
    }
}

impl ChatContent {
    /// The content type of this body.
    pub fn content_type(&self) -> &'static str {
        match self {
            ChatContent::Receipt(_) => RECEIPT_CONTENT_TYPE,
            ChatContent::Edit(_) => EDIT_CONTENT_TYPE,
            ChatContent::Delete(_) => DELETE_CONTENT_TYPE,
            ChatContent::Reaction(_) => REACTION_CONTENT_TYPE,
            ChatContent::Reply(_) => REPLY_CONTENT_TYPE,
            ChatContent::Typing(_) => TYPING_CONTENT_TYPE,
            ChatContent::Presence(_) => PRESENCE_CONTENT_TYPE,
            ChatContent::Profile(_) => PROFILE_CONTENT_TYPE,
            ChatContent::Timer(_) => TIMER_CONTENT_TYPE,
        }
    }

    /// The body's bytes, after checking its rules.
    pub fn encode(&self) -> Result<Vec<u8>, ChatError> {
        match self {
            ChatContent::Receipt(body) => body.encode(),
            ChatContent::Edit(body) => body.encode(),
            ChatContent::Delete(body) => body.encode(),
            ChatContent::Reaction(body) => body.encode(),
            ChatContent::Reply(body) => body.encode(),
            ChatContent::Typing(body) => body.encode(),
            ChatContent::Presence(body) => body.encode(),
            ChatContent::Profile(body) => body.encode(),
            ChatContent::Timer(body) => body.encode(),
        }
    }

    /// Reads the body of a message of `content_type`; [`ChatError::NotChat`] for a content
    /// type not in [`CONTENT_TYPES`].
    pub fn decode(content_type: &str, body: &[u8]) -> Result<ChatContent, ChatError> {
        Ok(match content_type {
            RECEIPT_CONTENT_TYPE => ChatContent::Receipt(Receipt::decode(body)?),
            EDIT_CONTENT_TYPE => ChatContent::Edit(Edit::decode(body)?),
            DELETE_CONTENT_TYPE => ChatContent::Delete(Delete::decode(body)?),
            REACTION_CONTENT_TYPE => ChatContent::Reaction(Reaction::decode(body)?),
            REPLY_CONTENT_TYPE => ChatContent::Reply(Reply::decode(body)?),
            TYPING_CONTENT_TYPE => ChatContent::Typing(Typing::decode(body)?),
            PRESENCE_CONTENT_TYPE => ChatContent::Presence(Presence::decode(body)?),
            PROFILE_CONTENT_TYPE => ChatContent::Profile(Profile::decode(body)?),
            TIMER_CONTENT_TYPE => ChatContent::Timer(Timer::decode(body)?),
            other => return Err(ChatError::NotChat(other.to_owned())),
        })
    }

    /// Whether messages of this kind are ephemeral: sent over core NATS, never stored
    /// (`kez.typing`, `kez.presence`).
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, ChatContent::Typing(_) | ChatContent::Presence(_))
    }

    /// The change this body makes to earlier messages, with the messages it names: `None` for
    /// typing, presence, profile and timer, which name none.
    pub fn change(&self) -> Option<(ChangeKind, Vec<MessageId>)> {
        match self {
            ChatContent::Receipt(receipt) => Some((
                ChangeKind::Receipt(receipt.kind),
                receipt.ids.iter().copied().collect(),
            )),
            ChatContent::Edit(edit) => Some((ChangeKind::Edit, vec![edit.id])),
            ChatContent::Delete(delete) => Some((ChangeKind::Delete, vec![delete.id])),
            ChatContent::Reaction(reaction) => Some((ChangeKind::Reaction, vec![reaction.id])),
            ChatContent::Reply(reply) => Some((ChangeKind::Reply, vec![reply.id])),
            ChatContent::Typing(_)
            | ChatContent::Presence(_)
            | ChatContent::Profile(_)
            | ChatContent::Timer(_) => None,
        }
    }
}

/// What a message does to the earlier message it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// `kez.edit`.
    Edit,
    /// `kez.delete`.
    Delete,
    /// `kez.reaction`.
    Reaction,
    /// `kez.reply` (it changes nothing; it quotes).
    Reply,
    /// `kez.receipt` of this kind.
    Receipt(ReceiptKind),
}

/// Whether a message of `content_type` is one a person sees in a conversation, which can be
/// reacted or replied to: `text`, `file-offer`, `kez.reply`, and every content type this
/// version does not know (shown as "a message this version cannot show"). Not: the chat
/// types that change or describe other messages or the conversation (`kez.receipt`,
/// `kez.edit`, `kez.delete`, `kez.reaction`, `kez.typing`, `kez.presence`, `kez.profile`,
/// `kez.timer`), a resend request (`kez.resend`), a manifest entry's wrap (`kez.file-key`), a
/// sent copy (`kez.sent`, stored as the message it copies) or a pairing sync (`kez-pair-sync`).
pub fn is_message(content_type: &str) -> bool {
    content_type == REPLY_CONTENT_TYPE
        || !(CONTENT_TYPES.contains(&content_type)
            || content_type == RESEND_CONTENT_TYPE
            || content_type == crate::manifest::FILE_KEY_CONTENT_TYPE
            || content_type == crate::copy::SENT_COPY_CONTENT_TYPE
            || content_type == crate::pair::SYNC_CONTENT_TYPE)
}

/// Whether a message of `content_type` may be edited or deleted (by its sender): `text` and
/// `kez.reply`.
pub fn is_editable(content_type: &str) -> bool {
    content_type == "text" || content_type == REPLY_CONTENT_TYPE
}

/// Whether a change may apply to the message it names (PROTOCOL.md §8.6): the target was sent
/// by the identity `target_sender`, is of `target_content_type` and is in the conversation the
/// change came in (`same_conversation`, which the caller knows); the change was sent by the
/// identity `change_sender` (the identity whose verified chain lists the envelope's device,
/// never a device key compared on its own). In this order:
///
/// 1. the target is in the same conversation — else [`ChatError::NotInConversation`];
/// 2. the target is a message a person sees ([`is_message`]) — else [`ChatError::NotAMessage`];
/// 3. an edit or a deletion: the target is a text or a reply ([`is_editable`]) — else
///    [`ChatError::NotEditable`]; and it comes from the target's sender (any of its
///    devices) — else [`ChatError::NotTheSender`];
/// 4. a receipt: it comes from another identity than the target's sender (in a conversation of
///    two, the target's recipient: the peer about an own message, or another own device about
///    the peer's message, which is how read state reaches the own devices) — else
///    [`ChatError::ReceiptFromSender`];
/// 5. a reaction or a reply: anyone in the conversation.
pub fn may_change(
    target_sender: &PublicKey,
    target_content_type: &str,
    same_conversation: bool,
    change_sender: &PublicKey,
    change: ChangeKind,
) -> Result<(), ChatError> {
    if !same_conversation {
        return Err(ChatError::NotInConversation);
    }
    if !is_message(target_content_type) {
        return Err(ChatError::NotAMessage);
    }
    match change {
        ChangeKind::Edit | ChangeKind::Delete => {
            if !is_editable(target_content_type) {
                return Err(ChatError::NotEditable);
            }
            if change_sender != target_sender {
                return Err(ChatError::NotTheSender);
            }
            Ok(())
        }
        ChangeKind::Receipt(_) => {
            if change_sender == target_sender {
                return Err(ChatError::ReceiptFromSender);
            }
            Ok(())
        }
        ChangeKind::Reaction | ChangeKind::Reply => Ok(()),
    }
}

/// When a message sent at `time` (its envelope time, seconds since the epoch) under `timer`
/// disappears: `time + timer.seconds`, or `None` when the timer is off (0). Saturates at
/// `u64::MAX` rather than wrapping to the past.
pub fn expires_at(time: u64, timer: Timer) -> Option<u64> {
    match timer.seconds {
        0 => None,
        seconds => Some(time.saturating_add(u64::from(seconds))),
    }
}

/// Whether a timer set by a message at (`time`, `id`) replaces the one set at (`current_time`,
/// `current_id`): the later envelope time wins, and of two at the same time the larger id, so
/// every device settles on the same timer whatever order they arrive in.
pub fn timer_replaces(time: u64, id: MessageId, current_time: u64, current_id: MessageId) -> bool {
    (time, id) > (current_time, current_id)
}

/// The timer in force at `time` in a conversation whose `kez.timer` messages are `timers`
/// (envelope time, id, timer; in any order): of those sent at or before `time`, the one that
/// [replaces](timer_replaces) the others; off (0) when there is none. A message sent at `time`
/// expires at [`expires_at`]`(time, timer_in_force(timers, time))`.
pub fn timer_in_force(timers: &[(u64, MessageId, Timer)], time: u64) -> Timer {
    timers
        .iter()
        .filter(|(set, _, _)| *set <= time)
        .max_by_key(|(set, id, _)| (*set, *id))
        .map_or(Timer { seconds: 0 }, |(_, _, timer)| *timer)
}

#[cfg(test)]
mod tests;
