//! Body types of the proxy. Bodies stream frame by frame and are never collected whole.
//!
//! [`RequestBody`] counts the bytes going upstream, stops at `gateway.max_body_size`, and
//! fails a body that stops arriving for `gateway.body_timeout`.
//! [`ResponseBody`] counts the bytes going to the client and, when it ends or is dropped,
//! hands the request's audit event to the record stage, so every request is recorded exactly
//! once, however it ends.

use crate::pipeline::Recorder;
use crate::upstream::Lease;
use apiwarden_core::event::Reason;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

/// What the record stage learns about a request body that streamed upstream.
#[derive(Default)]
pub struct BodyStats {
    pub bytes: AtomicU64,
    pub too_large: AtomicBool,
    /// Set when reading the body from the client failed.
    pub client_failed: AtomicBool,
    /// Set when no byte of the body came for `gateway.body_timeout`.
    pub timed_out: AtomicBool,
    /// Set once the whole body has been read from the client.
    done: AtomicBool,
    /// Set when hyper let the body go without reading it to its end (a request it frames
    /// without a body, such as a GET sent chunked): nothing more will be sent.
    stopped: AtomicBool,
    /// When a part of the body was last handed to hyper (milliseconds since [`epoch`], plus
    /// one), or 0 while hyper is asking for the next part. Left set, it says the upstream's
    /// connection is not taking what it was given (see [`BodyStats::wait_sent`]).
    handed_at: AtomicU64,
    done_signal: tokio::sync::Notify,
}

/// The clock of [`BodyStats`]: a process-wide start, so that a time fits an atomic.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl BodyStats {
    /// True once the whole body has been read from the client (and so sent on).
    pub fn done(&self) -> bool {
        self.done.load(Relaxed)
    }

    fn mark_done(&self) {
        if !self.done.swap(true, Relaxed) {
            self.done_signal.notify_waiters();
        }
    }

    fn mark_stopped(&self) {
        if !self.stopped.swap(true, Relaxed) {
            self.done_signal.notify_waiters();
        }
    }

    /// Waits while the body is being sent. Returns when nothing more of it will be sent (it
    /// was read whole, or hyper let it go), with the time from which the upstream's response
    /// `timeout` runs; or `None` once the upstream has not taken a part handed to it for
    /// `timeout` (it stopped reading: nginx's `proxy_send_timeout`). Time the gateway spends
    /// waiting for the client is not counted: that is `gateway.body_timeout`'s.
    pub async fn wait_sent(&self, timeout: std::time::Duration) -> Option<Instant> {
        let limit = timeout.as_millis() as u64;
        loop {
            let notified = self.done_signal.notified();
            if self.done() || self.stopped.load(Relaxed) {
                return Some(Instant::now());
            }
            let now = now_ms();
            let next = match self.handed_at.load(Relaxed) {
                0 => now + limit.max(1),
                // The time was read in whole milliseconds, rounded down: counted from the next
                // one, the timeout never fires early.
                at => {
                    let due = at + limit;
                    if now >= due {
                        return None;
                    }
                    due
                }
            };
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(std::time::Duration::from_millis(next - now)) => {}
            }
        }
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds the limit")]
    TooLarge,
    #[error("no byte of the request body came for {0:?}")]
    TimedOut(std::time::Duration),
    #[error("reading the request body failed: {0}")]
    Read(#[from] hyper::Error),
}

/// The request body as sent upstream.
pub struct RequestBody {
    inner: Option<Incoming>,
    seen: u64,
    limit: u64,
    stats: Option<Arc<BodyStats>>,
    /// `gateway.body_timeout`: the longest pause between two parts of the body.
    idle: std::time::Duration,
    /// Armed the first time the client keeps the body waiting, and reset by each part after
    /// that: a body that comes with its head (the common case) never touches the timer.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for RequestBody {
    /// hyper lets a body go once it has sent it, or without reading it when it frames the
    /// request without one: either way the upstream's response timeout may run now.
    fn drop(&mut self) {
        if let Some(s) = &self.stats {
            s.mark_stopped();
        }
    }
}

impl RequestBody {
    /// A body that is known to be empty: no allocation for the common GET.
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            seen: 0,
            limit: 0,
            stats: None,
            idle: std::time::Duration::ZERO,
            stall: None,
        }
    }

    /// Streams `inner`, failing once more than `limit` bytes have passed, or once no part of
    /// it has come for `idle`.
    pub fn limited(
        inner: Incoming,
        limit: u64,
        idle: std::time::Duration,
    ) -> (Self, Arc<BodyStats>) {
        let stats = Arc::new(BodyStats::default());
        (
            RequestBody {
                inner: Some(inner),
                seen: 0,
                limit,
                stats: Some(stats.clone()),
                idle,
                stall: None,
            },
            stats,
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(s) = &this.stats {
            // hyper asks for more: what it was given has gone on.
            s.handed_at.store(0, Relaxed);
        }
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_pending() {
            let idle = this.idle;
            let stall = this
                .stall
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
            if std::future::Future::poll(stall.as_mut(), cx).is_ready() {
                // The client stopped sending: the body fails (the upstream connection that
                // carries it is closed), and the request is answered 408 if it still can be.
                if let Some(s) = &this.stats {
                    s.timed_out.store(true, Relaxed);
                }
                this.inner = None;
                return Poll::Ready(Some(Err(RequestBodyError::TimedOut(idle))));
            }
            return Poll::Pending;
        }
        if let Some(stall) = this.stall.as_mut() {
            stall
                .as_mut()
                .reset(tokio::time::Instant::now() + this.idle);
        }
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(s) = &this.stats {
                        s.bytes.store(this.seen, Relaxed);
                        if this.seen > this.limit {
                            s.too_large.store(true, Relaxed);
                            return Poll::Ready(Some(Err(RequestBodyError::TooLarge)));
                        }
                    }
                }
                // Trailers are the last frame (hyper polls no more after them).
                if let Some(s) = &this.stats {
                    if frame.is_trailers() || this.inner.as_ref().is_some_and(|b| b.is_end_stream())
                    {
                        s.mark_done();
                    } else {
                        s.handed_at.store(now_ms() + 1, Relaxed);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // The client's side failed (it went away, or sent a broken chunked body).
                if let Some(s) = &this.stats {
                    s.client_failed.store(true, Relaxed);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                if let Some(s) = &this.stats {
                    s.mark_done();
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

enum Inner {
    Full(Option<Bytes>),
    /// The upstream's body and the connection it comes on, returned to its pool at the end.
    Upstream(Incoming, Option<Lease>),
}

/// The response body sent to the client.
pub struct ResponseBody {
    inner: Inner,
    bytes: u64,
    recorder: Option<Recorder>,
}

impl ResponseBody {
    /// A body the gateway wrote itself (an error message, an admin page).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        ResponseBody {
            inner: Inner::Full(if b.is_empty() { None } else { Some(b) }),
            bytes: 0,
            recorder: None,
        }
    }

    /// The upstream's body, streamed.
    pub fn upstream(body: Incoming, lease: Lease) -> Self {
        ResponseBody {
            inner: Inner::Upstream(body, Some(lease)),
            bytes: 0,
            recorder: None,
        }
    }

    /// Records the request's audit event when this body ends.
    pub fn with_recorder(mut self, recorder: Recorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    fn finish(&mut self, error: Option<Reason>) {
        if let Some(r) = self.recorder.take() {
            r.finish(self.bytes, error);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            Inner::Upstream(body, lease) => {
                let polled = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &polled {
                    // Broken: the connection closes when the lease is dropped.
                    Some(Err(_)) => drop(lease.take()),
                    // Read to its end (hyper may not poll again after the last frame of a
                    // body of known length): the connection can serve another request.
                    None => release(lease),
                    // Trailers end a body too: hyper's servers poll no more after them.
                    Some(Ok(f)) if f.is_trailers() || body.is_end_stream() => release(lease),
                    Some(Ok(_)) => {}
                }
                polled
            }
        };
        match polled {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if frame.is_trailers() {
                    // The response is complete: recorded now, not as abandoned when dropped.
                    this.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.finish(Some(Reason::UpstreamError));
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.finish(None);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(b, _) => b.size_hint(),
        }
    }
}

/// Returns a connection whose response has been read to its end to its pool.
fn release(lease: &mut Option<Lease>) {
    if let Some(l) = lease.take() {
        l.release();
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body read to its end leaves a reusable connection.
        if let Inner::Upstream(body, lease) = &mut self.inner {
            if body.is_end_stream() {
                release(lease);
            }
        }
        if self.recorder.is_some() {
            // The gateway's own bodies are a few bytes that hyper skips for HEAD; only an
            // upstream body left unread means the client went away.
            let complete = match &self.inner {
                Inner::Full(_) => true,
                Inner::Upstream(b, _) => b.is_end_stream(),
            };
            self.finish(if complete {
                None
            } else {
                Some(Reason::ClientDisconnected)
            });
        }
    }
}
