//! Files: per-file content keys, chunked encryption, and the offer that carries a file's key to a
//! recipient (PROTOCOL.md §9).
//!
//! A file is encrypted once, with a fresh random [`ContentKey`], before it is imported into a
//! blob store, so every node that stores or serves it (a pinning home server included) only ever
//! holds ciphertext. The ciphertext is a STREAM construction (Hoang, Reyhanitabar, Rogaway and
//! Vizár, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015) over
//! ChaCha20-Poly1305:
//!
//! ```text
//! file     = header || segment_0 || ... || segment_n        (segment_n is the final segment)
//! header   = "KEZF" || 0x01 || nonce_prefix(7)             (12 bytes)
//! segment  = chacha20poly1305(key, nonce_i, plaintext_i, aad = header)   (plaintext_i + 16-byte tag)
//! nonce_i  = nonce_prefix(7) || u32be(i) || last(1)        (last = 0x01 on segment_n, else 0x00)
//! ```
//!
//! Every segment but the final one holds exactly [`SEGMENT_LEN`] (64 KiB) of plaintext; the final
//! one holds less (0 to 65535 bytes), so it is always present, even for an empty file or one whose
//! size is a multiple of 64 KiB. Reordering, dropping, duplicating or truncating segments makes
//! authentication fail or the stream end early, and memory use is one segment whatever the size.
//!
//! The key and the blob's hash travel to the recipient in a [`FileOffer`], the body of an
//! end-to-end envelope (§8) with content type [`FILE_OFFER_CONTENT_TYPE`].

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::canonical;
use crate::key::{KeyError, decode_hex};

/// The first four bytes of every encrypted file.
pub const FILE_MAGIC: &[u8; 4] = b"KEZF";
/// The encrypted file format version (the header's fifth byte).
pub const FILE_VERSION: u8 = 1;
/// Length of the random nonce prefix in the header.
pub const NONCE_PREFIX_LEN: usize = 7;
/// Length of the header: magic, version, nonce prefix.
pub const HEADER_LEN: usize = FILE_MAGIC.len() + 1 + NONCE_PREFIX_LEN;
/// Plaintext bytes in every segment but the final one (which holds fewer).
pub const SEGMENT_LEN: usize = 64 * 1024;
/// Length of the Poly1305 tag that ends every segment.
pub const TAG_LEN: usize = 16;
/// Largest plaintext that can be encrypted: 2^32 segments (the counter is 32 bits), the final
/// one at most `SEGMENT_LEN - 1` bytes. 2^48 − 1 bytes, about 256 TiB.
pub const MAX_PLAINTEXT_LEN: u64 = (1u64 << 32) * SEGMENT_LEN as u64 - 1;

/// Ciphertext bytes of a full (non-final) segment.
const FULL_SEGMENT: usize = SEGMENT_LEN + TAG_LEN;

/// The random 256-bit key of one file. Zeroized on drop; `Debug` never shows it. Text and serde
/// form: 64 lowercase hex digits ([`to_hex`](Self::to_hex)); there is deliberately no `Display`,
/// so it cannot end up in a log line by accident.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ContentKey([u8; 32]);

impl ContentKey {
    /// A fresh key from the OS random number generator. Use one per file, never twice.
    pub fn generate() -> Self {
        let mut key = ContentKey([0u8; 32]);
        OsRng.fill_bytes(&mut key.0);
        key
    }

    /// The key with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ContentKey(bytes)
    }

    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits of the key, zeroized when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(data_encoding::HEXLOWER.encode(&self.0))
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&self.0))
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentKey(<redacted>)")
    }
}

/// Compared in constant time.
impl PartialEq for ContentKey {
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for ContentKey {}

impl FromStr for ContentKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(decode_hex::<32>(text)?);
        Ok(ContentKey(*bytes))
    }
}

impl Serialize for ContentKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ContentKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a file cannot be encrypted or decrypted. Each variant has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum FileCryptError {
    /// The ciphertext ends before its header, or before a final segment (at a segment boundary,
    /// or with fewer than 16 bytes of a segment).
    #[error("encrypted file is truncated")]
    Truncated,
    /// The ciphertext does not start with `KEZF`: not a KEZ encrypted file.
    #[error("not a KEZ encrypted file (bad magic)")]
    BadMagic,
    /// A format version this code does not know.
    #[error("encrypted file format version {version} is not supported; upgrade")]
    UnknownVersion {
        /// The version found.
        version: u8,
    },
    /// A segment does not authenticate: the wrong key (segment 0), or the file was changed,
    /// reordered or cut inside a segment. Plaintext before this segment has been written.
    #[error("encrypted file segment {segment} does not authenticate (wrong key, or tampered)")]
    AuthFailed {
        /// The 0-based index of the segment.
        segment: u64,
    },
    /// Bytes follow the final segment (only detectable when the length is known:
    /// [`decrypt_exact`]).
    #[error("encrypted file has data after its final segment")]
    TrailingData,
    /// The plaintext needs more than 2^32 segments ([`MAX_PLAINTEXT_LEN`]).
    #[error("file is larger than {MAX_PLAINTEXT_LEN} bytes, the format's limit")]
    TooLarge,
    /// Reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl FileCryptError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            FileCryptError::Truncated => "truncated",
            FileCryptError::BadMagic => "bad_magic",
            FileCryptError::UnknownVersion { .. } => "unknown_version",
            FileCryptError::AuthFailed { .. } => "auth_failed",
            FileCryptError::TrailingData => "trailing_data",
            FileCryptError::TooLarge => "too_large",
            FileCryptError::Io(_) => "io",
        }
    }
}

/// Ciphertext bytes for `plaintext_len` bytes of plaintext: the header, the plaintext and one
/// tag per segment (`plaintext_len / 65536 + 1` segments). `None` above [`MAX_PLAINTEXT_LEN`].
pub fn ciphertext_len(plaintext_len: u64) -> Option<u64> {
    if plaintext_len > MAX_PLAINTEXT_LEN {
        return None;
    }
    let segments = plaintext_len / SEGMENT_LEN as u64 + 1;
    Some(HEADER_LEN as u64 + plaintext_len + segments * TAG_LEN as u64)
}

/// Plaintext bytes in a ciphertext of `ciphertext_len` bytes, or `None` if no ciphertext has that
/// length (its final segment would be shorter than a tag, or it is beyond the format's limit).
pub fn plaintext_len(ciphertext_len: u64) -> Option<u64> {
    let body = ciphertext_len.checked_sub(HEADER_LEN as u64)?;
    let full_segments = body / FULL_SEGMENT as u64;
    let final_segment = (body % FULL_SEGMENT as u64).checked_sub(TAG_LEN as u64)?;
    let plaintext = full_segments * SEGMENT_LEN as u64 + final_segment;
    (plaintext <= MAX_PLAINTEXT_LEN).then_some(plaintext)
}

/// The per-file cipher state shared by encryption and decryption.
struct Stream {
    cipher: ChaCha20Poly1305,
    header: [u8; HEADER_LEN],
    /// Index of the next segment.
    counter: u64,
}

impl Stream {
    fn new(key: &ContentKey, nonce_prefix: &[u8; NONCE_PREFIX_LEN]) -> Self {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(FILE_MAGIC);
        header[4] = FILE_VERSION;
        header[5..].copy_from_slice(nonce_prefix);
        Stream {
            cipher: key.cipher(),
            header,
            counter: 0,
        }
    }

    /// The nonce of the next segment, or `TooLarge` past segment 2^32 − 1.
    fn nonce(&self, last: bool) -> Result<Nonce, FileCryptError> {
        let counter = u32::try_from(self.counter).map_err(|_| FileCryptError::TooLarge)?;
        let mut nonce = Nonce::default();
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.header[5..]);
        nonce[NONCE_PREFIX_LEN..11].copy_from_slice(&counter.to_be_bytes());
        nonce[11] = u8::from(last);
        Ok(nonce)
    }

    /// Encrypts the plaintext in `buffer` in place as the next segment (appending the tag).
    fn seal(&mut self, buffer: &mut Vec<u8>, last: bool) -> Result<(), FileCryptError> {
        let nonce = self.nonce(last)?;
        self.cipher
            .encrypt_in_place(&nonce, &self.header, buffer)
            .map_err(|_| FileCryptError::TooLarge)?;
        self.counter += 1;
        Ok(())
    }

    /// Decrypts the segment in `buffer` in place (removing the tag).
    fn open(&mut self, buffer: &mut Vec<u8>, last: bool) -> Result<(), FileCryptError> {
        let nonce = self.nonce(last)?;
        self.cipher
            .decrypt_in_place(&nonce, &self.header, buffer)
            .map_err(|_| FileCryptError::AuthFailed {
                segment: self.counter,
            })?;
        self.counter += 1;
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EncryptorState {
    Header,
    Segments,
    Done,
}

/// Incremental encryption: reads plaintext from `R` and yields the ciphertext in chunks (the
/// header, then one chunk per segment), so a caller can stream it into a blob store without a
/// temporary file. Memory: one segment.
///
/// As an [`Iterator`] it yields `Result<Vec<u8>, FileCryptError>` and ends after the final
/// segment or the first error; [`next_chunk_into`](Self::next_chunk_into) reuses one buffer.
pub struct Encryptor<R> {
    reader: R,
    stream: Stream,
    state: EncryptorState,
}

impl<R: Read> Encryptor<R> {
    /// Encrypts `reader` with `key` and a fresh random nonce prefix.
    pub fn new(key: &ContentKey, reader: R) -> Self {
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        OsRng.fill_bytes(&mut prefix);
        Self::with_nonce_prefix(key, prefix, reader)
    }

    /// With a fixed nonce prefix: for test vectors only.
    pub(crate) fn with_nonce_prefix(
        key: &ContentKey,
        nonce_prefix: [u8; NONCE_PREFIX_LEN],
        reader: R,
    ) -> Self {
        Encryptor {
            reader,
            stream: Stream::new(key, &nonce_prefix),
            state: EncryptorState::Header,
        }
    }

    /// The file's header (the first chunk).
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.stream.header
    }

    /// Replaces the contents of `out` with the next chunk of ciphertext and returns `true`, or
    /// returns `false` (leaving `out` empty) once the final segment has been produced. After an
    /// error, the ciphertext is incomplete and must be discarded; later calls return `false`.
    pub fn next_chunk_into(&mut self, out: &mut Vec<u8>) -> Result<bool, FileCryptError> {
        out.clear();
        match self.state {
            EncryptorState::Done => Ok(false),
            EncryptorState::Header => {
                out.extend_from_slice(&self.stream.header);
                self.state = EncryptorState::Segments;
                Ok(true)
            }
            EncryptorState::Segments => {
                let result = self.next_segment(out);
                if !matches!(result, Ok(false)) {
                    self.state = EncryptorState::Done;
                }
                result.map(|_| true)
            }
        }
    }

    /// Seals the next segment into `out`; `Ok(true)` if it was the final one.
    fn next_segment(&mut self, out: &mut Vec<u8>) -> Result<bool, FileCryptError> {
        // Before reading, so nothing is read that could not be encrypted.
        self.stream.nonce(false)?;
        out.reserve(FULL_SEGMENT);
        out.resize(SEGMENT_LEN, 0);
        let filled = read_up_to(&mut self.reader, out);
        let filled = match filled {
            Ok(filled) => filled,
            Err(err) => {
                out.zeroize();
                return Err(err.into());
            }
        };
        out.truncate(filled);
        let last = filled < SEGMENT_LEN;
        if let Err(err) = self.stream.seal(out, last) {
            out.zeroize();
            return Err(err);
        }
        Ok(last)
    }
}

impl<R: Read> Iterator for Encryptor<R> {
    type Item = Result<Vec<u8>, FileCryptError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut chunk = Vec::with_capacity(FULL_SEGMENT);
        match self.next_chunk_into(&mut chunk) {
            Ok(true) => Some(Ok(chunk)),
            Ok(false) => None,
            Err(err) => Some(Err(err)),
        }
    }
}

impl<R: Read> std::iter::FusedIterator for Encryptor<R> {}

/// Encrypts everything `reader` gives with `key` (and a fresh random nonce prefix) to `writer`,
/// returning the number of ciphertext bytes written. Memory: one segment.
pub fn encrypt<R: Read, W: Write>(
    key: &ContentKey,
    reader: R,
    writer: W,
) -> Result<u64, FileCryptError> {
    encrypt_with(Encryptor::new(key, reader), writer)
}

fn encrypt_with<R: Read, W: Write>(
    mut encryptor: Encryptor<R>,
    mut writer: W,
) -> Result<u64, FileCryptError> {
    let mut chunk = Vec::with_capacity(FULL_SEGMENT);
    let mut written = 0u64;
    while encryptor.next_chunk_into(&mut chunk)? {
        writer.write_all(&chunk)?;
        written += chunk.len() as u64;
    }
    writer.flush()?;
    Ok(written)
}

/// Decrypts a file encrypted with `key` from `reader` to `writer`, returning the number of
/// plaintext bytes written. The end of the ciphertext is where `reader` ends.
///
/// Plaintext is written segment by segment as each one authenticates, so on an error `writer`
/// has received a prefix of the file: callers must write to a temporary file and delete it on
/// error, never show or move a partial result. Memory: one segment.
///
/// Checks, in order: a full header (`truncated`), magic (`bad_magic`), version
/// (`unknown_version`); then per segment: at least a tag's worth of bytes (`truncated`), a
/// segment index below 2^32 (`too_large`), authentication (`auth_failed`). A read of a full
/// segment's size is a non-final segment, anything shorter the final one.
pub fn decrypt<R: Read, W: Write>(
    key: &ContentKey,
    mut reader: R,
    mut writer: W,
) -> Result<u64, FileCryptError> {
    let mut header = [0u8; HEADER_LEN];
    if read_up_to(&mut reader, &mut header)? < HEADER_LEN {
        return Err(FileCryptError::Truncated);
    }
    if &header[..4] != FILE_MAGIC {
        return Err(FileCryptError::BadMagic);
    }
    if header[4] != FILE_VERSION {
        return Err(FileCryptError::UnknownVersion { version: header[4] });
    }
    let prefix: [u8; NONCE_PREFIX_LEN] = header[5..].try_into().expect("7 bytes");
    let mut stream = Stream::new(key, &prefix);
    let mut buffer = Zeroizing::new(Vec::with_capacity(FULL_SEGMENT));
    let mut written = 0u64;
    loop {
        buffer.resize(FULL_SEGMENT, 0);
        let filled = read_up_to(&mut reader, &mut buffer)?;
        if filled < TAG_LEN {
            return Err(FileCryptError::Truncated);
        }
        buffer.truncate(filled);
        let last = filled < FULL_SEGMENT;
        stream.open(&mut buffer, last)?;
        writer.write_all(&buffer)?;
        written += buffer.len() as u64;
        if last {
            writer.flush()?;
            return Ok(written);
        }
    }
}

/// [`decrypt`] for a ciphertext whose length is known (a blob's size, an offer's `cipher_size`):
/// reads at most `ciphertext_len` bytes, answers `truncated` if `reader` ends before that, and
/// `trailing_data` if it has more after a complete, authentic ciphertext of that length.
/// The same rules for `writer` apply: discard its output on any error.
pub fn decrypt_exact<R: Read, W: Write>(
    key: &ContentKey,
    mut reader: R,
    writer: W,
    ciphertext_len: u64,
) -> Result<u64, FileCryptError> {
    let mut limited = Limited {
        inner: &mut reader,
        remaining: ciphertext_len,
        ended_early: false,
    };
    let result = decrypt(key, &mut limited, writer);
    if limited.ended_early {
        return Err(FileCryptError::Truncated);
    }
    // Success means the final segment was a short read: `reader` ended (`ended_early`, above)
    // or exactly `ciphertext_len` bytes were consumed.
    let written = result?;
    if read_up_to(&mut reader, &mut [0u8; 1])? > 0 {
        return Err(FileCryptError::TrailingData);
    }
    Ok(written)
}

/// A reader cut off after `remaining` bytes that remembers whether the inner one ended first.
struct Limited<R> {
    inner: R,
    remaining: u64,
    ended_early: bool,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if max == 0 {
            return Ok(0);
        }
        let read = self.inner.read(&mut buf[..max])?;
        if read == 0 {
            self.ended_early = true;
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

/// Fills `buf` from `reader` until it is full or the reader ends; returns the bytes read.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// The envelope content type (§8) of a message whose body is a [`FileOffer`].
pub const FILE_OFFER_CONTENT_TYPE: &str = "file-offer";
/// Largest file offer, in bytes of JSON.
pub const MAX_OFFER_BYTES: usize = 48 * 1024;
/// Longest file name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 255;
pub use crate::provider::{MAX_PROVIDER_LEN, MAX_PROVIDERS};

/// A blob's BLAKE3 hash: the content address of an encrypted file in the blob store. Text form:
/// 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash([u8; 32]);

impl BlobHash {
    /// The hash with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        BlobHash(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

impl FromStr for BlobHash {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(BlobHash(decode_hex::<32>(text)?))
    }
}

serde_as_text!(BlobHash);

/// The body of a [`FILE_OFFER_CONTENT_TYPE`] message: everything a recipient needs to fetch,
/// check and decrypt one file. JSON with exactly these members; the sender writes it as
/// canonical JSON (§3) with [`to_json`](Self::to_json). It holds the file's key: keep it only
/// as long as the file is wanted, and never log it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOffer {
    /// The file's name, for the recipient to save it under ([`check_name`] rules).
    pub name: String,
    /// Plaintext size in bytes.
    pub size: u64,
    /// BLAKE3 hash of the encrypted blob.
    pub blob: BlobHash,
    /// Size of the encrypted blob in bytes: [`ciphertext_len`] of `size`.
    pub cipher_size: u64,
    /// Where the blob can be fetched: opaque strings (iroh endpoint addresses), 1 to
    /// [`MAX_PROVIDERS`] distinct ones of 1 to [`MAX_PROVIDER_LEN`] bytes, no control characters.
    pub providers: Vec<String>,
    /// The file's content key.
    pub key: ContentKey,
    /// Whether the sender asked its home server to keep (pin) the blob.
    pub pinned: bool,
}

/// Why a file offer is refused. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileOfferError {
    /// Larger than [`MAX_OFFER_BYTES`].
    #[error("file offer is {size} bytes; the limit is {MAX_OFFER_BYTES}")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not JSON, or members missing, unknown or of the wrong type (bad hex included).
    #[error("malformed file offer: {0}")]
    Malformed(String),
    /// The name breaks the [`check_name`] rules.
    #[error("bad file name: {0}")]
    BadName(&'static str),
    /// The provider list breaks its rules.
    #[error("bad providers: {0}")]
    BadProviders(&'static str),
    /// `cipher_size` is not the ciphertext length of `size`, or `size` is beyond the format.
    #[error("file size {size} does not match encrypted size {cipher_size}")]
    SizeMismatch {
        /// The plaintext size.
        size: u64,
        /// The ciphertext size.
        cipher_size: u64,
    },
}

impl FileOfferError {
    /// The failure's stable snake_case name.
    pub fn code(&self) -> &'static str {
        match self {
            FileOfferError::TooLarge { .. } => "too_large",
            FileOfferError::Malformed(_) => "malformed",
            FileOfferError::BadName(_) => "bad_name",
            FileOfferError::BadProviders(_) => "bad_providers",
            FileOfferError::SizeMismatch { .. } => "size_mismatch",
        }
    }
}

impl FileOffer {
    /// Parses and validates an offer (a message body).
    pub fn from_json(bytes: &[u8]) -> Result<FileOffer, FileOfferError> {
        if bytes.len() > MAX_OFFER_BYTES {
            return Err(FileOfferError::TooLarge { size: bytes.len() });
        }
        let offer: FileOffer = serde_json::from_slice(bytes)
            .map_err(|err| FileOfferError::Malformed(err.to_string()))?;
        offer.validate()?;
        Ok(offer)
    }

    /// The offer as canonical JSON (§3), after validating it. Zeroized when dropped: it holds
    /// the key.
    pub fn to_json(&self) -> Result<Zeroizing<Vec<u8>>, FileOfferError> {
        self.validate()?;
        let value = serde_json::to_value(self).expect("an offer serialises");
        let bytes = Zeroizing::new(
            canonical::encode(&value).map_err(|err| FileOfferError::Malformed(err.to_string()))?,
        );
        if bytes.len() > MAX_OFFER_BYTES {
            return Err(FileOfferError::TooLarge { size: bytes.len() });
        }
        Ok(bytes)
    }

    /// Checks the name, the providers and the sizes, in that order.
    pub fn validate(&self) -> Result<(), FileOfferError> {
        check_name(&self.name)?;
        check_providers(&self.providers)?;
        if ciphertext_len(self.size) != Some(self.cipher_size) {
            return Err(FileOfferError::SizeMismatch {
                size: self.size,
                cipher_size: self.cipher_size,
            });
        }
        Ok(())
    }
}

/// A file name's rules: 1 to 255 bytes of UTF-8; no `/`, `\` or control character (Unicode
/// category Cc: U+0000–U+001F, U+007F–U+009F); not `.` or `..`. A valid name is a single path
/// component on every common system, so joining it to a directory stays in that directory.
pub fn check_name(name: &str) -> Result<(), FileOfferError> {
    if name.is_empty() {
        return Err(FileOfferError::BadName("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(FileOfferError::BadName("longer than 255 bytes"));
    }
    if name == "." || name == ".." {
        return Err(FileOfferError::BadName("`.` and `..` are not names"));
    }
    if name.contains(['/', '\\']) {
        return Err(FileOfferError::BadName("contains `/` or `\\`"));
    }
    if name.chars().any(char::is_control) {
        return Err(FileOfferError::BadName("contains a control character"));
    }
    Ok(())
}

/// A valid name ([`check_name`]) made from any text, e.g. a local path's last component: `/`,
/// `\` and control characters become `_`, the result is cut to 255 bytes at a character
/// boundary, and an empty result, `.` or `..` becomes `file`. Valid names are returned
/// unchanged.
pub fn safe_name(raw: &str) -> String {
    let mut name = String::with_capacity(raw.len().min(MAX_NAME_LEN));
    for c in raw.chars() {
        let c = if c == '/' || c == '\\' || c.is_control() {
            '_'
        } else {
            c
        };
        if name.len() + c.len_utf8() > MAX_NAME_LEN {
            break;
        }
        name.push(c);
    }
    if name.is_empty() || name == "." || name == ".." {
        name = "file".to_owned();
    }
    name
}

/// A provider list's rules (file offers, pin requests): 1 to [`MAX_PROVIDERS`] distinct
/// strings of 1 to [`MAX_PROVIDER_LEN`] bytes without control characters.
pub fn check_providers(providers: &[String]) -> Result<(), FileOfferError> {
    if providers.is_empty() {
        return Err(FileOfferError::BadProviders("no providers"));
    }
    if providers.len() > MAX_PROVIDERS {
        return Err(FileOfferError::BadProviders("more than 16 providers"));
    }
    for (i, provider) in providers.iter().enumerate() {
        if provider.is_empty() || provider.len() > MAX_PROVIDER_LEN {
            return Err(FileOfferError::BadProviders(
                "a provider is empty or longer than 1024 bytes",
            ));
        }
        if provider.chars().any(char::is_control) {
            return Err(FileOfferError::BadProviders(
                "a provider contains a control character",
            ));
        }
        if providers[..i].contains(provider) {
            return Err(FileOfferError::BadProviders("a provider is listed twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
