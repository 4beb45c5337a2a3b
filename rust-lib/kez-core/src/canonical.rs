//! Canonical JSON: the subset of RFC 8785 (JCS) that KEZ signs.
//!
//! Signed KEZ objects are JSON whose bytes are exactly their JCS serialisation: object members
//! sorted by their UTF-16 code units, no insignificant whitespace, strings escaped as JCS says.
//! Numbers are restricted to integers in `0..=2^53-1`, where JCS number formatting is just the
//! decimal digits, so no floating-point formatting is ever involved. A verifier re-encodes what it
//! parsed and requires the same bytes, so each signed object has exactly one byte form and one hash.

use serde_json::Value;

/// The largest integer a canonical number may hold (`2^53 - 1`, exact in every JSON parser).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a value has no canonical form, or bytes are not in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// The bytes are not JSON at all.
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// A number is negative, fractional, or above 2^53-1.
    #[error("numbers must be whole and between 0 and 2^53-1")]
    NumberOutOfRange,
    /// The JSON is valid but its bytes differ from the canonical (RFC 8785) serialisation.
    #[error("JSON is not in canonical (RFC 8785) form: members unsorted, whitespace, or escapes")]
    NotCanonical,
}

/// Serialises `value` canonically.
pub fn encode(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, value)?;
    Ok(out)
}

/// Parses `bytes` as JSON and requires them to be the canonical serialisation of what they hold.
pub fn decode(bytes: &[u8]) -> Result<Value, CanonicalError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|err| CanonicalError::Syntax(err.to_string()))?;
    if encode(&value)? != bytes {
        return Err(CanonicalError::NotCanonical);
    }
    Ok(value)
}

fn write_value(out: &mut Vec<u8>, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => match number.as_u64() {
            Some(n) if n <= MAX_SAFE_INTEGER => out.extend_from_slice(n.to_string().as_bytes()),
            _ => return Err(CanonicalError::NumberOutOfRange),
        },
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item)?;
            }
            out.push(b']');
        }
        Value::Object(members) => {
            // JCS orders members by UTF-16 code units, which differs from byte order for
            // characters above U+FFFF; sorting explicitly also keeps us independent of whether
            // serde_json's `preserve_order` feature is enabled somewhere in the build.
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                write_value(out, item)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for ch in text.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\u{0c}' => out.extend_from_slice(b"\\f"),
            '\r' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(value: Value) -> String {
        String::from_utf8(encode(&value).unwrap()).unwrap()
    }

    #[test]
    fn members_are_sorted_by_utf16_code_units() {
        // U+1F600 is the surrogate pair D83D DE00, which sorts before U+FB01 in UTF-16
        // although its UTF-8 bytes sort after.
        let value = json!({"b": 1, "a": 2, "\u{fb01}": 3, "\u{1f600}": 4, "A": 5});
        assert_eq!(
            enc(value),
            "{\"A\":5,\"a\":2,\"b\":1,\"\u{1f600}\":4,\"\u{fb01}\":3}"
        );
    }

    #[test]
    fn strings_are_escaped_as_jcs_says() {
        let value = json!("q\" b\\ \u{8}\t\n\u{c}\r \u{1} \u{1f} \u{7f} é /");
        assert_eq!(
            enc(value),
            "\"q\\\" b\\\\ \\b\\t\\n\\f\\r \\u0001 \\u001f \u{7f} é /\""
        );
    }

    #[test]
    fn numbers_are_safe_integers_only() {
        assert_eq!(enc(json!(0)), "0");
        assert_eq!(enc(json!(MAX_SAFE_INTEGER)), "9007199254740991");
        for bad in [
            json!(MAX_SAFE_INTEGER + 1),
            json!(-1),
            json!(1.5),
            json!(1.0),
        ] {
            assert_eq!(encode(&bad), Err(CanonicalError::NumberOutOfRange));
        }
    }

    #[test]
    fn decode_accepts_only_the_canonical_bytes() {
        assert_eq!(decode(br#"{"a":[1,true,null],"b":"x"}"#).unwrap()["b"], "x");
        for bad in [
            &br#"{"b":1,"a":2}"#[..],
            br#"{"a": 1}"#,
            br#"{"a":1} "#,
            br#"{"a":"\u0041"}"#,
            br#"{"a":1,"a":1}"#,
            br#"{"a":1.0}"#,
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(decode(b"{"), Err(CanonicalError::Syntax(_))));
    }
}
