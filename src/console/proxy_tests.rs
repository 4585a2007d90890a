use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::console::testing::{ws_pair, MemClient};
use crate::console::WsAdapter;

/// Every await in these tests is bounded; on a paused clock the bound is virtual time.
async fn within<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test timed out")
}

fn quiet() -> ProxyConfig {
    ProxyConfig {
        ping_interval: None,
        ..ProxyConfig::default()
    }
}

struct Session {
    client: MemClient,
    peer: DuplexStream,
    stop: StopSignal,
    task: JoinHandle<ProxySummary>,
}

fn start(config: ProxyConfig) -> Session {
    let (ws, client) = ws_pair(16);
    let (upstream, peer) = tokio::io::duplex(64 * 1024);
    let stop = StopSignal::new();
    let task = tokio::spawn(proxy(ws, upstream, stop.clone(), config));
    Session {
        client,
        peer,
        stop,
        task,
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

/// Collects binary frames until `len` bytes arrived; returns the bytes and the largest frame.
async fn recv_binary(rx: &mut mpsc::Receiver<WsFrame>, len: usize) -> (Vec<u8>, usize) {
    let mut got = Vec::with_capacity(len);
    let mut largest = 0;
    while got.len() < len {
        match rx.next().await {
            Some(WsFrame::Binary(b)) => {
                largest = largest.max(b.len());
                got.extend_from_slice(&b);
            }
            other => panic!("expected binary data, got {other:?}"),
        }
    }
    (got, largest)
}

async fn send(client: &mut MemClient, frame: WsFrame) {
    client.tx.send(Ok(frame)).await.expect("the pump listens");
}

#[tokio::test]
async fn binary_frames_keep_their_order_both_ways() {
    let Session {
        client: MemClient { mut tx, mut rx },
        peer,
        stop: _stop,
        task,
    } = start(quiet());
    let (mut peer_r, mut peer_w) = tokio::io::split(peer);
    let frames: Vec<Vec<u8>> = (0..2000).map(|i| pattern(i, 1 + i % 300)).collect();
    let to_upstream = frames.concat();
    let to_client = pattern(7, 1 << 20);

    let client_sends = async {
        for frame in frames {
            tx.send(Ok(WsFrame::Binary(frame.into()))).await.unwrap();
        }
        tx
    };
    let upstream_reads = async {
        let mut got = vec![0; to_upstream.len()];
        peer_r.read_exact(&mut got).await.unwrap();
        got
    };
    let upstream_writes = async { peer_w.write_all(&to_client).await.unwrap() };
    let client_receives = recv_binary(&mut rx, to_client.len());
    let (mut tx, got_upstream, (), (got_client, _)) = within(
        30,
        futures::future::join4(
            client_sends,
            upstream_reads,
            upstream_writes,
            client_receives,
        ),
    )
    .await;
    assert!(
        got_upstream == to_upstream,
        "client → upstream bytes differ"
    );
    assert!(got_client == to_client, "upstream → client bytes differ");

    tx.send(Ok(WsFrame::Close(None))).await.unwrap();
    let summary = within(10, task).await.unwrap();
    assert!(matches!(summary.ended, Ended::ClientClosed), "{summary:?}");
    assert_eq!(summary.to_upstream_bytes, to_upstream.len() as u64);
    assert_eq!(summary.to_client_bytes, to_client.len() as u64);
}

#[tokio::test]
async fn a_client_close_half_closes_the_upstream() {
    let mut s = start(quiet());
    send(&mut s.client, WsFrame::Binary(Bytes::from_static(b"bye"))).await;
    send(&mut s.client, WsFrame::Close(Some((1000, String::new())))).await;

    let mut got = Vec::new();
    within(10, s.peer.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"bye", "the upstream reads the bytes, then EOF");
    let summary = within(10, s.task).await.unwrap();
    assert!(matches!(summary.ended, Ended::ClientClosed), "{summary:?}");
    assert_eq!(summary.to_upstream_bytes, 3);
    // The pump closed its side of the socket; the client sees the end of the stream.
    assert_eq!(within(10, s.client.rx.next()).await, None);
}

#[tokio::test]
async fn a_client_that_just_goes_away_counts_as_closed() {
    let mut s = start(quiet());
    drop(s.client.tx);
    let mut got = Vec::new();
    within(10, s.peer.read_to_end(&mut got)).await.unwrap();
    assert!(got.is_empty());
    let summary = within(10, s.task).await.unwrap();
    assert!(matches!(summary.ended, Ended::ClientClosed), "{summary:?}");
}

#[tokio::test]
async fn upstream_eof_closes_with_a_reason_and_lets_the_client_finish() {
    let mut s = start(quiet());
    s.peer.write_all(b"last words").await.unwrap();
    s.peer.shutdown().await.unwrap();

    let (got, _) = within(10, recv_binary(&mut s.client.rx, 10)).await;
    assert_eq!(got, b"last words");
    assert_eq!(
        within(10, s.client.rx.next()).await,
        Some(WsFrame::Close(Some((
            1000,
            "the virtual machine's console closed".into()
        ))))
    );
    // Until its Close reply, what the client sends still reaches the upstream.
    send(&mut s.client, WsFrame::Binary(Bytes::from_static(b"late"))).await;
    send(&mut s.client, WsFrame::Close(None)).await;
    let mut got = Vec::new();
    within(10, s.peer.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"late");

    let summary = within(10, s.task).await.unwrap();
    assert!(
        matches!(summary.ended, Ended::UpstreamClosed),
        "{summary:?}"
    );
    assert_eq!(
        (summary.to_upstream_bytes, summary.to_client_bytes),
        (4, 10)
    );
}

#[tokio::test]
async fn four_mib_frames_pass_and_reads_are_framed_at_most_max_frame_bytes() {
    let Session {
        client: MemClient { mut tx, mut rx },
        peer,
        stop: _stop,
        task,
    } = start(quiet());
    let (mut peer_r, mut peer_w) = tokio::io::split(peer);
    let big = pattern(3, 4 << 20);

    let client_sends = async {
        tx.send(Ok(WsFrame::Binary(big.clone().into())))
            .await
            .unwrap();
        tx
    };
    let upstream_reads = async {
        let mut got = vec![0; big.len()];
        peer_r.read_exact(&mut got).await.unwrap();
        got
    };
    let upstream_writes = async { peer_w.write_all(&big).await.unwrap() };
    let client_receives = recv_binary(&mut rx, big.len());
    let (mut tx, got_upstream, (), (got_client, largest)) = within(
        30,
        futures::future::join4(
            client_sends,
            upstream_reads,
            upstream_writes,
            client_receives,
        ),
    )
    .await;
    assert!(got_upstream == big && got_client == big);
    assert!(
        largest <= quiet().max_frame_bytes,
        "largest frame {largest}"
    );
    assert!(
        largest > 8 * 1024,
        "reads grow past the initial size: {largest}"
    );

    tx.send(Ok(WsFrame::Close(None))).await.unwrap();
    within(10, task).await.unwrap();
}

#[tokio::test]
async fn frames_to_the_client_respect_a_small_max_frame_bytes() {
    let mut s = start(ProxyConfig {
        max_frame_bytes: 1000,
        ..quiet()
    });
    let data = pattern(5, 100_000);
    let (mut peer_r, mut peer_w) = tokio::io::split(s.peer);
    let writes = async { peer_w.write_all(&data).await.unwrap() };
    let ((), (got, largest)) = within(
        10,
        futures::future::join(writes, recv_binary(&mut s.client.rx, data.len())),
    )
    .await;
    assert!(got == data);
    assert!(largest <= 1000, "largest frame {largest}");
    drop(s.client.tx);
    within(10, s.task).await.unwrap();
    let _ = peer_r.read(&mut [0; 1]).await;
}

#[tokio::test]
async fn text_pings_and_pongs_from_the_client_are_not_forwarded() {
    let mut s = start(quiet());
    for frame in [
        WsFrame::Text("hello".into()),
        WsFrame::Binary(Bytes::from_static(b"a")),
        WsFrame::Ping(Bytes::from_static(b"p")),
        WsFrame::Text("{}".into()),
        WsFrame::Pong(Bytes::new()),
        WsFrame::Binary(Bytes::from_static(b"b")),
        WsFrame::Close(None),
    ] {
        send(&mut s.client, frame).await;
    }
    let mut got = Vec::new();
    within(10, s.peer.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"ab");
    let summary = within(10, s.task).await.unwrap();
    assert_eq!(summary.to_upstream_bytes, 2);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_session_is_pinged_every_interval() {
    let mut s = start(ProxyConfig::default());
    let t0 = Instant::now();
    for n in 1..=3u32 {
        let frame = within(3600, s.client.rx.next()).await;
        assert_eq!(frame, Some(WsFrame::Ping(Bytes::new())));
        let elapsed = t0.elapsed();
        let due = Duration::from_secs(20) * n;
        assert!(
            elapsed >= due && elapsed < due + Duration::from_millis(50),
            "ping {n} after {elapsed:?}"
        );
    }
    drop(s.client.tx);
    within(3600, s.task).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pings_do_not_pile_up_while_the_client_is_not_reading() {
    // A client that reads nothing for ten minutes gets one ping per reading, not thirty.
    let (ws, mut client) = ws_pair(0);
    let (upstream, _peer) = tokio::io::duplex(1024);
    let task = tokio::spawn(proxy(
        ws,
        upstream,
        StopSignal::new(),
        ProxyConfig::default(),
    ));
    tokio::time::sleep(Duration::from_secs(600)).await;
    let mut pings = 0;
    while let Ok(frame) = client.rx.try_recv() {
        assert_eq!(frame, WsFrame::Ping(Bytes::new()));
        pings += 1;
    }
    assert!(pings <= 3, "{pings} pings queued");
    drop(client.tx);
    within(3600, task).await.unwrap();
}

#[tokio::test]
async fn a_stop_closes_with_its_reason_and_drops_later_client_data() {
    let mut s = start(quiet());
    s.stop.stop(CloseReason::vm_suspended());
    assert_eq!(
        within(10, s.client.rx.next()).await,
        Some(WsFrame::Close(Some((
            4000,
            "the virtual machine was suspended".into()
        ))))
    );
    send(
        &mut s.client,
        WsFrame::Binary(Bytes::from_static(b"too late")),
    )
    .await;
    send(&mut s.client, WsFrame::Close(None)).await;
    let mut got = Vec::new();
    within(10, s.peer.read_to_end(&mut got)).await.unwrap();
    assert!(got.is_empty(), "nothing reaches a stopped VM: {got:?}");
    let summary = within(10, s.task).await.unwrap();
    assert!(
        matches!(&summary.ended, Ended::Stopped(r) if *r == CloseReason::vm_suspended()),
        "{summary:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_answers_the_close_is_let_go_after_the_close_timeout() {
    let mut s = start(quiet());
    let t0 = Instant::now();
    s.stop.stop(CloseReason::job_ended());
    let frame = within(60, s.client.rx.next()).await;
    assert_eq!(frame, Some(WsFrame::from(&CloseReason::job_ended())));
    let summary = within(60, s.task).await.unwrap();
    assert!(matches!(summary.ended, Ended::Stopped(_)));
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn a_session_started_on_a_stopped_signal_closes_at_once() {
    let (ws, mut client) = ws_pair(4);
    let (upstream, _peer) = tokio::io::duplex(1024);
    let stop = StopSignal::new();
    stop.stop(CloseReason::vm_stopped());
    let task = tokio::spawn(proxy(ws, upstream, stop, quiet()));
    assert_eq!(
        within(10, client.rx.next()).await,
        Some(WsFrame::from(&CloseReason::vm_stopped()))
    );
    client.tx.send(Ok(WsFrame::Close(None))).await.unwrap();
    assert!(matches!(
        within(10, task).await.unwrap().ended,
        Ended::Stopped(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn the_session_time_limit_closes_with_4003() {
    let mut s = start(ProxyConfig {
        max_session: Some(Duration::from_secs(3600)),
        ..quiet()
    });
    let t0 = Instant::now();
    assert_eq!(
        within(7200, s.client.rx.next()).await,
        Some(WsFrame::from(&CloseReason::time_limit()))
    );
    assert!(t0.elapsed() >= Duration::from_secs(3600));
    send(&mut s.client, WsFrame::Close(None)).await;
    assert!(matches!(
        within(60, s.task).await.unwrap().ended,
        Ended::TimeLimit
    ));
}

#[tokio::test]
async fn a_failing_client_socket_ends_the_session_and_the_upstream() {
    let mut s = start(quiet());
    s.client
        .tx
        .send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
        .await
        .unwrap();
    let mut got = Vec::new();
    within(10, s.peer.read_to_end(&mut got)).await.unwrap();
    let summary = within(10, s.task).await.unwrap();
    assert!(
        matches!(summary.ended, Ended::ClientFailed(_)),
        "{summary:?}"
    );
}

/// An upstream that never has data and refuses writes.
struct Broken;

impl AsyncRead for Broken {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Broken {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "console gone",
        )))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failing_upstream_closes_with_1011() {
    let (ws, mut client) = ws_pair(4);
    let task = tokio::spawn(proxy(ws, Broken, StopSignal::new(), quiet()));
    client
        .tx
        .send(Ok(WsFrame::Binary(Bytes::from_static(b"x"))))
        .await
        .unwrap();
    assert_eq!(
        within(10, client.rx.next()).await,
        Some(WsFrame::from(&CloseReason::console_failed()))
    );
    client.tx.send(Ok(WsFrame::Close(None))).await.unwrap();
    let summary = within(10, task).await.unwrap();
    assert!(
        matches!(summary.ended, Ended::UpstreamFailed(_)),
        "{summary:?}"
    );
}

/// The same pump over real tungstenite WebSockets (server side through [`WsAdapter`]), with
/// the closing handshake after an upstream EOF.
#[tokio::test]
async fn a_real_websocket_pair_completes_the_close_handshake() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let (upstream, mut peer) = tokio::io::duplex(64 * 1024);
    let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
    let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let task = tokio::spawn(proxy(
        WsAdapter::new(server),
        upstream,
        StopSignal::new(),
        quiet(),
    ));

    client
        .send(Message::binary(&b"RFB 003.008\n"[..]))
        .await
        .unwrap();
    let mut hello = [0; 12];
    within(10, peer.read_exact(&mut hello)).await.unwrap();
    assert_eq!(&hello, b"RFB 003.008\n");

    peer.write_all(b"\x00\x00\x00\x01").await.unwrap();
    peer.shutdown().await.unwrap();
    let message = within(10, client.next()).await.unwrap().unwrap();
    assert_eq!(message, Message::binary(&b"\x00\x00\x00\x01"[..]));
    let Message::Close(Some(close)) = within(10, client.next()).await.unwrap().unwrap() else {
        panic!("expected a close frame")
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1000, "the virtual machine's console closed")
    );
    // tungstenite answers the Close; the stream then ends cleanly.
    assert!(within(10, client.next()).await.is_none());
    let summary = within(10, task).await.unwrap();
    assert!(
        matches!(summary.ended, Ended::UpstreamClosed),
        "{summary:?}"
    );
}

/// An upstream that records whether its write half was shut down (as opposed to dropped).
struct ShutdownRecorder {
    inner: DuplexStream,
    shut_down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AsyncRead for ShutdownRecorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ShutdownRecorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn client_close_upstream_eof_and_stop_all_shut_the_upstream_write_half_down() {
    for ending in ["client close", "upstream EOF", "stop"] {
        let (ws, mut client) = ws_pair(4);
        let (inner, mut peer) = tokio::io::duplex(1024);
        let shut_down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = ShutdownRecorder {
            inner,
            shut_down: shut_down.clone(),
        };
        let stop = StopSignal::new();
        let task = tokio::spawn(proxy(ws, upstream, stop.clone(), quiet()));
        let expected_close = match ending {
            "upstream EOF" => {
                peer.shutdown().await.unwrap();
                Some(CloseReason::console_closed())
            }
            "stop" => {
                stop.stop(CloseReason::vm_stopped());
                Some(CloseReason::vm_stopped())
            }
            _ => None,
        };
        if let Some(reason) = expected_close {
            assert_eq!(
                within(10, client.rx.next()).await,
                Some(WsFrame::from(&reason))
            );
        }
        client.tx.send(Ok(WsFrame::Close(None))).await.unwrap();
        within(10, task).await.unwrap();
        assert!(
            shut_down.load(std::sync::atomic::Ordering::SeqCst),
            "{ending}: the upstream's write half was not shut down"
        );
    }
}

#[tokio::test]
async fn a_zero_max_frame_bytes_still_forwards_byte_by_byte() {
    let mut s = start(ProxyConfig {
        max_frame_bytes: 0,
        ..quiet()
    });
    s.peer.write_all(b"0123456789").await.unwrap();
    let (got, largest) = within(10, recv_binary(&mut s.client.rx, 10)).await;
    assert_eq!((got.as_slice(), largest), (&b"0123456789"[..], 1));
    drop(s.client.tx);
    within(10, s.task).await.unwrap();
}

#[tokio::test]
async fn reads_grow_in_a_burst_and_shrink_back_when_it_is_over() {
    let (ws, _client) = ws_pair(1);
    let (upstream, _peer) = tokio::io::duplex(1024);
    let mut pump = Pump::new(ws, upstream, Passthrough, ProxyConfig::default());
    let max = ProxyConfig::default().max_frame_bytes;
    assert_eq!(pump.read_size, INITIAL_READ_BYTES);
    while pump.read_size < max {
        pump.adapt_read_size(pump.read_size);
    }
    pump.adapt_read_size(max);
    assert_eq!(
        pump.read_size, max,
        "full reads stop growing at the largest frame"
    );
    pump.read_buf_reserve();
    assert!(pump.read_buf.capacity() >= max);
    for _ in 0..3 {
        pump.adapt_read_size(max / 2);
    }
    assert_eq!(pump.read_size, max, "reads of half the buffer keep it");
    while pump.read_size > INITIAL_READ_BYTES {
        pump.adapt_read_size(1);
    }
    pump.adapt_read_size(1);
    assert_eq!(
        pump.read_size, INITIAL_READ_BYTES,
        "small reads shrink it back"
    );
    pump.read_buf_reserve();
    assert!(
        pump.read_buf.capacity() < max,
        "the burst's buffer is let go: {}",
        pump.read_buf.capacity()
    );
}

/// The pump over vmhost's own WebSocket ([`crate::console::ServerSocket`]) and a tungstenite
/// client: a burst larger than any frame arrives whole and in order, the client's bytes reach
/// the upstream, and the upstream's EOF ends in the closing handshake.
#[tokio::test]
async fn over_vmhosts_own_websocket_a_burst_arrives_whole_then_the_close_handshake() {
    use crate::console::{ServerSocket, SocketConfig};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    let (server_io, client_io) = tokio::io::duplex(256 * 1024);
    let (upstream, peer) = tokio::io::duplex(256 * 1024);
    let server = ServerSocket::new(server_io, SocketConfig::vnc());
    let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let task = tokio::spawn(proxy(server, upstream, StopSignal::new(), quiet()));
    let (mut peer_r, mut peer_w) = tokio::io::split(peer);

    let burst = pattern(5, 3 << 20);
    let upstream_writes = async {
        peer_w.write_all(&burst).await.unwrap();
        peer_w.shutdown().await.unwrap();
    };
    let client_talks = async {
        client
            .send(Message::binary(&b"RFB 003.008\n"[..]))
            .await
            .unwrap();
        let mut got = Vec::new();
        let close = loop {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(b) => got.extend_from_slice(&b),
                Message::Close(close) => break close.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        };
        // tungstenite answers the Close; the stream then ends cleanly.
        assert!(client.next().await.is_none());
        (got, close)
    };
    let upstream_reads = async {
        let mut hello = [0; 12];
        peer_r.read_exact(&mut hello).await.unwrap();
        hello
    };
    let ((), (got, close), hello) = within(
        30,
        futures::future::join3(upstream_writes, client_talks, upstream_reads),
    )
    .await;
    assert_eq!(&hello, b"RFB 003.008\n");
    assert!(got == burst, "upstream → client bytes differ");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1000, "the virtual machine's console closed")
    );
    let summary = within(10, task).await.unwrap();
    assert!(
        matches!(summary.ended, Ended::UpstreamClosed),
        "{summary:?}"
    );
    assert_eq!(summary.to_client_bytes, burst.len() as u64);
}
