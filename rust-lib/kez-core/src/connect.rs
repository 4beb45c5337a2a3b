//! The connect proof (PROTOCOL.md §6.1): how a client proves to the auth callout that it holds
//! the key it connects as.
//!
//! The broker sends a nonce in its `INFO`; the client signs it in
//! [`SignatureDomain::NatsConnect`]. Whoever sends `INFO` (the broker, or anyone on the path of
//! a plain connection) chooses the nonce, so the client signs only what a nats-server nonce
//! looks like ([`check_nonce`]), and only under the connect tag: such a signature can never pass
//! for a sigchain link, a registration or any other KEZ statement.

use crate::key::{PublicKey, SecretKey, Signature, SignatureDomain};

/// Longest nonce a client signs. nats-server's are 15 characters (11 random bytes, base64url).
pub const MAX_NONCE_LEN: usize = 64;

/// Why a client refuses to sign a nonce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// The broker sent no nonce (its config has no nkey user, so it asks for no proof).
    #[error("the broker sent no nonce to sign; it is not configured for KEZ keys")]
    Empty,
    /// Longer than [`MAX_NONCE_LEN`].
    #[error(
        "the broker's nonce is {0} bytes, longer than any nats-server sends ({MAX_NONCE_LEN}): refusing to sign it"
    )]
    TooLong(usize),
    /// A byte outside `A-Z a-z 0-9 _ -`.
    #[error(
        "the broker's nonce holds bytes no nats-server nonce has (only A-Z a-z 0-9 _ -): refusing to sign it"
    )]
    BadCharacter,
}

/// Checks that `nonce` is what nats-server sends: 1 to [`MAX_NONCE_LEN`] characters of the
/// base64url alphabet (`A-Z a-z 0-9 _ -`).
pub fn check_nonce(nonce: &[u8]) -> Result<&str, NonceError> {
    if nonce.is_empty() {
        return Err(NonceError::Empty);
    }
    if nonce.len() > MAX_NONCE_LEN {
        return Err(NonceError::TooLong(nonce.len()));
    }
    if !nonce
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err(NonceError::BadCharacter);
    }
    Ok(std::str::from_utf8(nonce).expect("ASCII"))
}

/// The connect proof of `key` for the broker's `nonce`: its signature over
/// `"KEZ-NATS-CONNECT-V1" || 0x00 || nonce`. A nonce [`check_nonce`] refuses is not signed.
pub fn sign_nonce(key: &SecretKey, nonce: &[u8]) -> Result<Signature, NonceError> {
    let nonce = check_nonce(nonce)?;
    Ok(key.sign(SignatureDomain::NatsConnect, nonce.as_bytes()))
}

/// Whether the callout accepts the untagged proofs of the previous release (a signature over
/// the nonce's bytes alone), for clients not yet upgraded. New clients never make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyProofs {
    /// Accepted (the default of this release, so existing clients keep connecting).
    Accept,
    /// Refused: only [`SignatureDomain::NatsConnect`] proofs.
    Refuse,
}

/// Which form a proof that verified has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofForm {
    /// Over `"KEZ-NATS-CONNECT-V1" || 0x00 || nonce`.
    Tagged,
    /// Over the nonce alone: a client of the previous release, which signs whatever a broker
    /// sends and should be upgraded.
    Legacy,
}

/// A connect proof that does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// Neither form verifies (or only the legacy one, which is refused).
    #[error("the client's connect proof does not verify with the key it names")]
    BadSignature,
    /// Only the legacy form verifies, and legacy proofs are refused.
    #[error(
        "the client signed the nonce without the KEZ-NATS-CONNECT-V1 tag (a client older than this server accepts): it must be upgraded"
    )]
    LegacyRefused,
}

/// Checks `signature` as `key`'s connect proof for `nonce` (the callout's step 2, PROTOCOL.md
/// §6.1): the tagged form, else, when `legacy` allows, the untagged form of the previous release.
pub fn verify_proof(
    key: &PublicKey,
    nonce: &str,
    signature: &Signature,
    legacy: LegacyProofs,
) -> Result<ProofForm, ProofError> {
    if key
        .verify(SignatureDomain::NatsConnect, nonce.as_bytes(), signature)
        .is_ok()
    {
        return Ok(ProofForm::Tagged);
    }
    match key.verify_untagged(nonce.as_bytes(), signature) {
        Ok(()) if legacy == LegacyProofs::Accept => Ok(ProofForm::Legacy),
        Ok(()) => Err(ProofError::LegacyRefused),
        Err(_) => Err(ProofError::BadSignature),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "pQ1rX_-9aZk0Lm3";

    fn key() -> SecretKey {
        SecretKey::from_seed(&[9; 32])
    }

    #[test]
    fn nats_server_nonces_are_signed_under_the_connect_tag() {
        let sig = sign_nonce(&key(), NONCE.as_bytes()).unwrap();
        let public = key().public_key();
        assert_eq!(
            public.verify_untagged(b"KEZ-NATS-CONNECT-V1\0pQ1rX_-9aZk0Lm3", &sig),
            Ok(())
        );
        assert_eq!(
            verify_proof(&public, NONCE, &sig, LegacyProofs::Refuse),
            Ok(ProofForm::Tagged)
        );
        assert_eq!(
            verify_proof(&public, "pQ1rX_-9aZk0Lm4", &sig, LegacyProofs::Accept),
            Err(ProofError::BadSignature)
        );
    }

    #[test]
    fn nonces_no_nats_server_sends_are_not_signed() {
        let link_message = b"KEZ-SIGCHAIN-LINK-V1\0{\"chain\":\"ed25519:...\"}";
        assert_eq!(
            sign_nonce(&key(), link_message),
            Err(NonceError::BadCharacter)
        );
        assert_eq!(sign_nonce(&key(), b""), Err(NonceError::Empty));
        assert_eq!(
            sign_nonce(&key(), &[b'a'; 65]),
            Err(NonceError::TooLong(65))
        );
        assert!(sign_nonce(&key(), &[b'a'; 64]).is_ok());
        for bad in [
            &b"abc def"[..],
            b"abc\0def",
            b"abc=",
            b"abc+/",
            "é".as_bytes(),
            b"a.b",
        ] {
            assert_eq!(
                sign_nonce(&key(), bad),
                Err(NonceError::BadCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn legacy_proofs_verify_only_when_accepted() {
        let public = key().public_key();
        let legacy = Signature::from_bytes(
            ed25519_dalek::Signer::sign(
                &ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
                NONCE.as_bytes(),
            )
            .to_bytes(),
        );
        assert_eq!(
            verify_proof(&public, NONCE, &legacy, LegacyProofs::Accept),
            Ok(ProofForm::Legacy)
        );
        assert_eq!(
            verify_proof(&public, NONCE, &legacy, LegacyProofs::Refuse),
            Err(ProofError::LegacyRefused)
        );
    }

    #[test]
    fn a_connect_proof_is_no_other_kez_signature() {
        // Whatever the nonce, the signed bytes start with the connect tag and a zero byte, which
        // no other domain's message does.
        let message = SignatureDomain::NatsConnect.message(NONCE.as_bytes());
        for other in SignatureDomain::ALL
            .into_iter()
            .filter(|d| *d != SignatureDomain::NatsConnect)
        {
            assert!(!message.starts_with(&other.message(b"")), "{other:?}");
        }
    }
}
