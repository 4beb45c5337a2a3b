//! `move --server URL [--name NAME]`: moving house (PROTOCOL.md §14.6). The identity's own key
//! registers NAME on the new server, the sigchain is copied there link by link, and the move
//! links (`nats` and `home` endpoints replaced) are appended there and then on the old server;
//! the home's config and the service's connection then point at the new server. Every step is
//! safe to repeat: a move that stopped half way is finished by running it again.

use kez_client::{ClientError, Connection, Moved, now};
use kez_core::moving::{home_of, move_ops};
use kez_core::{Handle, PublicKey};
use serde_json::json;

use crate::failure::{self, Failure, RUNTIME, USAGE};
use crate::term::{say, tell};
use crate::{App, display, print_json};

/// What a contact's client tells its person when it followed a move (or could not).
pub(crate) fn moved_note(moved: &Moved) -> String {
    match &moved.not_followed {
        None => format!(
            "{} moved to {} (same identity, sigchain verified)",
            moved.from, moved.to
        ),
        Some(why) => format!(
            "{}'s sigchain says it moved to {}, not followed yet ({}): messages go to {} meanwhile",
            moved.from,
            moved.to,
            display::inline(why),
            moved.from
        ),
    }
}

impl App {
    /// `move --server URL [--name NAME]`.
    pub(crate) async fn move_home(&self, name: Option<String>, json: bool) -> Result<(), Failure> {
        let old_handle: Handle = self.handle()?.parse().map_err(|err| {
            Failure::new(
                failure::DAMAGED,
                format!("the handle in this home's config.json does not parse: {err}"),
            )
        })?;
        if self.config.identity.is_some() {
            return Err(Failure::new(
                USAGE,
                format!(
                    "this home is another device of {old_handle}: a move registers the identity's own key (the one that registered {old_handle}) on the new server, so that contacts see the same identity. Run `kez-chat move` on the device that holds that first key"
                ),
            ));
        }
        let (Some(new_url), Some(old_url)) = (&self.server_flag, &self.config.server) else {
            return Err(Failure::new(
                USAGE,
                "name the new server: `kez-chat move --server tls://HOST:4222 [--name NAME]`",
            ));
        };
        let new_url = kez_client::broker_urls(new_url, self.plaintext())
            .map_err(|err| Failure::client(err.into()))?
            .join(",");
        let name = name.unwrap_or_else(|| old_handle.name().to_owned());
        Handle::parse(&name, "kez.invalid")
            .map_err(|err| Failure::new(USAGE, format!("{name:?} is not a valid name: {err}")))?;
        let key = self.key()?;
        let me = key.public_key();

        tell!("connecting to {new_url}");
        let narrow = self.connect_to(&new_url, key.clone()).await?;
        let info = narrow.server_info().await.map_err(Failure::client)?;
        if info.domain == old_handle.domain() {
            return Err(Failure::new(
                USAGE,
                format!(
                    "{new_url} serves {}, where {old_handle} lives already: nothing to move (a move goes to another domain's server)",
                    info.domain
                ),
            ));
        }
        let wanted = Handle::parse(&name, &info.domain)
            .map_err(|err| Failure::new(USAGE, format!("{name:?} is not a valid name: {err}")))?;
        if wanted.domain() != info.domain {
            return Err(Failure::new(
                USAGE,
                format!(
                    "{wanted} is a handle on {}, but {new_url} serves {}: name it @{} (or leave --name out)",
                    wanted.domain(),
                    info.domain,
                    wanted.name()
                ),
            ));
        }
        // Registering again is harmless: a move that stopped half way runs again. The client
        // checks the answer names the handle and key asked for.
        let record = narrow.register(&name).await.map_err(Failure::client)?;
        let _ = narrow.close().await;
        tell!(
            "registered {} on {} with your identity key",
            record.handle,
            info.domain
        );

        // The chat profile comes with a new connection (PROTOCOL.md §6.2).
        let new = self.connect_to(&new_url, key.clone()).await?;
        let old = self.connect_to(old_url, key.clone()).await;
        let writing = self.held.chain_writer.lock().await;
        let links = self
            .links_to_copy(old.as_ref(), &new, &me, &record.handle)
            .await?;
        let there = match new.chain_links(&me).await {
            Ok(there) => there,
            Err(ClientError::Service(err)) if err.answer.code == 404 => Vec::new(),
            Err(err) => return Err(Failure::client(err)),
        };
        if there.iter().zip(&links).any(|(there, here)| there != here) {
            return Err(Failure::new(
                failure::CONFLICT,
                format!(
                    "{} holds another sigchain for your key than {old_url}: a move copies your chain as it is, so it stops here. Nothing was changed on {old_url}; ask the operator of {} what the chain there is",
                    info.domain, info.domain
                ),
            ));
        }
        for link in links.iter().skip(there.len()) {
            new.append(link.as_bytes()).await.map_err(Failure::client)?;
        }
        let copied = links.len().saturating_sub(there.len());
        tell!(
            "copied your sigchain to {} ({copied} of {} links; the rest were there already)",
            info.domain,
            links.len()
        );
        let mut chain = new.chain(&me).await.map_err(Failure::client)?;
        let mut moved = Vec::new();
        for op in move_ops(&chain, &record.handle, &new_url) {
            let link = chain
                .next_link_by(me, now(), op)
                .sign(&key)
                .map_err(|err| {
                    Failure::new(RUNTIME, format!("cannot sign a sigchain link: {err}"))
                })?;
            new.append(link.bytes()).await.map_err(Failure::client)?;
            chain.append(link.bytes()).map_err(|err| {
                Failure::new(RUNTIME, format!("a link just made does not verify: {err}"))
            })?;
            moved.push(link);
        }
        tell!(
            "sigchain on {}: home {}, nats {new_url} (seq {})",
            info.domain,
            record.handle,
            chain.seq()
        );
        // The old server gets the same links (identical bytes: one chain, two copies), so
        // contacts that ask it learn the new home; the new server holds the truth either way.
        let old_told = match &old {
            Ok(old) => {
                let mut told = Ok(());
                for link in &moved {
                    if let Err(err) = old.append(link.bytes()).await {
                        told = Err(err.to_string());
                        break;
                    }
                }
                told
            }
            Err(failure) => Err(failure.message.clone()),
        };
        drop(writing);
        match &old_told {
            Ok(()) => tell!(
                "told {}: your sigchain there names {} as your home",
                old_handle.domain(),
                record.handle
            ),
            Err(why) => tell!(
                "could not tell {} ({}): the new server holds the move; contacts follow when they read your chain there or get a message from you",
                old_handle.domain(),
                display::inline(why)
            ),
        }

        let mut config = self.home.config().map_err(Failure::home)?;
        config.server = Some(new_url.clone());
        config.handle = Some(record.handle.to_string());
        config.allow_plaintext |= self.plaintext_flag;
        self.home.save_config(&config).map_err(Failure::home)?;
        let _ = new.close().await;
        if let Ok(old) = old {
            let _ = old.close().await;
        }
        let store = self.store()?;
        let conn = self
            .held
            .rehome(&new_url, &store, &key, async |options| {
                self.connect_with(&new_url, key.clone(), options).await
            })
            .await?;
        if let Err(err) = conn.own_devices(&store, &record.handle.to_string()).await {
            tracing::warn!("cannot read the own sigchain on the new server yet: {err}");
        }
        if json {
            print_json(&json!({
                "from": old_handle.to_string(),
                "handle": record.handle.to_string(),
                "key": me.to_string(),
                "server": new_url,
                "old_server": old_url,
                "copied_links": copied,
                "sigchain": { "seq": chain.seq(), "head": chain.head().to_string() },
                "old_server_told": old_told.is_ok(),
            }));
        } else {
            say!("moved {old_handle} to {}", record.handle);
            say!("key     {me} (the same identity)");
            say!("server  {new_url}");
            say!("head    seq {} {}", chain.seq(), chain.head());
            say!(
                "Contacts keep you pinned: their clients read the move in your sigchain and show \"{old_handle} moved to {} (same identity, sigchain verified)\". Your old server forwards mail sent to {old_handle} while it runs; your other devices keep using it.",
                record.handle
            );
        }
        Ok(())
    }

    /// The own chain's links to copy to the new server: the old server's copy; or, when that
    /// server cannot be read, the new server's own when it already names `handle` as home (a
    /// move run again after the old server went away: nothing is left to copy). A part copied
    /// before is never taken for the whole chain: a move appended to it would fork the chain.
    async fn links_to_copy(
        &self,
        old: Result<&Connection, &Failure>,
        new: &Connection,
        me: &PublicKey,
        handle: &Handle,
    ) -> Result<Vec<String>, Failure> {
        let unread = match old {
            Ok(old) => match old.chain_links(me).await {
                Ok(links) => return Ok(links),
                Err(err) => err.to_string(),
            },
            Err(failure) => failure.message.clone(),
        };
        if let Ok(chain) = new.chain(me).await
            && home_of(&chain).as_ref() == Some(handle)
        {
            return new.chain_links(me).await.map_err(Failure::client);
        }
        Err(Failure::new(
            RUNTIME,
            format!(
                "cannot read your sigchain from your old server ({}): a move copies it from there. Run `kez-chat move` again when that server answers",
                display::inline(&unread)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A followed move is a note of the same identity; one not followed says why, through
    /// `display` (the reason may quote a server), and where messages go meanwhile.
    #[test]
    fn the_move_notes_say_what_happened() {
        let moved = |not_followed: Option<&str>| Moved {
            from: "@alice@a.test".parse().unwrap(),
            to: "@alice@b.test".parse().unwrap(),
            not_followed: not_followed.map(str::to_owned),
        };
        assert_eq!(
            moved_note(&moved(None)),
            "@alice@a.test moved to @alice@b.test (same identity, sigchain verified)"
        );
        let note = moved_note(&moved(Some("peer down\u{1b}[2J")));
        assert!(
            note.starts_with("@alice@a.test's sigchain says it moved to @alice@b.test, not followed yet (peer down"),
            "{note}"
        );
        assert!(!note.contains('\u{1b}'), "{note}");
        assert!(
            note.ends_with("messages go to @alice@a.test meanwhile"),
            "{note}"
        );
    }
}
