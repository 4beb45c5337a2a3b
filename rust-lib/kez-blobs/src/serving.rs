//! What a node serves, as events for [`crate::BlobNode::watch_served`]: iroh-blobs' provider
//! events (notify only: nothing here can hold up, deny or throttle a request) turned into
//! [`Served`] and broadcast.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use iroh::EndpointId;
use iroh_blobs::Hash;
use tokio::sync::broadcast;

use super::{ConnectMode, EventMask, EventSender, ProviderMessage, RequestMode, RequestUpdate};

/// Events a watcher may fall behind by before it misses the oldest.
pub(crate) const CAPACITY: usize = 512;

/// Progress events per transfer at most (besides its start and end): one per 1% of the blob.
const PROGRESS_STEPS: u64 = 100;

/// Events iroh-blobs queues for the handler before the provider waits for it.
const QUEUE: usize = 64;

/// Turns one request's updates into [`Served`] events for the watchers, until it ends.
fn relay(
    mut request: Request,
    mut updates: irpc::channel::mpsc::Receiver<RequestUpdate>,
    out: broadcast::WeakSender<Served>,
) {
    tokio::spawn(async move {
        while let Ok(Some(update)) = updates.recv().await {
            if let Some(served) = request.on(update)
                && let Some(out) = out.upgrade()
            {
                // Nobody watching is fine: the event goes nowhere.
                let _ = out.send(served);
            }
        }
    });
}

/// One step of serving one blob to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The blob.
    pub hash: Hash,
    /// The peer it goes to, as its connection authenticated it (`None` if unknown).
    pub peer: Option<EndpointId>,
    /// The connection (iroh's stable id for it): one peer may make several.
    pub connection: u64,
    /// The request on that connection: a resumed download is a new request.
    pub request: u64,
    /// What happened.
    pub event: ServeEvent,
    /// How far into the blob this request's transfer has reached: the end, in bytes, of the
    /// last chunk reported sent (0 at the start, the blob's size once completed). iroh-blobs
    /// drops progress reports it cannot queue, so a progress event may lag what was sent.
    pub offset: u64,
    /// The blob's size in bytes.
    pub size: u64,
}

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEvent {
    /// The node found the blob and starts sending what the peer asked for (all of it, or for
    /// a resumed download what the peer lacks).
    Started,
    /// More was sent (at most about one event per 1% of the blob).
    Progress,
    /// Everything the peer asked for was sent: `sent` payload bytes. A peer that asked for
    /// what it lacked now holds the whole blob (once the last packets arrive).
    Completed {
        /// Payload bytes this request sent.
        sent: u64,
    },
    /// The request ended before everything was sent (the peer went away or stopped it).
    Aborted {
        /// Payload bytes this request sent.
        sent: u64,
    },
}

/// The event sender for `BlobsProtocol`: notifications of connections (to know the peer) and
/// of get requests with their transfers, handled by a task that lives as long as the
/// protocol holds the sender, and broadcast on `out` while it has a strong sender.
pub(crate) fn events(out: broadcast::WeakSender<Served>) -> EventSender {
    let mask = EventMask {
        connected: ConnectMode::Notify,
        get: RequestMode::NotifyLog,
        get_many: RequestMode::NotifyLog,
        ..EventMask::DEFAULT
    };
    let (sender, mut messages) = EventSender::channel(QUEUE, mask);
    tokio::spawn(async move {
        let peers: Arc<Mutex<HashMap<u64, EndpointId>>> = Arc::default();
        let peer_of = |connection: u64| {
            peers
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .get(&connection)
                .copied()
        };
        while let Some(message) = messages.recv().await {
            match message {
                ProviderMessage::ClientConnectedNotify(msg) => {
                    if let Some(peer) = msg.inner.endpoint_id {
                        peers
                            .lock()
                            .unwrap_or_else(|poison| poison.into_inner())
                            .insert(msg.inner.connection_id, peer);
                    }
                }
                ProviderMessage::ConnectionClosed(msg) => {
                    peers
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .remove(&msg.inner.connection_id);
                }
                ProviderMessage::GetRequestReceivedNotify(msg) => {
                    let (connection, id) = (msg.inner.connection_id, msg.inner.request_id);
                    relay(
                        Request::new(peer_of(connection), connection, id),
                        msg.rx,
                        out.clone(),
                    );
                }
                ProviderMessage::GetManyRequestReceivedNotify(msg) => {
                    let (connection, id) = (msg.inner.connection_id, msg.inner.request_id);
                    relay(
                        Request::new(peer_of(connection), connection, id),
                        msg.rx,
                        out.clone(),
                    );
                }
                // Not asked for (push is refused, observe and throttling are off); intercept
                // variants are answered "yes" should they come anyway.
                ProviderMessage::ClientConnected(msg) => {
                    msg.tx.send(Ok(())).await.ok();
                }
                ProviderMessage::GetRequestReceived(msg) => {
                    msg.tx.send(Ok(())).await.ok();
                }
                ProviderMessage::GetManyRequestReceived(msg) => {
                    msg.tx.send(Ok(())).await.ok();
                }
                ProviderMessage::PushRequestReceived(msg) => {
                    msg.tx.send(Ok(())).await.ok();
                }
                ProviderMessage::ObserveRequestReceived(msg) => {
                    msg.tx.send(Ok(())).await.ok();
                }
                ProviderMessage::Throttle(msg) => {
                    msg.tx.send(Ok(())).await.ok();
                }
                ProviderMessage::PushRequestReceivedNotify(_)
                | ProviderMessage::ObserveRequestReceivedNotify(_) => {}
            }
        }
    });
    sender
}

/// One request being served: turns its updates into events.
struct Request {
    peer: Option<EndpointId>,
    connection: u64,
    request: u64,
    /// The blob being sent (a get-many request sends several in turn).
    current: Option<Served>,
    /// How far the last progress event reported.
    reported: u64,
}

impl Request {
    fn new(peer: Option<EndpointId>, connection: u64, request: u64) -> Request {
        Request {
            peer,
            connection,
            request,
            current: None,
            reported: 0,
        }
    }

    /// The event `update` makes, if any.
    fn on(&mut self, update: RequestUpdate) -> Option<Served> {
        let event = match update {
            RequestUpdate::Started(started) => {
                self.current = Some(Served {
                    hash: started.hash,
                    peer: self.peer,
                    connection: self.connection,
                    request: self.request,
                    event: ServeEvent::Started,
                    offset: 0,
                    size: started.size,
                });
                self.reported = 0;
                ServeEvent::Started
            }
            RequestUpdate::Progress(progress) => {
                let served = self.current.as_mut()?;
                served.offset = progress.end_offset;
                let step = (served.size / PROGRESS_STEPS).max(1);
                if progress.end_offset < self.reported + step && progress.end_offset < served.size {
                    return None;
                }
                self.reported = progress.end_offset;
                ServeEvent::Progress
            }
            RequestUpdate::Completed(done) => {
                // The last progress report may have been dropped; a completed request leaves
                // the peer holding the whole blob.
                let served = self.current.as_mut()?;
                served.offset = served.size;
                ServeEvent::Completed {
                    sent: done.stats.payload_bytes_sent,
                }
            }
            RequestUpdate::Aborted(aborted) => ServeEvent::Aborted {
                sent: aborted.stats.payload_bytes_sent,
            },
        };
        let served = self.current.as_mut()?;
        served.event = event;
        Some(served.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use iroh_blobs::provider::TransferStats;
    use iroh_blobs::provider::events::{
        TransferAborted, TransferCompleted, TransferProgress, TransferStarted,
    };

    use super::*;

    const SIZE: u64 = 1000;

    fn started(request: &mut Request) -> Served {
        request
            .on(RequestUpdate::Started(TransferStarted {
                index: 0,
                hash: Hash::new(b"blob"),
                size: SIZE,
            }))
            .expect("a start is an event")
    }

    fn progress(request: &mut Request, end_offset: u64) -> Option<Served> {
        request.on(RequestUpdate::Progress(TransferProgress { end_offset }))
    }

    fn stats(payload_bytes_sent: u64) -> Box<TransferStats> {
        Box::new(TransferStats {
            payload_bytes_sent,
            other_bytes_sent: 0,
            other_bytes_read: 0,
            duration: Duration::ZERO,
        })
    }

    #[test]
    fn progress_is_reported_once_per_step_and_at_the_end() {
        let mut request = Request::new(None, 1, 2);
        let start = started(&mut request);
        assert_eq!(
            (start.event, start.offset, start.size),
            (ServeEvent::Started, 0, SIZE)
        );
        assert_eq!(progress(&mut request, 5), None, "under 1% of the blob");
        let step = progress(&mut request, 10).expect("1% of the blob");
        assert_eq!((step.event, step.offset), (ServeEvent::Progress, 10));
        assert_eq!(progress(&mut request, 19), None);
        assert_eq!(progress(&mut request, SIZE).map(|s| s.offset), Some(SIZE));
    }

    #[test]
    fn completion_reaches_the_end_though_the_last_progress_was_dropped() {
        let mut request = Request::new(None, 1, 2);
        started(&mut request);
        progress(&mut request, 500).expect("half way");
        let done = request
            .on(RequestUpdate::Completed(TransferCompleted {
                stats: stats(SIZE),
            }))
            .expect("completion is an event");
        assert_eq!(done.event, ServeEvent::Completed { sent: SIZE });
        assert_eq!(done.offset, SIZE);
    }

    #[test]
    fn an_abort_keeps_how_far_it_got() {
        let mut request = Request::new(None, 1, 2);
        started(&mut request);
        progress(&mut request, 300).expect("a third");
        let aborted = request
            .on(RequestUpdate::Aborted(TransferAborted {
                stats: stats(300),
            }))
            .expect("an abort is an event");
        assert_eq!(aborted.event, ServeEvent::Aborted { sent: 300 });
        assert_eq!(aborted.offset, 300);
    }

    #[test]
    fn updates_before_a_start_are_no_event() {
        let mut request = Request::new(None, 1, 2);
        assert_eq!(progress(&mut request, 10), None);
        let done = request.on(RequestUpdate::Completed(TransferCompleted {
            stats: stats(0),
        }));
        assert_eq!(done, None);
    }
}
