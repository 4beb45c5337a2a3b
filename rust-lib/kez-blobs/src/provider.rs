//! The provider string ([`kez_core::provider`]) of an iroh node's address, both ways.

use iroh::{EndpointAddr, EndpointId, RelayUrl, TransportAddr};
use kez_core::provider::{
    MAX_PROVIDER_ADDRS, MAX_PROVIDER_LEN, PROVIDER_PREFIX, Provider, ProviderAddr,
};

use crate::Error;

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

/// Parses and validates a provider string ([`kez_core::provider`]) into the address iroh dials.
pub fn parse_provider(text: &str) -> Result<EndpointAddr, Error> {
    let provider = Provider::parse(text).map_err(|err| Error::BadProvider {
        reason: err.to_string(),
    })?;
    let id = EndpointId::from_bytes(&provider.endpoint_id).map_err(|_| Error::BadProvider {
        reason: "the endpoint id is not a valid ed25519 public key".into(),
    })?;
    let mut addr = EndpointAddr::new(id);
    for item in provider.addrs {
        let transport = match item {
            ProviderAddr::Ip(sock) => TransportAddr::Ip(sock),
            ProviderAddr::Relay(url) => {
                TransportAddr::Relay(url.parse::<RelayUrl>().map_err(|_| Error::BadProvider {
                    reason: format!("`{url}` is not a relay URL"),
                })?)
            }
        };
        addr.addrs.insert(transport);
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
    fn refuses_what_the_grammar_refuses_and_relays_that_are_not_urls() {
        // The grammar's own cases are kez-core's (`provider`); here what the conversion adds.
        for case in [
            format!("iroh:{ID};ip=127.0.0.1:1;ip=127.0.0.1:1"),
            format!("iroh:{ID};relay=relay.example.org"),
        ] {
            assert!(parse_provider(&case).is_err(), "accepted {case:?}");
        }
    }
}
