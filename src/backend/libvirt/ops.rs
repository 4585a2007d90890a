//! Blocking libvirt operations, one function per backend step.
//!
//! Each function runs whole inside one `spawn_blocking` closure (see `Inner::call`), so the
//! libvirt calls and the reads of libvirt's thread-local error happen on the same thread. They
//! absorb the benign races of a shared hypervisor ("already running", "not running", "vanished"
//! between lookup and action) and the flags some drivers refuse.

use virt::connect::Connect;
use virt::domain::{Domain, DomainShutoffReason, DomainState, DomainStateReason};
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::sys;

use super::domain_xml;
use crate::backend::{DomainInfo, PowerState, StopCause};

/// The connection itself failed (daemon gone, broken RPC): the caller should reconnect.
pub(super) fn is_connection_error(e: &VirtError) -> bool {
    matches!(
        e.code(),
        Enum::Known(ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc)
    ) || matches!(
        e.domain(),
        Enum::Known(ErrorDomain::Rpc | ErrorDomain::Remote)
    )
}

/// The driver refused a flag value (test:/// says "unsupported flags"); retry with fewer.
fn is_unsupported_flags(e: &VirtError) -> bool {
    matches!(
        e.code(),
        Enum::Known(
            ErrorNumber::InvalidArg | ErrorNumber::NoSupport | ErrorNumber::ArgumentUnsupported
        )
    )
}

pub(super) fn lookup(c: &Connect, name: &str) -> Result<Option<Domain>, VirtError> {
    match c.lookup_domain_by_name(name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Boots `name`; `true` if this call started it, `false` if it was already running.
pub(super) fn start(c: &Connect, name: &str) -> Result<bool, VirtError> {
    let d = c.lookup_domain_by_name(name)?;
    if d.is_active()? {
        return Ok(false);
    }
    match d.create() {
        Ok(()) => Ok(true),
        Err(e) if e.code().is(ErrorNumber::OperationInvalid) && d.is_active()? => Ok(false),
        Err(e) => Err(e),
    }
}

/// Presses the ACPI power button (plain shutdown where the driver refuses the flag);
/// `true` if a request was sent, `false` if the domain was not running.
pub(super) fn shutdown(c: &Connect, name: &str) -> Result<bool, VirtError> {
    let d = c.lookup_domain_by_name(name)?;
    if !d.is_active()? {
        return Ok(false);
    }
    let r = match d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
        Err(e) if is_unsupported_flags(&e) => d.shutdown(),
        r => r,
    };
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.code().is(ErrorNumber::OperationInvalid) && !d.is_active()? => Ok(false),
        Err(e) => Err(e),
    }
}

/// Hard power-off; `true` if this call stopped the domain, `false` if absent or not running.
pub(super) fn destroy(c: &Connect, name: &str) -> Result<bool, VirtError> {
    match lookup(c, name)? {
        Some(d) => destroy_if_active(&d),
        None => Ok(false),
    }
}

fn destroy_if_active(d: &Domain) -> Result<bool, VirtError> {
    if !d.is_active()? {
        return Ok(false);
    }
    match d.destroy() {
        Ok(()) => Ok(true),
        Err(e) if e.code().is(ErrorNumber::OperationInvalid) && !d.is_active()? => Ok(false),
        Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Destroys (if running) and undefines `name`; `true` if the domain existed.
pub(super) fn remove(c: &Connect, name: &str) -> Result<bool, VirtError> {
    let Some(d) = lookup(c, name)? else {
        return Ok(false);
    };
    destroy_if_active(&d)?;
    undefine(c, name)?;
    Ok(true)
}

/// Undefines `name` with managed-save, snapshot metadata and NVRAM, dropping the flags the
/// driver refuses (test:/// refuses NVRAM). A missing domain is success.
pub(super) fn undefine(c: &Connect, name: &str) -> Result<(), VirtError> {
    // Look up again: a transient domain is gone after destroy.
    let Some(d) = lookup(c, name)? else {
        return Ok(());
    };
    if !d.is_persistent()? {
        return destroy_if_active(&d).map(drop);
    }
    let base = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    let result = match d.undefine_flags(base | sys::VIR_DOMAIN_UNDEFINE_NVRAM) {
        Err(e) if is_unsupported_flags(&e) => match d.undefine_flags(base) {
            Err(e) if is_unsupported_flags(&e) => d.undefine(),
            r => r,
        },
        r => r,
    };
    match result {
        Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(()),
        r => r,
    }
}

/// Power state of `name`, `None` if there is no such domain.
pub(super) fn state(c: &Connect, name: &str) -> Result<Option<PowerState>, VirtError> {
    // `Domain::state()` in virt 0.5.0 ignores errors; `info()` reports them.
    match lookup(c, name)? {
        Some(d) => Ok(Some(power_state(d.info()?.state))),
        None => Ok(None),
    }
}

/// libvirt's recorded reason for a shut-off domain.
pub(super) fn stop_cause(c: &Connect, name: &str) -> Result<Option<StopCause>, VirtError> {
    let Some(d) = lookup(c, name)? else {
        return Ok(None);
    };
    // `state()` swallows errors (virt 0.5.0), so ask `info()` first: it reports them.
    if power_state(d.info()?.state) != PowerState::ShutOff {
        return Ok(None);
    }
    let (_, reason) = d.state()?;
    Ok(Some(match reason {
        Enum::Known(DomainStateReason::Shutoff(Enum::Known(r))) => match r {
            DomainShutoffReason::Shutdown => StopCause::GuestShutdown,
            DomainShutoffReason::Destroyed => StopCause::Destroyed,
            DomainShutoffReason::Crashed | DomainShutoffReason::Failed => StopCause::Crashed,
            _ => StopCause::Other,
        },
        _ => StopCause::Other,
    }))
}

/// Active and inactive domains whose name starts with `prefix`, sorted by name.
pub(super) fn list(c: &Connect, prefix: &str) -> Result<Vec<DomainInfo>, VirtError> {
    let mut out = Vec::new();
    for d in c.list_all_domains(0)? {
        let name = d.name()?;
        if !name.starts_with(prefix) {
            continue;
        }
        // A domain undefined since the listing is simply skipped.
        let details = d.xml_desc(0).and_then(|x| Ok((x, d.info()?.state)));
        let (xml, state) = match details {
            Err(e) if e.code().is(ErrorNumber::NoDomain) => continue,
            r => r?,
        };
        let owner = domain_xml::parse_owner(&xml);
        out.push(DomainInfo {
            name,
            owner,
            state: power_state(state),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn power_state(state: Enum<DomainState, sys::virDomainState>) -> PowerState {
    match state {
        // NOSTATE is reported for an active domain whose state libvirt cannot tell.
        Enum::Known(DomainState::Running | DomainState::Blocked | DomainState::NoState) => {
            PowerState::Running
        }
        Enum::Known(DomainState::Paused | DomainState::PMSuspended) => PowerState::Paused,
        Enum::Known(DomainState::Shutdown) => PowerState::ShuttingDown,
        Enum::Known(DomainState::Shutoff) => PowerState::ShutOff,
        Enum::Known(DomainState::Crashed) => PowerState::Crashed,
        // A state newer than the bindings: treat as running so nothing assumes it stopped.
        Enum::Unknown(_) => PowerState::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_states_map_conservatively() {
        let known = |s| power_state(Enum::Known(s));
        assert_eq!(known(DomainState::Running), PowerState::Running);
        assert_eq!(known(DomainState::Blocked), PowerState::Running);
        assert_eq!(known(DomainState::Paused), PowerState::Paused);
        assert_eq!(known(DomainState::Shutdown), PowerState::ShuttingDown);
        assert_eq!(known(DomainState::Shutoff), PowerState::ShutOff);
        assert_eq!(known(DomainState::Crashed), PowerState::Crashed);
        assert_eq!(power_state(Enum::Unknown(99)), PowerState::Running);
    }
}
