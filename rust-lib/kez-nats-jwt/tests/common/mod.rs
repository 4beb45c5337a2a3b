//! Test helpers: signing arbitrary (also malformed) JWTs the way nats-server does, and a
//! realistic authorization request modelled on the captured ones.

#![allow(dead_code)]

use data_encoding::{BASE64, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde_json::{Value, json};

/// The header nats-server writes.
pub const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// A fixed "now" for the synthetic requests (2027-01-15).
pub const NOW: u64 = 1_800_000_000;

/// base64url without padding.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    BASE64URL_NOPAD.encode(bytes.as_ref())
}

/// Signs `header.claims` (both given as raw bytes) with `key`, over the base64url text.
pub fn sign_raw(key: &KeyPair, header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64(sig))
}

/// Signs `claims` under the standard header with `key`.
pub fn sign(key: &KeyPair, claims: &Value) -> String {
    sign_raw(key, HEADER.as_bytes(), claims.to_string().as_bytes())
}

/// The nkey text (`prefix` byte, the 32 `raw` bytes, the CRC, base32) of any bytes, curve
/// point or not, as nats-server's nkeys library encodes keys.
pub fn nkey_of_raw(prefix: u8, raw: &[u8; 32]) -> String {
    let mut bytes = vec![prefix];
    bytes.extend_from_slice(raw);
    let mut crc: u16 = 0;
    for &byte in &bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    bytes.extend_from_slice(&crc.to_le_bytes());
    data_encoding::BASE32_NOPAD.encode(&bytes)
}

/// 32 bytes that are no ed25519 curve point: the first small y off the curve.
pub fn not_a_point() -> [u8; 32] {
    (2u8..=255)
        .map(|y| {
            let mut raw = [0u8; 32];
            raw[0] = y;
            raw
        })
        .find(|raw| ed25519_dalek::VerifyingKey::from_bytes(raw).is_err())
        .expect("some small y is off the curve")
}

/// The pieces of a synthetic request.
pub struct Setup {
    /// The server's key (`N...`), which signs requests.
    pub server: KeyPair,
    /// The callout issuer account (`A...`).
    pub issuer: KeyPair,
    /// The connecting client's key (`U...`).
    pub client: KeyPair,
    /// The fresh user key the server made for this connection.
    pub user_nkey: String,
    /// The nonce the server sent the client.
    pub nonce: String,
}

impl Setup {
    /// Fresh random keys.
    pub fn new() -> Self {
        Self {
            server: KeyPair::new_server(),
            issuer: KeyPair::new_account(),
            client: KeyPair::new_user(),
            user_nkey: KeyPair::new_user().public_key(),
            nonce: "rI5i3fBmLs5U_hw".to_owned(),
        }
    }

    /// The client's signature over `message`, base64url without padding (as async-nats).
    pub fn client_sig(&self, message: &[u8]) -> String {
        b64(self.client.sign(message).unwrap())
    }

    /// The client's signature over the nonce in standard base64 with padding (as nats-py).
    pub fn client_sig_std(&self) -> String {
        BASE64.encode(&self.client.sign(self.nonce.as_bytes()).unwrap())
    }

    /// Request claims shaped like those nats-server 2.15.1 writes, valid at [`NOW`].
    pub fn claims(&self) -> Value {
        let server_id = self.server.public_key();
        json!({
            "aud": "nats-authorization-request",
            "exp": NOW + 2,
            "jti": "VC5JZ65C3ZIYQVUKDIHFNMB6B62GUH5X5QGIZ4VUYROCDCWIKRSQ",
            "iat": NOW,
            "iss": server_id,
            "sub": self.issuer.public_key(),
            "nats": {
                "server_id": {
                    "name": "kez-test",
                    "host": "127.0.0.1",
                    "id": server_id,
                    "version": "2.15.1"
                },
                "user_nkey": self.user_nkey,
                "client_info": {
                    "host": "127.0.0.1",
                    "id": 8,
                    "user": self.client.public_key(),
                    "name": "kez-test-client",
                    "kind": "Client",
                    "type": "nats",
                    "nonce": self.nonce
                },
                "connect_opts": {
                    "nkey": self.client.public_key(),
                    "sig": self.client_sig(self.nonce.as_bytes()),
                    "name": "kez-test-client",
                    "lang": "rust",
                    "version": "0.51.0",
                    "protocol": 1
                },
                "type": "authorization_request",
                "version": 2
            }
        })
    }

    /// The claims after `edit`, signed by the server.
    pub fn request_with(&self, edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = self.claims();
        edit(&mut claims);
        sign(&self.server, &claims)
    }

    /// A valid signed request.
    pub fn request(&self) -> String {
        self.request_with(|_| {})
    }
}
