//! Moving house (PROTOCOL.md §14.6): an identity that registered on another server says so in
//! its own sigchain with the endpoint `home` (kind `home`), whose address is the handle it lives
//! under now, and replaces its `nats` endpoint with the new server's URL. A chain is the
//! identity, not the server: a contact that verified the chain follows the move without a new
//! pin, and the old server forwards mail while it lives.

use crate::handle::Handle;
use crate::sigchain::{Endpoint, Op, Sigchain};

/// The name and kind of the endpoint that names the handle an identity lives under after a
/// move.
pub const HOME_ENDPOINT: &str = "home";

/// The name and kind of the endpoint that names the home server's NATS URL (§4.3).
pub const NATS_ENDPOINT: &str = "nats";

/// The handle `chain` says its identity lives under, from its `home` endpoint: `None` when it
/// has none (it never moved), or when the endpoint is not of kind `home` or its address is not
/// a handle in full form (a verifier keeps any text there, §4.3; such an endpoint says nothing
/// a client can follow).
pub fn home_of(chain: &Sigchain) -> Option<Handle> {
    let endpoint = chain.endpoints().get(HOME_ENDPOINT)?;
    if endpoint.kind != HOME_ENDPOINT {
        return None;
    }
    endpoint.address.parse().ok()
}

/// Where the identity known as `handle` moved to: the handle its chain's `home` endpoint names
/// when that is another one than `handle` (compared in normalised form), else `None`.
pub fn moved_to(chain: &Sigchain, handle: &Handle) -> Option<Handle> {
    home_of(chain).filter(|home| home != handle)
}

/// The ops that advertise a move of `chain`'s identity to `new_handle` on the server at
/// `nats_url`, in order: the `nats` endpoint replaced (when it names another URL), then the
/// `home` endpoint replaced (when it names another handle), each removal before its addition.
/// Empty when the chain says so already, so a move run again appends nothing.
pub fn move_ops(chain: &Sigchain, new_handle: &Handle, nats_url: &str) -> Vec<Op> {
    let mut ops = chain.ops_to_advertise(&Endpoint {
        name: NATS_ENDPOINT.into(),
        kind: NATS_ENDPOINT.into(),
        address: nats_url.into(),
    });
    ops.extend(chain.ops_to_advertise(&Endpoint {
        name: HOME_ENDPOINT.into(),
        kind: HOME_ENDPOINT.into(),
        address: new_handle.to_string(),
    }));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use crate::sigchain::UnsignedLink;

    fn handle(text: &str) -> Handle {
        text.parse().expect("a full handle")
    }

    /// A chain of `key` registered at `nats://a:4222`, with `ops` appended after its first link.
    fn chain(key: &SecretKey, ops: Vec<Op>) -> Sigchain {
        let first = UnsignedLink::first(
            key.public_key(),
            1,
            Op::AddEndpoint(Endpoint {
                name: NATS_ENDPOINT.into(),
                kind: NATS_ENDPOINT.into(),
                address: "nats://a:4222".into(),
            }),
        )
        .sign(key)
        .unwrap();
        let mut chain = Sigchain::start(first.bytes()).unwrap();
        for op in ops {
            let link = chain.next_link(2, op).sign(key).unwrap();
            chain.append(link.bytes()).unwrap();
        }
        chain
    }

    #[test]
    fn a_move_replaces_the_nats_endpoint_and_names_the_new_home() {
        let key = SecretKey::from_seed(&[3; 32]);
        let old = handle("@alice@a.test");
        let new = handle("@alice@b.test");
        let before = chain(&key, Vec::new());
        assert_eq!(home_of(&before), None);
        assert_eq!(moved_to(&before, &old), None);
        let ops = move_ops(&before, &new, "nats://b:4222");
        assert_eq!(
            ops.iter().map(Op::name).collect::<Vec<_>>(),
            ["remove_endpoint", "add_endpoint", "add_endpoint"]
        );
        let after = chain(&key, ops);
        assert_eq!(after.version(), 1, "endpoint ops stay version 1");
        assert_eq!(home_of(&after), Some(new.clone()));
        assert_eq!(moved_to(&after, &old), Some(new.clone()));
        assert_eq!(moved_to(&after, &new), None, "the new handle is home");
        assert_eq!(
            after.endpoints()[NATS_ENDPOINT].address,
            "nats://b:4222".to_owned()
        );
        assert!(
            move_ops(&after, &new, "nats://b:4222").is_empty(),
            "moving again to the same place appends nothing"
        );
        let onward = move_ops(&after, &handle("@al@c.test"), "nats://c:4222");
        assert_eq!(
            onward.iter().map(Op::name).collect::<Vec<_>>(),
            [
                "remove_endpoint",
                "add_endpoint",
                "remove_endpoint",
                "add_endpoint"
            ],
            "a later move removes and re-adds both"
        );
    }

    #[test]
    fn a_home_endpoint_that_is_not_a_full_handle_of_kind_home_says_nothing() {
        let key = SecretKey::from_seed(&[4; 32]);
        let add = |kind: &str, address: &str| {
            Op::AddEndpoint(Endpoint {
                name: HOME_ENDPOINT.into(),
                kind: kind.into(),
                address: address.into(),
            })
        };
        let old = handle("@alice@a.test");
        for (kind, address) in [
            ("nats", "@alice@b.test"),
            ("home", "@alice"),
            ("home", "alice@b.test"),
            ("home", "nats://b:4222"),
        ] {
            let chain = chain(&key, vec![add(kind, address)]);
            assert_eq!(home_of(&chain), None, "{kind} {address}");
            assert_eq!(moved_to(&chain, &old), None, "{kind} {address}");
        }
        let upper = chain(&key, vec![add("home", "@Alice@A.test")]);
        assert_eq!(moved_to(&upper, &old), None, "the same handle, normalised");
    }
}
