//! KEZ handles: `@name@domain`, unique per home server.
//!
//! A handle names a user (`name`) on a home server (`domain`). People may type it four ways;
//! the bare forms mean "on my home server" and take the caller's default domain:
//!
//! | typed            | means                       |
//! |------------------|-----------------------------|
//! | `@name@domain`   | full form                   |
//! | `name@domain`    | full form without the `@`   |
//! | `@name`          | `@name@<default domain>`    |
//! | `name`           | `@name@<default domain>`    |
//!
//! # Rules
//!
//! 1. The whole handle is ASCII. Any other character (a Cyrillic `а` U+0430 that looks like `a`,
//!    fullwidth letters, zero-width characters, non-breaking spaces) is refused, never mapped to
//!    a look-alike: two handles that look the same must be the same handle. An international
//!    domain is written in its punycode `xn--` form.
//! 2. Normalisation is ASCII lowercasing of name and domain, and nothing else.
//! 3. No whitespace anywhere, not even leading or trailing.
//! 4. `@` appears only as the optional first character and as the separator before the domain;
//!    the name and the domain are never empty.
//! 5. The name is 2 to 32 characters of `a-z`, `0-9` and `_`, and starts with a letter `a-z`.
//! 6. The name is not one of [`RESERVED_NAMES`] (they would let a user pass as the server or
//!    its operators).
//! 7. The domain is a DNS name: at most 253 characters, one or more labels separated by `.`,
//!    each label 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`.
//!    A single label (`localhost`) is allowed for development. No port, no trailing dot.
//!
//! The canonical text of a handle is its full form `@name@domain`; it is what [`fmt::Display`],
//! [`FromStr`] and serde use. Showing `@name` alone is for people only ([`Handle::display_for`]).

use std::fmt;
use std::str::FromStr;

/// Fewest characters in a name.
pub const NAME_MIN_LEN: usize = 2;
/// Most characters in a name.
pub const NAME_MAX_LEN: usize = 32;
/// Most characters in a domain.
pub const DOMAIN_MAX_LEN: usize = 253;
/// Most characters in one label (the part between dots) of a domain.
pub const DOMAIN_LABEL_MAX_LEN: usize = 63;

/// Names no user may register: they would let someone pass as the server, its operators or
/// a system address.
pub const RESERVED_NAMES: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "support",
    "postmaster",
    "hostmaster",
    "webmaster",
    "abuse",
    "security",
    "system",
    "kez",
    "server",
    "registry",
    "sigchain",
    "help",
    "info",
    "noreply",
    "nats",
    "operator",
    "staff",
    "moderator",
];

/// Why text is not a valid handle. Positions count characters of the text as given, from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// Nothing was given.
    #[error("the handle is empty: write it as `@name@domain`, or `@name` on your home server")]
    Empty,
    /// A space, tab or line break is somewhere in the text (often a paste accident).
    #[error(
        "a handle contains no spaces or line breaks: remove the whitespace at character {position}"
    )]
    Whitespace {
        /// Where the first whitespace character is.
        position: usize,
    },
    /// More `@` than the form allows, or an `@` in the wrong place.
    #[error(
        "too many `@`: write the handle as `@name@domain`, with `@` only before the name and before the domain"
    )]
    TooManyAt,
    /// The name part is empty (for example `@` or `@@kez.lat`).
    #[error("the name is missing: write `@name@domain`, or `@name` on your home server")]
    EmptyName,
    /// The domain part after the second `@` is empty (for example `@alice@`).
    #[error(
        "the domain after the last `@` is missing: write `@name@domain`, or just `@name` on your home server"
    )]
    EmptyDomain,
    /// The full form `@name@domain` was required but a bare or `@`-less form was given.
    #[error("expected a full handle `@name@domain` (with the leading `@` and the domain)")]
    NotFullForm,
    /// A non-ASCII character in the name.
    #[error(
        "handles are ASCII only: {ch:?} ({}) at character {position} is not ASCII; type the name with a-z, 0-9 and _",
        code_point(.ch)
    )]
    NonAscii {
        /// The offending character.
        ch: char,
        /// Where it is.
        position: usize,
    },
    /// A non-ASCII character in the domain.
    #[error(
        "handles are ASCII only: {ch:?} ({}) at character {position} of the domain is not ASCII; write an international domain in its punycode `xn--` form",
        code_point(.ch)
    )]
    NonAsciiDomain {
        /// The offending character.
        ch: char,
        /// Where it is.
        position: usize,
    },
    /// An ASCII character that names may not contain.
    #[error(
        "{ch:?} at character {position} cannot be in a name: use 2 to 32 of a-z, 0-9 and _, starting with a letter"
    )]
    BadCharacter {
        /// The offending character.
        ch: char,
        /// Where it is.
        position: usize,
    },
    /// The name starts with a digit or `_`.
    #[error("a name starts with a letter a-z, not {ch:?}")]
    MustStartWithLetter {
        /// The first character of the name.
        ch: char,
    },
    /// The name is shorter than [`NAME_MIN_LEN`].
    #[error("the name has {len} character, at least 2 are needed: use 2 to 32 of a-z, 0-9 and _")]
    TooShort {
        /// Characters in the name.
        len: usize,
    },
    /// The name is longer than [`NAME_MAX_LEN`].
    #[error("the name has {len} characters, at most 32 are allowed: use 2 to 32 of a-z, 0-9 and _")]
    TooLong {
        /// Characters in the name.
        len: usize,
    },
    /// The name is in [`RESERVED_NAMES`].
    #[error("`{name}` is reserved for the server and its operators: choose another name")]
    Reserved {
        /// The reserved name (lowercased).
        name: String,
    },
    /// The domain is not a DNS name under the rules above.
    #[error("not a usable domain: {reason}")]
    BadDomain {
        /// What is wrong and how to fix it (never echoes more than one label of the input).
        reason: String,
    },
}

impl HandleError {
    /// A stable snake_case name for this failure, for logs, wire errors and tests.
    pub fn code(&self) -> &'static str {
        match self {
            HandleError::Empty => "empty",
            HandleError::Whitespace { .. } => "whitespace",
            HandleError::TooManyAt => "too_many_at",
            HandleError::EmptyName => "empty_name",
            HandleError::EmptyDomain => "empty_domain",
            HandleError::NotFullForm => "not_full_form",
            HandleError::NonAscii { .. } => "non_ascii",
            HandleError::NonAsciiDomain { .. } => "non_ascii_domain",
            HandleError::BadCharacter { .. } => "bad_character",
            HandleError::MustStartWithLetter { .. } => "must_start_with_letter",
            HandleError::TooShort { .. } => "too_short",
            HandleError::TooLong { .. } => "too_long",
            HandleError::Reserved { .. } => "reserved",
            HandleError::BadDomain { .. } => "bad_domain",
        }
    }
}

/// `U+0430`-style code point, so invisible and look-alike characters can be identified.
fn code_point(ch: &char) -> String {
    format!("U+{:04X}", u32::from(*ch))
}

/// A valid, normalised (lowercase) handle. Text form: `@name@domain`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    name: String,
    domain: String,
}

impl Handle {
    /// Parses any of the four typed forms (see the module doc); the bare forms `@name` and `name`
    /// take `default_domain`, which is checked by the same domain rules.
    pub fn parse(input: &str, default_domain: &str) -> Result<Handle, HandleError> {
        parse(input, Some(default_domain))
    }

    /// The name, lowercase, without `@`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The home server's domain, lowercase.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// What to show a person: `@name` when the handle lives on `default_domain`, else the full
    /// form, so a user on another server is always recognisable as such.
    pub fn display_for(&self, default_domain: &str) -> String {
        if self.domain.eq_ignore_ascii_case(default_domain) {
            format!("@{}", self.name)
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}@{}", self.name, self.domain)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({self})")
    }
}

impl FromStr for Handle {
    type Err = HandleError;

    /// The full form `@name@domain` only: stored and transmitted handles never depend on
    /// whose default domain is in effect. Uppercase is still accepted and lowercased.
    fn from_str(text: &str) -> Result<Handle, HandleError> {
        parse(text, None)
    }
}

serde_as_text!(Handle);

/// `default_domain: None` means only the full form `@name@domain` is accepted.
fn parse(input: &str, default_domain: Option<&str>) -> Result<Handle, HandleError> {
    if input.is_empty() {
        return Err(HandleError::Empty);
    }
    // Whitespace gets its own error: a stray space or newline from a paste is the usual cause,
    // and "bad character ' '" would hide that.
    if let Some(position) = input
        .chars()
        .position(|ch| ch.is_ascii() && ch.is_whitespace())
    {
        return Err(HandleError::Whitespace {
            position: position + 1,
        });
    }

    // Structure first, by `@` alone (ASCII, so splitting is safe on any text): an optional
    // leading `@`, then `name` or `name@domain`.
    let leading_at = input.starts_with('@');
    let body = if leading_at { &input[1..] } else { input };
    let mut parts = body.split('@');
    let raw_name = parts.next().unwrap_or_default();
    let raw_domain = parts.next();
    if parts.next().is_some() {
        return Err(HandleError::TooManyAt);
    }
    if default_domain.is_none() && (!leading_at || raw_domain.is_none()) {
        return Err(HandleError::NotFullForm);
    }

    let name_start = usize::from(leading_at);
    let name = check_name(raw_name, name_start)?;
    let domain = match raw_domain {
        Some(raw) => check_domain(raw, name_start + raw_name.chars().count() + 1)?,
        // A bad default domain is a configuration mistake; it gets the same domain errors,
        // with positions counted within the default domain.
        None => check_domain(default_domain.unwrap_or_default(), 0)?,
    };
    Ok(Handle { name, domain })
}

/// The first non-ASCII character of `part` and its 1-based position in the whole input,
/// given that `part` starts `offset` characters in.
fn first_non_ascii(part: &str, offset: usize) -> Option<(char, usize)> {
    part.chars()
        .enumerate()
        .find(|(_, ch)| !ch.is_ascii())
        .map(|(i, ch)| (ch, offset + i + 1))
}

fn check_name(raw: &str, offset: usize) -> Result<String, HandleError> {
    if raw.is_empty() {
        return Err(HandleError::EmptyName);
    }
    if let Some((ch, position)) = first_non_ascii(raw, offset) {
        return Err(HandleError::NonAscii { ch, position });
    }
    // From here on the name is ASCII: bytes and characters coincide.
    let name = raw.to_ascii_lowercase();
    if let Some((i, ch)) = name
        .char_indices()
        .find(|&(_, ch)| !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'))
    {
        return Err(HandleError::BadCharacter {
            ch,
            position: offset + i + 1,
        });
    }
    let first = name.as_bytes()[0];
    if !first.is_ascii_lowercase() {
        return Err(HandleError::MustStartWithLetter {
            ch: char::from(first),
        });
    }
    if name.len() < NAME_MIN_LEN {
        return Err(HandleError::TooShort { len: name.len() });
    }
    if name.len() > NAME_MAX_LEN {
        return Err(HandleError::TooLong { len: name.len() });
    }
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(HandleError::Reserved { name });
    }
    Ok(name)
}

/// Checks and normalises a domain on its own (rule 7), e.g. a server's configured domain.
pub fn parse_domain(raw: &str) -> Result<String, HandleError> {
    check_domain(raw, 0)
}

fn check_domain(raw: &str, offset: usize) -> Result<String, HandleError> {
    if raw.is_empty() {
        return Err(HandleError::EmptyDomain);
    }
    if let Some((ch, position)) = first_non_ascii(raw, offset) {
        return Err(HandleError::NonAsciiDomain { ch, position });
    }
    let domain = raw.to_ascii_lowercase();
    let bad = |reason: String| Err(HandleError::BadDomain { reason });
    // Specific messages for the two likely mistakes, before the generic character rule.
    if domain.contains(':') {
        return bad(
            "it has a port; remove the `:` and what follows (a handle names only the domain)"
                .into(),
        );
    }
    if domain.ends_with('.') {
        return bad("it ends with `.`; remove the trailing dot".into());
    }
    if domain.len() > DOMAIN_MAX_LEN {
        return bad(format!(
            "it has {} characters, at most {DOMAIN_MAX_LEN} are allowed",
            domain.len()
        ));
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return bad(
                "it has an empty label (`..`, or a `.` at the start); remove the extra dot".into(),
            );
        }
        if label.len() > DOMAIN_LABEL_MAX_LEN {
            return bad(format!(
                "a label (the part between dots) has {} characters, at most {DOMAIN_LABEL_MAX_LEN} are allowed",
                label.len()
            ));
        }
        if let Some(ch) = label
            .chars()
            .find(|&ch| !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'))
        {
            return bad(format!(
                "{ch:?} cannot be in a domain; labels use a-z, 0-9 and - only"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad(format!("the label `{label}` starts or ends with `-`"));
        }
    }
    Ok(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: &str = "kez.lat";

    fn err(input: &str) -> HandleError {
        Handle::parse(input, HOME).unwrap_err()
    }

    #[test]
    fn four_forms_and_normalisation() {
        for input in ["@alice@kez.lat", "alice@kez.lat", "@alice", "alice"] {
            let handle = Handle::parse(input, HOME).unwrap();
            assert_eq!((handle.name(), handle.domain()), ("alice", "kez.lat"));
        }
        let handle = Handle::parse("@Alice@KEZ.lat", HOME).unwrap();
        assert_eq!((handle.name(), handle.domain()), ("alice", "kez.lat"));
        // The default domain is normalised too.
        let handle = Handle::parse("@ALICE", "Kez.LAT").unwrap();
        assert_eq!(handle.to_string(), "@alice@kez.lat");
        let handle = Handle::parse("bob_2@localhost", HOME).unwrap();
        assert_eq!(handle.to_string(), "@bob_2@localhost");
    }

    #[test]
    fn display_is_bare_only_on_the_default_domain() {
        let home = Handle::parse("@alice", HOME).unwrap();
        let away = Handle::parse("@chris@chris.com", HOME).unwrap();
        assert_eq!(home.to_string(), "@alice@kez.lat");
        assert_eq!(home.display_for(HOME), "@alice");
        assert_eq!(home.display_for("KEZ.LAT"), "@alice");
        assert_eq!(away.display_for(HOME), "@chris@chris.com");
        assert_eq!(format!("{home:?}"), "Handle(@alice@kez.lat)");
    }

    #[test]
    fn from_str_wants_the_full_form() {
        let handle: Handle = "@Alice@kez.lat".parse().unwrap();
        assert_eq!(handle.to_string(), "@alice@kez.lat");
        for input in ["alice@kez.lat", "@alice", "alice"] {
            assert_eq!(
                input.parse::<Handle>(),
                Err(HandleError::NotFullForm),
                "{input}"
            );
        }
        assert_eq!("".parse::<Handle>(), Err(HandleError::Empty));
    }

    #[test]
    fn serde_uses_the_full_form() {
        let handle = Handle::parse("@alice", HOME).unwrap();
        let json = serde_json::to_string(&handle).unwrap();
        assert_eq!(json, "\"@alice@kez.lat\"");
        assert_eq!(serde_json::from_str::<Handle>(&json).unwrap(), handle);
        assert!(serde_json::from_str::<Handle>("\"@alice\"").is_err());
        assert!(serde_json::from_str::<Handle>("\"@admin@kez.lat\"").is_err());
    }

    #[test]
    fn structure_errors() {
        assert_eq!(err(""), HandleError::Empty);
        assert_eq!(err(" @alice"), HandleError::Whitespace { position: 1 });
        assert_eq!(err("@alice\n"), HandleError::Whitespace { position: 7 });
        assert_eq!(
            err("@al ice@kez.lat"),
            HandleError::Whitespace { position: 4 }
        );
        assert_eq!(err("@alice@kez.lat@x"), HandleError::TooManyAt);
        assert_eq!(err("alice@kez@lat"), HandleError::TooManyAt);
        assert_eq!(err("@"), HandleError::EmptyName);
        assert_eq!(err("@@kez.lat"), HandleError::EmptyName);
        assert_eq!(err("@alice@"), HandleError::EmptyDomain);
        assert_eq!(err("alice@"), HandleError::EmptyDomain);
    }

    #[test]
    fn non_ascii_is_named_with_its_code_point() {
        // Cyrillic `а` looks exactly like Latin `a`.
        let e = err("@\u{430}lice@kez.lat");
        assert_eq!(
            e,
            HandleError::NonAscii {
                ch: '\u{430}',
                position: 2
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("U+0430") && text.contains("ASCII only"),
            "{text}"
        );

        // Fullwidth `ａ`, and a zero-width space hidden inside the name.
        assert_eq!(err("ａlice").code(), "non_ascii");
        let e = err("ali\u{200B}ce");
        assert_eq!(
            e,
            HandleError::NonAscii {
                ch: '\u{200B}',
                position: 4
            }
        );
        assert!(e.to_string().contains("U+200B"));
        // A non-breaking space is non-ASCII rather than whitespace: the code point identifies it.
        assert_eq!(err("@alice\u{A0}").code(), "non_ascii");

        let e = err("@alice@k\u{e9}z.lat");
        assert_eq!(
            e,
            HandleError::NonAsciiDomain {
                ch: 'é',
                position: 9
            }
        );
        let text = e.to_string();
        assert!(text.contains("U+00E9") && text.contains("xn--"), "{text}");
    }

    #[test]
    fn name_rules() {
        assert_eq!(
            err("@al.ice"),
            HandleError::BadCharacter {
                ch: '.',
                position: 4
            }
        );
        assert_eq!(err("al-ice").code(), "bad_character");
        assert!(
            err("al-ice")
                .to_string()
                .contains("use 2 to 32 of a-z, 0-9 and _")
        );
        assert_eq!(err("@1alice"), HandleError::MustStartWithLetter { ch: '1' });
        assert_eq!(err("_alice"), HandleError::MustStartWithLetter { ch: '_' });
        assert_eq!(err("@a"), HandleError::TooShort { len: 1 });
        assert!(Handle::parse("ab", HOME).is_ok());
        let longest = format!("a{}", "b".repeat(31));
        assert!(Handle::parse(&longest, HOME).is_ok());
        assert_eq!(
            err(&format!("{longest}c")),
            HandleError::TooLong { len: 33 }
        );
        assert_eq!(
            err("@Admin@kez.lat"),
            HandleError::Reserved {
                name: "admin".into()
            }
        );
        for name in RESERVED_NAMES {
            assert_eq!(err(name).code(), "reserved", "{name}");
        }
    }

    #[test]
    fn domain_rules() {
        let reason = |input: &str| match err(input) {
            HandleError::BadDomain { reason } => reason,
            other => panic!("{input}: expected BadDomain, got {other:?}"),
        };
        assert!(reason("@alice@kez.lat:4222").contains("port"));
        assert!(reason("@alice@kez.lat.").contains("trailing dot"));
        assert!(reason("@alice@kez..lat").contains("empty label"));
        assert!(reason("@alice@.kez.lat").contains("empty label"));
        assert!(reason("@alice@kez_lat.com").contains("'_'"));
        assert!(reason("@alice@-kez.lat").contains("`-kez`"));
        assert!(reason("@alice@kez-.lat").contains("`kez-`"));
        assert!(reason(&format!("@alice@{}.lat", "a".repeat(64))).contains("64"));
        assert!(Handle::parse(&format!("@alice@{}.lat", "a".repeat(63)), HOME).is_ok());
        // Three labels of 63, one of 61 and three dots: exactly 253 characters.
        let label = "a".repeat(63);
        let at_limit = format!("{label}.{label}.{label}.{}", "a".repeat(61));
        assert_eq!(at_limit.len(), 253);
        assert!(Handle::parse(&format!("@alice@{at_limit}"), HOME).is_ok());
        assert!(reason(&format!("@alice@{at_limit}a")).contains("254"));
        assert!(Handle::parse("@alice@xn--kz-cja.lat", HOME).is_ok());
        assert!(Handle::parse("@alice@a-1.b2", HOME).is_ok());
        // The default domain is checked by the same rules.
        assert_eq!(
            Handle::parse("@alice", "kez.lat.").unwrap_err().code(),
            "bad_domain"
        );
        assert_eq!(
            Handle::parse("@alice", "").unwrap_err(),
            HandleError::EmptyDomain
        );
    }

    #[test]
    fn codes_are_distinct() {
        let errors = [
            HandleError::Empty,
            HandleError::Whitespace { position: 1 },
            HandleError::TooManyAt,
            HandleError::EmptyName,
            HandleError::EmptyDomain,
            HandleError::NotFullForm,
            HandleError::NonAscii {
                ch: 'é',
                position: 1,
            },
            HandleError::NonAsciiDomain {
                ch: 'é',
                position: 1,
            },
            HandleError::BadCharacter {
                ch: '.',
                position: 1,
            },
            HandleError::MustStartWithLetter { ch: '1' },
            HandleError::TooShort { len: 1 },
            HandleError::TooLong { len: 33 },
            HandleError::Reserved {
                name: "root".into(),
            },
            HandleError::BadDomain {
                reason: String::new(),
            },
        ];
        let mut codes: Vec<_> = errors.iter().map(HandleError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errors.len());
    }
}
