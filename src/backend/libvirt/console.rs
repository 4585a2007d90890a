//! Console streams of a libvirt domain: its VNC display and its serial port.
//!
//! VNC ([`open_graphics`]):
//! - `virDomainOpenGraphicsFD` with `SKIPAUTH` makes libvirt create a socketpair, hand one end
//!   to QEMU (QMP `add_client`) and return the other. QEMU listens on no TCP port; the caller
//!   has authenticated the user, so the VNC password is skipped (security type None).
//! - The descriptor is owned (closed on drop) inside the same blocking closure that received
//!   it, so a caller that gives up while the call runs leaks nothing.
//! - Several viewers may be attached at once: QEMU's VNC server is shared by default (a client
//!   whose ClientInit says `shared = 0` disconnects the others, as RFB specifies).
//! - Only local UNIX connections to libvirtd support it; `test:///` does not (`NoSupport`).
//!
//! Serial ([`open_console`] then [`bridge_serial`]):
//! - `virDomainOpenConsole(dom, NULL, stream, FORCE)` attaches a libvirt [`Stream`] to the
//!   domain's first console (ttyS0). **Multi-attach policy: the newest session wins.** FORCE
//!   makes libvirt end an existing session of the same console (its reader sees the stream end)
//!   instead of refusing the new one. So there is at most one serial session per domain.
//! - The stream is used in *blocking* mode and bridged to async code through a
//!   `tokio::io::duplex` pair whose other end is the returned [`ConsoleStream`]:
//!
//!   ```text
//!   caller ⇄ duplex ⇄ pump task ──in (mpsc)──▶ `vmhost-con-tx` thread: stream.send
//!                               ◀─out (mpsc)── `vmhost-con-rx` thread: stream.recv
//!   ```
//!
//!   The two threads are dedicated OS threads, not blocking-pool tasks, and they hold no call
//!   permit: a session lives as long as the viewer, and must not starve the other calls.
//! - Shutdown, whichever side ends first:
//!   - the caller drops (or shuts down) its end: the pump task sees EOF on the duplex and ends,
//!     dropping the input sender; the tx thread's `blocking_recv` returns `None`, it aborts the
//!     stream, which makes the rx thread's blocked `recv` fail at once ("stream is closed",
//!     checked on libvirt 9.0), and the rx thread ends;
//!   - the guest side ends (domain stopped, a FORCE attach replaced this session, libvirtd
//!     gone): `recv` returns 0 or an error, the rx thread ends and drops the output sender; the
//!     pump task sees that, shuts its duplex end down (the caller reads EOF) and ends, and the
//!     tx thread ends as in the first case (with `finish` instead of `abort` after a clean EOF);
//!   - the caller gives up while the attach itself runs (or bridging fails): the unused stream
//!     is aborted by [`Attached`], on a short-lived thread of its own, never on an async
//!     worker.
//!
//!   Once bridged, the tx thread is the only one that ends the libvirt stream, exactly once.
//! - Alternative not taken: a non-blocking stream driven by event-loop callbacks needs no
//!   threads, but its callbacks run on the shared `libvirt-events` thread and need unsafe glue
//!   (virt 0.5.0's `event_add_callback` keeps a raw pointer to the `Stream`, which must then
//!   never move). Two threads per session, and at most one session per domain, are simpler.
//!
//! This file holds the crate's second and last piece of `unsafe`: [`socket_from_fd`].

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::stream::Stream;
use virt::sys;

use crate::backend::ConsoleStream;

/// Bytes read from or written to the libvirt stream at a time.
const CHUNK: usize = 16 * 1024;
/// Buffer of the duplex pair between the pump task and the caller.
const DUPLEX_BUFFER: usize = 64 * 1024;
/// Chunks queued between a bridge thread and the pump task (backpressure beyond that).
const QUEUE: usize = 16;

/// What opening a console found.
#[derive(Debug)]
pub(super) enum Opened<T> {
    Open(T),
    /// The domain exists but is not running (no QEMU process to attach to).
    NotRunning,
    /// The connection's driver cannot open this console (`test:///`).
    Unsupported,
}

/// Opens the VNC display of `name` without VNC authentication. Blocking.
pub(super) fn open_graphics(c: &Connect, name: &str) -> Result<Opened<UnixStream>, VirtError> {
    let d = c.lookup_domain_by_name(name)?;
    let opened = attach(&d, || {
        d.open_graphics_fd(0, sys::VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH)
    })?;
    Ok(match opened {
        Opened::Open(fd) => Opened::Open(socket_from_fd(fd)),
        Opened::NotRunning => Opened::NotRunning,
        Opened::Unsupported => Opened::Unsupported,
    })
}

/// Attaches a new blocking stream to the first console of `name`, replacing any existing
/// session (FORCE). Blocking.
pub(super) fn open_console(c: &Connect, name: &str) -> Result<Opened<Attached>, VirtError> {
    let d = c.lookup_domain_by_name(name)?;
    attach(&d, || {
        let stream = Stream::new(c, 0)?;
        d.open_console(None, &stream, sys::VIR_DOMAIN_CONSOLE_FORCE)?;
        Ok(Attached(Some(stream)))
    })
}

/// A console stream not yet handed to [`bridge_serial`]. Dropped unused (the caller gave up
/// while [`open_console`] ran, or bridging failed), it aborts the stream so libvirtd does not
/// keep the session open.
pub(super) struct Attached(Option<Stream>);

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            // Aborting is a round trip to libvirtd, and this may run on an async worker: tokio
            // drops a finished blocking call's result where the abandoned future was polled.
            let abort = move || {
                if let Err(e) = stream.abort() {
                    tracing::debug!(error = %e, "cannot abort an unused console stream");
                }
            };
            let _ = std::thread::Builder::new()
                .name("vmhost-con-abort".to_owned())
                .spawn(abort);
        }
    }
}

/// Runs `open` on a running domain, telling "not running" and "not supported" apart from other
/// failures (also when the domain stops between the check and the call).
fn attach<T>(
    d: &Domain,
    open: impl FnOnce() -> Result<T, VirtError>,
) -> Result<Opened<T>, VirtError> {
    if !d.is_active()? {
        return Ok(Opened::NotRunning);
    }
    match open() {
        Ok(v) => Ok(Opened::Open(v)),
        Err(e) if e.code().is(ErrorNumber::NoSupport) => Ok(Opened::Unsupported),
        Err(e) if e.code().is(ErrorNumber::OperationInvalid) && !d.is_active()? => {
            Ok(Opened::NotRunning)
        }
        Err(e) => Err(e),
    }
}

/// Takes ownership of the socket `virDomainOpenGraphicsFD` returned.
#[allow(unsafe_code)]
fn socket_from_fd(fd: u32) -> UnixStream {
    // virt casts libvirt's non-negative `int` to u32, so this never fails.
    let fd = RawFd::try_from(fd).expect("libvirt returns a non-negative int descriptor");
    // SAFETY: libvirt just created this descriptor (one end of a socketpair) for us and keeps
    // no reference to it; nothing else in the process knows it, so it is open and owned by
    // exactly this `OwnedFd`, which closes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    UnixStream::from(owned)
}

/// Bridges a blocking console `stream` of domain `name` to async I/O (see the module docs).
/// Must be called inside a tokio runtime.
pub(super) fn bridge_serial(name: &str, mut attached: Attached) -> std::io::Result<ConsoleStream> {
    let stream = attached
        .0
        .clone()
        .expect("an Attached holds its stream until bridged");
    let (caller, ours) = tokio::io::duplex(DUPLEX_BUFFER);
    // Sent to by the pump task (guest input), received by the tx thread; closed when the pump
    // task ends, which tells the tx thread to end the stream.
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    // Sent to by the rx thread (guest output), received by the pump task; closed when the rx
    // thread ends (guest side gone), which ends the pump task.
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    // Set by the rx thread on a clean end of stream, so the tx thread finishes, not aborts.
    let eof = Arc::new(AtomicBool::new(false));

    // The tx thread first: if the rx thread cannot start, dropping `in_tx` ends the tx thread
    // and the stream with it.
    let (tx_stream, tx_eof, domain) = (stream.clone(), eof.clone(), name.to_owned());
    // Until the tx thread runs, `attached` still aborts the stream if this returns early.
    std::thread::Builder::new()
        .name("vmhost-con-tx".to_owned())
        .spawn(move || send_input(&domain, tx_stream, in_rx, &tx_eof))?;
    attached.0 = None;
    let domain = name.to_owned();
    std::thread::Builder::new()
        .name("vmhost-con-rx".to_owned())
        .spawn(move || recv_output(&domain, &stream, &out_tx, &eof))?;
    tokio::spawn(pump(ours, out_rx, in_tx));
    Ok(Box::new(caller))
}

/// The rx thread: guest output from the stream into `out` until either ends.
fn recv_output(name: &str, stream: &Stream, out: &mpsc::Sender<Vec<u8>>, eof: &AtomicBool) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.recv(&mut buf) {
            Ok(0) => {
                tracing::debug!(domain = %name, "serial console stream ended");
                eof.store(true, Ordering::SeqCst);
                return;
            }
            Ok(n) => {
                let Some(bytes) = usize::try_from(n).ok().and_then(|n| buf.get(..n)) else {
                    return;
                };
                if out.blocking_send(bytes.to_vec()).is_err() {
                    return;
                }
            }
            Err(e) => {
                // Also the normal way out after the tx thread aborted the stream.
                tracing::debug!(domain = %name, error = %e, "serial console stream closed");
                return;
            }
        }
    }
}

/// The tx thread: guest input from `input` into the stream; then ends the stream.
fn send_input(name: &str, stream: Stream, mut input: mpsc::Receiver<Vec<u8>>, eof: &AtomicBool) {
    'session: while let Some(bytes) = input.blocking_recv() {
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let sent = stream.send(rest).map(|n| usize::try_from(n).unwrap_or(0));
            match sent {
                Ok(n) if n > 0 => rest = rest.get(n..).unwrap_or_default(),
                Ok(_) => break 'session,
                Err(e) => {
                    tracing::debug!(domain = %name, error = %e, "cannot write to the serial console");
                    break 'session;
                }
            }
        }
    }
    // Dropping `input` here makes the pump task's next send fail if it is still running.
    drop(input);
    let ended = if eof.load(Ordering::SeqCst) {
        stream.finish()
    } else {
        stream.abort()
    };
    if let Err(e) = ended {
        // Expected when the guest side ended first (the stream is gone already).
        tracing::trace!(domain = %name, error = %e, "ending the serial console stream");
    }
    tracing::debug!(domain = %name, "serial console session ended");
}

/// The pump task: moves bytes between the duplex end and the two threads until one side ends.
async fn pump(io: DuplexStream, mut out: mpsc::Receiver<Vec<u8>>, input: mpsc::Sender<Vec<u8>>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Both futures are cancel-safe; the writes happen in the arms, outside the select.
        tokio::select! {
            chunk = out.recv() => match chunk {
                Some(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            n = rd.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    let Some(bytes) = buf.get(..n) else { break };
                    if input.send(bytes.to_vec()).await.is_err() {
                        break;
                    }
                }
                // EOF or the caller dropped its end.
                _ => break,
            },
        }
    }
    let _ = wr.shutdown().await;
}
