//! The provider string: a node's address as text (format in the crate docs).

use std::net::SocketAddr;

use iroh::{EndpointAddr, EndpointId, RelayUrl, TransportAddr};

use crate::Error;

/// Prefix of every provider string; a different format would get a different prefix.
pub const PROVIDER_PREFIX: &str = "iroh:";

/// Longest provider string [`parse_provider`] accepts, in bytes.
pub const MAX_PROVIDER_LEN: usize = 1024;

/// Most addresses (`ip=` plus `relay=` items) [`parse_provider`] accepts in one provider string.
pub const MAX_PROVIDER_ADDRS: usize = 16;

/// Formats `addr` as a provider string. IP addresses come first in ascending order, then relay
/// URLs; addresses that would not parse back (custom transports, IPv6 scope ids, URLs containing
/// `;` or whitespace) are left out, and only the first [`MAX_PROVIDER_ADDRS`] are kept.
pub fn format_provider(addr: &EndpointAddr) -> String {
    let mut out = format!("{PROVIDER_PREFIX}{}", addr.id);
    let ips = addr.addrs.iter().filter_map(|a| match a {
        TransportAddr::Ip(ip) => Some(format!(";ip={ip}")),
        _ => None,
    });
    let relays = addr.addrs.iter().filter_map(|a| match a {
        TransportAddr::Relay(url) => Some(format!(";relay={url}")),
        _ => None,
    });
    let mut count = 0;
    for item in ips.chain(relays) {
        if count == MAX_PROVIDER_ADDRS || out.len() + item.len() > MAX_PROVIDER_LEN {
            break;
        }
        let mut probe = String::from(PROVIDER_PREFIX);
        probe.push_str(&addr.id.to_string());
        probe.push_str(&item);
        // Only items that round-trip go in, so parse_provider(format_provider(a)) never fails.
        if parse_provider(&probe).is_ok() {
            out.push_str(&item);
            count += 1;
        }
    }
    out
}

/// Parses and validates a provider string (format in the crate docs).
pub fn parse_provider(text: &str) -> Result<EndpointAddr, Error> {
    let bad = |reason: String| Error::BadProvider { reason };
    if text.len() > MAX_PROVIDER_LEN {
        return Err(bad(format!(
            "{} bytes long, at most {MAX_PROVIDER_LEN} allowed",
            text.len()
        )));
    }
    let rest = text
        .strip_prefix(PROVIDER_PREFIX)
        .ok_or_else(|| bad(format!("does not start with `{PROVIDER_PREFIX}`")))?;
    let mut items = rest.split(';');
    let id_hex = items.next().unwrap_or_default();
    if id_hex.len() != 64
        || !id_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(
            "the endpoint id is not 64 lowercase hex digits".to_string()
        ));
    }
    let id: EndpointId = id_hex
        .parse()
        .map_err(|_| bad("the endpoint id is not a valid ed25519 public key".to_string()))?;
    let mut addr = EndpointAddr::new(id);
    let mut count = 0;
    for item in items {
        count += 1;
        if count > MAX_PROVIDER_ADDRS {
            return Err(bad(format!("more than {MAX_PROVIDER_ADDRS} addresses")));
        }
        let transport = if let Some(ip) = item.strip_prefix("ip=") {
            let sock: SocketAddr = ip
                .parse()
                .map_err(|_| bad(format!("`{ip}` is not an IP socket address")))?;
            if sock.to_string() != ip {
                return Err(bad(format!("`{ip}` is not in canonical form (`{sock}`)")));
            }
            TransportAddr::Ip(sock)
        } else if let Some(url) = item.strip_prefix("relay=") {
            if url.is_empty() || url.contains(|c: char| c.is_whitespace()) {
                return Err(bad(format!("`{url}` is not a relay URL")));
            }
            let relay: RelayUrl = url
                .parse()
                .map_err(|_| bad(format!("`{url}` is not a relay URL")))?;
            TransportAddr::Relay(relay)
        } else {
            return Err(bad(format!(
                "unknown item `{}` (expected `ip=` or `relay=`)",
                item.chars().take(32).collect::<String>()
            )));
        };
        if !addr.addrs.insert(transport) {
            return Err(bad("an address is listed twice".to_string()));
        }
    }
    Ok(addr)
}

/// The addresses of `addr` a node that dials only where it is told may use (a pin node fetching
/// from an owner's providers): its IP addresses that are public unicast (or any, with
/// `dial_private`); never relay URLs. `None` when nothing is left.
pub fn dialable(addr: &EndpointAddr, dial_private: bool) -> Option<EndpointAddr> {
    let mut allowed = EndpointAddr::new(addr.id);
    for transport in &addr.addrs {
        if let TransportAddr::Ip(sock) = transport
            && (dial_private || is_public_unicast(sock.ip()))
        {
            allowed.addrs.insert(transport.clone());
        }
    }
    (!allowed.addrs.is_empty()).then_some(allowed)
}

/// Whether `ip` is a public unicast address: not unspecified, loopback, private, shared
/// (CGNAT), link-local, multicast, broadcast, documentation or reserved space.
pub fn is_public_unicast(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_unicast(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                || first == 0x0064 && v6.segments()[1] == 0xff9b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_dialled_unless_allowed() {
        for public in ["203.0.114.7", "8.8.8.8", "2a01:4f8::1", "::ffff:8.8.4.4"] {
            assert!(is_public_unicast(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public_unicast(private.parse().unwrap()), "{private}");
        }
        let id = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";
        let mixed = parse_provider(&format!(
            "iroh:{id};ip=127.0.0.1:4433;ip=8.8.8.8:4433;relay=https://relay.example.org./"
        ))
        .unwrap();
        let public = dialable(&mixed, false).unwrap();
        let dialled: Vec<String> = public
            .addrs
            .iter()
            .map(|addr| match addr {
                TransportAddr::Ip(sock) => sock.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(dialled, ["8.8.8.8:4433"]);
        assert_eq!(
            dialable(&mixed, true).unwrap().addrs.len(),
            2,
            "loopback allowed, the relay never"
        );
        let internal = parse_provider(&format!("iroh:{id};ip=10.0.0.5:4433")).unwrap();
        assert_eq!(dialable(&internal, false), None);
    }

    const ID: &str = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";

    #[test]
    fn round_trips() {
        let text =
            format!("iroh:{ID};ip=127.0.0.1:4433;ip=[::1]:4433;relay=https://relay.example.org./");
        let addr = parse_provider(&text).unwrap();
        assert_eq!(addr.addrs.len(), 3);
        assert_eq!(parse_provider(&format_provider(&addr)).unwrap(), addr);
        let bare = parse_provider(&format!("iroh:{ID}")).unwrap();
        assert!(bare.addrs.is_empty());
        assert_eq!(format_provider(&bare), format!("iroh:{ID}"));
    }

    #[test]
    fn rejects_malformed() {
        let long = format!("iroh:{ID}{}", ";ip=127.0.0.1:1".repeat(100));
        let cases = [
            String::new(),
            ID.to_string(),
            format!("iroh:{}", ID.to_uppercase()),
            format!("iroh:{}", &ID[..63]),
            format!("iroh:{ID};"),
            format!("iroh:{ID};ip=localhost:1"),
            format!("iroh:{ID};ip=127.0.0.1"),
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
        ];
        for case in cases {
            assert!(parse_provider(&case).is_err(), "accepted {case:?}");
        }
    }
}
