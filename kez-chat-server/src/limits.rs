//! Rate limits against hostile clients: token buckets keyed by who asks (PROTOCOL.md §5.5).
//!
//! Limiters, each a map of token buckets with a hard cap on its size:
//! - **per key**: every `kez.registry.*`, `kez.sigchain.*` and `kez.pin.*` request, keyed by the
//!   caller's KEZ key (the nkey nats-server vouches for in the `Nats-Request-Info` header, see
//!   [`Caller`]); over the limit the answer is 429 `rate_limited`;
//! - **registrations per address**: `kez.registry.register` keyed by the client's IP address
//!   (the same header); over the limit 429 `too_many_registrations`;
//! - **registrations per instance**: every `kez.registry.register`, one bucket; over the limit
//!   429 `too_many_registrations`;
//! - **unregistered connections per address**: the auth callout's narrow-profile grants, keyed
//!   by `client_info.host`; over the limit the connection is refused;
//! - **messages and bytes per sender**: `kez.mail.send`, keyed by the caller's key; over either
//!   limit 429 `rate_limited`;
//! - **claims per claimer**: `kez.keys.claim`, keyed by the caller's key; over the limit 429
//!   `rate_limited`;
//! - **one-time keys per target**: the one-time prekeys `kez.keys.claim` hands out per target
//!   device; over the limit the device's fallback key is handed out instead.
//!
//! A bucket holds at most `burst` tokens, refills at `per_sec` tokens a second and each request
//! takes one. A bucket that has refilled completely is the same as no bucket, so those are the
//! ones dropped when a map reaches its cap; if that frees too little (a flood of distinct
//! callers), the whole map is cleared, which costs the callers a fresh burst and nothing else.
//! Memory is therefore bounded by the cap, and every check is O(1) amortised.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most buckets one limiter keeps (each a few dozen bytes plus its key).
pub const DEFAULT_MAX_BUCKETS: usize = 100_000;
/// Longest key kept (an nkey is 56 characters, an IPv6 address at most 45).
const MAX_KEY_LEN: usize = 64;

/// A rate: `per_sec` tokens a second, at most `burst` at once. `per_sec == 0.0` disables it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Bucket size: the most requests accepted at once after a quiet spell.
    pub burst: u32,
}

impl Rate {
    /// `per_sec` a second, bursts of `burst`.
    pub const fn new(per_sec: f64, burst: u32) -> Rate {
        Rate { per_sec, burst }
    }

    /// No limit at all.
    pub const OFF: Rate = Rate {
        per_sec: 0.0,
        burst: 0,
    };

    /// Whether this rate limits anything.
    pub fn is_on(&self) -> bool {
        self.per_sec > 0.0 && self.burst > 0
    }
}

/// The server's limits; [`Limits::default`] holds the defaults PROTOCOL.md §5.5 documents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests per caller key to `kez.registry.*`, `kez.sigchain.*` and `kez.pin.*`.
    pub per_key: Rate,
    /// `kez.registry.register` requests per client address.
    pub register_per_addr: Rate,
    /// `kez.registry.register` requests to this instance from anyone: what new accounts an
    /// attacker with many addresses can make.
    pub register_global: Rate,
    /// Connections the auth callout grants the unregistered profile, per client address.
    pub unregistered_connects_per_addr: Rate,
    /// Messages per sender key through `kez.mail.send`.
    pub send_per_key: Rate,
    /// Envelope bytes per sender key through `kez.mail.send` (one token a byte): what one key
    /// can make the broker store.
    pub send_bytes_per_key: Rate,
    /// `kez.keys.claim` requests per claimer key (PROTOCOL.md §15.2).
    pub claim_per_key: Rate,
    /// One-time prekeys handed out per target device; past it a claim gets the device's
    /// fallback key (draining a device's one-time keys is bounded).
    pub one_time_per_target: Rate,
    /// Most buckets each limiter keeps.
    pub max_buckets: usize,
}

/// Default per-key rate: 20 requests a second, bursts of 40.
pub const DEFAULT_PER_KEY: Rate = Rate::new(20.0, 40);
/// Default registration rate per address: 20 at once, then one a minute.
pub const DEFAULT_REGISTER_PER_ADDR: Rate = Rate::new(1.0 / 60.0, 20);
/// Default unregistered connections per address: 50 at once, then 5 a second.
pub const DEFAULT_UNREGISTERED_CONNECTS_PER_ADDR: Rate = Rate::new(5.0, 50);
/// Default registrations per instance from all addresses: 600 at once, then one a second.
pub const DEFAULT_REGISTER_GLOBAL: Rate = Rate::new(1.0, 600);
/// Default messages per sender: 200 at once, then 20 a second.
pub const DEFAULT_SEND_PER_KEY: Rate = Rate::new(20.0, 200);
/// Default envelope bytes per sender: 8 MiB at once, then 16 MiB an hour.
pub const DEFAULT_SEND_BYTES_PER_KEY: Rate = Rate::new(16.0 * 1024.0 * 1024.0 / 3600.0, 8 << 20);

/// Default claims per claimer: 50 at once, then 10 a second.
pub const DEFAULT_CLAIM_PER_KEY: Rate = Rate::new(10.0, 50);
/// Default one-time keys handed out per target device: 20 at once, then 20 a minute.
pub const DEFAULT_ONE_TIME_PER_TARGET: Rate = Rate::new(20.0 / 60.0, 20);

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            per_key: DEFAULT_PER_KEY,
            register_per_addr: DEFAULT_REGISTER_PER_ADDR,
            register_global: DEFAULT_REGISTER_GLOBAL,
            unregistered_connects_per_addr: DEFAULT_UNREGISTERED_CONNECTS_PER_ADDR,
            send_per_key: DEFAULT_SEND_PER_KEY,
            send_bytes_per_key: DEFAULT_SEND_BYTES_PER_KEY,
            claim_per_key: DEFAULT_CLAIM_PER_KEY,
            one_time_per_target: DEFAULT_ONE_TIME_PER_TARGET,
            max_buckets: DEFAULT_MAX_BUCKETS,
        }
    }
}

impl Limits {
    /// No limits (for tests that measure something else).
    pub const OFF: Limits = Limits {
        per_key: Rate::OFF,
        register_per_addr: Rate::OFF,
        register_global: Rate::OFF,
        unregistered_connects_per_addr: Rate::OFF,
        send_per_key: Rate::OFF,
        send_bytes_per_key: Rate::OFF,
        claim_per_key: Rate::OFF,
        one_time_per_target: Rate::OFF,
        max_buckets: DEFAULT_MAX_BUCKETS,
    };
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by key, at most `max_buckets` of them.
#[derive(Debug)]
pub struct Limiter {
    rate: Rate,
    max_buckets: usize,
    buckets: Mutex<HashMap<Box<str>, Bucket>>,
}

/// A refusal: how long until the next request would be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Time until one token is back.
    pub retry_after: Duration,
}

impl Limited {
    /// [`Limited::retry_after`] in whole milliseconds, at least 1: what `Kez-Retry-After-Ms`
    /// says.
    pub fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.retry_after.as_millis().max(1)).unwrap_or(u64::MAX)
    }
}

impl Limiter {
    /// A limiter for `rate` keeping at most `max_buckets` buckets (at least 1).
    pub fn new(rate: Rate, max_buckets: usize) -> Limiter {
        Limiter {
            rate,
            max_buckets: max_buckets.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the limiter limits anything.
    pub fn is_on(&self) -> bool {
        self.rate.is_on()
    }

    /// Takes one token from `key`'s bucket at `now`, or says how long until there is one.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Limited> {
        self.take(key, 1, now)
    }

    /// Takes `cost` tokens (at most the burst) from `key`'s bucket at `now`, or says how long
    /// until there are that many.
    pub fn take(&self, key: &str, cost: u32, now: Instant) -> Result<(), Limited> {
        if !self.rate.is_on() {
            return Ok(());
        }
        let cost = f64::from(cost.min(self.rate.burst));
        let key = truncate(key);
        let burst = f64::from(self.rate.burst);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_buckets {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key.into()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate.per_sec).min(burst);
        bucket.updated = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            let missing = cost - bucket.tokens;
            Err(Limited {
                retry_after: Duration::from_secs_f64(missing / self.rate.per_sec)
                    .max(Duration::from_millis(1)),
            })
        }
    }

    /// How many buckets are kept now.
    pub fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .len()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every bucket that has refilled (idle callers); if that frees less than a quarter
    /// of the cap, drops them all.
    fn make_room(&self, buckets: &mut HashMap<Box<str>, Bucket>, now: Instant) {
        let burst = f64::from(self.rate.burst);
        let per_sec = self.rate.per_sec;
        buckets.retain(|_, bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens + elapsed * per_sec < burst
        });
        if buckets.len() > self.max_buckets - self.max_buckets / 4 {
            tracing::warn!(
                buckets = buckets.len(),
                "rate limiter full of active callers; starting afresh"
            );
            buckets.clear();
        }
    }
}

fn truncate(key: &str) -> &str {
    if key.len() <= MAX_KEY_LEN {
        return key;
    }
    let mut end = MAX_KEY_LEN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

/// Who sent a request, as nats-server vouches for it in the `Nats-Request-Info` header it
/// stamps on every request that crosses a service import (the `APP` account's imports carry
/// `share: true`, so the header names the user and its address). nats-server writes the header
/// itself on the first hop and replaces one a client sent, so it cannot be forged from `APP`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The connection's nkey (`U…`): its KEZ key, proven to the auth callout.
    pub user: Option<String>,
    /// The client's IP address.
    pub host: Option<String>,
}

/// The header nats-server puts on requests that cross a service import.
pub const REQUEST_INFO_HEADER: &str = "Nats-Request-Info";

#[derive(serde::Deserialize)]
struct RequestInfo {
    #[serde(default)]
    acc: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    host: Option<String>,
}

impl Caller {
    /// Reads the caller from a `Nats-Request-Info` header value. Only requests from `account`
    /// (the users' account) are attributed; anything unreadable is an unknown caller.
    pub fn from_request_info(value: &str, account: &str) -> Caller {
        let Ok(info) = serde_json::from_str::<RequestInfo>(value) else {
            return Caller::default();
        };
        if info.acc.as_deref() != Some(account) {
            return Caller::default();
        }
        let clean = |text: Option<String>| {
            text.filter(|text| !text.is_empty() && text.len() <= MAX_KEY_LEN)
        };
        Caller {
            user: clean(info.user),
            host: clean(info.host).map(|host| address_bucket(&host)),
        }
    }
}

/// The key a client address is limited under: an IPv4 address as it is, an IPv6 address by
/// its /64 (one subscriber usually holds a whole /64, so keying on the full address would give
/// one attacker 2^64 budgets); an IPv4-mapped IPv6 address as the IPv4 address. Anything else
/// (not an address) as it is.
pub fn address_bucket(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", std::net::Ipv6Addr::from(prefix))
            }
        },
        Ok(std::net::IpAddr::V4(v4)) => v4.to_string(),
        Err(_) => host.to_owned(),
    }
}

/// The request limiters of PROTOCOL.md §5.5 (the callout holds the connection one).
#[derive(Debug)]
pub struct Limiters {
    /// Requests per caller key.
    pub per_key: Limiter,
    /// Registrations per client address.
    pub register_per_addr: Limiter,
    /// Registrations to this instance from anyone (one bucket).
    pub register_global: Limiter,
    /// `kez.mail.send` messages per sender key.
    pub send_per_key: Limiter,
    /// `kez.mail.send` envelope bytes per sender key.
    pub send_bytes_per_key: Limiter,
    /// `kez.keys.claim` requests per claimer key.
    pub claim_per_key: Limiter,
    /// One-time prekeys handed out per target device.
    pub one_time_per_target: Limiter,
}

impl Limiters {
    /// Limiters for `limits`.
    pub fn new(limits: &Limits) -> Limiters {
        let limiter = |rate| Limiter::new(rate, limits.max_buckets);
        Limiters {
            per_key: limiter(limits.per_key),
            register_per_addr: limiter(limits.register_per_addr),
            register_global: limiter(limits.register_global),
            send_per_key: limiter(limits.send_per_key),
            send_bytes_per_key: limiter(limits.send_bytes_per_key),
            claim_per_key: limiter(limits.claim_per_key),
            one_time_per_target: limiter(limits.one_time_per_target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_share_a_bucket_per_64() {
        assert_eq!(address_bucket("192.0.2.7"), "192.0.2.7");
        assert_eq!(address_bucket("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            address_bucket("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            "2001:db8:1:2::/64"
        );
        assert_ne!(address_bucket("2001:db8:1:3::1"), "2001:db8:1:2::/64");
        assert_eq!(address_bucket("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(address_bucket("::1"), "::/64");
        assert_eq!(address_bucket("not an address"), "not an address");
        let caller =
            Caller::from_request_info(r#"{"acc":"APP","user":"UAB","host":"2001:db8::5"}"#, "APP");
        assert_eq!(caller.host.as_deref(), Some("2001:db8::/64"));
    }

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = Limiter::new(Rate::new(10.0, 5), 100);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.check("a", start).unwrap();
        }
        let limited = limiter.check("a", start).unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_millis(100));
        // Another key has its own bucket.
        limiter.check("b", start).unwrap();
        // 100 ms later one token is back, and only one.
        let later = start + Duration::from_millis(100);
        limiter.check("a", later).unwrap();
        assert!(limiter.check("a", later).is_err());
        // A long pause refills to the burst, not beyond.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..5 {
            limiter.check("a", much_later).unwrap();
        }
        assert!(limiter.check("a", much_later).is_err());
    }

    #[test]
    fn off_limits_nothing_and_keeps_nothing() {
        let limiter = Limiter::new(Rate::OFF, 10);
        let now = Instant::now();
        for _ in 0..1000 {
            limiter.check("a", now).unwrap();
        }
        assert!(limiter.is_empty());
        assert!(!limiter.is_on());
    }

    #[test]
    fn the_map_never_outgrows_its_cap() {
        let limiter = Limiter::new(Rate::new(1.0, 2), 100);
        let now = Instant::now();
        // A flood of distinct callers, each using up its bucket (so none is idle).
        for i in 0..10_000 {
            let key = format!("k{i}");
            limiter.check(&key, now).unwrap();
            let _ = limiter.check(&key, now);
            assert!(limiter.len() <= 100);
        }
        // Idle buckets go first: a busy caller keeps its (empty) bucket while idle ones fill
        // the map.
        let limiter = Limiter::new(Rate::new(1.0, 2), 10);
        limiter.check("busy", now).unwrap();
        limiter.check("busy", now).unwrap();
        for i in 0..9 {
            limiter.check(&format!("idle{i}"), now).unwrap();
        }
        assert_eq!(limiter.len(), 10);
        let later = now + Duration::from_millis(1500);
        limiter.check("new", later).unwrap();
        assert_eq!(limiter.len(), 2, "the refilled idle buckets were dropped");
        assert!(
            limiter.check("busy", later).is_ok() && limiter.check("busy", later).is_err(),
            "the busy caller kept its bucket: 1.5 tokens back, not a fresh burst of 2"
        );
    }

    #[test]
    fn long_keys_share_their_prefix_bucket() {
        let limiter = Limiter::new(Rate::new(1.0, 1), 10);
        let now = Instant::now();
        let long = "x".repeat(1000);
        limiter.check(&long, now).unwrap();
        assert!(limiter.check(&format!("{long}y"), now).is_err());
        assert_eq!(truncate("é".repeat(40).as_str()).len(), 64);
    }

    #[test]
    fn the_caller_comes_from_the_users_account_only() {
        let header = r#"{"start":"2026-11-26T19:00:00Z","host":"127.0.0.1","id":7,"acc":"APP","user":"UAB","name":"x","rtt":1000}"#;
        assert_eq!(
            Caller::from_request_info(header, "APP"),
            Caller {
                user: Some("UAB".into()),
                host: Some("127.0.0.1".into())
            }
        );
        assert_eq!(
            Caller::from_request_info(header, "SERVER"),
            Caller::default()
        );
        assert_eq!(
            Caller::from_request_info(r#"{"acc":"APP","rtt":1}"#, "APP"),
            Caller::default()
        );
        assert_eq!(
            Caller::from_request_info("not json", "APP"),
            Caller::default()
        );
    }
}
