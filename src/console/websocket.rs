//! The server side of RFC 6455 for the VNC console: the upgrade ([`WsUpgrade`], an axum
//! extractor) and the framed socket ([`ServerSocket`]) that [`super::proxy()`] drives.
//!
//! Why not axum's WebSocket (tungstenite): it copies every payload into its write buffer and
//! hides the socket. A VNC console is a bulk byte stream to the browser, and at loopback speed
//! that copy is the largest user-space cost of the pump. Here a frame to the client is its
//! 2-10 byte header and the payload `Bytes` the pump read from the upstream, sent with one
//! vectored write: no copy, no buffer per session beyond the queue of pending frames.
//!
//! Scope, as the console needs it:
//! - HTTP/1.1 upgrades only (the `Connection`, `Upgrade`, `Sec-WebSocket-Version: 13` and
//!   `Sec-WebSocket-Key` checks axum does); the configured subprotocol is echoed only when the
//!   client offers it. No extensions (permessage-deflate is never negotiated).
//! - Client frames must be masked; fragmented messages are reassembled, control frames may
//!   interleave them; text must be UTF-8; a message may not exceed
//!   [`SocketConfig::max_message_bytes`].
//! - Pings are answered with Pongs and a Close with a Close echoing its code, as libraries do;
//!   both frames are also passed up so the pump sees them.
//! - A client that breaks the protocol gets Close 1002 (1007 for bad UTF-8, 1009 for a
//!   message too large), sent on a best-effort basis, and the stream yields the error.
//! - Frames to the client are never masked nor fragmented.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::{header, request, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, Stream};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

use super::WsFrame;

/// Reads from the client reserve this much; client messages (keys, pointer moves) are small.
const READ_CHUNK: usize = 4 * 1024;
/// A read buffer grown past this by a large message is dropped once it is empty again.
const KEEP_READ_CAPACITY: usize = 64 * 1024;
/// Queued bytes to the client past which [`Sink::poll_ready`] writes before accepting more.
/// Below it, small frames queue up and leave in one vectored write at the next flush.
const FLUSH_BYTES: usize = 16 * 1024;
/// Frames queued at most (each takes two of a vectored write's slices).
const MAX_QUEUED_FRAMES: usize = 32;
/// A control frame's payload is at most this long.
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest frame header: 2 bytes, an 8-byte length, no mask (server frames are unmasked).
const MAX_HEADER: usize = 10;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Everything that can go wrong with a console WebSocket: a refused upgrade (the extractor's
/// rejection, answered with an HTTP status) or a failure of an established socket.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("a WebSocket upgrade must be a GET request")]
    NotGet,
    #[error("the request is not a WebSocket upgrade: {0}")]
    BadUpgrade(&'static str),
    #[error("only WebSocket version 13 is supported")]
    BadVersion,
    #[error("this connection cannot be upgraded (HTTP/1.1 only)")]
    NotUpgradable,
    #[error("the client broke the WebSocket protocol: {0}")]
    Protocol(&'static str),
    #[error("the client sent a text message that is not UTF-8")]
    NotUtf8,
    #[error("the client sent a message of more than {limit} bytes")]
    TooBig { limit: usize },
    #[error("the WebSocket is closing; nothing more can be sent")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl WsError {
    /// The close code a client is sent for breaking the protocol this way.
    fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(_) => Some(1002),
            WsError::NotUtf8 => Some(1007),
            WsError::TooBig { .. } => Some(1009),
            _ => None,
        }
    }
}

/// A refused upgrade, in UCloud's error format like every other refusal of the API.
impl IntoResponse for WsError {
    fn into_response(self) -> Response {
        let (status, code) = match self {
            WsError::NotGet => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            WsError::NotUpgradable => (StatusCode::UPGRADE_REQUIRED, "UPGRADE_REQUIRED"),
            WsError::BadVersion | WsError::BadUpgrade(_) => {
                (StatusCode::BAD_REQUEST, "BAD_REQUEST")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
        };
        let body = crate::ucloud::error_body(status.as_u16(), code, &self.to_string());
        let mut response = (status, axum::Json(body)).into_response();
        if matches!(self, WsError::BadVersion) {
            // RFC 6455 4.4: the refusal names the version the server speaks.
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// Settings of one WebSocket, fixed at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketConfig {
    /// The subprotocol accepted when the client offers it (old noVNC versions offer `binary`).
    pub subprotocol: Option<&'static str>,
    /// Largest message accepted from the client, reassembled.
    pub max_message_bytes: usize,
}

impl SocketConfig {
    /// The VNC console: the `binary` subprotocol, messages up to 8 MiB (a big clipboard paste).
    pub fn vnc() -> SocketConfig {
        SocketConfig {
            subprotocol: Some("binary"),
            max_message_bytes: super::frame::VNC_MAX_MESSAGE_BYTES,
        }
    }
}

/// A checked WebSocket upgrade request: extract it in a handler (after the handler's own
/// checks, which refuse with plain HTTP statuses), then answer with [`WsUpgrade::on_upgrade`].
#[derive(Debug)]
pub struct WsUpgrade {
    accept: HeaderValue,
    offered_protocols: Option<HeaderValue>,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = WsError;

    async fn from_request_parts(parts: &mut request::Parts, _: &S) -> Result<Self, WsError> {
        if parts.method != Method::GET {
            return Err(WsError::NotGet);
        }
        if parts.version != Version::HTTP_11 {
            return Err(WsError::NotUpgradable);
        }
        let headers = &parts.headers;
        if !header_has_token(headers, header::CONNECTION, "upgrade") {
            return Err(WsError::BadUpgrade(
                "`Connection` does not include `upgrade`",
            ));
        }
        if !header_has_token(headers, header::UPGRADE, "websocket") {
            return Err(WsError::BadUpgrade("`Upgrade` is not `websocket`"));
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
            return Err(WsError::BadVersion);
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(WsError::BadUpgrade("no `Sec-WebSocket-Key`"))?;
        let accept = accept_key(key.as_bytes());
        let offered_protocols = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(WsError::NotUpgradable)?;
        Ok(WsUpgrade {
            accept,
            offered_protocols,
            on_upgrade,
        })
    }
}

impl WsUpgrade {
    /// Answers 101 Switching Protocols; once hyper hands the connection over, `session` runs
    /// on a task of its own with the socket.
    pub fn on_upgrade<F, Fut>(self, config: SocketConfig, session: F) -> Response
    where
        F: FnOnce(ServerSocket<TokioIo<Upgraded>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let protocol = config.subprotocol.filter(|wanted| {
            self.offered_protocols.as_ref().is_some_and(|offered| {
                offered
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|p| p.trim() == *wanted)
            })
        });
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => session(ServerSocket::new(TokioIo::new(upgraded), config)).await,
                Err(e) => tracing::debug!(error = %e, "the WebSocket upgrade did not complete"),
            }
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        if let Some(protocol) = protocol {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Whether a comma-separated header holds `token` (case-insensitively), in any of its lines.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn accept_key(key: &[u8]) -> HeaderValue {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let encoded = base64::engine::general_purpose::STANDARD.encode(sha1.finalize());
    HeaderValue::from_str(&encoded).expect("base64 is a valid header value")
}

/// A frame waiting to be written: its header inline, its payload shared with whoever made it.
struct Outgoing {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Bytes,
    /// Bytes of header and payload already written.
    written: usize,
}

impl Outgoing {
    fn new(opcode: u8, payload: Bytes) -> Outgoing {
        let mut header = [0u8; MAX_HEADER];
        header[0] = 0x80 | opcode; // FIN: frames to the client are never fragmented
        let len = payload.len();
        let header_len = if len < 126 {
            header[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            header[1] = 126;
            header[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Outgoing {
            header,
            header_len,
            payload,
            written: 0,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.header_len) + self.payload.len()
    }

    /// The unwritten parts, as up to two slices.
    fn slices(&self) -> [&[u8]; 2] {
        let header_len = usize::from(self.header_len);
        if self.written < header_len {
            [&self.header[self.written..header_len], &self.payload]
        } else {
            [&self.payload[self.written - header_len..], &[]]
        }
    }
}

/// A message from the client that arrives in fragments.
struct Fragmented {
    text: bool,
    data: BytesMut,
}

/// A parsed client frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length, mask included.
    len: usize,
    payload_len: usize,
}

/// An established WebSocket, server side, over any byte stream: a
/// `Sink<WsFrame> + Stream<Item = Result<WsFrame, WsError>>`, as the pumps take.
///
/// Frames handed to the sink queue up (zero-copy) until 16 KiB are queued or the sink
/// is flushed; then they leave in one vectored write.
pub struct ServerSocket<S> {
    io: S,
    config: SocketConfig,
    read_buf: BytesMut,
    fragmented: Option<Fragmented>,
    queue: VecDeque<Outgoing>,
    queued_bytes: usize,
    /// A Pong or Close reply was queued while reading; reading tries to send it out.
    reply_queued: bool,
    close_sent: bool,
    close_received: bool,
}

impl<S> std::fmt::Debug for ServerSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSocket")
            .field("queued_bytes", &self.queued_bytes)
            .field("close_sent", &self.close_sent)
            .field("close_received", &self.close_received)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerSocket<S> {
    /// A socket over `io`, whose handshake is done.
    pub fn new(io: S, config: SocketConfig) -> ServerSocket<S> {
        ServerSocket {
            io,
            config,
            read_buf: BytesMut::new(),
            fragmented: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            reply_queued: false,
            close_sent: false,
            close_received: false,
        }
    }

    fn enqueue(&mut self, opcode: u8, payload: Bytes) {
        let frame = Outgoing::new(opcode, payload);
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
    }

    /// Writes the queue out, as many frames per write as a vectored write takes.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 2 * MAX_QUEUED_FRAMES];
            let mut count = 0;
            let parts = self.queue.iter().flat_map(Outgoing::slices);
            for part in parts.filter(|p| !p.is_empty()).take(slices.len()) {
                slices[count] = IoSlice::new(part);
                count += 1;
            }
            let mut n = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.queued_bytes -= n;
            while n > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                let left = front.len() - front.written;
                if n < left {
                    front.written += n;
                    break;
                }
                n -= left;
                // Dropping the payload lets the pump reuse its read buffer.
                self.queue.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Queues a reply the client is owed (Pong, Close) and tries to send it at once.
    fn reply(&mut self, cx: &mut Context<'_>, opcode: u8, payload: Bytes) {
        if self.close_sent {
            return;
        }
        if opcode == OP_CLOSE {
            self.close_sent = true;
        }
        self.enqueue(opcode, payload);
        self.reply_queued = true;
        self.poll_reply(cx);
    }

    /// Sends queued replies out if the socket takes them now; write errors surface on the
    /// next write or flush.
    fn poll_reply(&mut self, cx: &mut Context<'_>) {
        if self.reply_queued && !matches!(self.poll_write_queue(cx), Poll::Pending) {
            self.reply_queued = false;
        }
    }

    /// Parses the next frame header in the read buffer; `None` until it is all there.
    fn parse_header(&self) -> Result<Option<Header>, WsError> {
        let buf = &self.read_buf[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let (fin, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x0F);
        if buf[0] & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set without an extension"));
        }
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(WsError::Protocol("unknown opcode"));
        }
        if buf[1] & 0x80 == 0 {
            return Err(WsError::Protocol("client frames must be masked"));
        }
        let (len_bytes, short_len) = match buf[1] & 0x7F {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(usize::from(n))),
        };
        let len = 2 + len_bytes + 4;
        if buf.len() < len {
            return Ok(None);
        }
        let payload_len = match short_len {
            Some(n) => n as u64,
            None => buf[2..2 + len_bytes]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        };
        if opcode >= OP_CLOSE && (!fin || payload_len > MAX_CONTROL_PAYLOAD as u64) {
            return Err(WsError::Protocol("control frames must be whole and short"));
        }
        let so_far = self.fragmented.as_ref().map_or(0, |f| f.data.len()) as u64;
        let limit = self.config.max_message_bytes;
        if so_far.saturating_add(payload_len) > limit as u64 {
            return Err(WsError::TooBig { limit });
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&buf[len - 4..len]);
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            len,
            payload_len: payload_len as usize,
        }))
    }

    /// The next message from the client, reading as needed; `None` at a clean end.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WsFrame, WsError>>> {
        loop {
            if let Some(header) = self.parse_header()? {
                let frame_len = header.len + header.payload_len;
                if self.read_buf.len() >= frame_len {
                    self.read_buf.advance(header.len);
                    let mut payload = self.read_buf.split_to(header.payload_len);
                    unmask(&mut payload, header.mask);
                    if let Some(message) = self.message(cx, &header, payload)? {
                        return Poll::Ready(Some(Ok(message)));
                    }
                    continue;
                }
                // The rest of this frame, in as few reads as the socket allows.
                self.read_buf.reserve(frame_len - self.read_buf.len());
            } else if self.read_buf.is_empty() && self.read_buf.capacity() > KEEP_READ_CAPACITY {
                self.read_buf = BytesMut::new();
            }
            self.read_buf.reserve(READ_CHUNK);
            match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf) {
                Poll::Ready(Ok(0)) if self.read_buf.is_empty() && self.fragmented.is_none() => {
                    return Poll::Ready(None)
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Some(Err(
                        io::Error::from(io::ErrorKind::UnexpectedEof).into()
                    )))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Handles one unmasked frame; `Some` when it completes a message for the pump.
    fn message(
        &mut self,
        cx: &mut Context<'_>,
        header: &Header,
        payload: BytesMut,
    ) -> Result<Option<WsFrame>, WsError> {
        let (text, data) = match header.opcode {
            OP_PING => {
                let payload = payload.freeze();
                self.reply(cx, OP_PONG, payload.clone());
                return Ok(Some(WsFrame::Ping(payload)));
            }
            OP_PONG => return Ok(Some(WsFrame::Pong(payload.freeze()))),
            OP_CLOSE => {
                let close = parse_close(&payload)?;
                self.close_received = true;
                // Echo the code, as RFC 6455 5.5.1 suggests; no code gets an empty Close.
                let echo = payload.freeze().slice(..payload_code_len(&close));
                self.reply(cx, OP_CLOSE, echo);
                return Ok(Some(WsFrame::Close(close)));
            }
            OP_CONTINUATION => {
                let fragmented = self
                    .fragmented
                    .as_mut()
                    .ok_or(WsError::Protocol("a continuation without a message"))?;
                fragmented.data.extend_from_slice(&payload);
                if !header.fin {
                    return Ok(None);
                }
                let Fragmented { text, data } = self.fragmented.take().expect("checked above");
                (text, data)
            }
            opcode => {
                if self.fragmented.is_some() {
                    return Err(WsError::Protocol("a new message inside a fragmented one"));
                }
                let text = opcode == OP_TEXT;
                if !header.fin {
                    self.fragmented = Some(Fragmented {
                        text,
                        data: payload,
                    });
                    return Ok(None);
                }
                (text, payload)
            }
        };
        Ok(Some(if text {
            WsFrame::Text(String::from_utf8(data.to_vec()).map_err(|_| WsError::NotUtf8)?)
        } else {
            WsFrame::Binary(data.freeze())
        }))
    }
}

/// Bytes of a Close payload to echo back: the code alone, or nothing.
fn payload_code_len(close: &Option<(u16, String)>) -> usize {
    if close.is_some() {
        2
    } else {
        0
    }
}

/// A Close frame's code and reason (RFC 6455 5.5.1, 7.4).
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("a Close with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(WsError::Protocol("an invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::NotUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Unmasks a client payload in place.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for ServerSocket<S> {
    type Item = Result<WsFrame, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.poll_reply(cx);
        if this.close_received {
            return Poll::Ready(None);
        }
        let polled = this.poll_message(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if let Some(code) = e.close_code() {
                // Tell the client why, if its socket takes it now.
                this.reply(cx, OP_CLOSE, Bytes::copy_from_slice(&code.to_be_bytes()));
                this.close_received = true;
            }
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<WsFrame> for ServerSocket<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.queued_bytes < FLUSH_BYTES && self.queue.len() < MAX_QUEUED_FRAMES {
            return Poll::Ready(Ok(()));
        }
        self.poll_write_queue(cx).map_err(Into::into)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: WsFrame) -> Result<(), WsError> {
        if self.close_sent {
            return Err(WsError::Closed);
        }
        let (opcode, payload) = match frame {
            WsFrame::Binary(b) => (OP_BINARY, b),
            WsFrame::Text(t) => (OP_TEXT, Bytes::from(t)),
            WsFrame::Ping(b) => (OP_PING, b),
            WsFrame::Pong(b) => (OP_PONG, b),
            WsFrame::Close(close) => {
                self.close_sent = true;
                let payload = match close {
                    None => Bytes::new(),
                    Some((code, reason)) => {
                        let mut payload = code.to_be_bytes().to_vec();
                        payload.extend_from_slice(reason.as_bytes());
                        Bytes::from(payload)
                    }
                };
                (OP_CLOSE, payload)
            }
        };
        if opcode >= OP_CLOSE && payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(WsError::Protocol("control frames must be short"));
        }
        self.enqueue(opcode, payload);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        std::task::ready!(self.poll_write_queue(cx))?;
        Pin::new(&mut self.io).poll_flush(cx).map_err(Into::into)
    }

    /// Sends a Close unless one was sent, flushes, and shuts the socket's write half down;
    /// after a Close each way the server is the one to end the TCP connection (RFC 6455 7.1.1).
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if !self.close_sent {
            self.close_sent = true;
            self.enqueue(OP_CLOSE, Bytes::new());
        }
        std::task::ready!(self.poll_write_queue(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx).map_err(Into::into)
    }
}

#[cfg(test)]
#[path = "websocket_tests.rs"]
mod tests;
