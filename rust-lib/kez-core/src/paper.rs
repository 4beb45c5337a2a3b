//! Paper keys: a device key a person writes down as 24 words (PROTOCOL.md §1.5).
//!
//! The words are the BIP39 English encoding of 32 random bytes (256 bits and an 8-bit
//! checksum, 11 bits a word), and those 32 bytes are the paper device's ed25519 seed. Nothing
//! here stores the words: they exist in memory while shown or typed, and are zeroized on drop.

use std::fmt;

use bip39::{Language, Mnemonic};
use zeroize::Zeroizing;

use crate::SecretKey;

/// How many words a paper key has.
pub const PAPER_KEY_WORDS: usize = 24;

/// A paper key: its words and the device key they encode.
pub struct PaperKey {
    /// Zeroized on drop (bip39's `zeroize` feature).
    mnemonic: Mnemonic,
}

/// Why typed words are not a paper key. The messages never repeat a word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaperKeyError {
    /// Not 24 words.
    #[error(
        "a paper key is {PAPER_KEY_WORDS} words, and this is {words}: type every word, in order, separated by spaces"
    )]
    WordCount {
        /// How many words were typed.
        words: usize,
    },
    /// A word outside the BIP39 English list.
    #[error(
        "word {position} is not a paper-key word (BIP39 English): check its spelling against the paper"
    )]
    UnknownWord {
        /// Its position, from 1.
        position: usize,
    },
    /// Every word is a paper-key word, but together they are not a paper key.
    #[error(
        "these words are not a paper key: one of them is wrong, or two are swapped (their checksum does not match); check them against the paper"
    )]
    Checksum,
}

impl PaperKey {
    /// A fresh paper key from the operating system's random number generator.
    pub fn generate() -> PaperKey {
        use rand_core::RngCore;
        let mut seed = Zeroizing::new([0u8; 32]);
        rand_core::OsRng.fill_bytes(seed.as_mut());
        PaperKey::from_seed(&seed)
    }

    /// The paper key whose device seed is `seed` (deterministic: for tests and vectors).
    pub fn from_seed(seed: &[u8; 32]) -> PaperKey {
        let mnemonic = Mnemonic::from_entropy_in(Language::English, seed)
            .expect("32 bytes are a valid BIP39 entropy length");
        PaperKey { mnemonic }
    }

    /// Reads the words as a person types them: any case, any whitespace between them.
    pub fn parse(typed: &str) -> Result<PaperKey, PaperKeyError> {
        let words = typed.split_whitespace().count();
        if words != PAPER_KEY_WORDS {
            return Err(PaperKeyError::WordCount { words });
        }
        let normalized = Zeroizing::new(
            typed
                .split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(" "),
        );
        match Mnemonic::parse_in_normalized(Language::English, &normalized) {
            Ok(mnemonic) => Ok(PaperKey { mnemonic }),
            Err(bip39::Error::UnknownWord(index)) => Err(PaperKeyError::UnknownWord {
                position: index + 1,
            }),
            Err(bip39::Error::InvalidChecksum) => Err(PaperKeyError::Checksum),
            // 24 words of the English list fail only by their checksum.
            Err(bip39::Error::BadWordCount(words)) => Err(PaperKeyError::WordCount { words }),
            Err(_) => Err(PaperKeyError::Checksum),
        }
    }

    /// The words, in order, to show once.
    pub fn words(&self) -> Vec<&'static str> {
        self.mnemonic.words().collect()
    }

    /// A position (1 to 24) to ask a person for, to confirm they wrote the words down: random,
    /// so that writing down one remembered word is not enough.
    pub fn position_to_confirm() -> usize {
        use rand_core::RngCore;
        // 2^64 is not a multiple of 24; the bias is below 2^-59.
        (rand_core::OsRng.next_u64() % PAPER_KEY_WORDS as u64) as usize + 1
    }

    /// Whether `answer` is the word at `position` (from 1), as a person types it.
    pub fn is_word(&self, position: usize, answer: &str) -> bool {
        position
            .checked_sub(1)
            .and_then(|index| self.mnemonic.words().nth(index))
            .is_some_and(|word| word.eq_ignore_ascii_case(answer.trim()))
    }

    /// The paper device's key: its 32 bytes are the ed25519 seed.
    pub fn secret_key(&self) -> SecretKey {
        let (entropy, len) = self.mnemonic.to_entropy_array();
        let entropy = Zeroizing::new(entropy);
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            entropy[..len]
                .try_into()
                .expect("a paper key always holds 32 bytes"),
        );
        SecretKey::from_seed(&seed)
    }
}

impl fmt::Debug for PaperKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PaperKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 256-bit cases of the BIP39 reference vectors (trezor/python-mnemonic vectors.json):
    /// the words are the standard encoding, so any BIP39 implementation reads a KEZ paper key.
    const REFERENCE: [(&str, &str); 3] = [
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon art",
        ),
        (
            "7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f",
            "legal winner thank year wave sausage worth useful legal winner thank year wave sausage worth useful legal winner thank year wave sausage worth title",
        ),
        (
            "8080808080808080808080808080808080808080808080808080808080808080",
            "letter advice cage absurd amount doctor acoustic avoid letter advice cage absurd amount doctor acoustic avoid letter advice cage absurd amount doctor acoustic bless",
        ),
    ];

    fn seed(hex: &str) -> [u8; 32] {
        data_encoding::HEXLOWER
            .decode(hex.as_bytes())
            .unwrap()
            .try_into()
            .unwrap()
    }

    #[test]
    fn words_are_the_bip39_encoding_of_the_seed() {
        for (hex, words) in REFERENCE {
            let paper = PaperKey::from_seed(&seed(hex));
            assert_eq!(paper.words().join(" "), words);
            let parsed = PaperKey::parse(words).unwrap();
            assert_eq!(
                parsed.secret_key().public_key(),
                SecretKey::from_seed(&seed(hex)).public_key()
            );
        }
    }

    #[test]
    fn typed_words_may_differ_in_case_and_spacing() {
        let (hex, words) = REFERENCE[1];
        let typed = format!("  {}\n", words.to_uppercase().replace(' ', " \t "));
        let parsed = PaperKey::parse(&typed).unwrap();
        assert_eq!(
            parsed.secret_key().public_key(),
            SecretKey::from_seed(&seed(hex)).public_key()
        );
    }

    #[test]
    fn a_generated_key_reads_back_and_differs_from_the_next() {
        let paper = PaperKey::generate();
        let words = paper.words();
        assert_eq!(words.len(), PAPER_KEY_WORDS);
        let again = PaperKey::parse(&words.join(" ")).unwrap();
        assert_eq!(
            again.secret_key().public_key(),
            paper.secret_key().public_key()
        );
        assert_ne!(
            PaperKey::generate().secret_key().public_key(),
            paper.secret_key().public_key()
        );
    }

    #[test]
    fn wrong_words_are_refused_with_what_to_check() {
        let (_, words) = REFERENCE[1];
        let mut list: Vec<&str> = words.split(' ').collect();
        assert_eq!(
            PaperKey::parse(&list[..23].join(" ")).unwrap_err(),
            PaperKeyError::WordCount { words: 23 }
        );
        assert_eq!(
            PaperKey::parse("").unwrap_err(),
            PaperKeyError::WordCount { words: 0 }
        );
        list[6] = "worthy";
        assert_eq!(
            PaperKey::parse(&list.join(" ")).unwrap_err(),
            PaperKeyError::UnknownWord { position: 7 }
        );
        // Two different words swapped: every word is known, the checksum catches it.
        let mut swapped: Vec<&str> = words.split(' ').collect();
        swapped.swap(0, 1);
        assert_eq!(
            PaperKey::parse(&swapped.join(" ")).unwrap_err(),
            PaperKeyError::Checksum
        );
        let message = PaperKeyError::UnknownWord { position: 7 }.to_string();
        assert!(message.contains("word 7") && !message.contains("worthy"));
    }

    #[test]
    fn one_word_asked_back_must_match_its_position() {
        let paper = PaperKey::from_seed(&seed(REFERENCE[1].0));
        assert!(paper.is_word(1, "legal"));
        assert!(paper.is_word(24, " Title "));
        assert!(!paper.is_word(2, "legal"));
        assert!(!paper.is_word(0, "legal"));
        assert!(!paper.is_word(25, "title"));
    }

    #[test]
    fn positions_to_confirm_are_word_positions_and_vary() {
        let positions: std::collections::BTreeSet<usize> =
            (0..200).map(|_| PaperKey::position_to_confirm()).collect();
        assert!(positions.iter().all(|p| (1..=PAPER_KEY_WORDS).contains(p)));
        assert!(positions.len() > 12, "{positions:?}");
    }

    #[test]
    fn debug_shows_no_word() {
        let paper = PaperKey::from_seed(&seed(REFERENCE[1].0));
        assert_eq!(format!("{paper:?}"), "PaperKey(..)");
    }
}
