//! A verified sigchain together with its link hashes, so a later copy can be checked to extend
//! it (a server that serves an older or forked chain must not undo a rotation).

use std::ops::Deref;

use kez_core::sigchain::LinkHash;
use kez_core::{ChainError, Sigchain};

/// A sigchain whose links verified ([`Sigchain::verify`]), with each link's hash.
/// Dereferences to the [`Sigchain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    chain: Sigchain,
    hashes: Vec<LinkHash>,
}

impl VerifiedChain {
    /// Verifies a whole chain, first link first.
    pub fn verify<B: AsRef<[u8]>>(links: &[B]) -> Result<VerifiedChain, ChainError> {
        let chain = Sigchain::verify(links)?;
        let hashes = links
            .iter()
            .map(|link| LinkHash::of(link.as_ref()))
            .collect();
        Ok(VerifiedChain { chain, hashes })
    }

    /// The hash of the link at `seq` (1-based), if the chain is that long.
    pub fn hash_at(&self, seq: u64) -> Option<LinkHash> {
        let index = usize::try_from(seq.checked_sub(1)?).ok()?;
        self.hashes.get(index).copied()
    }

    /// Whether this chain is the one last seen at (`seq`, `head`) or grew from it.
    pub fn extends(&self, seq: u64, head: LinkHash) -> bool {
        self.hash_at(seq) == Some(head)
    }
}

impl Deref for VerifiedChain {
    type Target = Sigchain;

    fn deref(&self) -> &Sigchain {
        &self.chain
    }
}

#[cfg(test)]
mod tests {
    use kez_core::SecretKey;
    use kez_core::sigchain::{Endpoint, Op, UnsignedLink};

    use super::*;

    fn endpoint(name: &str) -> Op {
        Op::AddEndpoint(Endpoint {
            name: name.into(),
            kind: "nats".into(),
            address: format!("kez.inbox.{name}"),
        })
    }

    #[test]
    fn a_longer_chain_extends_its_prefix_and_a_fork_does_not() {
        let key = SecretKey::from_seed(&[7; 32]);
        let first = UnsignedLink::first(key.public_key(), 100, endpoint("a"))
            .sign(&key)
            .unwrap();
        let one = VerifiedChain::verify(&[first.bytes()]).unwrap();
        let second = one.next_link(101, endpoint("b")).sign(&key).unwrap();
        let two = VerifiedChain::verify(&[first.bytes(), second.bytes()]).unwrap();
        let fork = one.next_link(102, endpoint("c")).sign(&key).unwrap();
        let forked = VerifiedChain::verify(&[first.bytes(), fork.bytes()]).unwrap();

        assert_eq!(two.hash_at(1), Some(one.head()));
        assert_eq!(two.hash_at(2), Some(two.head()));
        assert_eq!(two.hash_at(0), None);
        assert_eq!(two.hash_at(3), None);
        assert!(two.extends(1, one.head()));
        assert!(two.extends(2, two.head()));
        assert!(!one.extends(2, two.head()), "shorter: a rollback");
        assert!(!forked.extends(2, two.head()), "same length, other link");
    }
}
