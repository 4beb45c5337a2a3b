//! Trusting a contact's identity (PROTOCOL.md §6.5): a sigchain verified with its link hashes,
//! and the decision a client makes when it meets a contact's chain again. Trust on first use
//! pins the chain's identity; later copies must be the same identity and extend what was seen,
//! and the current key follows only the chain's own rotations.

use std::ops::Deref;

use crate::key::PublicKey;
use crate::sigchain::{ChainError, ChainErrorKind, Device, LinkHash, Sigchain};

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
            kind: ChainErrorKind::Empty,
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

/// What a client keeps of a contact's chain to check the next copy against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedChain {
    /// The pinned identity: the chain id (the registering key). It never changes unless the
    /// user accepts a key change.
    pub key: PublicKey,
    /// The key the chain names now: messages are sealed to it and signed by it.
    pub current_key: PublicKey,
    /// The chain's seq when last verified.
    pub seq: u64,
    /// The hash of the link at `seq`.
    pub head: LinkHash,
}

impl PinnedChain {
    /// Where `chain` stands now.
    pub fn of(chain: &VerifiedChain) -> PinnedChain {
        PinnedChain {
            key: chain.chain_id(),
            current_key: chain.current_key(),
            seq: chain.seq(),
            head: chain.head(),
        }
    }
}

/// What changed since a contact's chain was last pinned ([`check_pin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinChange {
    /// A new contact: its identity is pinned now.
    New,
    /// The pinned identity, with the same current key (the chain may have grown).
    Same,
    /// The pinned identity's own sigchain rotated its key: the current key moved from `from`.
    /// No warning is due: the old key signed the move.
    Rotated {
        /// The current key before.
        from: PublicKey,
    },
}

/// Why a chain is not trusted for a pinned contact. Nothing changes on a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PinRefusal {
    /// Another identity than the pinned one (a different registry key without a rotation in
    /// the pinned chain): an account taken over, or a lying server.
    #[error("the pinned identity is {pinned}, the chain offered is {offered}'s")]
    KeyChanged {
        /// The identity pinned.
        pinned: PublicKey,
        /// The chain id offered now.
        offered: PublicKey,
    },
    /// An older copy of the chain than verified before: it could undo a rotation.
    #[error("the chain is at seq {served}, but seq {pinned} was verified before")]
    Rollback {
        /// The seq verified before.
        pinned: u64,
        /// The seq of the chain offered.
        served: u64,
    },
    /// The same length or longer, but another link at the pinned seq: a fork.
    #[error("the chain has another link {seq} than verified before")]
    Forked {
        /// The seq whose link differs.
        seq: u64,
    },
}

/// A change to a contact's devices between two verified copies of its chain: a note for
/// people, not a warning (the identity is the same; its own chain signed the change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// A device added since.
    Added(Device),
    /// A device revoked since (it was active before).
    Revoked(Device),
}

/// What changed from the devices `before` (as last verified; empty when they were never
/// recorded, which yields no changes) to `after` (a chain that extends that one), in chain
/// order.
pub fn device_changes(before: &[Device], after: &[Device]) -> Vec<DeviceChange> {
    if before.is_empty() {
        return Vec::new();
    }
    let mut changes = Vec::new();
    for device in after {
        match before.iter().find(|known| known.key == device.key) {
            None => {
                changes.push(DeviceChange::Added(device.clone()));
                if !device.is_active() {
                    changes.push(DeviceChange::Revoked(device.clone()));
                }
            }
            Some(known) if known.is_active() && !device.is_active() => {
                changes.push(DeviceChange::Revoked(device.clone()));
            }
            Some(_) => {}
        }
    }
    changes
}

/// The trust decision for `chain` when `pinned` was seen before (`None`: a new contact). On
/// success, what to keep now and what changed.
pub fn check_pin(
    pinned: Option<&PinnedChain>,
    chain: &VerifiedChain,
) -> Result<(PinnedChain, PinChange), PinRefusal> {
    let now = PinnedChain::of(chain);
    let Some(pinned) = pinned else {
        return Ok((now, PinChange::New));
    };
    if pinned.key != now.key {
        return Err(PinRefusal::KeyChanged {
            pinned: pinned.key,
            offered: now.key,
        });
    }
    if now.seq < pinned.seq {
        return Err(PinRefusal::Rollback {
            pinned: pinned.seq,
            served: now.seq,
        });
    }
    if !chain.extends(pinned.seq, pinned.head) {
        return Err(PinRefusal::Forked { seq: pinned.seq });
    }
    let change = if pinned.current_key == now.current_key {
        PinChange::Same
    } else {
        PinChange::Rotated {
            from: pinned.current_key,
        }
    };
    Ok((now, change))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use crate::sigchain::{Endpoint, Op, UnsignedLink};

    fn endpoint(name: &str) -> Op {
        Op::AddEndpoint(Endpoint {
            name: name.into(),
            kind: "nats".into(),
            address: format!("kez.inbox.{name}"),
        })
    }

    fn device(seed: u8, added: u64, revoked: Option<u64>) -> Device {
        Device {
            key: SecretKey::from_seed(&[seed; 32]).public_key(),
            name: format!("d{seed}"),
            kind: crate::sigchain::DeviceKind::Cli,
            added,
            revoked,
        }
    }

    #[test]
    fn device_changes_name_what_was_added_and_revoked_since() {
        let before = [device(1, 1, None), device(2, 2, None)];
        let after = [
            device(1, 1, None),
            device(2, 2, Some(4)),
            device(3, 3, None),
            device(4, 5, Some(6)),
        ];
        assert_eq!(
            device_changes(&before, &after),
            vec![
                DeviceChange::Revoked(device(2, 2, Some(4))),
                DeviceChange::Added(device(3, 3, None)),
                DeviceChange::Added(device(4, 5, Some(6))),
                DeviceChange::Revoked(device(4, 5, Some(6))),
            ]
        );
        assert!(device_changes(&before, &before).is_empty());
        assert!(
            device_changes(&[], &after).is_empty(),
            "never recorded: no notes"
        );
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

    fn link(name: &str) -> Op {
        endpoint(name)
    }
    #[test]
    fn a_contact_is_pinned_on_first_use_and_must_extend_after() {
        let key = SecretKey::from_seed(&[7; 32]);
        let first = UnsignedLink::first(key.public_key(), 100, link("a"))
            .sign(&key)
            .unwrap();
        let one = VerifiedChain::verify(&[first.bytes()]).unwrap();
        let (pinned, change) = check_pin(None, &one).unwrap();
        assert_eq!((pinned, change), (PinnedChain::of(&one), PinChange::New));

        let second = one.next_link(101, link("b")).sign(&key).unwrap();
        let two = VerifiedChain::verify(&[first.bytes(), second.bytes()]).unwrap();
        assert_eq!(
            check_pin(Some(&pinned), &one),
            Ok((pinned, PinChange::Same))
        );
        let (grown, change) = check_pin(Some(&pinned), &two).unwrap();
        assert_eq!((grown.seq, change), (2, PinChange::Same));

        assert_eq!(
            check_pin(Some(&grown), &one),
            Err(PinRefusal::Rollback {
                pinned: 2,
                served: 1
            })
        );
        let fork = one.next_link(102, link("c")).sign(&key).unwrap();
        let forked = VerifiedChain::verify(&[first.bytes(), fork.bytes()]).unwrap();
        assert_eq!(
            check_pin(Some(&grown), &forked),
            Err(PinRefusal::Forked { seq: 2 })
        );

        let mallory = SecretKey::from_seed(&[9; 32]);
        let other = UnsignedLink::first(mallory.public_key(), 100, link("a"))
            .sign(&mallory)
            .unwrap();
        let theirs = VerifiedChain::verify(&[other.bytes()]).unwrap();
        assert_eq!(
            check_pin(Some(&grown), &theirs),
            Err(PinRefusal::KeyChanged {
                pinned: key.public_key(),
                offered: mallory.public_key()
            })
        );
    }

    #[test]
    fn the_current_key_follows_the_chains_own_rotation() {
        let old = SecretKey::from_seed(&[7; 32]);
        let new = SecretKey::from_seed(&[8; 32]);
        let first = UnsignedLink::first(old.public_key(), 100, link("a"))
            .sign(&old)
            .unwrap();
        let one = VerifiedChain::verify(&[first.bytes()]).unwrap();
        let (pinned, _) = check_pin(None, &one).unwrap();
        let rotation = one
            .next_link(101, link("replaced by the rotation"))
            .sign_rotation(&old, &new)
            .unwrap();
        let rotated = VerifiedChain::verify(&[first.bytes(), rotation.bytes()]).unwrap();
        let (now, change) = check_pin(Some(&pinned), &rotated).unwrap();
        assert_eq!(
            change,
            PinChange::Rotated {
                from: old.public_key()
            }
        );
        assert_eq!(
            (now.key, now.current_key),
            (old.public_key(), new.public_key())
        );
    }
}
