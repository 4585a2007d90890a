//! UCloud's interactive shell protocol (provider protocol §3.3) over a VM's serial console.
//!
//! The browser (UCloud's `Shell.tsx`) sends text frames in UCloud's WebSocket envelope,
//! `{"call":"jobs.compute.<provider>.shell.open","streamId":"<n>","payload":{...}}`, with a new
//! `streamId` for every call. The payloads:
//!
//! | client → vmhost | vmhost → client |
//! |---|---|
//! | `{"type":"initialize","sessionIdentifier":..,"cols":..,"rows":..}` | `{"type":"message","streamId":<init's>,"payload":{"type":"initialize"}}` |
//! | `{"type":"input","data":"ls\r"}` | `{"type":"message","streamId":<input's>,"payload":{"type":"ack"}}` |
//! | `{"type":"resize","cols":..,"rows":..}` | `{"type":"message","streamId":<resize's>,"payload":{"type":"ack"}}` |
//! | | `{"type":"message","streamId":<init's>,"payload":{"type":"data","data":"..."}}` |
//!
//! This follows UCloud's integration module: console output goes out on the `initialize` call's
//! stream (the one the browser subscribed to), acks on the stream of the call they answer; a
//! second `initialize` counts as a resize; anything before `initialize` is ignored; unknown
//! types are acknowledged and ignored; binary frames are ignored. A bare payload without the envelope is accepted too
//! (its ack goes out on the `initialize` stream).
//!
//! - **Resize** can only be acknowledged: a serial console has no window size to set, and
//!   typing `stty rows R cols C` into the user's shell on their behalf would be a surprise.
//! - **Output** is the guest's bytes as lossy UTF-8: invalid bytes become U+FFFD, and a
//!   character split across two reads is held back until its last byte arrives
//!   ([`Utf8Decoder`]).
//! - **Caps**: a client frame is at most [`MAX_CLIENT_FRAME_BYTES`] (close 1009 beyond),
//!   terminal sizes at most [`MAX_DIMENSION`], session identifiers [`MAX_SESSION_ID_CHARS`];
//!   any other malformed frame closes the session with 1008 (UCloud's IM drops the connection).

use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use super::proxy::{BoxError, Codec, Finish, Forward, Pump};
use super::{CloseReason, ProxyConfig, ProxySummary, StopSignal, WsFrame};

/// Largest client frame accepted (a paste arrives as one `input`).
pub const MAX_CLIENT_FRAME_BYTES: usize = 256 * 1024;
/// Largest accepted `cols` or `rows`.
pub const MAX_DIMENSION: u16 = 10_000;
/// Longest accepted `sessionIdentifier`.
pub const MAX_SESSION_ID_CHARS: usize = 512;

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    /// The envelope's `streamId`; `None` for a bare payload.
    pub stream_id: Option<String>,
    pub request: ShellRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellRequest {
    Initialize {
        session_identifier: String,
        cols: u16,
        rows: u16,
    },
    /// Keystrokes or a paste, as text.
    Input {
        data: String,
    },
    Resize {
        cols: u16,
        rows: u16,
    },
    /// A type this version does not know; acknowledged and ignored.
    Other {
        kind: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("shell message of {len} bytes is larger than {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed shell message")]
    Malformed {
        #[source]
        err: serde_json::Error,
    },
    #[error("shell {kind} message without {field}")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("terminal size {cols}x{rows} is out of range")]
    Dimension { cols: u64, rows: u64 },
    #[error("session identifier longer than {MAX_SESSION_ID_CHARS} characters")]
    SessionIdentifierTooLong,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    stream_id: Option<String>,
    payload: RawRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRequest {
    #[serde(rename = "type")]
    kind: String,
    session_identifier: Option<String>,
    cols: Option<u64>,
    rows: Option<u64>,
    data: Option<String>,
}

/// Parses one text frame from the client (envelope or bare payload).
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, ShellError> {
    if text.len() > MAX_CLIENT_FRAME_BYTES {
        return Err(ShellError::TooLarge {
            len: text.len(),
            max: MAX_CLIENT_FRAME_BYTES,
        });
    }
    let malformed = |err| ShellError::Malformed { err };
    let value: serde_json::Value = serde_json::from_str(text).map_err(malformed)?;
    let (stream_id, raw) = if value.get("payload").is_some() {
        let envelope = RawEnvelope::deserialize(value).map_err(malformed)?;
        (envelope.stream_id, envelope.payload)
    } else {
        (None, RawRequest::deserialize(value).map_err(malformed)?)
    };
    let request = match raw.kind.as_str() {
        "initialize" => {
            let session_identifier = raw.session_identifier.ok_or(ShellError::Missing {
                kind: "initialize",
                field: "sessionIdentifier",
            })?;
            if session_identifier.chars().count() > MAX_SESSION_ID_CHARS {
                return Err(ShellError::SessionIdentifierTooLong);
            }
            let (cols, rows) = dimensions(raw.cols, raw.rows)?;
            ShellRequest::Initialize {
                session_identifier,
                cols,
                rows,
            }
        }
        "input" => ShellRequest::Input {
            data: raw.data.ok_or(ShellError::Missing {
                kind: "input",
                field: "data",
            })?,
        },
        "resize" => {
            let (cols, rows) = dimensions(raw.cols, raw.rows)?;
            ShellRequest::Resize { cols, rows }
        }
        _ => ShellRequest::Other { kind: raw.kind },
    };
    Ok(ClientFrame { stream_id, request })
}

/// Missing sizes are 0, as UCloud's IM reads them.
fn dimensions(cols: Option<u64>, rows: Option<u64>) -> Result<(u16, u16), ShellError> {
    let (c, r) = (cols.unwrap_or(0), rows.unwrap_or(0));
    let max = u64::from(MAX_DIMENSION);
    if c > max || r > max {
        return Err(ShellError::Dimension { cols: c, rows: r });
    }
    // Both are at most MAX_DIMENSION, which fits a u16.
    Ok((
        u16::try_from(c).unwrap_or(MAX_DIMENSION),
        u16::try_from(r).unwrap_or(MAX_DIMENSION),
    ))
}

/// A frame vmhost sends to the shell client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellResponse<'a> {
    Initialize,
    Data(&'a str),
    Ack,
}

#[derive(Serialize)]
struct Outgoing<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "streamId")]
    stream_id: &'a str,
    payload: Payload<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Payload<'a> {
    Initialize,
    Data { data: &'a str },
    Ack,
}

impl ShellResponse<'_> {
    /// The frame's JSON text on stream `stream_id`.
    pub fn to_json(&self, stream_id: &str) -> String {
        let payload = match *self {
            ShellResponse::Initialize => Payload::Initialize,
            ShellResponse::Data(data) => Payload::Data { data },
            ShellResponse::Ack => Payload::Ack,
        };
        let frame = Outgoing {
            kind: "message",
            stream_id,
            payload,
        };
        // Only strings and fixed tags: serialising cannot fail.
        serde_json::to_string(&frame).expect("shell frames serialise")
    }
}

/// Turns a byte stream into UTF-8 text chunk by chunk without breaking a character that is
/// split across chunks. Invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    /// The start of a character whose remaining bytes have not arrived (at most 3 bytes).
    carry: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes `bytes` after whatever was held back; holds back an incomplete last character.
    pub fn decode(&mut self, bytes: &[u8]) -> String {
        let joined;
        let mut rest = if self.carry.is_empty() {
            bytes
        } else {
            self.carry.extend_from_slice(bytes);
            joined = std::mem::take(&mut self.carry);
            &joined[..]
        };
        let mut out = String::with_capacity(rest.len());
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    return out;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // The input ends inside a character: keep its start for next time.
                        None => {
                            self.carry = after.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// The stream ended: a held-back partial character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.carry.is_empty() {
            String::new()
        } else {
            self.carry.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// Tuning of a shell session. `Default` is what production uses.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// How long the client has to send `initialize` (UCloud's IM: 30 s).
    pub init_timeout: Duration,
    /// Text shown in the terminal right after `initialize`. A serial console prints its
    /// prompt only after a key, so the default says so.
    pub greeting: Option<String>,
    pub proxy: ProxyConfig,
}

impl Default for ShellConfig {
    fn default() -> ShellConfig {
        ShellConfig {
            init_timeout: Duration::from_secs(30),
            greeting: Some(
                "Connected to the virtual machine's serial console. \
                 Press Enter if no prompt appears.\r\n"
                    .to_owned(),
            ),
            proxy: ProxyConfig::default(),
        }
    }
}

/// Runs one shell session: waits for the client's `initialize` (at most
/// [`ShellConfig::init_timeout`]), checks that its `sessionIdentifier` is the one the caller
/// redeemed, answers it, then pumps `input` to `upstream` (the serial console) and the
/// console's output to the client as `data` frames, acknowledging every call. Ends as
/// [`super::proxy()`] does; a client that breaks the protocol gets 1008 (or 1009) and
/// [`super::Ended::Rejected`].
pub async fn run_shell<W, E, U>(
    ws: W,
    upstream: U,
    session_identifier: &str,
    stop: StopSignal,
    config: ShellConfig,
) -> ProxySummary
where
    W: Sink<WsFrame> + Stream<Item = Result<WsFrame, E>> + Unpin,
    <W as Sink<WsFrame>>::Error: Into<BoxError>,
    E: Into<BoxError>,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut pump = Pump::new(ws, upstream, ShellCodec::default(), config.proxy);
    let opening = tokio::select! {
        biased;
        reason = stop.stopped() => Err(Finish::Stopped(reason)),
        opened = tokio::time::timeout(config.init_timeout, await_initialize(pump.ws_mut())) => {
            opened.unwrap_or_else(|_| {
                Err(Finish::Rejected(CloseReason::policy("no initialize message in time")))
            })
        }
    };
    let (stream_id, presented) = match opening {
        Ok(opened) => opened,
        Err(finish) => return pump.finish(finish).await,
    };
    let expected: [u8; 32] = Sha256::digest(session_identifier.as_bytes()).into();
    let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    if expected != presented {
        let reason = CloseReason::policy("unknown shell session");
        return pump.finish(Finish::Rejected(reason)).await;
    }
    pump.queue(WsFrame::Text(ShellResponse::Initialize.to_json(&stream_id)));
    if let Some(greeting) = &config.greeting {
        pump.queue(WsFrame::Text(
            ShellResponse::Data(greeting).to_json(&stream_id),
        ));
    }
    pump.codec_mut().stream_id = stream_id;
    pump.run(stop).await
}

/// Reads client frames until `initialize`; returns its stream id and session identifier.
async fn await_initialize<W, E>(ws: &mut W) -> Result<(String, String), Finish>
where
    W: Stream<Item = Result<WsFrame, E>> + Unpin,
    E: Into<BoxError>,
{
    loop {
        let text = match ws.next().await {
            None | Some(Ok(WsFrame::Close(_))) => return Err(Finish::ClientClosed),
            Some(Err(e)) => return Err(Finish::ClientFailed(e.into())),
            Some(Ok(WsFrame::Text(text))) => text,
            Some(Ok(_)) => continue,
        };
        match parse_client_frame(&text) {
            Ok(ClientFrame {
                stream_id,
                request:
                    ShellRequest::Initialize {
                        session_identifier, ..
                    },
            }) => return Ok((stream_id.unwrap_or_default(), session_identifier)),
            // UCloud's IM ignores everything before `initialize`.
            Ok(_) => {}
            Err(e) => return Err(Finish::Rejected(close_reason(&e))),
        }
    }
}

fn close_reason(err: &ShellError) -> CloseReason {
    match err {
        ShellError::TooLarge { .. } => CloseReason::too_big("shell message too large"),
        ShellError::Malformed { .. }
        | ShellError::Missing { .. }
        | ShellError::Dimension { .. }
        | ShellError::SessionIdentifierTooLong => CloseReason::policy("malformed shell message"),
    }
}

/// The shell protocol as the engine's codec, once `initialize` has been answered.
#[derive(Debug, Default)]
struct ShellCodec {
    /// The `initialize` call's stream: console output goes out on it.
    stream_id: String,
    decoder: Utf8Decoder,
}

impl ShellCodec {
    fn data(&self, text: &str) -> Option<WsFrame> {
        (!text.is_empty())
            .then(|| WsFrame::Text(ShellResponse::Data(text).to_json(&self.stream_id)))
    }
}

impl Codec for ShellCodec {
    fn client_message(&mut self, frame: WsFrame) -> Result<Forward, CloseReason> {
        let WsFrame::Text(text) = frame else {
            return Ok(Forward::default());
        };
        let frame = parse_client_frame(&text).map_err(|e| close_reason(&e))?;
        let ack_stream = frame.stream_id.as_deref().unwrap_or(&self.stream_id);
        let reply = Some(WsFrame::Text(ShellResponse::Ack.to_json(ack_stream)));
        let upstream = match frame.request {
            ShellRequest::Input { data } => Some(Bytes::from(data.into_bytes())),
            ShellRequest::Initialize { .. }
            | ShellRequest::Resize { .. }
            | ShellRequest::Other { .. } => None,
        };
        Ok(Forward { upstream, reply })
    }

    fn upstream_bytes(&mut self, chunk: Bytes) -> Option<WsFrame> {
        let text = self.decoder.decode(&chunk);
        self.data(&text)
    }

    fn upstream_eof(&mut self) -> Option<WsFrame> {
        let text = self.decoder.finish();
        self.data(&text)
    }
}

#[cfg(test)]
#[path = "shell_tests.rs"]
mod tests;
