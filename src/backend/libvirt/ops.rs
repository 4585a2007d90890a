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
use virt::network::Network;
use virt::sys;

use super::domain_xml;
use super::network_xml::{self, NetworkInfo};
use crate::backend::{
    DhcpHost, DomainInfo, DomainOwner, PowerState, PrivateNetworkSpec, StopCause,
};

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

/// What [`remove`] found under a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    Absent,
    Removed,
    /// A domain stamped for someone else (or not stamped): left as it was.
    NotOurs,
}

/// Destroys (if running) and undefines `name` if its metadata names `owner`.
pub(super) fn remove(c: &Connect, name: &str, owner: &DomainOwner) -> Result<Removal, VirtError> {
    let Some(d) = lookup(c, name)? else {
        return Ok(Removal::Absent);
    };
    if domain_xml::parse_owner(&d.xml_desc(0)?).as_ref() != Some(owner) {
        return Ok(Removal::NotOurs);
    }
    destroy_if_active(&d)?;
    undefine(c, name)?;
    Ok(Removal::Removed)
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

// ---- the private network ----

/// What [`ensure_network`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NetworkEnsured {
    /// Defined, set to autostart and started by this call.
    Created,
    /// It existed inactive (after a libvirtd or host restart) and was started.
    Started,
    /// It already ran.
    Running,
    /// A network of that name is not this one; nothing was changed.
    Mismatch(String),
}

pub(super) fn lookup_network(c: &Connect, name: &str) -> Result<Option<Network>, VirtError> {
    match c.lookup_network_by_name(name) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.code().is(ErrorNumber::NoNetwork) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The views of a network an update must keep in step: the running definition (if active)
/// and the persistent one (if persistent), each with its `virNetworkUpdate` flag and parsed
/// XML. The test driver refuses `VIR_NETWORK_XML_INACTIVE`; it keeps one definition, so the
/// live XML stands for both there.
fn network_views(n: &Network) -> Result<Vec<(u32, NetworkInfo)>, VirtError> {
    let mut views = Vec::with_capacity(2);
    let live = if n.is_active()? {
        let xml = n.xml_desc(0)?;
        views.push((
            sys::VIR_NETWORK_UPDATE_AFFECT_LIVE,
            network_xml::parse(&xml),
        ));
        Some(xml)
    } else {
        None
    };
    if n.is_persistent()? {
        let xml = match n.xml_desc(sys::VIR_NETWORK_XML_INACTIVE) {
            Err(e) if is_unsupported_flags(&e) => match live {
                Some(xml) => xml,
                None => n.xml_desc(0)?,
            },
            r => r?,
        };
        views.push((
            sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG,
            network_xml::parse(&xml),
        ));
    }
    Ok(views)
}

/// Makes `spec`'s network exist persistently, autostarted and running (see
/// `VmBackend::ensure_network`). A network this call defined but could not start is undefined
/// again, so a corrected spec is not refused as a mismatch with a broken leftover.
pub(super) fn ensure_network(
    c: &Connect,
    spec: &PrivateNetworkSpec,
) -> Result<NetworkEnsured, VirtError> {
    let Some(n) = lookup_network(c, &spec.name)? else {
        let n = c.define_network_xml(&network_xml::render(spec))?;
        let started = n.set_autostart(true).and_then(|()| n.create());
        if let Err(e) = started {
            if let Err(undo) = n.undefine() {
                tracing::warn!(network = %spec.name, error = %undo, "cannot undefine the network after a failed start");
            }
            return Err(e);
        }
        return Ok(NetworkEnsured::Created);
    };
    for (_, info) in network_views(&n)? {
        if let Some(m) = network_xml::mismatch(spec, &info) {
            return Ok(NetworkEnsured::Mismatch(m));
        }
    }
    if n.is_persistent()? {
        if !n.autostart()? {
            n.set_autostart(true)?;
        }
    } else {
        tracing::warn!(network = %spec.name, "the network is transient; it will not survive a libvirtd restart");
    }
    if n.is_active()? {
        return Ok(NetworkEnsured::Running);
    }
    match n.create() {
        Ok(()) => Ok(NetworkEnsured::Started),
        // Someone else started it in between.
        Err(e) if e.code().is(ErrorNumber::OperationInvalid) && n.is_active()? => {
            Ok(NetworkEnsured::Running)
        }
        Err(e) => Err(e),
    }
}

/// What [`put_dhcp_host`] / [`remove_dhcp_host`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LeaseChange {
    /// Every view already was as asked.
    Unchanged,
    Changed,
    /// Refused without changing anything (the reason).
    Refused(String),
}

/// Adds `host` or replaces the entry of its MAC, in the running network and its persistent
/// definition. Each view is handled on its own (one can lack an entry the other has, after an
/// interrupted update); views needing the same command share one call.
pub(super) fn put_dhcp_host(
    c: &Connect,
    network: &str,
    host: &DhcpHost,
) -> Result<LeaseChange, VirtError> {
    let n = c.lookup_network_by_name(network)?;
    let xml = network_xml::render_host(host);
    let mut changes = Vec::new();
    for (flag, info) in network_views(&n)? {
        if let Some(p) = lease_problem(network, &info, host) {
            return Ok(LeaseChange::Refused(p));
        }
        let cmd = match info.host(&host.mac) {
            Some(e) if e.is(host) => continue,
            // MODIFY finds the entry with this MAC, address or name; `conflict` made sure
            // only ours has any of them.
            Some(_) => sys::VIR_NETWORK_UPDATE_COMMAND_MODIFY,
            None => sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        };
        changes.push((flag, cmd, xml.clone()));
    }
    apply_dhcp_changes(&n, changes)
}

/// Why `host` cannot be a lease of the network `info` describes, if it cannot.
fn lease_problem(network: &str, info: &NetworkInfo, host: &DhcpHost) -> Option<String> {
    let Some((gateway, Some(prefix_len))) = info.ipv4.first().copied() else {
        return Some("the network has no usable IPv4 address".to_owned());
    };
    let spec = PrivateNetworkSpec {
        name: network.to_owned(),
        bridge: info.bridge.clone().unwrap_or_default(),
        gateway,
        prefix_len,
    };
    spec.host_problem(host).or_else(|| info.conflict(host))
}

/// Removes the entry of `mac` from every view that has it.
pub(super) fn remove_dhcp_host(
    c: &Connect,
    network: &str,
    mac: &str,
) -> Result<LeaseChange, VirtError> {
    let n = c.lookup_network_by_name(network)?;
    let mut changes = Vec::new();
    for (flag, info) in network_views(&n)? {
        if let Some(entry) = info.host(mac) {
            let xml = network_xml::render_entry(entry);
            changes.push((flag, sys::VIR_NETWORK_UPDATE_COMMAND_DELETE, xml));
        }
    }
    apply_dhcp_changes(&n, changes)
}

/// Runs the `(flag, command, xml)` updates, merging the flags of identical ones.
///
/// A merged update that fails is retried one view at a time, where a DELETE that finds
/// nothing is done and an ADD that finds the entry becomes a MODIFY: a view can differ from
/// what was read (the test driver shows no persistent XML, and after a network was stopped
/// its persistent definition there lacks leases added while it was down), and `virNetworkUpdate`
/// changes nothing when it fails.
fn apply_dhcp_changes(
    n: &Network,
    changes: Vec<(
        sys::virNetworkUpdateFlags,
        sys::virNetworkUpdateCommand,
        String,
    )>,
) -> Result<LeaseChange, VirtError> {
    if changes.is_empty() {
        return Ok(LeaseChange::Unchanged);
    }
    let mut merged: Vec<(sys::virNetworkUpdateFlags, _, String)> = Vec::new();
    for (flag, cmd, xml) in changes {
        match merged.iter_mut().find(|(_, c, x)| *c == cmd && *x == xml) {
            Some(m) => m.0 |= flag,
            None => merged.push((flag, cmd, xml)),
        }
    }
    let section = sys::VIR_NETWORK_SECTION_IP_DHCP_HOST;
    for (flags, cmd, xml) in merged {
        let err = match n.update(cmd, section, -1, &xml, flags) {
            Ok(()) => continue,
            Err(e) if flags.count_ones() > 1 && e.code().is(ErrorNumber::OperationInvalid) => e,
            Err(e) => return Err(e),
        };
        tracing::debug!(error = %err, "network views differ; updating them one by one");
        for flag in [
            sys::VIR_NETWORK_UPDATE_AFFECT_LIVE,
            sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG,
        ] {
            if flags & flag == 0 {
                continue;
            }
            match n.update(cmd, section, -1, &xml, flag) {
                Err(e) if e.code().is(ErrorNumber::OperationInvalid) => match cmd {
                    sys::VIR_NETWORK_UPDATE_COMMAND_DELETE => {}
                    sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST => n.update(
                        sys::VIR_NETWORK_UPDATE_COMMAND_MODIFY,
                        section,
                        -1,
                        &xml,
                        flag,
                    )?,
                    _ => return Err(e),
                },
                r => r?,
            }
        }
    }
    Ok(LeaseChange::Changed)
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
