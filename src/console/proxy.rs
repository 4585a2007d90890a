//! The WebSocket ⇄ byte-stream pump behind every console session.
//!
//! [`proxy`] carries a VNC console: binary frames from the client are written to the upstream
//! (QEMU's VNC socket) byte for byte, and every read from the upstream goes to the client as one
//! binary frame. [`super::shell::run_shell`] drives the same engine with UCloud's JSON shell
//! codec instead of the passthrough one.
//!
//! ## Rules
//! - Order is kept in both directions; nothing is dropped while the session runs.
//! - Text frames from the client are ignored (noVNC only sends binary); the client's Pings are
//!   answered by the WebSocket layer ([`super::ServerSocket`], axum and tungstenite all do), its Pongs are ignored.
//! - The engine sends a Ping every [`ProxyConfig::ping_interval`] so that reverse proxies with
//!   idle timeouts (nginx: 60 s) keep quiet consoles open.
//! - Frames to the client are at most [`ProxyConfig::max_frame_bytes`]; reads start at 8 KiB,
//!   double while they fill the buffer and halve again when they come back small, so a burst
//!   moves in large frames and idle sessions hold little memory.
//!
//! ## How a session ends
//! | cause | vmhost sends | then |
//! |---|---|---|
//! | the client closes (Close frame or EOF) | the library's Close reply | upstream write half shut down |
//! | the upstream reaches EOF | Close 1000 "the virtual machine's console closed" | client bytes are still forwarded until its Close reply, then upstream write half shut down |
//! | the [`StopSignal`] fires | Close with the signal's reason (e.g. 4000) | pending data dropped; waits for the Close reply |
//! | [`ProxyConfig::max_session`] passes | Close 4003 | as for a stop |
//! | the upstream fails | Close 1011 | as for a stop |
//! | the client's socket fails | nothing | upstream shut down |
//!
//! Every wait after the session stops running (sending the Close, the client's reply, the
//! upstream shutdown) is bounded by [`ProxyConfig::close_timeout`].
//!
//! ## Concurrency
//! One task, no locks: the engine polls both directions from a single future, so it needs
//! neither a split WebSocket nor a split upstream, and a stalled direction (backpressure) never
//! blocks the other. Nothing is read from the upstream until the client's sink is ready for
//! another frame (backpressure); each read then goes to the sink at once, and the sink is
//! flushed when the upstream has nothing more to read right now, so bursts leave in few
//! syscalls and single keystrokes leave at once. Over [`super::ServerSocket`] a read is
//! written to the client without being copied, and the next read reuses its buffer.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Sink, SinkExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::io::poll_read_buf;

use super::{CloseReason, StopSignal, WsFrame};

/// The error of a client's WebSocket, whatever the library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// First read size; it doubles while reads fill it, up to [`ProxyConfig::max_frame_bytes`].
const INITIAL_READ_BYTES: usize = 8 * 1024;
/// Replies (shell acks) and pings waiting for the client; past this, client frames wait too.
const OUTBOX_LIMIT: usize = 64;
/// Frames moved in one direction per poll before yielding to the rest of the runtime.
const BUDGET: usize = 64;

/// Tuning of a console session. `Default` is what production uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Interval between WebSocket Pings to the client; `None` sends none. Default: 20 s.
    pub ping_interval: Option<Duration>,
    /// Largest read from the upstream, hence largest frame to the client (at least 1).
    /// Default: 1 MiB. Reads only grow that large while the upstream has that much waiting (a
    /// burst, or a client slower than the VM), where large reads save CPU per byte (see
    /// docs/benchmarks.md); websockify reads 64 KiB.
    pub max_frame_bytes: usize,
    /// Bound on each closing step (sending Close, awaiting the reply, shutting the upstream
    /// down). Default: 5 s.
    pub close_timeout: Duration,
    /// Hard cap on a session's length, after which it closes with 4003; `None` (the default)
    /// for no cap.
    pub max_session: Option<Duration>,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            ping_interval: Some(Duration::from_secs(20)),
            max_frame_bytes: 1 << 20,
            close_timeout: Duration::from_secs(5),
            max_session: None,
        }
    }
}

/// What a finished session did.
#[derive(Debug)]
pub struct ProxySummary {
    /// Bytes taken from the client and written to the upstream.
    pub to_upstream_bytes: u64,
    /// Bytes read from the upstream and sent to the client (before any framing).
    pub to_client_bytes: u64,
    pub duration: Duration,
    pub ended: Ended,
}

/// How a session ended.
#[derive(Debug)]
pub enum Ended {
    /// The client sent Close or its stream ended.
    ClientClosed,
    /// The upstream reached EOF (the console closed); the client got Close 1000.
    UpstreamClosed,
    /// The [`StopSignal`] fired; the client got its reason.
    Stopped(CloseReason),
    /// [`ProxyConfig::max_session`] passed; the client got Close 4003.
    TimeLimit,
    /// The client broke the protocol (shell: malformed message, no `initialize` in time,
    /// unknown session); the client got this reason.
    Rejected(CloseReason),
    /// The client's WebSocket failed (reset, protocol error).
    ClientFailed(BoxError),
    /// Reading or writing the upstream failed; the client got Close 1011.
    UpstreamFailed(io::Error),
}

/// Proxies a VNC console: `ws` is the client's WebSocket (a [`super::ServerSocket`], or a
/// library's socket through [`super::WsAdapter`]), `upstream`
/// the console's byte stream. Returns when the session has ended, as described in the module
/// docs; the caller only logs the summary.
pub async fn proxy<W, E, U>(
    ws: W,
    upstream: U,
    stop: StopSignal,
    config: ProxyConfig,
) -> ProxySummary
where
    W: Sink<WsFrame> + Stream<Item = Result<WsFrame, E>> + Unpin,
    <W as Sink<WsFrame>>::Error: Into<BoxError>,
    E: Into<BoxError>,
    U: AsyncRead + AsyncWrite + Unpin,
{
    Pump::new(ws, upstream, Passthrough, config).run(stop).await
}

/// Translates between client frames and upstream bytes. The engine handles Ping, Pong and
/// Close itself; a codec sees Binary and Text frames only.
pub(super) trait Codec {
    /// A Binary or Text frame from the client. `Err` closes the session with that reason.
    fn client_message(&mut self, frame: WsFrame) -> Result<Forward, CloseReason>;
    /// A non-empty read from the upstream; `None` sends nothing (yet).
    fn upstream_bytes(&mut self, chunk: Bytes) -> Option<WsFrame>;
    /// The upstream reached EOF: a last frame for whatever the codec still holds.
    fn upstream_eof(&mut self) -> Option<WsFrame> {
        None
    }
}

/// What to do with one client frame.
#[derive(Debug, Default)]
pub(super) struct Forward {
    /// Bytes for the upstream.
    pub(super) upstream: Option<Bytes>,
    /// A frame for the client, sent ahead of upstream data.
    pub(super) reply: Option<WsFrame>,
}

/// VNC: binary frames are the byte stream; text frames mean nothing.
#[derive(Debug)]
pub(super) struct Passthrough;

impl Codec for Passthrough {
    fn client_message(&mut self, frame: WsFrame) -> Result<Forward, CloseReason> {
        Ok(match frame {
            WsFrame::Binary(b) => Forward {
                upstream: Some(b),
                reply: None,
            },
            _ => Forward::default(),
        })
    }

    fn upstream_bytes(&mut self, chunk: Bytes) -> Option<WsFrame> {
        Some(WsFrame::Binary(chunk))
    }
}

/// Why a session stops running.
pub(super) enum Finish {
    ClientClosed,
    ClientFailed(BoxError),
    UpstreamClosed,
    UpstreamFailed(io::Error),
    Stopped(CloseReason),
    TimeLimit,
    Rejected(CloseReason),
}

/// One session's state. Owned by the session's task; nothing is shared.
pub(super) struct Pump<W, U, C> {
    ws: W,
    upstream: U,
    codec: C,
    config: ProxyConfig,
    started: Instant,
    /// The part of the current client frame not yet written to the upstream.
    to_upstream: Bytes,
    /// Bytes were written to the upstream since its last flush.
    upstream_dirty: bool,
    /// Frames for the client that go before upstream data: replies, pings.
    outbox: VecDeque<WsFrame>,
    /// Frames were handed to the client's sink since its last flush.
    ws_dirty: bool,
    read_buf: BytesMut,
    /// Size of the next read: between [`INITIAL_READ_BYTES`] and `max_read`, following the
    /// reads (see [`Pump::adapt_read_size`]).
    read_size: usize,
    max_read: usize,
    ping: Option<Interval>,
    ping_queued: bool,
    /// The client reader stopped because the outbox was full; draining it must wake the task.
    reader_waits_for_outbox: bool,
    /// Closing: replies are dropped and the outbox no longer holds the reader back.
    closing: bool,
    /// Closing after a stop: client data is read (to see its Close) but dropped.
    discard_client_data: bool,
    to_upstream_bytes: u64,
    to_client_bytes: u64,
}

impl<W, E, U, C> Pump<W, U, C>
where
    W: Sink<WsFrame> + Stream<Item = Result<WsFrame, E>> + Unpin,
    <W as Sink<WsFrame>>::Error: Into<BoxError>,
    E: Into<BoxError>,
    U: AsyncRead + AsyncWrite + Unpin,
    C: Codec,
{
    pub(super) fn new(ws: W, upstream: U, codec: C, config: ProxyConfig) -> Self {
        let ping = config.ping_interval.map(|period| {
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        let max_read = config.max_frame_bytes.max(1);
        Pump {
            ws,
            upstream,
            codec,
            config,
            started: Instant::now(),
            to_upstream: Bytes::new(),
            upstream_dirty: false,
            outbox: VecDeque::new(),
            ws_dirty: false,
            read_buf: BytesMut::new(),
            read_size: INITIAL_READ_BYTES.min(max_read),
            max_read,
            ping,
            ping_queued: false,
            reader_waits_for_outbox: false,
            closing: false,
            discard_client_data: false,
            to_upstream_bytes: 0,
            to_client_bytes: 0,
        }
    }

    /// Queues a frame for the client ahead of everything else (a shell's `initialize` reply).
    pub(super) fn queue(&mut self, frame: WsFrame) {
        self.outbox.push_back(frame);
    }

    /// Runs the session until it ends, then closes it.
    pub(super) async fn run(mut self, stop: StopSignal) -> ProxySummary {
        let deadline = self.config.max_session.map(|d| self.started + d);
        let finish = tokio::select! {
            // A stop wins over data that is ready at the same moment.
            biased;
            reason = stop.stopped() => Finish::Stopped(reason),
            () = sleep_until_opt(deadline) => Finish::TimeLimit,
            finish = poll_fn(|cx| self.poll_running(cx)) => finish,
        };
        self.finish(finish).await
    }

    /// The client's WebSocket, for a protocol's opening exchange before [`Pump::run`].
    pub(super) fn ws_mut(&mut self) -> &mut W {
        &mut self.ws
    }

    pub(super) fn codec_mut(&mut self) -> &mut C {
        &mut self.codec
    }

    fn poll_running(&mut self, cx: &mut Context<'_>) -> Poll<Finish> {
        if let Poll::Ready(finish) = self.poll_to_upstream(cx) {
            return Poll::Ready(finish);
        }
        self.poll_to_client(cx)
    }

    /// Client frames → upstream bytes. `Ready` only when the session must stop.
    fn poll_to_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Finish> {
        for _ in 0..BUDGET {
            while !self.to_upstream.is_empty() {
                match Pin::new(&mut self.upstream).poll_write(cx, &self.to_upstream) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Finish::UpstreamFailed(io::ErrorKind::WriteZero.into()))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.to_upstream.advance(n);
                        self.upstream_dirty = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Finish::UpstreamFailed(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.closing && self.outbox.len() >= OUTBOX_LIMIT {
                self.reader_waits_for_outbox = true;
                return Poll::Pending;
            }
            let frame = match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Finish::ClientFailed(e.into())),
                Poll::Ready(None) => return Poll::Ready(Finish::ClientClosed),
                Poll::Pending => {
                    if self.upstream_dirty {
                        match Pin::new(&mut self.upstream).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.upstream_dirty = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Finish::UpstreamFailed(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            };
            match frame {
                WsFrame::Close(_) => return Poll::Ready(Finish::ClientClosed),
                WsFrame::Ping(_) | WsFrame::Pong(_) => {}
                data @ (WsFrame::Binary(_) | WsFrame::Text(_)) => {
                    let forward = match self.codec.client_message(data) {
                        Ok(forward) => forward,
                        Err(reason) => return Poll::Ready(Finish::Rejected(reason)),
                    };
                    if self.discard_client_data {
                        continue;
                    }
                    if let Some(bytes) = forward.upstream {
                        self.to_upstream_bytes += bytes.len() as u64;
                        self.to_upstream = bytes;
                    }
                    if let (Some(reply), false) = (forward.reply, self.closing) {
                        self.outbox.push_back(reply);
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Upstream bytes (and queued replies and pings) → client frames. `Ready` only when the
    /// session must stop.
    ///
    /// The client's sink must be ready before anything is read from the upstream: that is the
    /// backpressure, and it also gives the sink the chance to write the previous frame out
    /// first, so the next read reuses the buffer that frame was read into.
    fn poll_to_client(&mut self, cx: &mut Context<'_>) -> Poll<Finish> {
        if let Some(ping) = &mut self.ping {
            while ping.poll_tick(cx).is_ready() {
                if !self.ping_queued {
                    self.ping_queued = true;
                    self.outbox.push_back(WsFrame::Ping(Bytes::new()));
                }
            }
        }
        for _ in 0..BUDGET {
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Finish::ClientFailed(e.into())),
                Poll::Pending => return Poll::Pending,
            }
            let frame = match self.outbox.pop_front() {
                Some(frame) => {
                    if matches!(frame, WsFrame::Ping(_)) {
                        self.ping_queued = false;
                    }
                    if self.reader_waits_for_outbox && self.outbox.len() < OUTBOX_LIMIT {
                        self.reader_waits_for_outbox = false;
                        cx.waker().wake_by_ref();
                    }
                    frame
                }
                None => match self.poll_upstream_frame(cx) {
                    Poll::Ready(Ok(Some(frame))) => frame,
                    Poll::Ready(Ok(None)) => continue,
                    Poll::Ready(Err(finish)) => return Poll::Ready(finish),
                    Poll::Pending => {
                        // The upstream is quiet for now: push what is queued out to the client.
                        if self.ws_dirty {
                            match Pin::new(&mut self.ws).poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.ws_dirty = false,
                                Poll::Ready(Err(e)) => {
                                    return Poll::Ready(Finish::ClientFailed(e.into()))
                                }
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                },
            };
            if let Err(e) = Pin::new(&mut self.ws).start_send(frame) {
                return Poll::Ready(Finish::ClientFailed(e.into()));
            }
            self.ws_dirty = true;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One read from the upstream, through the codec: `Ok(None)` if the codec holds it back,
    /// `Err` when the session must stop.
    fn poll_upstream_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<WsFrame>, Finish>> {
        self.read_buf_reserve();
        let mut limited = (&mut self.read_buf).limit(self.read_size);
        match std::task::ready!(poll_read_buf(
            Pin::new(&mut self.upstream),
            cx,
            &mut limited
        )) {
            Ok(0) => Poll::Ready(Err(Finish::UpstreamClosed)),
            Ok(n) => {
                self.to_client_bytes += n as u64;
                self.adapt_read_size(n);
                let chunk = self.read_buf.split().freeze();
                Poll::Ready(Ok(self.codec.upstream_bytes(chunk)))
            }
            Err(e) => Poll::Ready(Err(Finish::UpstreamFailed(e))),
        }
    }

    /// Reads that fill the buffer double the next read (a burst: fewer, larger frames); reads
    /// under a quarter of it halve it, back down to [`INITIAL_READ_BYTES`].
    fn adapt_read_size(&mut self, n: usize) {
        if n >= self.read_size {
            self.read_size = (self.read_size * 2).min(self.max_read);
        } else if n < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(INITIAL_READ_BYTES.min(self.max_read));
        }
    }

    /// Makes room for the next read. Once the sink has written the previous chunk and dropped
    /// it, `BytesMut` reuses its allocation, so a busy session reads into the same memory over
    /// and over; once the reads have shrunk, a buffer grown by a burst is let go, so a session
    /// that turns quiet holds little memory again.
    fn read_buf_reserve(&mut self) {
        if self.read_buf.capacity() > 4 * self.read_size {
            self.read_buf = BytesMut::new();
        }
        self.read_buf.reserve(self.read_size);
    }

    /// Closes the session as the module docs describe; also ends sessions that never ran.
    pub(super) async fn finish(mut self, finish: Finish) -> ProxySummary {
        let timeout = self.config.close_timeout;
        let (ended, close) = match finish {
            Finish::ClientClosed => (Ended::ClientClosed, None),
            Finish::ClientFailed(e) => (Ended::ClientFailed(e), None),
            Finish::UpstreamClosed => (Ended::UpstreamClosed, Some(CloseReason::console_closed())),
            Finish::UpstreamFailed(e) => (
                Ended::UpstreamFailed(e),
                Some(CloseReason::console_failed()),
            ),
            Finish::Stopped(r) => (Ended::Stopped(r.clone()), Some(r)),
            Finish::TimeLimit => (Ended::TimeLimit, Some(CloseReason::time_limit())),
            Finish::Rejected(r) => (Ended::Rejected(r.clone()), Some(r)),
        };
        if let Some(reason) = close {
            self.closing = true;
            if matches!(ended, Ended::UpstreamClosed) {
                // Everything the console said reaches the client before the Close; the client
                // may keep typing until it has seen it.
                if let Some(last) = self.codec.upstream_eof() {
                    self.outbox.push_back(last);
                }
            } else {
                self.outbox.clear();
                self.to_upstream = Bytes::new();
                self.discard_client_data = true;
            }
            let sent = tokio::time::timeout(timeout, self.send_close(&reason)).await;
            if matches!(sent, Ok(Ok(()))) {
                // Await the client's Close reply (forwarding its last bytes after an EOF).
                let _ =
                    tokio::time::timeout(timeout, poll_fn(|cx| self.poll_to_upstream(cx))).await;
            }
        }
        if !matches!(ended, Ended::UpstreamFailed(_)) {
            // Half-close: the upstream sees EOF after the last byte the client sent.
            let _ = tokio::time::timeout(timeout, self.upstream.shutdown()).await;
        }
        if !matches!(ended, Ended::ClientFailed(_)) {
            // Lets the library send its reply to the client's Close and flush it.
            let _ = tokio::time::timeout(timeout, self.ws.close()).await;
        }
        ProxySummary {
            to_upstream_bytes: self.to_upstream_bytes,
            to_client_bytes: self.to_client_bytes,
            duration: self.started.elapsed(),
            ended,
        }
    }

    /// Sends what is queued for the client, then the Close frame.
    async fn send_close(&mut self, reason: &CloseReason) -> Result<(), BoxError> {
        while let Some(frame) = self.outbox.pop_front() {
            self.ws.feed(frame).await.map_err(Into::into)?;
        }
        self.ws
            .send(WsFrame::from(reason))
            .await
            .map_err(Into::into)
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "proxy_tests.rs"]
mod tests;
