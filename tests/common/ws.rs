//! A WebSocket client for console tests: connect (or see the refused upgrade's status) and
//! speak just enough RFB to prove a display works.
#![allow(dead_code)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, or returns the HTTP status of the refused upgrade.
pub async fn connect(url: &str, origin: Option<&str>, protocol: Option<&str>) -> Result<Ws, u16> {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => {
            if let Some(p) = protocol {
                assert_eq!(response.headers()["sec-websocket-protocol"], p);
            }
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

/// Reads binary frames until `n` bytes have arrived.
pub async fn read_exact(ws: &mut Ws, buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while buf.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            buf.extend_from_slice(&b);
        }
    }
    buf.drain(..n).collect()
}

/// Completes the RFB 3.8 handshake with security type None and reads one framebuffer update
/// header. Returns the framebuffer size.
pub async fn rfb_handshake(ws: &mut Ws) -> (u16, u16) {
    let mut buf = Vec::new();
    assert_eq!(read_exact(ws, &mut buf, 12).await, b"RFB 003.008\n");
    ws.send(Message::Binary(b"RFB 003.008\n".to_vec().into()))
        .await
        .unwrap();
    let count = read_exact(ws, &mut buf, 1).await[0] as usize;
    let types = read_exact(ws, &mut buf, count).await;
    assert!(types.contains(&1), "security type None offered: {types:?}");
    ws.send(Message::Binary(vec![1].into())).await.unwrap();
    assert_eq!(
        read_exact(ws, &mut buf, 4).await,
        [0, 0, 0, 0],
        "SecurityResult OK"
    );
    ws.send(Message::Binary(vec![1].into())).await.unwrap();
    let init = read_exact(ws, &mut buf, 24).await;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    assert!(w > 0 && h > 0);
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    read_exact(ws, &mut buf, name_len).await;
    let mut request = vec![3, 0, 0, 0, 0, 0];
    request.extend_from_slice(&w.to_be_bytes());
    request.extend_from_slice(&h.to_be_bytes());
    ws.send(Message::Binary(request.into())).await.unwrap();
    assert_eq!(
        read_exact(ws, &mut buf, 1).await,
        [0],
        "a FramebufferUpdate"
    );
    (w, h)
}
