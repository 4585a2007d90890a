//! Console proxy: vmhost's WebSocket pump beside websockify, both in front of the same TCP
//! upstream, with the upstream read directly as the baseline. All traffic stays on 127.0.0.1.
//!
//! - **Upstream**: a TCP server in the bench process. A connection's first byte picks its
//!   mode: `S` + a big-endian u64 `n` sends `n` bytes in 64 KiB writes, then closes; `E`
//!   echoes everything.
//! - **vmhost**: a minimal axum app whose WebSocket route (`console::WsUpgrade` with
//!   `SocketConfig::vnc()`, as the VNC route) connects to the upstream (TCP_NODELAY) and runs
//!   `console::proxy` with the production defaults (`BENCH_FRAME_KIB` overrides the largest
//!   frame, for comparisons). It runs as a child process of the bench (the bench binary
//!   re-executed with `VNC_PROXY_BENCH_SERVE` set) on a single-threaded runtime, as websockify
//!   runs in its own single-threaded process; the targets are judged on it, and its CPU time
//!   and memory are its own. The same app also runs inside the bench's two-worker runtime,
//!   beside the clients and the upstream, for comparison.
//! - **TCP relay**: the bench binary re-executed with `VNC_PROXY_BENCH_RELAY`: a plain
//!   `copy_bidirectional` between the client and the upstream, no WebSocket, reads as large
//!   as vmhost's largest frame, on a single-threaded runtime in its own process. It is what
//!   any proxy in its own process costs at the least: the bound for vmhost's figures.
//!   `VNC_PROXY_BENCH_SPLICE` serves the same relay with upstream → client moved by splice(2)
//!   through a pipe, never copied through user space: what a zero-copy pump could reach.
//! - **websockify**: `python3 -m websockify` (it forks a process per connection), a child of
//!   the bench, killed at the end.
//! - **Client**: a minimal WebSocket client ([`WsClient`]), the same for vmhost and websockify,
//!   with TCP_NODELAY. It reads in 256 KiB reads and parses frames in place, as the direct
//!   path reads in 256 KiB reads; tokio-tungstenite, the first client here, zero-filled
//!   128 KiB and copied every payload per message, CPU that competed with the proxies on 2
//!   cores.
//!
//! Measured: (a) throughput upstream → client of `BENCH_MIB` MiB (default 512), in
//! `BENCH_RUNS` (default 5) runs with the paths taking turns, with CPU seconds per GiB of
//! everything and of the proxy alone; (b) the same read straight from the upstream socket and
//! through the TCP relay; the throughput targets are judged on the median of the per-run
//! ratios, each taken between transfers that ran back to back; (c) `BENCH_ROUNDS` (default
//! 2000) round trips of 64 bytes per path after 100 warm-up rounds (direct, relay, proxies), in
//! blocks with the paths taking turns, median and p99, with the proxy's CPU per round trip;
//! (d) `BENCH_SESSIONS` (default 500) concurrent sessions through vmhost, each echoing a few
//! messages and then holding its session open until all are up; memory of the bench process
//! (clients and upstream; RSS) and of the proxy (PSS) before, at the peak and after. The same
//! for `BENCH_WSFY_SESSIONS` (default 50: one Python process each) sessions through websockify.
//!
//! Needs websockify (`pip install websockify`); without it the websockify figures are skipped.
//! Run: `cargo bench --bench vnc_proxy`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use vmhost::console::{proxy, ProxyConfig, SocketConfig, StopSignal, WsUpgrade};

const CHUNK: usize = 64 * 1024;
/// Every read of a throughput or round-trip client, WebSocket or direct.
const READ_BYTES: usize = 256 * 1024;
/// Reads of the clients of the concurrent sessions, which only echo short messages.
const SESSION_READ_BYTES: usize = 4 * 1024;
const ECHO_BYTES: usize = 64;
const WARMUP_ROUNDS: usize = 100;
/// Round trips are timed in this many blocks per path, the paths taking turns.
const LATENCY_BLOCKS: usize = 10;
const ECHOES_PER_SESSION: usize = 5;
/// Set in the environment of the re-executed bench binary that serves vmhost's proxy.
const SERVE_ENV: &str = "VNC_PROXY_BENCH_SERVE";
/// Set in the environment of the re-executed bench binary that serves the plain TCP relay.
const RELAY_ENV: &str = "VNC_PROXY_BENCH_RELAY";
/// Set in the environment of the re-executed bench binary that serves the splice relay.
const SPLICE_ENV: &str = "VNC_PROXY_BENCH_SPLICE";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The upstream

async fn upstream_server(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = upstream_connection(stream).await;
        });
    }
}

async fn upstream_connection(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode).await?;
    match mode[0] {
        b'S' => {
            let total = stream.read_u64().await?;
            let chunk = vec![0xA5u8; CHUNK];
            let mut left = total;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                stream.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            stream.shutdown().await
        }
        b'E' => {
            let (mut r, mut w) = stream.split();
            tokio::io::copy(&mut r, &mut w).await.map(|_| ())
        }
        _ => Ok(()),
    }
}

fn source_command(bytes: u64) -> Vec<u8> {
    let mut cmd = vec![b'S'];
    cmd.extend_from_slice(&bytes.to_be_bytes());
    cmd
}

// ---------------------------------------------------------------------------------------------
// vmhost's side: a minimal axum app around the pump

fn vmhost_app(upstream: SocketAddr) -> Router {
    Router::new().route(
        "/",
        get(move |ws: WsUpgrade| async move {
            ws.on_upgrade(SocketConfig::vnc(), move |socket| async move {
                let Ok(tcp) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                proxy(socket, tcp, StopSignal::new(), proxy_config()).await;
            })
        }),
    )
}

/// The production defaults; `BENCH_FRAME_KIB` overrides the largest frame, for comparisons.
fn proxy_config() -> ProxyConfig {
    let default = ProxyConfig::default();
    ProxyConfig {
        max_frame_bytes: env_or("BENCH_FRAME_KIB", default.max_frame_bytes >> 10) << 10,
        ..default
    }
}

async fn serve(listener: TcpListener, app: Router) {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let _ = axum::serve(listener, app).await;
}

/// What a re-executed bench binary serves.
#[derive(Clone, Copy)]
enum Served {
    Vmhost,
    Relay,
    SpliceRelay,
}

/// A child process: serves vmhost's proxy or a relay on a single-threaded runtime; prints its
/// port.
fn serve_child(upstream: &str, served: Served) -> anyhow::Result<()> {
    let upstream: SocketAddr = upstream.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // vmhost's own listener (deep backlog) for every proxy, so that a storm of connects
        // meets the same accept queue whichever proxy it goes to.
        let listener = vmhost::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        println!("{}", listener.local_addr()?.port());
        match served {
            Served::Vmhost => serve(listener, vmhost_app(upstream)).await,
            Served::Relay | Served::SpliceRelay => relay(listener, upstream, served).await,
        }
        anyhow::Ok(())
    })
}

/// The least any proxy in its own process can do: move bytes both ways, no WebSocket, with
/// reads as large as vmhost's largest frame. Its figures bound what framing can reach. The
/// plain relay copies (`copy_bidirectional`); the splice relay moves upstream → client without
/// a copy through user space.
async fn relay(listener: TcpListener, upstream: SocketAddr, served: Served) {
    let frame = proxy_config().max_frame_bytes;
    while let Ok((mut client, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut tcp = TcpStream::connect(upstream).await?;
            client.set_nodelay(true)?;
            tcp.set_nodelay(true)?;
            if matches!(served, Served::SpliceRelay) {
                return splice_relay(client, tcp, frame).await;
            }
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut tcp, frame, frame).await?;
            std::io::Result::Ok(())
        });
    }
}

/// Client → upstream by copy (it is small); upstream → client through a pipe with splice(2),
/// up to `frame` bytes per splice, as a zero-copy WebSocket pump would move payloads.
async fn splice_relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    frame: usize,
) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use tokio::io::Interest;

    let (pipe_out, pipe_in) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&pipe_in),
        FcntlArg::F_SETPIPE_SZ(i32::try_from(frame).unwrap_or(i32::MAX)),
    )?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let (mut from_client, to_client) = client.split();
    let (from_upstream, mut to_upstream) = upstream.split();
    let (from_upstream, to_client) = (from_upstream.as_ref(), to_client.as_ref());
    let up = tokio::io::copy(&mut from_client, &mut to_upstream);
    let down = async {
        loop {
            let n = from_upstream
                .async_io(Interest::READABLE, || {
                    Ok(splice(from_upstream, None, &pipe_in, None, frame, flags)?)
                })
                .await?;
            if n == 0 {
                return Ok(());
            }
            let mut left = n;
            while left > 0 {
                left -= to_client
                    .async_io(Interest::WRITABLE, || {
                        Ok(splice(&pipe_out, None, to_client, None, left, flags)?)
                    })
                    .await?;
            }
        }
    };
    tokio::try_join!(up, down).map(|_| ())
}

struct Child {
    child: tokio::process::Child,
    addr: SocketAddr,
    pid: u32,
}

async fn start_child(env: &str, upstream: SocketAddr) -> anyhow::Result<Child> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(env, upstream.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the proxy process")?;
    let pid = child.id().context("the proxy process has a pid")?;
    let stdout = child.stdout.take().context("its stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the proxy process did not report its port")??;
    let addr = format!("127.0.0.1:{}", line.trim()).parse()?;
    Ok(Child { child, addr, pid })
}

async fn start_vmhost_in_process(upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = vmhost::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, vmhost_app(upstream)));
    Ok(addr)
}

// ---------------------------------------------------------------------------------------------
// websockify

async fn start_websockify(upstream: SocketAddr) -> anyhow::Result<Option<Child>> {
    let probe = std::process::Command::new("python3")
        .args(["-m", "websockify", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        println!("websockify is not installed (pip install websockify): its figures are skipped");
        return Ok(None);
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let child = tokio::process::Command::new("python3")
        .args(["-m", "websockify", &addr.to_string(), &upstream.to_string()])
        // websockify imports numpy; OpenBLAS's spinning worker threads would only steal CPU.
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting websockify")?;
    let pid = child.id().context("websockify has a pid")?;
    let t0 = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "websockify did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Some(Child { child, addr, pid }))
}

// ---------------------------------------------------------------------------------------------
// Processes: CPU time and memory from /proc

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// CPU seconds of `pid` and its descendants: living threads to the nanosecond (schedstat),
/// reaped children to the tick (`cutime` + `cstime`).
fn cpu_seconds(pid: u32) -> f64 {
    let mut total = 0.0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            total += std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0.0, |ns| ns as f64 / 1e9);
        }
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // After the parenthesised command, state is field 3; cutime and cstime are 16 and 17.
        if let Some((_, fields)) = stat.rsplit_once(')') {
            let ticks: u64 = fields
                .split_whitespace()
                .skip(13)
                .take(2)
                .filter_map(|f| f.parse::<u64>().ok())
                .sum();
            total += ticks as f64 / 100.0; // sysconf(_SC_CLK_TCK) on Linux
        }
    }
    total + children(pid).into_iter().map(cpu_seconds).sum::<f64>()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Proportional set size of `pid` and its descendants, in KiB: shared pages (a forked
/// websockify's) count once in total.
fn pss_kib(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    own + children(pid).into_iter().map(pss_kib).sum::<u64>()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A minimal RFC 6455 client, used alike for vmhost and websockify. tokio-tungstenite (the
/// first client here) zero-fills its 128 KiB read buffer before every read and copies each
/// payload into a message; on 2 cores that client work competed with the proxies and hid
/// their differences. This one reads in [`READ_BYTES`] reads, as the direct path does, and
/// parses frames in place: its only copy is the kernel's, as for the direct path.
struct WsClient {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

/// A fixed key and mask: the bench needs no secrecy, and the proxies check neither.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const WS_MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;

impl WsClient {
    /// Connects and upgrades; `read_bytes` is the size of every read.
    async fn connect(addr: SocketAddr, read_bytes: usize) -> anyhow::Result<WsClient> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("WebSocket connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut ws = WsClient {
            tcp,
            buf: vec![0; read_bytes.max(4096)],
            start: 0,
            end: 0,
        };
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.tcp.write_all(request.as_bytes()).await?;
        let head_len = loop {
            if let Some(i) = ws.unparsed().windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await?;
        };
        let head = String::from_utf8_lossy(&ws.unparsed()[..head_len]).to_lowercase();
        ensure!(head.starts_with("http/1.1 101"), "upgrade refused: {head}");
        ensure!(
            head.contains(&WS_ACCEPT.to_lowercase()),
            "wrong accept key: {head}"
        );
        ws.start += head_len;
        Ok(ws)
    }

    fn unparsed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more; the unparsed bytes move to the front first when the buffer is full.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let n = self.tcp.read(&mut self.buf[self.end..]).await?;
        ensure!(n > 0, "the proxy closed the connection");
        self.end += n;
        Ok(())
    }

    /// Sends one masked frame.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&WS_MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ WS_MASK[i & 3]));
        self.tcp.write_all(&frame).await?;
        Ok(())
    }

    /// The next frame's opcode and payload length; the payload follows with [`Self::payload`].
    async fn header(&mut self) -> anyhow::Result<(u8, u64)> {
        loop {
            if let Some((len, header)) = parse_header(self.unparsed())? {
                self.start += len;
                return Ok(header);
            }
            self.fill().await?;
        }
    }

    /// Hands `len` payload bytes to `f`, in the pieces the reads bring, without copying them.
    async fn payload(&mut self, mut len: u64, mut f: impl FnMut(&[u8])) -> anyhow::Result<()> {
        while len > 0 {
            if self.start == self.end {
                self.fill().await?;
            }
            let n = (self.end - self.start).min(usize::try_from(len).unwrap_or(usize::MAX));
            f(&self.buf[self.start..self.start + n]);
            self.start += n;
            len -= n as u64;
        }
        Ok(())
    }

    /// Sends Close 1000 and reads until the proxy's Close or the end of the stream.
    async fn close(mut self) {
        let _ = self.send(OP_CLOSE, &1000u16.to_be_bytes()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let (opcode, len) = self.header().await?;
                self.payload(len, |_| {}).await?;
                if opcode == OP_CLOSE {
                    return anyhow::Ok(());
                }
            }
        })
        .await;
    }
}

/// A server frame header at the start of `buf`: its length, opcode and payload length.
fn parse_header(buf: &[u8]) -> anyhow::Result<Option<(usize, (u8, u64))>> {
    let [first, second, ..] = *buf else {
        return Ok(None);
    };
    ensure!(first & 0x80 != 0, "the bench expects unfragmented frames");
    ensure!(second & 0x80 == 0, "server frames must not be masked");
    let (len, payload_len) = match second & 0x7F {
        126 if buf.len() >= 4 => (4, u64::from(u16::from_be_bytes([buf[2], buf[3]]))),
        127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into()?)),
        126 | 127 => return Ok(None),
        n => (2, u64::from(n)),
    };
    Ok(Some((len, (first & 0x0F, payload_len))))
}

/// Bytes per second from the upstream through the WebSocket proxy at `addr`.
async fn ws_throughput(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut ws = WsClient::connect(addr, READ_BYTES).await?;
    let t0 = Instant::now();
    ws.send(OP_BINARY, &source_command(bytes)).await?;
    let mut got = 0u64;
    while got < bytes {
        let (opcode, len) = ws.header().await?;
        ensure!(opcode != OP_CLOSE, "closed after {got} of {bytes} bytes");
        ws.payload(len, |_| {}).await?;
        if opcode == OP_BINARY {
            got += len;
        }
    }
    let rate = got as f64 / t0.elapsed().as_secs_f64();
    ws.close().await;
    Ok(rate)
}

async fn direct_throughput(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let t0 = Instant::now();
    tcp.write_all(&source_command(bytes)).await?;
    let mut buf = vec![0u8; READ_BYTES];
    let mut got = 0u64;
    while got < bytes {
        let n = tcp.read(&mut buf).await?;
        ensure!(n > 0, "EOF after {got} of {bytes} bytes");
        got += n as u64;
    }
    Ok(got as f64 / t0.elapsed().as_secs_f64())
}

async fn ws_echo(ws: &mut WsClient, payload: &[u8]) -> anyhow::Result<()> {
    ws.send(OP_BINARY, payload).await?;
    let mut back = Vec::with_capacity(payload.len());
    while back.len() < payload.len() {
        let (opcode, len) = ws.header().await?;
        ensure!(opcode != OP_CLOSE, "closed during an echo");
        ws.payload(len, |piece| {
            if opcode == OP_BINARY {
                back.extend_from_slice(piece);
            }
        })
        .await?;
    }
    ensure!(back == payload, "echo differs");
    Ok(())
}

/// One open echo connection of a round-trip path.
enum Echo {
    Direct(TcpStream),
    Ws(WsClient),
}

impl Echo {
    /// Opens an echo session through `addr` (a WebSocket proxy when `ws`) and warms it up.
    async fn open(addr: SocketAddr, ws: bool) -> anyhow::Result<Echo> {
        let mut echo = if ws {
            let mut ws = WsClient::connect(addr, READ_BYTES).await?;
            ws.send(OP_BINARY, b"E").await?;
            Echo::Ws(ws)
        } else {
            let mut tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            tcp.write_all(b"E").await?;
            Echo::Direct(tcp)
        };
        let payload = echo_payload();
        for _ in 0..WARMUP_ROUNDS {
            echo.round(&payload).await?;
        }
        Ok(echo)
    }

    async fn round(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        match self {
            Echo::Ws(ws) => ws_echo(ws, payload).await,
            Echo::Direct(tcp) => {
                tcp.write_all(payload).await?;
                let mut back = vec![0u8; payload.len()];
                tcp.read_exact(&mut back).await?;
                ensure!(back == payload, "echo differs");
                Ok(())
            }
        }
    }

    async fn close(self) {
        if let Echo::Ws(ws) = self {
            ws.close().await;
        }
    }
}

fn echo_payload() -> Vec<u8> {
    (0..ECHO_BYTES as u8).collect()
}

/// A round-trip path: its echo session, the proxy process whose CPU is counted (if any), the
/// samples (µs) and that CPU time (s) so far.
struct LatencyPath {
    echo: Echo,
    pid: Option<u32>,
    samples: Vec<f64>,
    cpu: f64,
}

impl LatencyPath {
    async fn open(addr: SocketAddr, ws: bool, pid: Option<u32>) -> anyhow::Result<LatencyPath> {
        Ok(LatencyPath {
            echo: Echo::open(addr, ws).await?,
            pid,
            samples: Vec::new(),
            cpu: 0.0,
        })
    }

    /// Times `rounds` round trips and adds them to the samples.
    async fn block(&mut self, rounds: usize) -> anyhow::Result<()> {
        let payload = echo_payload();
        let cpu0 = self.pid.map(cpu_seconds);
        for _ in 0..rounds {
            let t0 = Instant::now();
            self.echo.round(&payload).await?;
            self.samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        if let (Some(pid), Some(cpu0)) = (self.pid, cpu0) {
            self.cpu += cpu_seconds(pid) - cpu0;
        }
        Ok(())
    }

    /// Sorted samples (µs) and the proxy's CPU µs per round trip.
    async fn finish(mut self) -> (Vec<f64>, Option<f64>) {
        self.echo.close().await;
        self.samples.sort_by(f64::total_cmp);
        let cpu = self.pid.map(|_| self.cpu / self.samples.len() as f64 * 1e6);
        (self.samples, cpu)
    }
}

/// Round trips on every path, in `blocks` interleaved blocks (direct, relay, vmhost, ... then
/// again), so that drift in the machine's load hits every path alike.
async fn round_trips(
    paths: &mut [LatencyPath],
    rounds: usize,
    blocks: usize,
) -> anyhow::Result<()> {
    let per_block = rounds.div_ceil(blocks);
    for _ in 0..blocks {
        for path in paths.iter_mut() {
            path.block(per_block).await?;
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One throughput run: bytes per second, and CPU seconds per GiB of every process of the
/// bench (clients, upstream and proxies) and of the proxy process alone.
struct Throughput {
    rate: f64,
    cpu_all: f64,
    cpu_proxy: Option<f64>,
}

async fn measured<F: std::future::Future<Output = anyhow::Result<f64>>>(
    bytes: u64,
    proxy_pid: Option<u32>,
    run: F,
) -> anyhow::Result<Throughput> {
    let me = std::process::id();
    let (all0, proxy0) = (cpu_seconds(me), proxy_pid.map(cpu_seconds));
    let rate = run.await?;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    Ok(Throughput {
        rate,
        cpu_all: (cpu_seconds(me) - all0) / gib,
        cpu_proxy: proxy_pid
            .map(cpu_seconds)
            .zip(proxy0)
            .map(|(b, a)| (b - a) / gib),
    })
}

/// Medians of a path's runs: MB/s, CPU-s/GiB of everything, CPU-s/GiB of the proxy.
fn summarize(runs: &[Throughput]) -> (f64, f64, Option<f64>) {
    let proxy = runs
        .iter()
        .map(|r| r.cpu_proxy)
        .collect::<Option<Vec<_>>>()
        .map(median);
    (
        median(runs.iter().map(|r| r.rate / 1e6).collect()),
        median(runs.iter().map(|r| r.cpu_all).collect()),
        proxy,
    )
}

/// Throughput of one path over another's, run by run: the runs were interleaved, so each pair
/// saw the same machine.
struct Paired {
    ratios: Vec<f64>,
}

impl Paired {
    fn new(a: &[Throughput], b: &[Throughput]) -> Paired {
        Paired {
            ratios: a.iter().zip(b).map(|(a, b)| a.rate / b.rate).collect(),
        }
    }

    fn median(&self) -> f64 {
        median(self.ratios.clone())
    }

    /// "1.23× (1.10-1.40) by run", and with a target ", reached in 3 of 5 runs".
    fn describe(&self, target: Option<f64>) -> String {
        let lo = self.ratios.iter().copied().fold(f64::MAX, f64::min);
        let hi = self.ratios.iter().copied().fold(f64::MIN, f64::max);
        let mut text = format!("{:.2}× ({lo:.2}-{hi:.2}) by run", self.median());
        if let Some(target) = target {
            let reached = self.ratios.iter().filter(|&&r| r >= target).count();
            text += &format!(", reached in {reached} of {} runs", self.ratios.len());
        }
        text
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrent sessions

struct SessionsReport {
    sessions: usize,
    served: usize,
    setup: Duration,
    /// Sockets the proxy held at the peak.
    proxy_fds: usize,
    /// RSS of the bench process (clients and upstream), KiB: before, peak, after.
    bench_rss: [u64; 3],
    /// PSS of the proxy's processes, KiB: before, peak, after.
    proxy_pss: [u64; 3],
}

impl SessionsReport {
    fn per_session_kib(&self, [before, peak, _]: [u64; 3]) -> f64 {
        peak.saturating_sub(before) as f64 / self.sessions as f64
    }
}

async fn concurrent_sessions(
    addr: SocketAddr,
    proxy_pid: u32,
    sessions: usize,
) -> anyhow::Result<SessionsReport> {
    let me = std::process::id();
    let (bench_before, proxy_before) = (status_kib(me, "VmRSS:"), pss_kib(proxy_pid));
    let all_up = Arc::new(Barrier::new(sessions + 1));
    let go_home = Arc::new(Barrier::new(sessions + 1));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..sessions)
        .map(|i| {
            let (all_up, go_home) = (all_up.clone(), go_home.clone());
            tokio::spawn(async move {
                let opened = async {
                    let mut ws = WsClient::connect(addr, SESSION_READ_BYTES).await?;
                    ws.send(OP_BINARY, b"E").await?;
                    for round in 0..ECHOES_PER_SESSION {
                        let payload = format!("session {i} echo {round} {}", "x".repeat(32));
                        ws_echo(&mut ws, payload.as_bytes()).await?;
                    }
                    anyhow::Ok(ws)
                }
                .await;
                // Every task reaches both barriers, failed or not, so the bench cannot hang.
                all_up.wait().await;
                go_home.wait().await;
                let ws = opened?;
                ws.close().await;
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), all_up.wait())
        .await
        .context("sessions did not come up within 120 s")?;
    let setup = t0.elapsed();
    let (bench_peak, proxy_peak) = (status_kib(me, "VmRSS:"), pss_kib(proxy_pid));
    let proxy_fds =
        open_fds(proxy_pid) + children(proxy_pid).into_iter().map(open_fds).sum::<usize>();
    go_home.wait().await;
    let mut served = 0;
    for task in tasks {
        match task.await? {
            Ok(()) => served += 1,
            Err(e) => println!("a session failed: {e:#}"),
        }
    }
    // Give the proxy a moment to drop the last sessions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(SessionsReport {
        sessions,
        served,
        setup,
        proxy_fds,
        bench_rss: [bench_before, bench_peak, status_kib(me, "VmRSS:")],
        proxy_pss: [proxy_before, proxy_peak, pss_kib(proxy_pid)],
    })
}

// ---------------------------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() -> anyhow::Result<()> {
    for (env, served) in [
        (SERVE_ENV, Served::Vmhost),
        (RELAY_ENV, Served::Relay),
        (SPLICE_ENV, Served::SpliceRelay),
    ] {
        if let Ok(upstream) = std::env::var(env) {
            return serve_child(&upstream, served);
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let mib = env_or("BENCH_MIB", 512) as u64;
    let bytes = mib << 20;
    let runs = env_or("BENCH_RUNS", 5).max(1);
    let rounds = env_or("BENCH_ROUNDS", 2000);
    let sessions = env_or("BENCH_SESSIONS", 500);
    let wsfy_sessions = env_or("BENCH_WSFY_SESSIONS", 50);

    let upstream_listener = vmhost::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let upstream = upstream_listener.local_addr()?;
    tokio::spawn(upstream_server(upstream_listener));
    let mut vmhost = start_child(SERVE_ENV, upstream).await?;
    let mut relay = start_child(RELAY_ENV, upstream).await?;
    let mut splice = start_child(SPLICE_ENV, upstream).await?;
    let in_process = start_vmhost_in_process(upstream).await?;
    let mut websockify = start_websockify(upstream).await?;
    let wsfy = websockify.as_ref().map(|w| (w.addr, w.pid));

    // (a), (b): throughput, runs interleaved so that drift hits every path alike.
    let (mut t_direct, mut t_relay, mut t_splice, mut t_vmhost, mut t_in_process, mut t_wsfy) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..runs {
        t_direct.push(measured(bytes, None, direct_throughput(upstream, bytes)).await?);
        let run = direct_throughput(relay.addr, bytes);
        t_relay.push(measured(bytes, Some(relay.pid), run).await?);
        let run = direct_throughput(splice.addr, bytes);
        t_splice.push(measured(bytes, Some(splice.pid), run).await?);
        let run = ws_throughput(vmhost.addr, bytes);
        t_vmhost.push(measured(bytes, Some(vmhost.pid), run).await?);
        t_in_process.push(measured(bytes, None, ws_throughput(in_process, bytes)).await?);
        if let Some((addr, pid)) = wsfy {
            t_wsfy.push(measured(bytes, Some(pid), ws_throughput(addr, bytes)).await?);
        }
    }
    // (c): round trips.
    let mut paths = vec![
        LatencyPath::open(upstream, false, None).await?,
        LatencyPath::open(relay.addr, false, None).await?,
        LatencyPath::open(splice.addr, false, None).await?,
        LatencyPath::open(vmhost.addr, true, Some(vmhost.pid)).await?,
        LatencyPath::open(in_process, true, None).await?,
    ];
    if let Some((addr, pid)) = wsfy {
        paths.push(LatencyPath::open(addr, true, Some(pid)).await?);
    }
    round_trips(&mut paths, rounds, LATENCY_BLOCKS).await?;
    let mut finished = Vec::new();
    for path in paths {
        finished.push(path.finish().await);
    }
    let mut finished = finished.into_iter();
    let mut next = || finished.next().unwrap_or_default();
    let (l_direct, _) = next();
    let (l_relay, _) = next();
    let (l_splice, _) = next();
    let (l_vmhost, c_vmhost) = next();
    let (l_in_process, _) = next();
    let (l_wsfy, c_wsfy) = match next() {
        (samples, cpu) if !samples.is_empty() => (Some(samples), cpu),
        _ => (None, None),
    };
    // (d): concurrent sessions.
    let s_vmhost = concurrent_sessions(vmhost.addr, vmhost.pid, sessions).await?;
    let s_wsfy = match wsfy {
        Some((addr, pid)) => Some(concurrent_sessions(addr, pid, wsfy_sessions).await?),
        None => None,
    };
    vmhost.child.kill().await?;
    relay.child.kill().await?;
    splice.child.kill().await?;
    if let Some(w) = &mut websockify {
        w.child.kill().await?;
    }

    println!(
        "console proxy on 127.0.0.1: {mib} MiB upstream → client in 64 KiB writes, \
         {} KiB reads, vmhost's frames up to {} KiB, median of {runs} interleaved runs",
        READ_BYTES >> 10,
        proxy_config().max_frame_bytes >> 10
    );
    println!(
        "{:<34} {:>8} {:>16} {:>18}",
        "path", "MB/s", "CPU-s/GiB, all", "CPU-s/GiB, proxy"
    );
    let t_row = |name: &str, runs: &[Throughput]| {
        let (rate, all, proxy) = summarize(runs);
        let proxy = proxy.map_or("-".to_owned(), |p| format!("{p:.2}"));
        println!("{name:<34} {rate:>8.0} {all:>16.2} {proxy:>18}");
    };
    t_row("direct TCP", &t_direct);
    t_row("TCP relay, own process", &t_relay);
    t_row("TCP relay, splice, own process", &t_splice);
    t_row("vmhost, own process", &t_vmhost);
    t_row("vmhost, in the bench's runtime", &t_in_process);
    if !t_wsfy.is_empty() {
        t_row("websockify 0.13, own process", &t_wsfy);
    }
    println!();
    println!(
        "round trip, {ECHO_BYTES}-byte echo, {rounds} rounds after {WARMUP_ROUNDS} warm-up, \
         in {LATENCY_BLOCKS} blocks per path, the paths taking turns"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>20}",
        "path", "median µs", "p99 µs", "proxy CPU µs/round"
    );
    let row = |name: &str, s: &[f64], cpu: Option<f64>| {
        let cpu = cpu.map_or("-".to_owned(), |c| format!("{c:.1}"));
        println!(
            "{name:<34} {:>10.1} {:>10.1} {cpu:>20}",
            percentile(s, 0.5),
            percentile(s, 0.99)
        );
    };
    row("direct TCP", &l_direct, None);
    row("TCP relay, own process", &l_relay, None);
    row("TCP relay, splice, own process", &l_splice, None);
    row("vmhost, own process", &l_vmhost, c_vmhost);
    row("vmhost, in the bench's runtime", &l_in_process, None);
    if let Some(l) = &l_wsfy {
        row("websockify 0.13, own process", l, c_wsfy);
    }
    println!();
    println!("concurrent sessions (each 5 echoes, then held open until all are up)");
    let s_row = |name: &str, r: &SessionsReport| {
        println!(
            "{name:<16} {}/{} served, up in {:.0} ms, proxy held {} fds; proxy PSS {} → {} → {} KiB \
             ({:.1} KiB/session); bench RSS {} → {} → {} KiB ({:.1} KiB/session)",
            r.served,
            r.sessions,
            r.setup.as_secs_f64() * 1e3,
            r.proxy_fds,
            r.proxy_pss[0],
            r.proxy_pss[1],
            r.proxy_pss[2],
            r.per_session_kib(r.proxy_pss),
            r.bench_rss[0],
            r.bench_rss[1],
            r.bench_rss[2],
            r.per_session_kib(r.bench_rss),
        );
    };
    s_row("vmhost", &s_vmhost);
    if let Some(r) = &s_wsfy {
        s_row("websockify 0.13", r);
    }
    println!();
    println!(
        "vmhost / TCP relay (the least a proxy in its own process costs): throughput {}, \
         round trip median {:.2}×",
        Paired::new(&t_vmhost, &t_relay).describe(None),
        percentile(&l_vmhost, 0.5) / percentile(&l_relay, 0.5)
    );
    println!(
        "splice relay / TCP relay (what zero-copy changes): throughput {}, round trip median \
         {:.2}×",
        Paired::new(&t_splice, &t_relay).describe(None),
        percentile(&l_splice, 0.5) / percentile(&l_relay, 0.5)
    );
    let to_direct = Paired::new(&t_vmhost, &t_direct);
    println!(
        "target ≥ 0.8× direct throughput: {} — {}",
        to_direct.describe(Some(0.8)),
        verdict(to_direct.median() >= 0.8)
    );
    if let Some(l_wsfy) = &l_wsfy {
        let to_wsfy = Paired::new(&t_vmhost, &t_wsfy);
        println!(
            "target ≥ 2× websockify's throughput: {} — {}",
            to_wsfy.describe(Some(2.0)),
            verdict(to_wsfy.median() >= 2.0)
        );
        let wsfy_to_direct = Paired::new(&t_wsfy, &t_direct).median();
        println!(
            "  (websockify moved {wsfy_to_direct:.2}× direct's throughput by run: 2× websockify \
             is {:.2}× direct)",
            2.0 * wsfy_to_direct
        );
        let median_ratio = percentile(&l_vmhost, 0.5) / percentile(l_wsfy, 0.5);
        let p99_ratio = percentile(&l_vmhost, 0.99) / percentile(l_wsfy, 0.99);
        println!(
            "target ≤ 0.5× websockify's round trip: median {median_ratio:.2}×, p99 {p99_ratio:.2}× — {}",
            verdict(median_ratio <= 0.5 && p99_ratio <= 0.5)
        );
        let (_, _, p) = summarize(&t_vmhost);
        let (_, _, w) = summarize(&t_wsfy);
        if let (Some(p), Some(w), Some(cp), Some(cw)) = (p, w, c_vmhost, c_wsfy) {
            println!(
                "proxy CPU, vmhost / websockify: {:.2}× per GiB, {:.2}× per round trip",
                p / w,
                cp / cw
            );
        }
    }
    println!(
        "target all {sessions} sessions served: {} — {}",
        s_vmhost.served,
        verdict(s_vmhost.served == sessions)
    );
    Ok(())
}
