//! WebSocket frames as the console pumps see them, the reasons vmhost closes a console with, and
//! the adapters that let one pump serve axum's server sockets and tokio-tungstenite's sockets.
//!
//! The adapters are the only place in `console` that names axum's or tungstenite's WebSocket
//! types (the shell and the tests use them; VNC runs on [`super::websocket`]); both conversions
//! are zero-copy for binary payloads (`Bytes` moves across).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws as axum_ws;
use axum::extract::ws::WebSocketUpgrade;
use bytes::Bytes;
use futures::{Sink, Stream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TungsteniteCloseFrame;
use tokio_tungstenite::tungstenite::Message as TungsteniteMessage;

use super::shell::MAX_CLIENT_FRAME_BYTES;
use super::SessionKind;

/// Initial read buffer of a console WebSocket. tungstenite zero-fills this much before every
/// read attempt, so the 128 KiB default costs a 128 KiB memset per message received; console
/// clients send small messages (keys, pointer moves, JSON), and the buffer still grows for a
/// large one.
pub const CONSOLE_READ_BUFFER_BYTES: usize = 8 * 1024;
/// Largest message accepted from a VNC client (a big clipboard paste).
pub const VNC_MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Applies the console settings to an axum WebSocket upgrade (the shell's; the VNC route
/// takes [`super::WsUpgrade`] with [`super::SocketConfig::vnc`] instead): for VNC the `binary`
/// subprotocol (echoed only when the client offers it, as old noVNC versions do) and an 8 MiB
/// message cap; for the shell a cap just above [`MAX_CLIENT_FRAME_BYTES`], so an oversized
/// message gets the shell's own 1009 close rather than a library error; for both a small read
/// buffer ([`CONSOLE_READ_BUFFER_BYTES`]).
pub fn configure_upgrade<F>(
    upgrade: WebSocketUpgrade<F>,
    kind: SessionKind,
) -> WebSocketUpgrade<F> {
    let upgrade = upgrade.read_buffer_size(CONSOLE_READ_BUFFER_BYTES);
    match kind {
        SessionKind::Vnc => upgrade
            .protocols(["binary"])
            .max_message_size(VNC_MAX_MESSAGE_BYTES)
            .max_frame_size(VNC_MAX_MESSAGE_BYTES),
        SessionKind::Shell => upgrade
            .max_message_size(2 * MAX_CLIENT_FRAME_BYTES)
            .max_frame_size(2 * MAX_CLIENT_FRAME_BYTES),
    }
}

/// One WebSocket message, independent of the WebSocket library underneath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsFrame {
    Binary(Bytes),
    Text(String),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame with its status code and reason; `None` is a close without a status.
    Close(Option<(u16, String)>),
}

impl From<&CloseReason> for WsFrame {
    fn from(reason: &CloseReason) -> WsFrame {
        WsFrame::Close(Some((reason.code, reason.reason.clone())))
    }
}

/// Why vmhost closes a console WebSocket: the close code and the reason a page can show.
///
/// Codes: 1000 to 1011 are RFC 6455's; 4000 to 4003 are vmhost's own (the private range), so a
/// console page can tell "suspended" from "stopped" from "terminated" without parsing text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    code: u16,
    reason: String,
}

impl CloseReason {
    /// A close frame's payload is at most 125 bytes: 2 for the code, the rest for the reason.
    pub const MAX_REASON_BYTES: usize = 123;

    /// A close reason; `reason` is cut (at a character boundary) to [`Self::MAX_REASON_BYTES`].
    pub fn new(code: u16, reason: impl Into<String>) -> CloseReason {
        let mut reason = reason.into();
        if reason.len() > Self::MAX_REASON_BYTES {
            let mut end = Self::MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        CloseReason { code, reason }
    }

    pub fn code(&self) -> u16 {
        self.code
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// 1000: the console's byte stream ended (the guest or QEMU closed it).
    pub fn console_closed() -> CloseReason {
        CloseReason::new(1000, "the virtual machine's console closed")
    }

    /// 1001: vmhost itself is going away.
    pub fn shutting_down() -> CloseReason {
        CloseReason::new(1001, "vmhost is shutting down")
    }

    /// 1008: the client broke the protocol (malformed or unexpected message).
    pub fn policy(reason: impl Into<String>) -> CloseReason {
        CloseReason::new(1008, reason)
    }

    /// 1009: the client sent a message larger than the protocol allows.
    pub fn too_big(reason: impl Into<String>) -> CloseReason {
        CloseReason::new(1009, reason)
    }

    /// 1011: reading or writing the console's byte stream failed.
    pub fn console_failed() -> CloseReason {
        CloseReason::new(1011, "the virtual machine's console failed")
    }

    /// 4000: the job was suspended (its VM shut down; it may come back).
    pub fn vm_suspended() -> CloseReason {
        CloseReason::new(4000, "the virtual machine was suspended")
    }

    /// 4001: the VM stopped (guest power-off or crash).
    pub fn vm_stopped() -> CloseReason {
        CloseReason::new(4001, "the virtual machine stopped")
    }

    /// 4002: the job ended (terminated or expired); the VM is gone for good.
    pub fn job_ended() -> CloseReason {
        CloseReason::new(4002, "the job has ended")
    }

    /// 4003: the session reached its configured hard time limit.
    pub fn time_limit() -> CloseReason {
        CloseReason::new(4003, "the console session reached its time limit")
    }
}

/// Presents a WebSocket of axum (`axum::extract::ws::WebSocket`) or of tokio-tungstenite
/// (`WebSocketStream<_>`) as a `Sink<WsFrame> + Stream<Item = Result<WsFrame, E>>`, which is
/// what [`super::proxy::proxy`] and [`super::shell::run_shell`] take.
#[derive(Debug)]
pub struct WsAdapter<S> {
    inner: S,
}

impl<S> WsAdapter<S> {
    pub fn new(inner: S) -> WsAdapter<S> {
        WsAdapter { inner }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, M, E> Stream for WsAdapter<S>
where
    S: Stream<Item = Result<M, E>> + Unpin,
    M: Into<WsFrame>,
{
    type Item = Result<WsFrame, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map(Into::into)))
    }
}

// `M` is named through the `Stream` bound: a library's socket sends the message type it yields.
impl<S, M, E> Sink<WsFrame> for WsAdapter<S>
where
    S: Sink<M> + Stream<Item = Result<M, E>> + Unpin,
    WsFrame: Into<M>,
{
    type Error = <S as Sink<M>>::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: WsFrame) -> Result<(), Self::Error> {
        Pin::new(&mut self.inner).start_send(frame.into())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

impl From<axum_ws::Message> for WsFrame {
    fn from(message: axum_ws::Message) -> WsFrame {
        match message {
            axum_ws::Message::Binary(b) => WsFrame::Binary(b),
            axum_ws::Message::Text(t) => WsFrame::Text(t.as_str().to_owned()),
            axum_ws::Message::Ping(b) => WsFrame::Ping(b),
            axum_ws::Message::Pong(b) => WsFrame::Pong(b),
            axum_ws::Message::Close(c) => {
                WsFrame::Close(c.map(|c| (c.code, c.reason.as_str().to_owned())))
            }
        }
    }
}

impl From<WsFrame> for axum_ws::Message {
    fn from(frame: WsFrame) -> axum_ws::Message {
        match frame {
            WsFrame::Binary(b) => axum_ws::Message::Binary(b),
            WsFrame::Text(t) => axum_ws::Message::Text(t.into()),
            WsFrame::Ping(b) => axum_ws::Message::Ping(b),
            WsFrame::Pong(b) => axum_ws::Message::Pong(b),
            WsFrame::Close(c) => {
                axum_ws::Message::Close(c.map(|(code, reason)| axum_ws::CloseFrame {
                    code,
                    reason: reason.into(),
                }))
            }
        }
    }
}

impl From<TungsteniteMessage> for WsFrame {
    fn from(message: TungsteniteMessage) -> WsFrame {
        match message {
            TungsteniteMessage::Binary(b) => WsFrame::Binary(b),
            TungsteniteMessage::Text(t) => WsFrame::Text(t.as_str().to_owned()),
            TungsteniteMessage::Ping(b) => WsFrame::Ping(b),
            TungsteniteMessage::Pong(b) => WsFrame::Pong(b),
            TungsteniteMessage::Close(c) => {
                WsFrame::Close(c.map(|c| (u16::from(c.code), c.reason.as_str().to_owned())))
            }
            // tungstenite documents that reading never yields a raw frame; should one appear,
            // it becomes a frame every pump ignores rather than data.
            TungsteniteMessage::Frame(_) => WsFrame::Pong(Bytes::new()),
        }
    }
}

impl From<WsFrame> for TungsteniteMessage {
    fn from(frame: WsFrame) -> TungsteniteMessage {
        match frame {
            WsFrame::Binary(b) => TungsteniteMessage::Binary(b),
            WsFrame::Text(t) => TungsteniteMessage::Text(t.into()),
            WsFrame::Ping(b) => TungsteniteMessage::Ping(b),
            WsFrame::Pong(b) => TungsteniteMessage::Pong(b),
            WsFrame::Close(c) => {
                TungsteniteMessage::Close(c.map(|(code, reason)| TungsteniteCloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<WsFrame> {
        vec![
            WsFrame::Binary(Bytes::from_static(b"\x00RFB 003.008\n")),
            WsFrame::Text("héllo".into()),
            WsFrame::Ping(Bytes::from_static(b"p")),
            WsFrame::Pong(Bytes::new()),
            WsFrame::Close(None),
            WsFrame::Close(Some((4000, "the virtual machine was suspended".into()))),
        ]
    }

    #[test]
    fn frames_round_trip_through_axum_messages() {
        for frame in all_frames() {
            let message: axum_ws::Message = frame.clone().into();
            assert_eq!(WsFrame::from(message), frame);
        }
    }

    #[test]
    fn frames_round_trip_through_tungstenite_messages() {
        for frame in all_frames() {
            let message: TungsteniteMessage = frame.clone().into();
            assert_eq!(WsFrame::from(message), frame);
        }
    }

    #[test]
    fn binary_payloads_are_not_copied() {
        let payload = Bytes::from(vec![7u8; 1024]);
        let message: TungsteniteMessage = WsFrame::Binary(payload.clone()).into();
        let TungsteniteMessage::Binary(moved) = message else {
            panic!("not binary")
        };
        assert_eq!(moved.as_ptr(), payload.as_ptr());
    }

    #[test]
    fn close_reasons_are_cut_to_fit_a_control_frame() {
        let long = "é".repeat(100); // 200 bytes
        let reason = CloseReason::new(1000, long);
        assert!(reason.reason().len() <= CloseReason::MAX_REASON_BYTES);
        assert_eq!(reason.reason().len(), 122, "cut at a character boundary");
        assert_eq!(CloseReason::vm_suspended().code(), 4000);
        assert_eq!(
            WsFrame::from(&CloseReason::console_closed()),
            WsFrame::Close(Some((1000, "the virtual machine's console closed".into())))
        );
    }
}
