use std::future::Future;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::*;
use crate::console::testing::{ws_pair, MemClient};
use crate::console::Ended;

const SESSION: &str = "0123456789abcdef0123456789abcdef";

async fn within<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test timed out")
}

fn envelope(stream_id: &str, payload: Value) -> WsFrame {
    WsFrame::Text(
        json!({
            "call": "jobs.compute.vmhost.shell.open",
            "streamId": stream_id,
            "payload": payload,
            "project": null,
        })
        .to_string(),
    )
}

fn initialize(stream_id: &str, session: &str) -> WsFrame {
    envelope(
        stream_id,
        json!({"type": "initialize", "sessionIdentifier": session, "cols": 80, "rows": 24}),
    )
}

fn input(stream_id: &str, data: &str) -> WsFrame {
    envelope(stream_id, json!({"type": "input", "data": data}))
}

/// The next frame as JSON; panics on anything but a text frame.
async fn recv_json(client: &mut MemClient) -> Value {
    match within(60, client.rx.next()).await {
        Some(WsFrame::Text(text)) => serde_json::from_str(&text).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

fn message(stream_id: &str, payload: Value) -> Value {
    json!({"type": "message", "streamId": stream_id, "payload": payload})
}

fn quiet() -> ShellConfig {
    ShellConfig {
        greeting: None,
        proxy: ProxyConfig {
            ping_interval: None,
            ..ProxyConfig::default()
        },
        ..ShellConfig::default()
    }
}

struct Session {
    client: MemClient,
    console: DuplexStream,
    stop: StopSignal,
    task: JoinHandle<ProxySummary>,
}

fn start(config: ShellConfig, console_buffer: usize) -> Session {
    let (ws, client) = ws_pair(16);
    let (upstream, console) = tokio::io::duplex(console_buffer);
    let stop = StopSignal::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { run_shell(ws, upstream, SESSION, stop, config).await }
    });
    Session {
        client,
        console,
        stop,
        task,
    }
}

async fn send(client: &mut MemClient, frame: WsFrame) {
    client.tx.send(Ok(frame)).await.expect("the shell listens");
}

#[test]
fn client_frames_parse_from_envelopes_and_bare_payloads() {
    let WsFrame::Text(init) = initialize("0", "abc") else {
        unreachable!()
    };
    assert_eq!(
        parse_client_frame(&init).unwrap(),
        ClientFrame {
            stream_id: Some("0".into()),
            request: ShellRequest::Initialize {
                session_identifier: "abc".into(),
                cols: 80,
                rows: 24
            }
        }
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"input","data":"ls\r"}"#).unwrap(),
        ClientFrame {
            stream_id: None,
            request: ShellRequest::Input {
                data: "ls\r".into()
            }
        }
    );
    assert_eq!(
        parse_client_frame(r#"{"streamId":"7","payload":{"type":"resize","cols":120,"rows":40}}"#)
            .unwrap()
            .request,
        ShellRequest::Resize {
            cols: 120,
            rows: 40
        }
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"terminate"}"#)
            .unwrap()
            .request,
        ShellRequest::Other {
            kind: "terminate".into()
        }
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"resize"}"#).unwrap().request,
        ShellRequest::Resize { cols: 0, rows: 0 },
        "missing sizes are 0, as in UCloud's IM"
    );
}

#[test]
fn malformed_and_oversized_client_frames_are_refused() {
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "Malformed"),
        (r#"{"data":"x"}"#.into(), "Malformed"),
        (r#"{"type":"input"}"#.into(), "Missing"),
        (r#"{"type":"input","data":5}"#.into(), "Malformed"),
        (r#"{"type":"initialize","cols":80}"#.into(), "Missing"),
        (
            r#"{"type":"resize","cols":10001,"rows":5}"#.into(),
            "Dimension",
        ),
        (
            r#"{"type":"resize","cols":-1,"rows":5}"#.into(),
            "Malformed",
        ),
        (
            json!({"type":"initialize","sessionIdentifier":"x".repeat(513)}).to_string(),
            "SessionIdentifierTooLong",
        ),
        (
            json!({"type":"input","data":"x".repeat(MAX_CLIENT_FRAME_BYTES)}).to_string(),
            "TooLarge",
        ),
    ];
    for (text, kind) in cases {
        let err = parse_client_frame(&text).unwrap_err();
        assert!(format!("{err:?}").starts_with(kind), "{text:.60}: {err:?}");
    }
}

#[test]
fn server_frames_have_ucloud_s_shape() {
    let parse = |s: String| serde_json::from_str::<Value>(&s).unwrap();
    assert_eq!(
        parse(ShellResponse::Initialize.to_json("0")),
        message("0", json!({"type": "initialize"}))
    );
    assert_eq!(
        parse(ShellResponse::Ack.to_json("12")),
        message("12", json!({"type": "ack"}))
    );
    assert_eq!(
        parse(ShellResponse::Data("a\"b\u{1b}[0m\r\n").to_json("0")),
        message("0", json!({"type": "data", "data": "a\"b\u{1b}[0m\r\n"}))
    );
}

#[test]
fn utf8_split_across_reads_is_not_broken() {
    let text = "héllo wörld, 世界 🎉 ok";
    let bytes = text.as_bytes();
    for cut in 0..=bytes.len() {
        let mut decoder = Utf8Decoder::default();
        let mut out = decoder.decode(&bytes[..cut]);
        out += &decoder.decode(&bytes[cut..]);
        out += &decoder.finish();
        assert_eq!(out, text, "cut at {cut}");
    }
    let mut decoder = Utf8Decoder::default();
    let out: String = bytes.iter().map(|b| decoder.decode(&[*b])).collect();
    assert_eq!(out, text, "one byte at a time");
}

#[test]
fn invalid_utf8_becomes_replacement_characters() {
    let mut decoder = Utf8Decoder::default();
    assert_eq!(decoder.decode(b"a\xffb\xc3"), "a\u{fffd}b");
    assert_eq!(
        decoder.decode(b"(x"),
        "\u{fffd}(x",
        "a broken sequence is replaced"
    );
    assert_eq!(decoder.decode(b"\xe4\xb8"), "");
    assert_eq!(
        decoder.finish(),
        "\u{fffd}",
        "an unfinished character at EOF"
    );
    assert_eq!(decoder.decode(b"ok"), "ok");
}

#[tokio::test]
async fn a_session_answers_initialize_then_pumps_input_and_output() {
    let mut s = start(
        ShellConfig {
            greeting: Some("hello\r\n".into()),
            ..quiet()
        },
        4096,
    );
    send(&mut s.client, initialize("0", SESSION)).await;
    assert_eq!(
        recv_json(&mut s.client).await,
        message("0", json!({"type": "initialize"}))
    );
    assert_eq!(
        recv_json(&mut s.client).await,
        message("0", json!({"type": "data", "data": "hello\r\n"}))
    );

    send(&mut s.client, input("1", "ls\r")).await;
    assert_eq!(
        recv_json(&mut s.client).await,
        message("1", json!({"type": "ack"}))
    );
    let mut typed = [0; 3];
    within(10, s.console.read_exact(&mut typed)).await.unwrap();
    assert_eq!(&typed, b"ls\r");

    s.console.write_all(b"bin  etc\r\n$ ").await.unwrap();
    assert_eq!(
        recv_json(&mut s.client).await,
        message("0", json!({"type": "data", "data": "bin  etc\r\n$ "}))
    );

    send(
        &mut s.client,
        envelope("2", json!({"type": "resize", "cols": 120, "rows": 40})),
    )
    .await;
    assert_eq!(
        recv_json(&mut s.client).await,
        message("2", json!({"type": "ack"}))
    );
    send(&mut s.client, WsFrame::Close(None)).await;
    let mut rest = Vec::new();
    within(10, s.console.read_to_end(&mut rest)).await.unwrap();
    assert!(
        rest.is_empty(),
        "a resize writes nothing to the console: {rest:?}"
    );
    let summary = within(10, s.task).await.unwrap();
    assert!(matches!(summary.ended, Ended::ClientClosed), "{summary:?}");
    assert_eq!(summary.to_upstream_bytes, 3);
}

#[tokio::test]
async fn frames_before_initialize_are_ignored() {
    let mut s = start(quiet(), 4096);
    send(&mut s.client, input("0", "early")).await;
    send(
        &mut s.client,
        WsFrame::Binary(bytes::Bytes::from_static(b"bin")),
    )
    .await;
    send(&mut s.client, initialize("1", SESSION)).await;
    assert_eq!(
        recv_json(&mut s.client).await,
        message("1", json!({"type": "initialize"}))
    );
    send(&mut s.client, WsFrame::Close(None)).await;
    let mut rest = Vec::new();
    within(10, s.console.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    within(10, s.task).await.unwrap();
}

#[tokio::test]
async fn multi_byte_characters_survive_one_byte_reads() {
    // A console buffer of one byte makes every read a single byte.
    let mut s = start(quiet(), 1);
    send(&mut s.client, initialize("0", SESSION)).await;
    recv_json(&mut s.client).await;
    let text = "ÆØÅ 世界 🎉\r\n";
    let (mut console_r, mut console_w) = tokio::io::split(s.console);
    let writes = async {
        console_w.write_all(text.as_bytes()).await.unwrap();
        console_w.shutdown().await.unwrap();
    };
    let reads = async {
        let mut got = String::new();
        loop {
            let frame = recv_json(&mut s.client).await;
            if frame["payload"]["type"] != "data" {
                panic!("unexpected {frame}");
            }
            got += frame["payload"]["data"].as_str().unwrap();
            if got.len() >= text.len() {
                return got;
            }
        }
    };
    let ((), got) = within(10, futures::future::join(writes, reads)).await;
    assert_eq!(got, text);
    assert_eq!(
        within(10, s.client.rx.next()).await,
        Some(WsFrame::from(&CloseReason::console_closed()))
    );
    send(&mut s.client, WsFrame::Close(None)).await;
    let summary = within(10, s.task).await.unwrap();
    assert!(
        matches!(summary.ended, Ended::UpstreamClosed),
        "{summary:?}"
    );
    let _ = console_r.read(&mut [0; 1]).await;
}

#[tokio::test(start_paused = true)]
async fn no_initialize_within_30_seconds_closes_with_1008() {
    let mut s = start(ShellConfig::default(), 4096);
    let t0 = tokio::time::Instant::now();
    assert_eq!(
        within(60, s.client.rx.next()).await,
        Some(WsFrame::Close(Some((
            1008,
            "no initialize message in time".into()
        ))))
    );
    assert!(t0.elapsed() >= Duration::from_secs(30));
    send(&mut s.client, WsFrame::Close(None)).await;
    let summary = within(60, s.task).await.unwrap();
    assert!(matches!(summary.ended, Ended::Rejected(_)), "{summary:?}");
}

#[tokio::test]
async fn a_wrong_session_identifier_is_refused() {
    let mut s = start(quiet(), 4096);
    send(&mut s.client, initialize("0", "someone-elses-session")).await;
    assert_eq!(
        within(10, s.client.rx.next()).await,
        Some(WsFrame::Close(Some((1008, "unknown shell session".into()))))
    );
    send(&mut s.client, WsFrame::Close(None)).await;
    let summary = within(10, s.task).await.unwrap();
    assert!(matches!(summary.ended, Ended::Rejected(_)), "{summary:?}");
}

#[tokio::test]
async fn a_malformed_message_after_initialize_closes_the_session() {
    let mut s = start(quiet(), 4096);
    send(&mut s.client, initialize("0", SESSION)).await;
    recv_json(&mut s.client).await;
    send(&mut s.client, WsFrame::Text("{not json".into())).await;
    assert_eq!(
        within(10, s.client.rx.next()).await,
        Some(WsFrame::Close(Some((
            1008,
            "malformed shell message".into()
        ))))
    );
    send(&mut s.client, WsFrame::Close(None)).await;
    assert!(matches!(
        within(10, s.task).await.unwrap().ended,
        Ended::Rejected(_)
    ));
}

#[tokio::test]
async fn a_stop_closes_the_shell_with_its_reason() {
    let mut s = start(quiet(), 4096);
    send(&mut s.client, initialize("0", SESSION)).await;
    recv_json(&mut s.client).await;
    s.stop.stop(CloseReason::vm_suspended());
    assert_eq!(
        within(10, s.client.rx.next()).await,
        Some(WsFrame::from(&CloseReason::vm_suspended()))
    );
    send(&mut s.client, WsFrame::Close(None)).await;
    assert!(matches!(
        within(10, s.task).await.unwrap().ended,
        Ended::Stopped(_)
    ));
}

#[tokio::test]
async fn many_inputs_without_reading_acks_do_not_deadlock() {
    let Session {
        client: MemClient { mut tx, mut rx },
        mut console,
        stop: _stop,
        task,
    } = start(quiet(), 4096);
    tx.send(Ok(initialize("0", SESSION))).await.unwrap();
    let n = 500;
    let sends = async {
        for i in 0..n {
            tx.send(Ok(input(&i.to_string(), "x"))).await.unwrap();
        }
        tx
    };
    let console_reads = async {
        let mut got = vec![0; n];
        console.read_exact(&mut got).await.unwrap();
        got
    };
    let acks = async {
        let mut acks = 0;
        while acks < n {
            match rx.next().await {
                Some(WsFrame::Text(t)) if t.contains("\"ack\"") => acks += 1,
                Some(WsFrame::Text(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let (mut tx, typed, ()) = within(30, futures::future::join3(sends, console_reads, acks)).await;
    assert!(typed.iter().all(|b| *b == b'x'));
    tx.send(Ok(WsFrame::Close(None))).await.unwrap();
    within(10, task).await.unwrap();
}
