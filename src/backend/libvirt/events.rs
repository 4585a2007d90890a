//! libvirt's event loop and the raw callbacks that virt 0.5.0 does not wrap.
//!
//! - [`init_event_loop`] registers libvirt's default event implementation (once per process,
//!   before any connection is opened, as libvirt requires) and starts the `libvirt-events`
//!   thread that runs it forever. All callbacks below run on that thread; they never block.
//! - [`Registrations::register`] hooks a connection up: domain lifecycle and reboot events are
//!   forwarded into a `broadcast::Sender<VmEvent>`, and the close callback clears an `alive`
//!   flag so the backend reconnects on its next call. Dropping a [`Registrations`] deregisters
//!   everything (on a short-lived thread, as deregistration is an RPC).
//!
//! Besides `console::socket_from_fd`, this is the only code of the crate allowed to use `unsafe`.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::sys;

use crate::backend::{StopCause, VmEvent};

/// Starts libvirt's default event loop once per process. Must run before `Connect::open`.
/// The error is the text of the first failure; the process cannot get events without a restart.
pub(super) fn init_event_loop() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // Otherwise libvirt prints every error (including expected ones) to stderr.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl()
            .map_err(|e| format!("cannot register the libvirt event loop: {e}"))?;
        std::thread::Builder::new()
            .name("libvirt-events".to_owned())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::error!(error = %e, "libvirt event loop iteration failed");
                    // A dedicated thread, not an async worker: back off instead of spinning.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .map_err(|e| format!("cannot spawn the libvirt event thread: {e}"))?;
        Ok(())
    })
    .clone()
}

/// Maps a lifecycle `(event, detail)` pair to a [`VmEvent`]; `None` for events vmhost ignores
/// (defined, suspended, resumed, shutting down, PM suspend, crashed-but-kept).
pub(super) fn map_lifecycle(event: c_int, detail: c_int, name: String) -> Option<VmEvent> {
    let event = u32::try_from(event).ok()?;
    let detail = u32::try_from(detail).ok()?;
    match event {
        sys::VIR_DOMAIN_EVENT_STARTED => Some(VmEvent::Started { name }),
        sys::VIR_DOMAIN_EVENT_STOPPED => {
            let cause = match detail {
                sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => StopCause::GuestShutdown,
                sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => StopCause::Destroyed,
                sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => StopCause::Crashed,
                // FAILED, MIGRATED, SAVED, FROM_SNAPSHOT and anything newer.
                _ => StopCause::Other,
            };
            Some(VmEvent::Stopped { name, cause })
        }
        sys::VIR_DOMAIN_EVENT_UNDEFINED => Some(VmEvent::Undefined { name }),
        // SHUTDOWN/{FINISHED,GUEST,HOST} announce a power-off in progress; STOPPED follows.
        // CRASHED is followed by STOPPED/CRASHED because vmhost domains use on_crash=destroy.
        _ => None,
    }
}

/// Copies the name out of a domain pointer that is only valid during a callback.
///
/// # Safety
/// `dom` must be a valid `virDomainPtr` (libvirt guarantees this inside event callbacks).
unsafe fn domain_name(dom: sys::virDomainPtr) -> Option<String> {
    // SAFETY: per the contract above `dom` is valid; virDomainGetName returns a pointer owned by
    // `dom` (or NULL), and we copy it before returning.
    let p = unsafe { sys::virDomainGetName(dom) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL, NUL-terminated, alive as long as `dom`.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Sends `ev` to every subscriber; with no subscribers the event is simply dropped.
///
/// # Safety
/// `opaque` must be the pointer made from `Box<broadcast::Sender<VmEvent>>` in `register`.
unsafe fn forward(opaque: *mut c_void, ev: VmEvent) {
    tracing::debug!(domain = ev.name(), event = ?ev, "libvirt domain event");
    // SAFETY: per the contract, `opaque` points to a live Sender that libvirt frees only through
    // `free_sender`, after the last callback.
    let tx = unsafe { &*(opaque as *const broadcast::Sender<VmEvent>) };
    let _ = tx.send(ev);
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: libvirt passes a domain valid for the duration of the callback.
        let Some(name) = (unsafe { domain_name(dom) }) else {
            return;
        };
        if let Some(ev) = map_lifecycle(event, detail, name) {
            // SAFETY: `opaque` is the Sender box registered with this callback.
            unsafe { forward(opaque, ev) };
        }
    });
    0
}

unsafe extern "C" fn reboot_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: libvirt passes a domain valid for the duration of the callback.
        if let Some(name) = unsafe { domain_name(dom) } {
            // SAFETY: `opaque` is the Sender box registered with this callback.
            unsafe { forward(opaque, VmEvent::Rebooted { name }) };
        }
    });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: `opaque` came from Box::into_raw in `register_domain_event`, and libvirt calls the
    // free callback exactly once, after the last event callback.
    drop(unsafe { Box::from_raw(opaque.cast::<broadcast::Sender<VmEvent>>()) });
}

unsafe extern "C" fn close_cb(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` came from Arc::into_raw in `register` and stays valid until `free_alive`.
    let alive = unsafe { &*(opaque as *const AtomicBool) };
    alive.store(false, Ordering::SeqCst);
    tracing::warn!(
        reason,
        "libvirt connection closed; will reconnect on the next call"
    );
}

unsafe extern "C" fn free_alive(opaque: *mut c_void) {
    // SAFETY: `opaque` came from Arc::into_raw in `register`; libvirt frees it exactly once.
    drop(unsafe { Arc::from_raw(opaque as *const AtomicBool) });
}

/// Event and close callbacks registered on one connection; dropping it deregisters them.
#[derive(Debug)]
pub(super) struct Registrations {
    conn: Connect,
    callback_ids: Vec<c_int>,
    close_registered: bool,
}

impl Registrations {
    /// Registers lifecycle and reboot events (forwarded into `tx`) and the close callback
    /// (clears `alive`). Blocking: call from a blocking thread.
    pub(super) fn register(
        conn: &Connect,
        tx: &broadcast::Sender<VmEvent>,
        alive: &Arc<AtomicBool>,
    ) -> Result<Self, virt::error::Error> {
        let mut regs = Registrations {
            conn: conn.clone(),
            callback_ids: Vec::new(),
            close_registered: false,
        };
        // SAFETY: the real signature of a LIFECYCLE callback is the one of `lifecycle_cb`; the
        // API takes it as the generic type and libvirt casts it back by event ID, exactly as the
        // C macro VIR_DOMAIN_EVENT_CALLBACK does.
        let lifecycle: sys::virConnectDomainEventGenericCallback = Some(unsafe {
            std::mem::transmute::<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    c_int,
                    c_int,
                    *mut c_void,
                ) -> c_int,
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
            >(lifecycle_cb)
        });
        let id = regs.register_domain_event(sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, tx)?;
        regs.callback_ids.push(id);
        let id =
            regs.register_domain_event(sys::VIR_DOMAIN_EVENT_ID_REBOOT, Some(reboot_cb), tx)?;
        regs.callback_ids.push(id);

        let opaque = Arc::into_raw(alive.clone()) as *mut c_void;
        // SAFETY: the connection is valid (we hold a reference). On success libvirt owns
        // `opaque` and releases it exactly once through `free_alive`; on failure it does not
        // keep it and we release it below.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                regs.conn.as_ptr(),
                Some(close_cb),
                opaque,
                Some(free_alive),
            )
        };
        if rc < 0 {
            let err = virt::error::Error::last_error();
            // SAFETY: registration failed, so libvirt did not keep `opaque`; reclaim it once.
            unsafe { free_alive(opaque) };
            // Drivers without close notification (test:///) still work; broken RPCs are also
            // detected from call errors.
            tracing::debug!(error = %err, "close callback not available on this connection");
        } else {
            regs.close_registered = true;
        }
        Ok(regs)
    }

    fn register_domain_event(
        &self,
        event_id: sys::virDomainEventID,
        cb: sys::virConnectDomainEventGenericCallback,
        tx: &broadcast::Sender<VmEvent>,
    ) -> Result<c_int, virt::error::Error> {
        let opaque = Box::into_raw(Box::new(tx.clone())).cast::<c_void>();
        let event_id = c_int::try_from(event_id).expect("libvirt event IDs are small");
        // SAFETY: the connection is valid; a NULL domain means "all domains"; `cb` matches
        // `event_id`; libvirt owns `opaque` on success and frees it with `free_sender`.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                self.conn.as_ptr(),
                std::ptr::null_mut(),
                event_id,
                cb,
                opaque,
                Some(free_sender),
            )
        };
        if id < 0 {
            let err = virt::error::Error::last_error();
            // SAFETY: registration failed, so libvirt did not keep `opaque`; reclaim it once.
            unsafe { free_sender(opaque) };
            return Err(err);
        }
        Ok(id)
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        let conn = self.conn.clone();
        let ids = std::mem::take(&mut self.callback_ids);
        let close = self.close_registered;
        // Deregistering is an RPC on remote connections and Drop may run on an async worker.
        // The registrations hold references on the connection, so without this it never closes.
        let spawned = std::thread::Builder::new()
            .name("libvirt-deregister".to_owned())
            .spawn(move || {
                for id in ids {
                    // SAFETY: `id` was returned by virConnectDomainEventRegisterAny on `conn`.
                    let _ = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
                }
                if close {
                    // SAFETY: `close_cb` was registered on `conn`; libvirt then calls free_alive.
                    let _ = unsafe {
                        sys::virConnectUnregisterCloseCallback(conn.as_ptr(), Some(close_cb))
                    };
                }
                drop(conn);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot deregister libvirt callbacks; connection leaks");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: u32, detail: u32) -> Option<VmEvent> {
        let e = c_int::try_from(event).expect("small");
        let d = c_int::try_from(detail).expect("small");
        map_lifecycle(e, d, "d".to_owned())
    }

    fn stopped(cause: StopCause) -> Option<VmEvent> {
        Some(VmEvent::Stopped {
            name: "d".to_owned(),
            cause,
        })
    }

    #[test]
    fn lifecycle_pairs_map_to_vm_events() {
        use sys::*;
        let started = Some(VmEvent::Started {
            name: "d".to_owned(),
        });
        assert_eq!(
            ev(VIR_DOMAIN_EVENT_STARTED, VIR_DOMAIN_EVENT_STARTED_BOOTED),
            started
        );
        assert_eq!(
            ev(VIR_DOMAIN_EVENT_STARTED, VIR_DOMAIN_EVENT_STARTED_RESTORED),
            started
        );
        let (s, sd) = (VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN);
        assert_eq!(ev(s, sd), stopped(StopCause::GuestShutdown));
        let d = VIR_DOMAIN_EVENT_STOPPED_DESTROYED;
        assert_eq!(ev(s, d), stopped(StopCause::Destroyed));
        let c = VIR_DOMAIN_EVENT_STOPPED_CRASHED;
        assert_eq!(ev(s, c), stopped(StopCause::Crashed));
        let f = VIR_DOMAIN_EVENT_STOPPED_FAILED;
        assert_eq!(ev(s, f), stopped(StopCause::Other));
        assert_eq!(
            ev(VIR_DOMAIN_EVENT_UNDEFINED, 0),
            Some(VmEvent::Undefined {
                name: "d".to_owned()
            })
        );
        assert_eq!(ev(VIR_DOMAIN_EVENT_DEFINED, 0), None);
        assert_eq!(
            ev(
                VIR_DOMAIN_EVENT_SHUTDOWN,
                VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED
            ),
            None
        );
        assert_eq!(ev(VIR_DOMAIN_EVENT_SUSPENDED, 0), None);
        assert_eq!(map_lifecycle(-1, 0, "d".to_owned()), None);
    }
}
