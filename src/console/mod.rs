//! Browser consoles: VNC (noVNC over a WebSocket) and UCloud's interactive shell (a serial
//! console), from the one-time token in the URL to the last byte.
//!
//! ```text
//!  browser ──wss──▶ api handler ──(token, Origin ok)──▶ upgrade ──▶ proxy / run_shell ◀──▶ VM console
//!                       │                                                 ▲               (backend::open_vnc,
//!                       └── SessionTokens::redeem                        StopSignal        open_serial)
//! ```
//!
//! - [`tokens`]: [`SessionTokens`] issues and redeems one-time session tokens (hashed at rest,
//!   short TTL, bound to job, rank, user and kind) and [`origin_allowed`] checks the `Origin`
//!   header of the upgrade request.
//! - [`proxy`](mod@proxy): [`proxy()`](proxy::proxy) pumps raw RFB bytes between a WebSocket
//!   and the VNC stream.
//! - [`shell`]: [`run_shell`] speaks UCloud's shell protocol over the same engine.
//! - [`frame`]: [`WsFrame`], [`CloseReason`] and [`WsAdapter`], which makes an axum or
//!   tokio-tungstenite socket the `Sink<WsFrame> + Stream` both pumps take (the shell runs on
//!   axum's WebSocket).
//! - [`websocket`]: vmhost's own RFC 6455 server side for VNC: the upgrade ([`WsUpgrade`]) and
//!   [`ServerSocket`], which sends the pump's upstream reads to the client without copying
//!   them. The pumps are generic, so tests run them over channels and in-memory pipes.
//!
//! ## Wiring (for `api`)
//! ```ignore
//! // interactiveSession (UCloud → provider): after checking the job, rank and owner:
//! // A bulk request takes `issue_all`: one token per grant, or none past a cap.
//! let token = tokens.issue(Grant { job_id, rank, user, kind: SessionKind::Vnc })?;
//! // → url = "{public_url}/ucloud/{provider}/vnc?token={token}"
//!
//! // GET /ucloud/{provider}/vnc?token=… (WebSocket upgrade; browsers send no bearer token):
//! if !origin_allowed(headers.get(ORIGIN).and_then(|v| v.to_str().ok()), &allowed, &public_url) {
//!     return 403;
//! }
//! let grant = tokens.redeem(&query.token, SessionKind::Vnc)?; // Expired → "this link expired"
//! let stream = backend.open_vnc(&domain_name(&grant)).await?; // before the upgrade: errors are HTTP
//! let stop = runner_stop_signal(&grant);                      // fired on suspend/stop/terminate
//! ws.on_upgrade(SocketConfig::vnc(), move |socket| async move { // ws: WsUpgrade (extractor)
//!     let summary = proxy(socket, stream, stop, ProxyConfig::default()).await;
//!     debug!(job_id = %grant.job_id, ?summary.ended, "console closed");
//! })
//! ```
//! The shell route is the same with [`SessionKind::Shell`], the `session` query parameter,
//! `backend.open_serial` and [`run_shell`] (which also checks the `sessionIdentifier` of the
//! client's `initialize` against the redeemed token), on axum's WebSocket:
//! `configure_upgrade(ws, SessionKind::Shell).on_upgrade(|s| run_shell(WsAdapter::new(s), …))`.
//!
//! ## Policies
//! - **Tokens**: 256 random bits, stored only as SHA-256, single use (a failed redeem burns
//!   the token too), TTL to *connect* chosen by the caller ([`SessionTokens::DEFAULT_TTL`] =
//!   60 s); an established session is not cut when its token expires (use
//!   [`ProxyConfig::max_session`] for a hard cap). Tokens are never logged: [`SessionTokens`]'
//!   `Debug` shows only a count.
//! - **Token limits**: at most [`tokens::MAX_PER_REQUEST`] (64) a request and
//!   [`tokens::MAX_PER_USER`] (256) held a user; a user at the cap is refused, never another
//!   user's token evicted (see [`tokens`] for why refusing beats evicting).
//! - **Origin**: see [`origin_allowed`]. UCloud's web app runs on UCloud's own domain, so that
//!   origin (e.g. `https://cloud.sdu.dk`) must be in the allowed list for consoles to work.
//! - **Several viewers**: every WebSocket gets its own upstream stream. QEMU's VNC server
//!   accepts shared clients (noVNC asks to share by default), so several tabs can watch one VM;
//!   nothing here limits that. A serial console has one reader in libvirt: which of two shell
//!   sessions wins is the backend's choice (`open_serial`).
//! - **Stops**: the job's runner owns one [`StopSignal`] per VM and fires it with
//!   [`CloseReason::vm_suspended`], [`CloseReason::vm_stopped`] or [`CloseReason::job_ended`];
//!   every session on that VM then closes with that code and reason.
//! - **Upstream over TCP** (tests, benchmarks, a VNC socket on a port): set `TCP_NODELAY` on it,
//!   or single keystrokes wait for Nagle's algorithm.

pub mod frame;
pub mod proxy;
pub mod shell;
pub mod tokens;
pub mod websocket;

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

pub use frame::{configure_upgrade, CloseReason, WsAdapter, WsFrame};
pub use proxy::{proxy, Ended, ProxyConfig, ProxySummary};
pub use shell::{run_shell, ShellConfig};
pub use tokens::{origin_allowed, Grant, SessionKind, SessionTokens, TokenError};
pub use websocket::{ServerSocket, SocketConfig, WsUpgrade};

/// Ends console sessions from outside, with the reason their clients are shown.
///
/// Cheap to clone; every clone stops together. The first [`StopSignal::stop`] wins: later
/// reasons are ignored. A session started on an already stopped signal closes at once.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    /// Set once, before `token` is cancelled, so whoever sees the cancellation finds it.
    reason: Arc<OnceLock<CloseReason>>,
}

impl StopSignal {
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Stops every session holding a clone of this signal.
    pub fn stop(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when the signal is stopped, with the first reason given.
    pub async fn stopped(&self) -> CloseReason {
        self.token.cancelled().await;
        // `stop` sets the reason before cancelling; the fallback is never used.
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(CloseReason::shutting_down)
    }
}

/// An in-memory WebSocket for tests: the pump's side and the test's (client's) side.
#[cfg(test)]
pub(crate) mod testing {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::channel::mpsc;
    use futures::{Sink, Stream};

    use super::WsFrame;

    /// What the pump holds: frames to the client go to `tx`, frames from it come from `rx`.
    #[derive(Debug)]
    pub(crate) struct MemWs {
        tx: mpsc::Sender<WsFrame>,
        rx: mpsc::Receiver<Result<WsFrame, io::Error>>,
    }

    /// What the test holds: `tx` sends as the client, `rx` receives what the pump sent.
    #[derive(Debug)]
    pub(crate) struct MemClient {
        pub(crate) tx: mpsc::Sender<Result<WsFrame, io::Error>>,
        pub(crate) rx: mpsc::Receiver<WsFrame>,
    }

    /// A connected pair; each direction buffers `capacity` frames (plus one per sender).
    pub(crate) fn ws_pair(capacity: usize) -> (MemWs, MemClient) {
        let (to_client, from_pump) = mpsc::channel(capacity);
        let (to_pump, from_client) = mpsc::channel(capacity);
        (
            MemWs {
                tx: to_client,
                rx: from_client,
            },
            MemClient {
                tx: to_pump,
                rx: from_pump,
            },
        )
    }

    impl Stream for MemWs {
        type Item = Result<WsFrame, io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Pin::new(&mut self.rx).poll_next(cx)
        }
    }

    impl Sink<WsFrame> for MemWs {
        type Error = mpsc::SendError;

        fn poll_ready(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.tx).poll_ready(cx)
        }

        fn start_send(mut self: Pin<&mut Self>, item: WsFrame) -> Result<(), Self::Error> {
            Pin::new(&mut self.tx).start_send(item)
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.tx).poll_flush(cx)
        }

        fn poll_close(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.tx).poll_close(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_over_axum_sockets_and_backend_streams_are_send() {
        fn is_send<T: Send>(_: &T) {}
        // Type-checked only: an axum WebSocket exists only inside an upgrade.
        fn check(
            vnc: ServerSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
            shell: WsAdapter<axum::extract::ws::WebSocket>,
            display: crate::backend::ConsoleStream,
            serial: crate::backend::ConsoleStream,
        ) {
            is_send(&proxy(
                vnc,
                display,
                StopSignal::new(),
                ProxyConfig::default(),
            ));
            let session = "s".to_owned();
            is_send(&run_shell(
                shell,
                serial,
                &session,
                StopSignal::new(),
                ShellConfig::default(),
            ));
        }
        let _ = check;
    }

    #[tokio::test]
    async fn the_first_stop_reason_wins() {
        let stop = StopSignal::new();
        let clone = stop.clone();
        assert!(!clone.is_stopped());
        stop.stop(CloseReason::vm_suspended());
        stop.stop(CloseReason::job_ended());
        assert!(clone.is_stopped());
        assert_eq!(clone.stopped().await, CloseReason::vm_suspended());
    }
}
