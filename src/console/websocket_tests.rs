use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::*;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the test timed out")
}

fn config(max_message_bytes: usize) -> SocketConfig {
    SocketConfig {
        subprotocol: None,
        max_message_bytes,
    }
}

/// A server socket and a tungstenite client on the two ends of an in-memory pipe.
async fn pair() -> (ServerSocket<DuplexStream>, WebSocketStream<DuplexStream>) {
    let (server, client) = tokio::io::duplex(256 * 1024);
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (ServerSocket::new(server, config(1 << 20)), client)
}

/// A server socket and the raw client end of its pipe.
fn raw_pair(max_message_bytes: usize) -> (ServerSocket<DuplexStream>, DuplexStream) {
    let (server, client) = tokio::io::duplex(256 * 1024);
    (ServerSocket::new(server, config(max_message_bytes)), client)
}

/// A client frame as it goes on the wire: masked, with a 7-bit length.
fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    let mut frame = vec![u8::from(fin) << 7 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    frame
}

/// Reads one unmasked server frame with a 7-bit length: (first byte, payload).
async fn read_frame(client: &mut DuplexStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 2];
    within(client.read_exact(&mut header)).await.unwrap();
    assert_eq!(header[1] & 0x80, 0, "server frames are not masked");
    let mut payload = vec![0; usize::from(header[1])];
    within(client.read_exact(&mut payload)).await.unwrap();
    (header[0], payload)
}

#[test]
fn the_accept_key_is_rfc_6455s() {
    assert_eq!(
        accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[tokio::test]
async fn messages_pass_both_ways_with_a_real_client() {
    let (mut server, mut client) = pair().await;
    client.send(Message::binary(&b"RFB"[..])).await.unwrap();
    client.send(Message::text("héllo")).await.unwrap();
    let big = vec![0x5A; 200_000];
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Binary(Bytes::from_static(b"RFB"))
    );
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Text("héllo".into())
    );
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Binary(big.into())
    );

    // Every length encoding; the small frames are queued together and flushed at once.
    let sizes = [0, 1, 125, 126, 65_535, 65_536, 300_000];
    let sending = tokio::spawn(async move {
        for (i, &size) in sizes.iter().enumerate() {
            let frame = WsFrame::Binary(vec![i as u8; size].into());
            server.feed(frame).await.unwrap();
        }
        server.feed(WsFrame::Text("ok".into())).await.unwrap();
        server.flush().await.unwrap();
    });
    for (i, &size) in sizes.iter().enumerate() {
        let message = within(client.next()).await.unwrap().unwrap();
        assert_eq!(message, Message::binary(vec![i as u8; size]), "frame {i}");
    }
    assert_eq!(
        within(client.next()).await.unwrap().unwrap(),
        Message::text("ok")
    );
    within(sending).await.unwrap();
}

#[tokio::test]
async fn pings_are_answered_and_a_close_is_echoed_then_the_socket_ends() {
    let (mut server, mut client) = pair().await;
    client
        .send(Message::Ping(Bytes::from_static(b"p1")))
        .await
        .unwrap();
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Ping(Bytes::from_static(b"p1"))
    );
    assert_eq!(
        within(client.next()).await.unwrap().unwrap(),
        Message::Pong(Bytes::from_static(b"p1"))
    );

    client
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Close(Some((1000, "bye".into())))
    );
    assert!(within(server.next()).await.is_none(), "nothing after Close");
    within(server.close()).await.unwrap();
    // tungstenite sees its code echoed and then the end of the stream.
    let Message::Close(Some(echo)) = within(client.next()).await.unwrap().unwrap() else {
        panic!("expected the Close echoed")
    };
    assert_eq!(u16::from(echo.code), 1000);
    assert!(within(client.next()).await.is_none());
}

#[tokio::test]
async fn a_server_close_is_answered_by_the_client() {
    let (mut server, mut client) = pair().await;
    server
        .send(WsFrame::Close(Some((4000, "suspended".into()))))
        .await
        .unwrap();
    let Message::Close(Some(close)) = within(client.next()).await.unwrap().unwrap() else {
        panic!("expected a close frame")
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4000, "suspended")
    );
    // tungstenite sends its reply while it is read on; then its stream ends.
    let client_ends = tokio::spawn(async move { within(client.next()).await.is_none() });
    assert!(
        matches!(within(server.next()).await, Some(Ok(WsFrame::Close(_)))),
        "tungstenite replies"
    );
    assert!(
        matches!(
            server.send(WsFrame::Binary(Bytes::new())).await,
            Err(WsError::Closed)
        ),
        "no data after a Close"
    );
    within(server.close()).await.unwrap();
    assert!(client_ends.await.unwrap());
}

#[tokio::test]
async fn fragments_are_reassembled_around_control_frames() {
    let (mut server, mut client) = raw_pair(1024);
    let mut wire = masked(false, OP_TEXT, b"hel");
    wire.extend(masked(true, OP_PING, b"!"));
    wire.extend(masked(false, OP_CONTINUATION, b"l"));
    wire.extend(masked(true, OP_CONTINUATION, b"o"));
    wire.extend(masked(false, OP_BINARY, &[1, 2]));
    wire.extend(masked(true, OP_CONTINUATION, &[3]));
    client.write_all(&wire).await.unwrap();
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Ping(Bytes::from_static(b"!"))
    );
    assert_eq!(
        read_frame(&mut client).await,
        (0x80 | OP_PONG, b"!".to_vec())
    );
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Text("hello".into())
    );
    assert_eq!(
        within(server.next()).await.unwrap().unwrap(),
        WsFrame::Binary(Bytes::from_static(&[1, 2, 3]))
    );
}

#[tokio::test]
async fn frames_split_across_reads_are_put_together() {
    let (mut server, mut client) = raw_pair(1024);
    let wire = masked(true, OP_BINARY, b"split in many reads");
    let reading = tokio::spawn(async move { (within(server.next()).await, server) });
    for byte in wire {
        client.write_all(&[byte]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let (message, _server) = reading.await.unwrap();
    assert_eq!(
        message.unwrap().unwrap(),
        WsFrame::Binary(Bytes::from_static(b"split in many reads"))
    );
}

#[tokio::test]
async fn protocol_violations_close_with_their_codes() {
    let unmasked = vec![0x80 | OP_BINARY, 1, b'x'];
    let cases: [(Vec<u8>, u16); 6] = [
        (unmasked, 1002),
        (masked(true, 0x3, b""), 1002),
        (masked(true, OP_CONTINUATION, b"x"), 1002),
        (masked(false, OP_PING, b""), 1002),
        (masked(true, OP_TEXT, &[0xFF, 0xFE]), 1007),
        (masked(true, OP_BINARY, &[0; 65]), 1009),
    ];
    for (wire, code) in cases {
        let (mut server, mut client) = raw_pair(64);
        client.write_all(&wire).await.unwrap();
        let error = within(server.next()).await.unwrap().unwrap_err();
        assert_eq!(error.close_code(), Some(code), "{error}");
        assert_eq!(
            read_frame(&mut client).await,
            (0x80 | OP_CLOSE, code.to_be_bytes().to_vec())
        );
        assert!(within(server.next()).await.is_none());
    }
}

#[tokio::test]
async fn an_eof_between_frames_ends_the_stream_and_inside_one_fails_it() {
    let (mut server, client) = raw_pair(64);
    drop(client);
    assert!(within(server.next()).await.is_none());

    let (mut server, mut client) = raw_pair(64);
    client
        .write_all(&masked(true, OP_BINARY, b"abc")[..5])
        .await
        .unwrap();
    drop(client);
    assert!(matches!(
        within(server.next()).await,
        Some(Err(WsError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof
    ));
}

/// The extractor's refusals, without hyper underneath: a request that passes every header
/// check still needs hyper's upgrade handle.
#[tokio::test]
async fn upgrade_requests_are_checked() {
    let request = |version: &str| {
        Request::get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version)
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    let status = |builder: axum::http::request::Builder| async move {
        let (mut parts, _) = builder.body(Body::empty()).unwrap().into_parts();
        match WsUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
            Err(e) => e.into_response().status(),
        }
    };
    assert_eq!(status(request("13")).await, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(
        status(request("13").method("POST")).await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(status(request("8")).await, StatusCode::BAD_REQUEST);
    let (mut parts, _) = Request::get("/")
        .header("upgrade", "websocket")
        .body(Body::empty())
        .unwrap()
        .into_parts();
    let refused = WsUpgrade::from_request_parts(&mut parts, &()).await;
    assert!(
        matches!(refused, Err(WsError::BadUpgrade(_))),
        "{refused:?}"
    );
}
