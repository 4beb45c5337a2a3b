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
        let mut links = links.iter().map(AsRef::as_ref);
        let first = links.next().ok_or(ChainError {
            position: 0,
            kind: kez_core::ChainErrorKind::Empty,
        })?;
        let mut chain = VerifiedChain::start(first)?;
        for link in links {
            chain.append(link)?;
        }
        Ok(chain)
    }

    /// Verifies a first link: the start of a chain verified link by link ([`Self::append`]),
    /// keeping only the links' hashes, so a long chain is checked as it arrives.
    pub fn start(link: &[u8]) -> Result<VerifiedChain, ChainError> {
        let chain = Sigchain::start(link).map_err(|kind| ChainError { position: 1, kind })?;
        Ok(VerifiedChain {
            chain,
            hashes: vec![LinkHash::of(link)],
        })
    }

    /// Verifies `link` as the next link and applies it; on error nothing changes.
    pub fn append(&mut self, link: &[u8]) -> Result<(), ChainError> {
        let signed = self.chain.append(link).map_err(|kind| ChainError {
            position: self.hashes.len() + 1,
            kind,
        })?;
        self.hashes.push(signed.hash());
        Ok(())
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
