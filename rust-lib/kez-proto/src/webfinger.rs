//! WebFinger (RFC 7033) for kez handles (PROTOCOL.md §7.1): the query a home server accepts, the
//! account it names, and the JRD it answers. The HTTP around it is the server's.

use std::collections::BTreeMap;

use kez_core::Handle;
use serde::{Deserialize, Serialize};

use crate::answer::{ChainHead, HandleRecord};
use crate::endpoint::Endpoint;

/// The WebFinger path (RFC 7033 §10.1).
pub const WEBFINGER_PATH: &str = "/.well-known/webfinger";
/// The JRD media type (RFC 7033 §10.2).
pub const JRD_CONTENT_TYPE: &str = "application/jrd+json";

/// Link relation: the home server's NATS endpoint (`href` is the NATS URL clients connect to).
pub const REL_NATS: &str = "https://kez.lat/ns/rel/nats";
/// Link relation: the account's sigchain, served over NATS (`href` is the NATS URL; the link's
/// properties name the subject and the key to ask for).
pub const REL_SIGCHAIN: &str = "https://kez.lat/ns/rel/sigchain";
/// Property: a KEZ key (PROTOCOL.md §1.1 text form).
pub const PROP_KEY: &str = "https://kez.lat/ns/key";
/// Property: the handle in its full `@name@domain` form.
pub const PROP_HANDLE: &str = "https://kez.lat/ns/handle";
/// Property: the sigchain's last seq as a decimal string, or `null` without a sigchain.
pub const PROP_SIGCHAIN_SEQ: &str = "https://kez.lat/ns/sigchain-seq";
/// Property: the sigchain's head (hex link hash), or `null` without a sigchain.
pub const PROP_SIGCHAIN_HEAD: &str = "https://kez.lat/ns/sigchain-head";
/// Link property: the NATS subject to send requests to.
pub const PROP_NATS_SUBJECT: &str = "https://kez.lat/ns/nats-subject";

/// Why a query is refused: the HTTP status it gets (400 or 404) and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 400: the query is not a WebFinger query for an `acct:` URI.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no account of this server by that name.
    #[error("{0}")]
    NotFound(String),
}

/// The WebFinger parameters: `resource` (exactly once) and any number of `rel`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Query {
    /// The `resource` parameter, percent-decoded.
    resource: String,
    /// The `rel` parameters, percent-decoded, in order: the link relations wanted (none: all).
    rels: Vec<String>,
}

/// Parses the query component: `&`-separated `name=value` pairs, both percent-decoded (RFC 3986
/// §2.1, strictly: `%` must start a two-hex-digit escape and the result must be UTF-8; `+` is a
/// plus sign). Unknown parameters are ignored (RFC 7033 §4.1 leaves room for extensions).
fn parse_query(query: Option<&str>) -> Result<Query, Refusal> {
    let mut resource = None;
    let mut rels = Vec::new();
    for pair in query.unwrap_or_default().split('&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name).map_err(Refusal::BadRequest)?;
        let value = percent_decode(value).map_err(Refusal::BadRequest)?;
        match name.as_str() {
            "resource" if resource.is_some() => {
                return Err(bad_request("resource is given more than once"));
            }
            "resource" => resource = Some(value),
            "rel" => rels.push(value),
            _ => {}
        }
    }
    match resource {
        None => Err(bad_request(
            "missing resource parameter, e.g. ?resource=acct:alice@kez.lat",
        )),
        Some(resource) if resource.is_empty() => Err(bad_request("resource is empty")),
        Some(resource) => Ok(Query { resource, rels }),
    }
}

/// Strict percent-decoding (RFC 3986 §2.1) into UTF-8.
fn percent_decode(input: &str) -> Result<String, String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            out.push(byte);
            rest = tail;
            continue;
        }
        match tail {
            [high, low, after @ ..] => match (hex_digit(*high), hex_digit(*low)) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    rest = after;
                }
                _ => return Err(format!("bad percent-encoding in {input:?}")),
            },
            _ => return Err(format!("bad percent-encoding in {input:?}")),
        }
    }
    String::from_utf8(out).map_err(|_| format!("{input:?} does not decode to UTF-8"))
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// An `acct:` URI (RFC 7565) split into its percent-decoded user part and host.
fn parse_acct(resource: &str) -> Result<(String, String), Refusal> {
    let Some((scheme, rest)) = resource.split_once(':') else {
        return Err(bad_request(format!(
            "resource {resource:?} is not a URI; use acct:name@domain"
        )));
    };
    // URI schemes are case-insensitive (RFC 3986 §3.1).
    if !scheme.eq_ignore_ascii_case("acct") {
        return Err(bad_request(format!(
            "only acct: resources are served here, not {scheme:?}"
        )));
    }
    let Some((user, host)) = rest.split_once('@') else {
        return Err(bad_request("an acct: resource is acct:name@domain"));
    };
    // userpart = 1*( unreserved / sub-delims / pct-encoded ); host is an RFC 3986 host.
    let user_ok = !user.is_empty() && user.bytes().all(|b| uri_char(b) || b == b'%');
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| uri_char(b) || matches!(b, b'%' | b'[' | b']' | b':'));
    if !user_ok || !host_ok {
        return Err(bad_request(format!(
            "{resource:?} is not an acct: URI (acct:name@domain)"
        )));
    }
    let user = percent_decode(user).map_err(Refusal::BadRequest)?;
    let host = percent_decode(host).map_err(Refusal::BadRequest)?;
    Ok((user, host))
}

/// RFC 3986 unreserved and sub-delims characters.
fn uri_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// What a WebFinger query asks about on the server of `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A user's account: the handle, by the registry's own normalisation (PROTOCOL.md §2).
    User(Handle),
    /// The server itself, `acct:kez@<domain>` (PROTOCOL.md §14.1): its key and federation URL.
    Server,
}

/// The account a query (the URL's query component) asks about on the server of `domain`, and
/// the link relations wanted. A host other than `domain`, or a user part no handle can have,
/// names no account here (404); `kez` (a reserved name) is the server.
pub fn account(query: Option<&str>, domain: &str) -> Result<(Asked, Vec<String>), Refusal> {
    let query = parse_query(query)?;
    let (user, host) = parse_acct(&query.resource)?;
    let host = host.to_ascii_lowercase();
    if host != domain {
        return Err(Refusal::NotFound(format!(
            "{host} is not served here; this server serves {domain}"
        )));
    }
    if user.eq_ignore_ascii_case(crate::federation::SERVER_ACCOUNT) {
        return Ok((Asked::Server, query.rels));
    }
    let handle = match user.contains('@') {
        true => None,
        false => Handle::parse(&format!("@{user}@{host}"), domain).ok(),
    }
    .ok_or_else(|| Refusal::NotFound(format!("no account {user:?} here")))?;
    Ok((Asked::User(handle), query.rels))
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::BadRequest(message.into())
}

/// A JSON Resource Descriptor (RFC 7033 §4.4): the answer for a registered handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jrd {
    /// `acct:<name>@<domain>`.
    pub subject: String,
    /// The key, in its text form.
    pub aliases: Vec<String>,
    /// [`PROP_KEY`], [`PROP_HANDLE`], [`PROP_SIGCHAIN_SEQ`], [`PROP_SIGCHAIN_HEAD`].
    pub properties: BTreeMap<String, Option<String>>,
    /// [`REL_NATS`] and [`REL_SIGCHAIN`], those the query asked for.
    pub links: Vec<Link>,
}

/// A link of a [`Jrd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The link relation.
    pub rel: String,
    /// Where: the NATS URL clients connect to.
    pub href: String,
    /// [`PROP_NATS_SUBJECT`] and [`PROP_KEY`] on the sigchain link; none on the other.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, Option<String>>,
}

impl Jrd {
    /// The descriptor of `record`, whose chain ends at `head`, served at `nats_url`, with the
    /// links of `rels` (none: all).
    pub fn new(
        record: &HandleRecord,
        head: Option<ChainHead>,
        nats_url: &str,
        rels: &[String],
    ) -> Jrd {
        let key = record.key.to_string();
        let property = |name: &str, value: Option<String>| (name.to_owned(), value);
        let properties = BTreeMap::from([
            property(PROP_KEY, Some(key.clone())),
            property(PROP_HANDLE, Some(record.handle.to_string())),
            property(PROP_SIGCHAIN_SEQ, head.map(|head| head.seq.to_string())),
            property(PROP_SIGCHAIN_HEAD, head.map(|head| head.head.to_string())),
        ]);
        let links = [
            Link {
                rel: REL_NATS.to_owned(),
                href: nats_url.to_owned(),
                properties: BTreeMap::new(),
            },
            Link {
                rel: REL_SIGCHAIN.to_owned(),
                href: nats_url.to_owned(),
                properties: BTreeMap::from([
                    property(
                        PROP_NATS_SUBJECT,
                        Some(Endpoint::GetChain.subject().to_owned()),
                    ),
                    property(PROP_KEY, Some(key.clone())),
                ]),
            },
        ];
        Jrd {
            subject: format!("acct:{}@{}", record.handle.name(), record.handle.domain()),
            aliases: vec![key],
            properties,
            links: links
                .into_iter()
                .filter(|link| rels.is_empty() || rels.contains(&link.rel))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(
            percent_decode("acct%3Aalice%40kez.lat").unwrap(),
            "acct:alice@kez.lat"
        );
        assert_eq!(percent_decode("a%2b+b").unwrap(), "a++b");
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
        for bad in ["%", "%4", "%4g", "%%41", "a%zz", "%C3", "%FF"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_need_exactly_one_resource() {
        let query = parse_query(Some("rel=a&resource=acct%3Ax%40y&rel=b&x&&other=1")).unwrap();
        assert_eq!(
            query,
            Query {
                resource: "acct:x@y".into(),
                rels: vec!["a".into(), "b".into()],
            }
        );
        for bad in [
            None,
            Some(""),
            Some("rel=a"),
            Some("resource="),
            Some("resource"),
            Some("resource=a&resource=a"),
            Some("resource=acct:x@y&resourc%65=acct:x@y"),
            Some("resource=%zz"),
        ] {
            assert!(
                matches!(parse_query(bad), Err(Refusal::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn acct_uris() {
        assert_eq!(
            parse_acct("ACCT:Alice@KEZ.lat").unwrap(),
            ("Alice".into(), "KEZ.lat".into())
        );
        assert_eq!(
            parse_acct("acct:%61lice@kez.lat").unwrap(),
            ("alice".into(), "kez.lat".into())
        );
        for bad in [
            "alice@kez.lat",
            "https://kez.lat/@alice",
            "mailto:alice@kez.lat",
            "acct:alice",
            "acct:@kez.lat",
            "acct:alice@",
            "acct:a@b@kez.lat",
            "acct:al ice@kez.lat",
            "acct:al/ice@kez.lat",
            "acct:alïce@kez.lat",
            "acct:alice@kez.lat/x",
            "acct:%zz@kez.lat",
        ] {
            assert!(
                matches!(parse_acct(bad), Err(Refusal::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_account_is_a_handle_of_the_served_domain() {
        let (asked, rels) = account(
            Some("resource=acct%3AAlice%40KEZ.lat&rel=https://kez.lat/ns/rel/nats"),
            "kez.lat",
        )
        .unwrap();
        let Asked::User(handle) = asked else {
            panic!("{asked:?}")
        };
        assert_eq!(handle.to_string(), "@alice@kez.lat");
        assert_eq!(rels, [REL_NATS]);
        for server in ["resource=acct:kez@kez.lat", "resource=acct%3AKEZ%40kez.lat"] {
            assert_eq!(account(Some(server), "kez.lat").unwrap().0, Asked::Server);
        }
        for elsewhere in [
            "resource=acct:alice@example.org",
            "resource=acct:al%2540ice@kez.lat",
            "resource=acct:a..b@kez.lat",
        ] {
            assert!(
                matches!(
                    account(Some(elsewhere), "kez.lat"),
                    Err(Refusal::NotFound(_))
                ),
                "{elsewhere}"
            );
        }
    }
}
