//! Every endpoint of the home server, by subject, and the NATS micro-services that group them
//! (PROTOCOL.md §5). This is the one place a service subject is written: the server subscribes
//! from these tables, the client sends to them, the callout and the broker configuration grant
//! them.

/// Every endpoint the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `kez.registry.register`
    Register,
    /// `kez.registry.lookup`
    Lookup,
    /// `kez.registry.whois`
    Whois,
    /// `kez.sigchain.append`
    Append,
    /// `kez.sigchain.get`
    GetChain,
    /// `kez.sigchain.head`
    Head,
    /// `kez.server.info`
    Info,
    /// `$SYS.REQ.USER.AUTH`: nats-server's auth callout (on the `AUTH` account connection).
    Authorize,
    /// `kez.pin.add`
    PinAdd,
    /// `kez.pin.remove`
    PinRemove,
    /// `kez.pin.list`
    PinList,
    /// `kez.pin.status`
    PinStatus,
    /// `kez.mail.send`
    MailSend,
    /// `kez.mail.fetch`
    MailFetch,
    /// `kez.pair.put`
    PairPut,
    /// `kez.pair.get`
    PairGet,
    /// `kez.mail.relay`: a client hands its home server an envelope for another domain.
    MailRelay,
    /// `kez.mail.deliver`: a peer server hands over an envelope for a user here.
    MailDeliver,
    /// `kez.keys.publish`: a device hands the server Olm prekeys (PROTOCOL.md §15.2).
    KeysPublish,
    /// `kez.keys.count`: what the server keeps of the caller's prekeys.
    KeysCount,
    /// `kez.keys.claim`: one prekey of a device, taken atomically.
    KeysClaim,
}

impl Endpoint {
    /// Every endpoint, in a fixed order (metrics index by it).
    pub const ALL: [Endpoint; 21] = [
        Endpoint::Register,
        Endpoint::Lookup,
        Endpoint::Whois,
        Endpoint::Append,
        Endpoint::GetChain,
        Endpoint::Head,
        Endpoint::Info,
        Endpoint::Authorize,
        Endpoint::PinAdd,
        Endpoint::PinRemove,
        Endpoint::PinList,
        Endpoint::PinStatus,
        Endpoint::MailSend,
        Endpoint::MailFetch,
        Endpoint::PairPut,
        Endpoint::PairGet,
        Endpoint::MailRelay,
        Endpoint::MailDeliver,
        Endpoint::KeysPublish,
        Endpoint::KeysCount,
        Endpoint::KeysClaim,
    ];

    /// The endpoint's position in [`Endpoint::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The subject the endpoint answers.
    pub fn subject(self) -> &'static str {
        match self {
            Endpoint::Register => "kez.registry.register",
            Endpoint::Lookup => "kez.registry.lookup",
            Endpoint::Whois => "kez.registry.whois",
            Endpoint::Append => "kez.sigchain.append",
            Endpoint::GetChain => "kez.sigchain.get",
            Endpoint::Head => "kez.sigchain.head",
            Endpoint::Info => "kez.server.info",
            Endpoint::Authorize => kez_nats_jwt::AUTH_CALLOUT_SUBJECT,
            Endpoint::PinAdd => "kez.pin.add",
            Endpoint::PinRemove => "kez.pin.remove",
            Endpoint::PinList => "kez.pin.list",
            Endpoint::PinStatus => "kez.pin.status",
            Endpoint::MailSend => "kez.mail.send",
            Endpoint::MailFetch => "kez.mail.fetch",
            Endpoint::PairPut => "kez.pair.put",
            Endpoint::PairGet => "kez.pair.get",
            Endpoint::MailRelay => "kez.mail.relay",
            Endpoint::MailDeliver => "kez.mail.deliver",
            Endpoint::KeysPublish => "kez.keys.publish",
            Endpoint::KeysCount => "kez.keys.count",
            Endpoint::KeysClaim => "kez.keys.claim",
        }
    }

    /// Whether requests count against the caller's per-key request limit (PROTOCOL.md §5.5):
    /// every `kez.registry.*`, `kez.sigchain.*`, `kez.pin.*`, `kez.mail.fetch`,
    /// `kez.keys.publish` and `kez.keys.count` request. `kez.mail.send` and `kez.mail.relay`
    /// have budgets of their own (messages and bytes per sender), `kez.mail.deliver` per peer
    /// domain, `kez.keys.claim` per claimer (PROTOCOL.md §15.2).
    pub fn is_rate_limited(self) -> bool {
        !matches!(
            self,
            Endpoint::Info
                | Endpoint::Authorize
                | Endpoint::MailSend
                | Endpoint::MailRelay
                | Endpoint::MailDeliver
                | Endpoint::KeysClaim
        )
    }
}

/// One NATS micro-service: its name, subject prefix and endpoints.
#[derive(Debug)]
pub struct ServiceSpec {
    /// Service name, as `$SRV.PING.<name>` finds it.
    pub name: &'static str,
    /// Subject prefix of its endpoints (empty for the callout, whose subject is nats-server's).
    pub prefix: &'static str,
    /// Shown by `$SRV.INFO`.
    pub description: &'static str,
    /// Its endpoints; each one's subject is the prefix, a dot and its name.
    pub endpoints: &'static [Endpoint],
}

impl ServiceSpec {
    /// The name `endpoint` has in this service: its subject after the prefix and the dot
    /// (the whole subject without a prefix).
    ///
    /// # Panics
    /// If `endpoint`'s subject does not start with the prefix: the tables below are wrong.
    pub fn endpoint_name(&self, endpoint: Endpoint) -> &'static str {
        let subject = endpoint.subject();
        if self.prefix.is_empty() {
            return subject;
        }
        subject
            .strip_prefix(self.prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or_else(|| panic!("{subject} is not under {}", self.prefix))
    }

    /// Every subject under the prefix: `<prefix>.>`.
    pub fn wildcard(&self) -> String {
        format!("{}.>", self.prefix)
    }
}

/// `kez.registry.*`: handles.
pub const REGISTRY_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-registry",
    prefix: "kez.registry",
    description: "Handle registry: register, lookup, whois",
    endpoints: &[Endpoint::Register, Endpoint::Lookup, Endpoint::Whois],
};

/// `kez.sigchain.*`: sigchains.
pub const SIGCHAIN_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-sigchain",
    prefix: "kez.sigchain",
    description: "Sigchain store: append, get, head",
    endpoints: &[Endpoint::Append, Endpoint::GetChain, Endpoint::Head],
};

/// `kez.server.*`: what the server is.
pub const SERVER_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-server",
    prefix: "kez.server",
    description: "Server information",
    endpoints: &[Endpoint::Info],
};

/// `kez.pin.*`: pinning, run only by instances with a pin directory.
pub const PIN_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-pin",
    prefix: "kez.pin",
    description: "Pinning: keep encrypted blobs for their owners",
    endpoints: &[
        Endpoint::PinAdd,
        Endpoint::PinRemove,
        Endpoint::PinList,
        Endpoint::PinStatus,
    ],
};

/// `kez.mail.*`: handing envelopes to the server.
pub const MAIL_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-mail",
    prefix: "kez.mail",
    description: "Mail: store a sealed envelope in a registered recipient's inbox; fetch the own; relay to and take from other servers",
    endpoints: &[
        Endpoint::MailSend,
        Endpoint::MailFetch,
        Endpoint::MailRelay,
        Endpoint::MailDeliver,
    ],
};

/// `kez.pair.*`: the pairing relay (PROTOCOL.md §5.6).
pub const PAIR_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-pair",
    prefix: "kez.pair",
    description: "Pairing relay: write-once, short-lived slots for adding a device",
    endpoints: &[Endpoint::PairPut, Endpoint::PairGet],
};

/// `kez.keys.*`: Olm prekeys for forward-secret sessions (PROTOCOL.md §15.2).
pub const KEYS_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-keys",
    prefix: "kez.keys",
    description: "Key service: devices' Olm one-time and fallback prekeys, claimed atomically",
    endpoints: &[
        Endpoint::KeysPublish,
        Endpoint::KeysCount,
        Endpoint::KeysClaim,
    ],
};

/// The auth callout service, served on the `AUTH` account connection when enabled.
pub const CALLOUT_SERVICE: ServiceSpec = ServiceSpec {
    name: "kez-auth",
    prefix: "",
    description: "NATS auth callout: KEZ keys as NATS credentials",
    endpoints: &[Endpoint::Authorize],
};

/// The services users reach, in a fixed order (the broker configuration's).
pub const USER_SERVICES: [&ServiceSpec; 7] = [
    &REGISTRY_SERVICE,
    &SIGCHAIN_SERVICE,
    &SERVER_SERVICE,
    &PIN_SERVICE,
    &MAIL_SERVICE,
    &PAIR_SERVICE,
    &KEYS_SERVICE,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_in_exactly_one_service_under_its_prefix() {
        for endpoint in Endpoint::ALL {
            let homes: Vec<&ServiceSpec> = USER_SERVICES
                .into_iter()
                .chain([&CALLOUT_SERVICE])
                .filter(|spec| spec.endpoints.contains(&endpoint))
                .collect();
            assert_eq!(homes.len(), 1, "{endpoint:?}");
            let name = homes[0].endpoint_name(endpoint);
            assert!(!name.is_empty() && !name.contains('.') || homes[0].prefix.is_empty());
            assert_eq!(Endpoint::ALL[endpoint.index()], endpoint);
        }
        assert_eq!(
            PIN_SERVICE.endpoint_name(Endpoint::PinStatus),
            "status",
            "names are the last token"
        );
        assert_eq!(REGISTRY_SERVICE.wildcard(), "kez.registry.>");
        let subjects: std::collections::HashSet<&str> =
            Endpoint::ALL.into_iter().map(Endpoint::subject).collect();
        assert_eq!(
            subjects.len(),
            Endpoint::ALL.len(),
            "one subject per endpoint"
        );
    }

    #[test]
    fn only_service_information_mail_and_claims_escape_the_per_key_limit() {
        let exempt: Vec<Endpoint> = Endpoint::ALL
            .into_iter()
            .filter(|endpoint| !endpoint.is_rate_limited())
            .collect();
        assert_eq!(
            exempt,
            [
                Endpoint::Info,
                Endpoint::Authorize,
                Endpoint::MailSend,
                Endpoint::MailRelay,
                Endpoint::MailDeliver,
                Endpoint::KeysClaim
            ]
        );
    }
}
