//! Provider strings: where a file's blob can be fetched (PROTOCOL.md §9.5). A provider string
//! is a node's address as self-contained text; it goes into sigchain endpoints, file offers,
//! manifests and pin requests, so its grammar is fixed:
//!
//! ```text
//! iroh:<endpoint id>[;ip=<socket address>]...[;relay=<relay URL>]...
//! ```
//!
//! - `<endpoint id>` is the node's ed25519 public key as exactly 64 lowercase hex digits, a
//!   valid curve point.
//! - Each `;ip=` item is a direct UDP address in canonical form: `192.0.2.7:4433` or
//!   `[2001:db8::7]:4433` (brackets for IPv6, no scope id, no leading zeros).
//! - Each `;relay=` item is the URL of a relay server the node uses, e.g.
//!   `;relay=https://relay.example.org./`, with no `;` or whitespace.
//! - Nothing else: no spaces, no trailing `;`, no unknown items, no address twice. At most
//!   [`MAX_PROVIDER_ADDRS`] addresses and [`MAX_PROVIDER_LEN`] bytes in all.
//!
//! [`Provider::parse`] enforces all of it, so a parsed provider's text form ([`Display`]) is
//! exactly the text it was parsed from. Example:
//! `iroh:ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6;ip=127.0.0.1:41771`.
//!
//! [`Display`]: std::fmt::Display

use std::fmt;
use std::net::SocketAddr;

use ed25519_dalek::VerifyingKey;

/// Prefix of every provider string; a different format would get a different prefix.
pub const PROVIDER_PREFIX: &str = "iroh:";

/// Longest provider string, in bytes.
pub const MAX_PROVIDER_LEN: usize = 1024;

/// Most providers one list names (a file offer, a `set_shared_files` link, a pin request).
pub const MAX_PROVIDERS: usize = 16;

/// Most addresses (`ip=` plus `relay=` items) in one provider string.
pub const MAX_PROVIDER_ADDRS: usize = 16;

/// A parsed provider string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The node's endpoint id: an ed25519 public key (the node's, not a KEZ key).
    pub endpoint_id: [u8; 32],
    /// Its addresses, in the order written.
    pub addrs: Vec<ProviderAddr>,
}

/// One address of a [`Provider`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderAddr {
    /// `ip=`: a direct UDP address.
    Ip(SocketAddr),
    /// `relay=`: a relay server's URL, as written (its URL syntax is the transport's to check).
    Relay(String),
}

/// Why a provider string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a provider string: {0}")]
pub struct ProviderError(String);

impl Provider {
    /// Parses and checks a provider string against the grammar above.
    pub fn parse(text: &str) -> Result<Provider, ProviderError> {
        let bad = |reason: String| Err(ProviderError(reason));
        if text.len() > MAX_PROVIDER_LEN {
            return bad(format!(
                "{} bytes long, at most {MAX_PROVIDER_LEN} allowed",
                text.len()
            ));
        }
        let Some(rest) = text.strip_prefix(PROVIDER_PREFIX) else {
            return bad(format!("does not start with `{PROVIDER_PREFIX}`"));
        };
        let mut items = rest.split(';');
        let id_hex = items.next().unwrap_or_default();
        let Some(endpoint_id) = lowercase_hex32(id_hex) else {
            return bad("the endpoint id is not 64 lowercase hex digits".into());
        };
        if VerifyingKey::from_bytes(&endpoint_id).is_err() {
            return bad("the endpoint id is not a valid ed25519 public key".into());
        }
        let mut addrs = Vec::new();
        for item in items {
            if addrs.len() == MAX_PROVIDER_ADDRS {
                return bad(format!("more than {MAX_PROVIDER_ADDRS} addresses"));
            }
            let addr = if let Some(ip) = item.strip_prefix("ip=") {
                let Ok(sock) = ip.parse::<SocketAddr>() else {
                    return bad(format!("`{ip}` is not an IP socket address"));
                };
                if sock.to_string() != ip {
                    return bad(format!("`{ip}` is not in canonical form (`{sock}`)"));
                }
                ProviderAddr::Ip(sock)
            } else if let Some(url) = item.strip_prefix("relay=") {
                if url.is_empty() || url.contains(char::is_whitespace) {
                    return bad(format!("`{url}` is not a relay URL"));
                }
                ProviderAddr::Relay(url.to_owned())
            } else {
                return bad(format!(
                    "unknown item `{}` (expected `ip=` or `relay=`)",
                    item.chars().take(32).collect::<String>()
                ));
            };
            if addrs.contains(&addr) {
                return bad("an address is listed twice".into());
            }
            addrs.push(addr);
        }
        Ok(Provider { endpoint_id, addrs })
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROVIDER_PREFIX)?;
        for byte in self.endpoint_id {
            write!(f, "{byte:02x}")?;
        }
        for addr in &self.addrs {
            match addr {
                ProviderAddr::Ip(sock) => write!(f, ";ip={sock}")?,
                ProviderAddr::Relay(url) => write!(f, ";relay={url}")?,
            }
        }
        Ok(())
    }
}

fn lowercase_hex32(text: &str) -> Option<[u8; 32]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";

    #[test]
    fn a_provider_reads_back_to_its_text() {
        for text in [
            format!("iroh:{ID}"),
            format!("iroh:{ID};ip=127.0.0.1:4433;ip=[::1]:4433;relay=https://relay.example.org./"),
            format!("iroh:{ID};relay=https://r.example/;ip=192.0.2.7:1"),
        ] {
            let provider = Provider::parse(&text).unwrap();
            assert_eq!(provider.to_string(), text);
        }
        let provider = Provider::parse(&format!("iroh:{ID};ip=[::1]:4433")).unwrap();
        assert_eq!(
            provider.addrs,
            [ProviderAddr::Ip("[::1]:4433".parse().unwrap())]
        );
    }

    #[test]
    fn anything_off_the_grammar_is_refused() {
        let long = format!("iroh:{ID}{}", ";ip=127.0.0.1:1".repeat(100));
        // The y coordinate 2 is not on the curve.
        let not_a_point = format!("iroh:02{}", "0".repeat(62));
        let cases = [
            String::new(),
            ID.to_string(),
            format!("iroh:{}", ID.to_uppercase()),
            format!("iroh:{}", &ID[..63]),
            format!("iroh:{ID};"),
            format!("iroh:{ID};ip=localhost:1"),
            format!("iroh:{ID};ip=127.0.0.1"),
            format!("iroh:{ID};ip=127.000.0.1:1"),
            format!("iroh:{ID};ip=127.0.0.1:1;ip=127.0.0.1:1"),
            format!("iroh:{ID};relay="),
            format!("iroh:{ID};relay=not a url"),
            format!("iroh:{ID};dns=x"),
            format!(
                "iroh:{ID}{}",
                (1..=17)
                    .map(|p| format!(";ip=127.0.0.1:{p}"))
                    .collect::<String>()
            ),
            long,
            not_a_point,
        ];
        for case in cases {
            assert!(Provider::parse(&case).is_err(), "accepted {case:?}");
        }
    }
}
