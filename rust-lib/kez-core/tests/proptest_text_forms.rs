//! Property tests: every text form of a key or handle parses back to what produced it, and no
//! text with a non-ASCII character is ever accepted as a handle.

use kez_core::handle::{Handle, HandleError, RESERVED_NAMES};
use kez_core::key::{PublicKey, SecretKey};
use proptest::prelude::*;

const HOME: &str = "kez.lat";

/// Names generated from the rules: a letter, then 1 to 31 of `a-z0-9_`, not reserved.
fn valid_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{1,31}".prop_filter("reserved name", |n| !RESERVED_NAMES.contains(&n.as_str()))
}

/// Domains generated from the rules: 1 to 4 labels of 1 to 63 characters, no `-` at either end.
fn valid_domain() -> impl Strategy<Value = String> {
    let label = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";
    prop::collection::vec(label, 1..=4)
        .prop_map(|labels| labels.join("."))
        .prop_filter("longer than 253", |d| d.len() <= 253)
}

fn valid_handle() -> impl Strategy<Value = (String, String)> {
    (valid_name(), valid_domain())
}

/// Uppercases the characters whose flag is set (flags cycle if shorter than the text).
fn mangle_case(text: &str, flags: &[bool]) -> String {
    text.chars()
        .zip(flags.iter().cycle())
        .map(|(ch, &upper)| if upper { ch.to_ascii_uppercase() } else { ch })
        .collect()
}

proptest! {
    #[test]
    fn public_key_text_and_nkey_round_trip(seed in any::<[u8; 32]>()) {
        let key = SecretKey::from_seed(&seed).public_key();
        prop_assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        prop_assert_eq!(PublicKey::from_nkey(&key.to_nkey()).unwrap(), key);
    }

    #[test]
    fn valid_handle_round_trips((name, domain) in valid_handle()) {
        let text = format!("@{name}@{domain}");
        let handle = Handle::parse(&text, HOME).unwrap();
        prop_assert_eq!(handle.name(), name.as_str());
        prop_assert_eq!(handle.domain(), domain.as_str());
        prop_assert_eq!(handle.to_string(), text.clone());
        prop_assert_eq!(text.parse::<Handle>().unwrap(), handle.clone());
        prop_assert_eq!(Handle::parse(&handle.display_for(HOME), HOME).unwrap(), handle);
    }

    #[test]
    fn bare_forms_take_the_default_domain((name, domain) in valid_handle()) {
        let full = Handle::parse(&format!("@{name}@{domain}"), HOME).unwrap();
        prop_assert_eq!(Handle::parse(&name, &domain).unwrap(), full.clone());
        prop_assert_eq!(Handle::parse(&format!("@{name}"), &domain).unwrap(), full.clone());
        prop_assert_eq!(full.display_for(&domain), format!("@{name}"));
    }

    #[test]
    fn case_mangled_handle_parses_to_the_lowercase_one(
        (name, domain) in valid_handle(),
        flags in prop::collection::vec(any::<bool>(), 1..16),
    ) {
        let lower = Handle::parse(&format!("@{name}@{domain}"), HOME).unwrap();
        let mangled = mangle_case(&format!("@{name}@{domain}"), &flags);
        prop_assert_eq!(Handle::parse(&mangled, HOME).unwrap(), lower.clone());
        prop_assert_eq!(mangled.parse::<Handle>().unwrap(), lower);
    }

    #[test]
    fn non_ascii_anywhere_never_parses(
        prefix in "[@a-zA-Z0-9_.-]{0,12}|\\PC{0,8}",
        ch in any::<char>().prop_filter("non-ASCII", |c| !c.is_ascii()),
        suffix in "[@a-zA-Z0-9_.-]{0,12}|\\PC{0,8}",
    ) {
        let text = format!("{prefix}{ch}{suffix}");
        prop_assert!(Handle::parse(&text, HOME).is_err());
        prop_assert!(text.parse::<Handle>().is_err());
    }

    /// When a non-ASCII character is the only flaw, the error names it and where it is.
    #[test]
    fn non_ascii_in_a_valid_handle_is_named(
        (name, domain) in valid_handle(),
        ch in any::<char>().prop_filter("non-ASCII", |c| !c.is_ascii()),
        at in any::<prop::sample::Index>(),
    ) {
        let text = format!("@{name}@{domain}");
        // After the leading `@`, so the structure stays that of a full handle.
        let insert_at = 1 + at.index(text.len());
        let mut bad = text.clone();
        bad.insert(insert_at, ch);
        let position = insert_at + 1;
        let expected = if insert_at <= name.len() + 1 {
            HandleError::NonAscii { ch, position }
        } else {
            HandleError::NonAsciiDomain { ch, position }
        };
        prop_assert_eq!(Handle::parse(&bad, HOME).unwrap_err(), expected.clone());
        prop_assert_eq!(bad.parse::<Handle>().unwrap_err(), expected);
    }

    #[test]
    fn any_text_parses_or_errors_without_panicking(text in "\\PC{0,40}|[@a-zA-Z0-9_. :-]{0,40}") {
        let _ = Handle::parse(&text, HOME);
        let _ = text.parse::<Handle>();
    }
}
