//! An in-memory hypervisor: the same contract as libvirt, no processes, no files.
//!
//! Used by component tests and by `backend = "fake"`. Domains boot instantly. Tests can
//! inject failures and simulate what guests and operators do behind vmhost's back (a guest
//! powering off, QEMU crashing, a domain being undefined).
//!
//! Consoles behave like libvirt's: only an active domain has them, a stop (or removal) ends
//! every open session, several VNC viewers may be attached, and a new serial attach replaces
//! the previous one. Each session is one end of a `tokio::io::duplex` pair; a task serves the
//! other end:
//! - VNC: a tiny RFB 3.8 server. It offers security type None, sends a 640x480 32 bpp
//!   ServerInit named `vmhost-fake`, answers every FramebufferUpdateRequest with one 1x1 raw
//!   rectangle, skips the other client messages by their sizes and closes on unknown ones;
//! - serial: a fake guest that echoes every byte and answers a line `echo X` (ended by `\r` or
//!   `\n`) with `X\r\n`.
//!
//! Networks behave like libvirt's as vmhost uses them: `ensure_network` refuses a network of
//! the same name with another bridge or address, starts an inactive one
//! ([`FakeBackend::simulate_network_stop`] makes one, as a host restart does), and fixed
//! leases are keyed by MAC, refused when another MAC holds the address or hostname, and an
//! unknown network is [`BackendError::NoSuchNetwork`]. A domain's NICs are in its
//! [`FakeDomain::spec`] (see [`FakeBackend::snapshot`]); a domain with a NIC on a network that
//! is not running does not start, as libvirt refuses it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{
    BackendError, ConsoleStream, DhcpHost, DomainInfo, DomainOwner, HostInfo, NicAttachment,
    PowerState, PrivateNetworkSpec, StopCause, VmBackend, VmEvent, VmFiles, VmSpec,
};

#[derive(Debug, Clone)]
pub struct FakeDomain {
    pub spec: VmSpec,
    pub state: PowerState,
    /// How often the guest was asked to power off via ACPI.
    pub shutdown_requests: u32,
    /// Why it last stopped, as libvirt would record it.
    pub stop_cause: Option<StopCause>,
}

/// A libvirt network in the fake hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeNetwork {
    pub spec: PrivateNetworkSpec,
    pub active: bool,
    /// Fixed DHCP leases, in the order they were added.
    pub hosts: Vec<DhcpHost>,
}

#[derive(Debug)]
pub struct FakeBackend {
    /// Guarded state; never held across an await.
    domains: Mutex<BTreeMap<String, FakeDomain>>,
    /// Networks by name; never held across an await (nor together with another lock).
    networks: Mutex<BTreeMap<String, FakeNetwork>>,
    /// Console sessions per domain name (entries are kept after the domain goes). Never held
    /// across an await; when both are needed, `domains` is locked first.
    consoles: Mutex<HashMap<String, FakeConsoles>>,
    failures: Mutex<Failures>,
    events: broadcast::Sender<VmEvent>,
    host: HostInfo,
}

#[derive(Debug, Default)]
struct Failures {
    /// `ensure_defined` fails for names containing one of these.
    define: Vec<String>,
    /// `start` fails for names containing one of these.
    start: Vec<String>,
    /// Every call fails as if the hypervisor were unreachable.
    unavailable: bool,
    /// Guests whose names contain one of these ignore the ACPI power button.
    ignore_acpi: Vec<String>,
}

/// The console sessions of one domain.
#[derive(Debug, Default)]
struct FakeConsoles {
    /// Held by every session task of the current boot; cancelled (then replaced) when the
    /// domain stops or goes away, which ends those sessions.
    power: CancellationToken,
    /// The current serial session (a child of `power`); cancelled when a new attach replaces it.
    serial: Option<CancellationToken>,
    /// One clone per live fake RFB server task: open VNC sessions are `strong_count - 1`.
    vnc_live: Arc<()>,
    /// One clone per live fake serial guest task.
    serial_live: Arc<()>,
}

/// Size of each direction's buffer in a fake console's duplex pair.
const CONSOLE_BUFFER: usize = 64 * 1024;
/// The fake desktop's size and name.
const FAKE_SCREEN: (u16, u16) = (640, 480);
const FAKE_DESKTOP: &[u8] = b"vmhost-fake";
/// The fake serial guest forgets a line longer than this.
const MAX_LINE: usize = 4096;

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend::new(HostInfo {
            cpus: 64,
            memory_mib: 256 * 1024,
        })
    }
}

fn unavailable() -> BackendError {
    BackendError::Unavailable {
        err: "fake hypervisor is down".into(),
    }
}

impl FakeBackend {
    pub fn new(host: HostInfo) -> FakeBackend {
        let (events, _) = broadcast::channel(256);
        FakeBackend {
            domains: Mutex::new(BTreeMap::new()),
            networks: Mutex::new(BTreeMap::new()),
            consoles: Mutex::new(HashMap::new()),
            failures: Mutex::new(Failures::default()),
            events,
            host,
        }
    }

    fn domains(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakeDomain>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn consoles(&self) -> std::sync::MutexGuard<'_, HashMap<String, FakeConsoles>> {
        self.consoles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, Failures> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_available(&self) -> Result<(), BackendError> {
        if self.failures().unavailable {
            return Err(unavailable());
        }
        Ok(())
    }

    fn nets(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakeNetwork>> {
        self.networks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every domain with its spec (NICs included) and state.
    pub fn snapshot(&self) -> BTreeMap<String, FakeDomain> {
        self.domains().clone()
    }

    /// Whether `network` is defined and running.
    fn network_is_active(&self, network: &str) -> bool {
        self.nets().get(network).is_some_and(|n| n.active)
    }

    /// Every network by name.
    pub fn networks(&self) -> BTreeMap<String, FakeNetwork> {
        self.nets().clone()
    }

    /// The fixed leases of `network` (empty if there is no such network).
    pub fn dhcp_hosts(&self, network: &str) -> Vec<DhcpHost> {
        self.nets()
            .get(network)
            .map(|n| n.hosts.clone())
            .unwrap_or_default()
    }

    /// The network stops but stays defined, as after a libvirtd or host restart.
    pub fn simulate_network_stop(&self, network: &str) {
        if let Some(n) = self.nets().get_mut(network) {
            n.active = false;
        }
    }

    pub fn fail_define_of(&self, name_part: &str) {
        self.failures().define.push(name_part.to_owned());
    }

    pub fn fail_start_of(&self, name_part: &str) {
        self.failures().start.push(name_part.to_owned());
    }

    /// Guests matching `name_part` ignore ACPI shutdown requests (like a hung OS).
    pub fn ignore_acpi_of(&self, name_part: &str) {
        self.failures().ignore_acpi.push(name_part.to_owned());
    }

    pub fn set_unavailable(&self, unavailable: bool) {
        self.failures().unavailable = unavailable;
    }

    /// Defines a domain vmhost did not create (an operator's, or another agent's).
    pub fn insert_foreign(&self, spec: VmSpec, state: PowerState) {
        self.domains().insert(
            spec.name.clone(),
            FakeDomain {
                spec,
                state,
                shutdown_requests: 0,
                stop_cause: None,
            },
        );
    }

    /// Open VNC sessions of `name` (fake RFB servers still serving a viewer).
    pub fn vnc_sessions(&self, name: &str) -> usize {
        self.consoles()
            .get(name)
            .map_or(0, |c| Arc::strong_count(&c.vnc_live) - 1)
    }

    /// Open serial sessions of `name` (at most one once a replaced session has ended).
    pub fn serial_sessions(&self, name: &str) -> usize {
        self.consoles()
            .get(name)
            .map_or(0, |c| Arc::strong_count(&c.serial_live) - 1)
    }

    /// Ends every console session of `name` (it stopped or went away).
    fn end_consoles(&self, name: &str) {
        if let Some(c) = self.consoles().get_mut(name) {
            c.power.cancel();
            c.power = CancellationToken::new();
            c.serial = None;
        }
    }

    /// Checks that `name` can have consoles, then starts a session task serving one end of a
    /// new duplex pair with `serve` and returns the other end.
    fn open_console<F, Fut>(
        &self,
        name: &str,
        serial: bool,
        serve: F,
    ) -> Result<ConsoleStream, BackendError>
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        self.check_available()?;
        let domains = self.domains();
        let d = domains.get(name).ok_or(BackendError::NoSuchDomain {
            name: name.to_owned(),
        })?;
        // What libvirt calls active: there is a QEMU process.
        let active = matches!(
            d.state,
            PowerState::Running | PowerState::Paused | PowerState::ShuttingDown
        );
        if !active {
            return Err(BackendError::NotRunning {
                name: name.to_owned(),
            });
        }
        let mut consoles = self.consoles();
        let c = consoles.entry(name.to_owned()).or_default();
        let (token, live) = if serial {
            // libvirt's FORCE: the new session replaces the current one.
            let token = c.power.child_token();
            if let Some(old) = c.serial.replace(token.clone()) {
                old.cancel();
            }
            (token, c.serial_live.clone())
        } else {
            (c.power.clone(), c.vnc_live.clone())
        };
        let (caller, ours) = tokio::io::duplex(CONSOLE_BUFFER);
        let session = serve(ours);
        let domain = name.to_owned();
        tokio::spawn(async move {
            let _live = live;
            tokio::select! {
                () = token.cancelled() => {}
                r = session => if let Err(e) = r {
                    tracing::debug!(domain = %domain, error = %e, "fake console session failed");
                },
            }
        });
        Ok(Box::new(caller))
    }

    /// The guest (or QEMU) stops on its own.
    pub fn simulate_stop(&self, name: &str, cause: StopCause) {
        if let Some(d) = self.domains().get_mut(name) {
            d.state = PowerState::ShutOff;
            d.stop_cause = Some(cause);
        }
        self.end_consoles(name);
        let _ = self.events.send(VmEvent::Stopped {
            name: name.to_owned(),
            cause,
        });
    }

    /// The domain disappears without an event (as while vmhost was down).
    pub fn vanish_silently(&self, name: &str) {
        self.domains().remove(name);
        self.end_consoles(name);
    }
}

#[async_trait]
impl VmBackend for FakeBackend {
    async fn ensure_defined(&self, spec: &VmSpec) -> Result<(), BackendError> {
        self.check_available()?;
        if self
            .failures()
            .define
            .iter()
            .any(|p| spec.name.contains(p.as_str()))
        {
            return Err(BackendError::Hypervisor {
                op: "define",
                name: spec.name.clone(),
                err: "injected define failure".into(),
            });
        }
        let mut domains = self.domains();
        if domains
            .get(&spec.name)
            .is_some_and(|d| d.spec.owner() != spec.owner())
        {
            // As the libvirt backend refuses it.
            return Err(BackendError::Hypervisor {
                op: "define",
                name: spec.name.clone(),
                err: "a domain with this name exists and is not this VM".into(),
            });
        }
        domains
            .entry(spec.name.clone())
            .or_insert_with(|| FakeDomain {
                spec: spec.clone(),
                state: PowerState::ShutOff,
                shutdown_requests: 0,
                stop_cause: None,
            });
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), BackendError> {
        self.check_available()?;
        if self
            .failures()
            .start
            .iter()
            .any(|p| name.contains(p.as_str()))
        {
            return Err(BackendError::Hypervisor {
                op: "start",
                name: name.to_owned(),
                err: "injected start failure".into(),
            });
        }
        let networks: Vec<String> = {
            let domains = self.domains();
            let d = domains.get(name).ok_or(BackendError::NoSuchDomain {
                name: name.to_owned(),
            })?;
            d.spec
                .nics
                .iter()
                .filter_map(|nic| match &nic.attachment {
                    NicAttachment::Network(network) => Some(network.clone()),
                    NicAttachment::Bridge(_) => None,
                })
                .collect()
        };
        if let Some(down) = networks.iter().find(|n| !self.network_is_active(n)) {
            // As libvirt refuses: "Requested operation is not valid: network 'x' is not active".
            return Err(BackendError::Hypervisor {
                op: "start",
                name: name.to_owned(),
                err: format!("network '{down}' is not active").into(),
            });
        }
        let mut domains = self.domains();
        let d = domains.get_mut(name).ok_or(BackendError::NoSuchDomain {
            name: name.to_owned(),
        })?;
        if d.state != PowerState::Running {
            d.state = PowerState::Running;
            let _ = self.events.send(VmEvent::Started {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Guests honour the power button at once (unless told to ignore it).
    async fn shutdown(&self, name: &str) -> Result<(), BackendError> {
        self.check_available()?;
        let ignores = self
            .failures()
            .ignore_acpi
            .iter()
            .any(|p| name.contains(p.as_str()));
        let mut domains = self.domains();
        let d = domains.get_mut(name).ok_or(BackendError::NoSuchDomain {
            name: name.to_owned(),
        })?;
        d.shutdown_requests += 1;
        if !ignores && d.state == PowerState::Running {
            d.state = PowerState::ShutOff;
            self.end_consoles(name);
            let _ = self.events.send(VmEvent::Stopped {
                name: name.to_owned(),
                cause: StopCause::GuestShutdown,
            });
        }
        Ok(())
    }

    async fn destroy(&self, name: &str) -> Result<(), BackendError> {
        self.check_available()?;
        let mut domains = self.domains();
        if let Some(d) = domains.get_mut(name) {
            if d.state != PowerState::ShutOff {
                d.state = PowerState::ShutOff;
                self.end_consoles(name);
                let _ = self.events.send(VmEvent::Stopped {
                    name: name.to_owned(),
                    cause: StopCause::Destroyed,
                });
            }
        }
        Ok(())
    }

    async fn remove(
        &self,
        name: &str,
        owner: &DomainOwner,
        _files: &VmFiles,
    ) -> Result<(), BackendError> {
        self.check_available()?;
        let mut domains = self.domains();
        if domains.get(name).is_some_and(|d| d.spec.owner() != *owner) {
            return Ok(());
        }
        let removed = domains.remove(name).is_some();
        drop(domains);
        if removed {
            self.end_consoles(name);
            let _ = self.events.send(VmEvent::Undefined {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    async fn state(&self, name: &str) -> Result<Option<PowerState>, BackendError> {
        self.check_available()?;
        Ok(self.domains().get(name).map(|d| d.state))
    }

    async fn stop_cause(&self, name: &str) -> Result<Option<StopCause>, BackendError> {
        self.check_available()?;
        let domains = self.domains();
        let stopped = domains.get(name).filter(|d| d.state == PowerState::ShutOff);
        Ok(stopped.map(|d| d.stop_cause.unwrap_or(StopCause::Other)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<DomainInfo>, BackendError> {
        self.check_available()?;
        Ok(self
            .domains()
            .values()
            .filter(|d| d.spec.name.starts_with(prefix))
            .map(|d| DomainInfo {
                name: d.spec.name.clone(),
                owner: (!d.spec.agent_id.is_empty()).then(|| DomainOwner {
                    agent_id: d.spec.agent_id.clone(),
                    job_id: d.spec.job_id.clone(),
                    rank: d.spec.rank,
                }),
                state: d.state,
            })
            .collect())
    }

    async fn host_info(&self) -> Result<HostInfo, BackendError> {
        self.check_available()?;
        Ok(self.host)
    }

    async fn open_vnc(&self, name: &str) -> Result<ConsoleStream, BackendError> {
        self.open_console(name, false, serve_rfb)
    }

    async fn open_serial(&self, name: &str) -> Result<ConsoleStream, BackendError> {
        self.open_console(name, true, serve_serial)
    }

    async fn ensure_network(&self, spec: &PrivateNetworkSpec) -> Result<(), BackendError> {
        self.check_available()?;
        let network_error = |err: String| BackendError::Network {
            op: "ensure_network",
            name: spec.name.clone(),
            err: err.into(),
        };
        if let Some(p) = spec.problem() {
            return Err(network_error(p));
        }
        let mut nets = self.nets();
        let bridge_taken = nets
            .values()
            .any(|n| n.spec.name != spec.name && n.spec.bridge == spec.bridge);
        let n = match nets.get_mut(&spec.name) {
            Some(n) => n,
            // libvirt refuses a second network on the same bridge.
            None if bridge_taken => {
                return Err(network_error(format!(
                    "bridge {} is used by another network",
                    spec.bridge
                )))
            }
            None => nets.entry(spec.name.clone()).or_insert(FakeNetwork {
                spec: spec.clone(),
                active: false,
                hosts: Vec::new(),
            }),
        };
        let have = &n.spec;
        let mut problems = Vec::new();
        if have.bridge != spec.bridge {
            problems.push(format!("bridge is {}, want {}", have.bridge, spec.bridge));
        }
        if (have.gateway, have.prefix_len) != (spec.gateway, spec.prefix_len) {
            problems.push(format!(
                "IPv4 address is {}/{}, want {}/{}",
                have.gateway, have.prefix_len, spec.gateway, spec.prefix_len
            ));
        }
        if !problems.is_empty() {
            return Err(BackendError::NetworkMismatch {
                name: spec.name.clone(),
                detail: problems.join("; "),
            });
        }
        n.active = true;
        Ok(())
    }

    async fn put_dhcp_host(&self, network: &str, host: &DhcpHost) -> Result<(), BackendError> {
        self.check_available()?;
        let mut nets = self.nets();
        let n = nets.get_mut(network).ok_or(BackendError::NoSuchNetwork {
            name: network.to_owned(),
        })?;
        let others = n.hosts.iter().filter(|h| !h.has_mac(&host.mac));
        let conflict = others.into_iter().find_map(|h| {
            if h.address == host.address {
                Some(format!("address {} is leased to {}", host.address, h.mac))
            } else if h.hostname.eq_ignore_ascii_case(&host.hostname) {
                Some(format!("hostname {} is leased to {}", host.hostname, h.mac))
            } else {
                None
            }
        });
        if let Some(p) = n.spec.host_problem(host).or(conflict) {
            return Err(BackendError::Network {
                op: "put_dhcp_host",
                name: network.to_owned(),
                err: p.into(),
            });
        }
        // Stored with a lowercase MAC, as the libvirt backend writes it.
        let host = DhcpHost {
            mac: host.mac.to_ascii_lowercase(),
            ..host.clone()
        };
        match n.hosts.iter_mut().find(|h| h.has_mac(&host.mac)) {
            Some(h) => *h = host,
            None => n.hosts.push(host),
        }
        Ok(())
    }

    async fn remove_dhcp_host(&self, network: &str, mac: &str) -> Result<(), BackendError> {
        self.check_available()?;
        let mut nets = self.nets();
        let n = nets.get_mut(network).ok_or(BackendError::NoSuchNetwork {
            name: network.to_owned(),
        })?;
        n.hosts.retain(|h| !h.has_mac(mac));
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }
}

/// The fake RFB 3.8 server (see the module docs). Ends at the viewer's EOF.
async fn serve_rfb(mut io: DuplexStream) -> std::io::Result<()> {
    io.write_all(b"RFB 003.008\n").await?;
    let mut version = [0u8; 12];
    io.read_exact(&mut version).await?;
    // One security type: None.
    io.write_all(&[1, 1]).await?;
    if io.read_u8().await? != 1 {
        let reason = b"only security type None is offered";
        io.write_u32(1).await?;
        io.write_u32(reason.len().try_into().unwrap_or(u32::MAX))
            .await?;
        return io.write_all(reason).await;
    }
    io.write_u32(0).await?;
    let _shared = io.read_u8().await?;
    io.write_all(&server_init()).await?;
    loop {
        let message = match io.read_u8().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        match message {
            // SetPixelFormat: 3 padding bytes and a 16-byte pixel format.
            0 => skip(&mut io, 19).await?,
            // SetEncodings: padding, a u16 count, then an i32 per encoding.
            2 => {
                skip(&mut io, 1).await?;
                let count = io.read_u16().await?;
                skip(&mut io, 4 * u64::from(count)).await?;
            }
            // FramebufferUpdateRequest: incremental flag and x, y, width, height.
            3 => {
                skip(&mut io, 9).await?;
                io.write_all(&FRAMEBUFFER_UPDATE).await?;
            }
            // KeyEvent: down flag, 2 padding bytes, u32 keysym.
            4 => skip(&mut io, 7).await?,
            // PointerEvent: button mask, x, y.
            5 => skip(&mut io, 5).await?,
            // ClientCutText: 3 padding bytes, u32 length, text.
            6 => {
                skip(&mut io, 3).await?;
                let len = io.read_u32().await?;
                skip(&mut io, u64::from(len)).await?;
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown RFB client message {other}"),
                ))
            }
        }
    }
}

/// ServerInit: size, a 32 bpp true-colour little-endian pixel format, the desktop name.
fn server_init() -> Vec<u8> {
    let (width, height) = FAKE_SCREEN;
    let mut m = Vec::with_capacity(24 + FAKE_DESKTOP.len());
    m.extend_from_slice(&width.to_be_bytes());
    m.extend_from_slice(&height.to_be_bytes());
    // bpp, depth, big-endian, true colour, red/green/blue max, red/green/blue shift, padding.
    m.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    let name_len = u32::try_from(FAKE_DESKTOP.len()).expect("a short constant");
    m.extend_from_slice(&name_len.to_be_bytes());
    m.extend_from_slice(FAKE_DESKTOP);
    m
}

/// FramebufferUpdate with one raw 1x1 rectangle at (0, 0): type, padding, count 1, x, y,
/// width, height, encoding 0 (raw), then one 32-bit pixel.
const FRAMEBUFFER_UPDATE: [u8; 20] = [
    0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0x20, 0x40, 0x80, 0,
];

/// Reads and drops exactly `n` bytes.
async fn skip(io: &mut (impl AsyncRead + Unpin), n: u64) -> std::io::Result<()> {
    let skipped = tokio::io::copy(&mut io.take(n), &mut tokio::io::sink()).await?;
    if skipped < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The fake serial guest (see the module docs). Ends at the caller's EOF.
async fn serve_serial(mut io: DuplexStream) -> std::io::Result<()> {
    let mut line = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = io.read(&mut buf).await?;
        let Some(input) = buf.get(..n).filter(|b| !b.is_empty()) else {
            return Ok(());
        };
        io.write_all(input).await?;
        for &b in input {
            if b == b'\r' || b == b'\n' {
                if let Some(text) = line.strip_prefix(b"echo ".as_slice()) {
                    let mut reply = text.to_vec();
                    reply.extend_from_slice(b"\r\n");
                    io.write_all(&reply).await?;
                }
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::backend::{Accel, BootMode};

    const WITHIN: Duration = Duration::from_secs(5);

    fn spec(name: &str) -> VmSpec {
        let dir = PathBuf::from("/nonexistent/vmhost-fake");
        VmSpec {
            name: name.to_owned(),
            job_id: "job".to_owned(),
            rank: 0,
            agent_id: "agent".to_owned(),
            vcpus: 1,
            memory_mib: 256,
            accel: Accel::Tcg,
            boot: BootMode::Disk,
            base_image: dir.join("base.qcow2"),
            base_format: "qcow2".to_owned(),
            overlay: dir.join("disk.qcow2"),
            disk_gib: 1,
            seed_path: dir.join("seed.img"),
            seed_image: None,
            console_log: dir.join("console.log"),
            nics: Vec::new(),
        }
    }

    async fn running(name: &str) -> FakeBackend {
        let fake = FakeBackend::default();
        fake.ensure_defined(&spec(name)).await.expect("define");
        fake.start(name).await.expect("start");
        fake
    }

    #[track_caller]
    fn console_error(r: Result<ConsoleStream, BackendError>) -> BackendError {
        match r {
            Ok(_) => panic!("a console was opened"),
            Err(e) => e,
        }
    }

    /// Polls `count` until it returns `want`.
    async fn wait_count(count: impl Fn() -> usize, want: usize) {
        let wait = async {
            while count() != want {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(WITHIN, wait)
            .await
            .unwrap_or_else(|_| panic!("session count stayed {}, want {want}", count()));
    }

    /// Reads until EOF and returns what came.
    async fn read_to_end(io: &mut ConsoleStream) -> Vec<u8> {
        let mut rest = Vec::new();
        tokio::time::timeout(WITHIN, io.read_to_end(&mut rest))
            .await
            .expect("stream ends")
            .expect("read");
        rest
    }

    /// Reads exactly `n` bytes.
    async fn read_n(io: &mut ConsoleStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(WITHIN, io.read_exact(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        buf
    }

    fn net_spec(name: &str, bridge: &str) -> PrivateNetworkSpec {
        PrivateNetworkSpec {
            name: name.to_owned(),
            bridge: bridge.to_owned(),
            gateway: std::net::Ipv4Addr::new(10, 250, 7, 1),
            prefix_len: 24,
        }
    }

    fn lease(mac: &str, last: u8, name: &str) -> DhcpHost {
        DhcpHost {
            mac: mac.to_owned(),
            address: std::net::Ipv4Addr::new(10, 250, 7, last),
            hostname: name.to_owned(),
        }
    }

    #[tokio::test]
    async fn fake_network_is_ensured_once_and_refuses_another_config() {
        let fake = FakeBackend::default();
        let spec = net_spec("priv", "vmhost0");
        fake.ensure_network(&spec).await.expect("create");
        fake.ensure_network(&spec).await.expect("idempotent");
        let nets = fake.networks();
        assert_eq!(nets.len(), 1);
        assert!(nets["priv"].active);
        assert_eq!(nets["priv"].spec, spec);

        fake.simulate_network_stop("priv");
        assert!(!fake.networks()["priv"].active);
        fake.ensure_network(&spec).await.expect("starts it again");
        assert!(fake.networks()["priv"].active);

        let mut other = spec.clone();
        other.bridge = "vmhost1".to_owned();
        other.prefix_len = 16;
        let e = fake.ensure_network(&other).await.expect_err("mismatch");
        assert!(
            matches!(&e, BackendError::NetworkMismatch { name, detail }
                if name == "priv" && detail.contains("vmhost1") && detail.contains("/16")),
            "{e:?}"
        );
        assert_eq!(fake.networks()["priv"].spec, spec, "never changed");

        let e = fake
            .ensure_network(&net_spec("second", "vmhost0"))
            .await
            .expect_err("bridge in use");
        assert!(matches!(e, BackendError::Network { .. }), "{e:?}");
        let mut bad = spec.clone();
        bad.bridge = "sixteen-bytes-xx".to_owned();
        let e = fake.ensure_network(&bad).await.expect_err("invalid");
        assert!(matches!(e, BackendError::Network { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn fake_leases_are_keyed_by_mac() {
        let fake = FakeBackend::default();
        let a = lease("52:54:00:fa:00:10", 10, "job-a");
        let e = fake
            .put_dhcp_host("priv", &a)
            .await
            .expect_err("no network");
        assert!(
            matches!(&e, BackendError::NoSuchNetwork { name } if name == "priv"),
            "{e:?}"
        );
        let e = fake
            .remove_dhcp_host("priv", &a.mac)
            .await
            .expect_err("no network");
        assert!(matches!(e, BackendError::NoSuchNetwork { .. }), "{e:?}");

        fake.ensure_network(&net_spec("priv", "vmhost0"))
            .await
            .expect("network");
        fake.put_dhcp_host("priv", &a).await.expect("add");
        fake.put_dhcp_host("priv", &a).await.expect("idempotent");
        let b = lease("52:54:00:fa:00:11", 11, "job-b");
        fake.put_dhcp_host("priv", &b).await.expect("add b");
        assert_eq!(fake.dhcp_hosts("priv"), [a.clone(), b.clone()]);

        // Replacing by MAC (any case) keeps one entry.
        let a2 = lease("52:54:00:FA:00:10", 20, "job-a2");
        fake.put_dhcp_host("priv", &a2).await.expect("replace");
        let a2 = lease("52:54:00:fa:00:10", 20, "job-a2");
        assert_eq!(fake.dhcp_hosts("priv"), [a2.clone(), b.clone()]);

        for (h, needle) in [
            (
                lease("52:54:00:fa:00:12", 11, "job-c"),
                "address 10.250.7.11",
            ),
            (lease("52:54:00:fa:00:12", 12, "job-b"), "hostname job-b"),
            (
                lease("52:54:00:fa:00:12", 1, "job-c"),
                "not a guest address",
            ),
            (lease("52:54:00:fa:00:12", 12, "a b"), "hostname"),
        ] {
            let e = fake.put_dhcp_host("priv", &h).await.expect_err("refused");
            let text = format!("{:?}", e);
            assert!(text.contains(needle), "{h:?}: {text}");
        }
        assert_eq!(fake.dhcp_hosts("priv"), [a2.clone(), b.clone()]);

        fake.remove_dhcp_host("priv", "52:54:00:fa:00:10")
            .await
            .expect("remove");
        fake.remove_dhcp_host("priv", "52:54:00:fa:00:10")
            .await
            .expect("remove is idempotent");
        assert_eq!(fake.dhcp_hosts("priv"), [b]);
    }

    #[tokio::test]
    async fn fake_snapshot_shows_the_nics_of_defined_domains() {
        use crate::backend::{NicAttachment, NicSpec};
        let fake = FakeBackend::default();
        let mut s = spec("vm");
        let nic = NicSpec {
            attachment: NicAttachment::Network("priv".to_owned()),
            mac: "52:54:00:fa:00:10".to_owned(),
            tap: "vh0123456789n0".to_owned(),
        };
        s.nics = vec![nic.clone()];
        fake.ensure_defined(&s).await.expect("define");
        assert_eq!(fake.snapshot()["vm"].spec.nics, [nic]);
    }

    #[tokio::test]
    async fn fake_domain_on_a_stopped_network_does_not_start() {
        use crate::backend::{NicAttachment, NicSpec};
        let fake = FakeBackend::default();
        let mut s = spec("vm");
        s.nics = vec![NicSpec {
            attachment: NicAttachment::Network("priv".to_owned()),
            mac: "52:54:00:fa:00:10".to_owned(),
            tap: "vh0123456789n0".to_owned(),
        }];
        fake.ensure_defined(&s).await.expect("define");
        let never_defined = fake.start("vm").await.expect_err("no such network yet");
        assert!(
            never_defined.to_string().contains("start"),
            "{never_defined}"
        );
        fake.ensure_network(&net_spec("priv", "vmhost0"))
            .await
            .expect("network");
        fake.simulate_network_stop("priv");
        fake.start("vm").await.expect_err("the network is stopped");
        assert_eq!(fake.snapshot()["vm"].state, PowerState::ShutOff);
        fake.ensure_network(&net_spec("priv", "vmhost0"))
            .await
            .expect("started again");
        fake.start("vm").await.expect("the network runs");
        assert_eq!(fake.snapshot()["vm"].state, PowerState::Running);
    }

    #[tokio::test]
    async fn fake_vnc_speaks_rfb_3_8_with_security_none() {
        let fake = running("vm").await;
        let mut io = fake.open_vnc("vm").await.expect("open_vnc");
        assert_eq!(read_n(&mut io, 12).await, b"RFB 003.008\n");
        io.write_all(b"RFB 003.008\n").await.expect("version");
        assert_eq!(read_n(&mut io, 2).await, [1, 1], "one type: None");
        io.write_u8(1).await.expect("choose None");
        assert_eq!(read_n(&mut io, 4).await, [0, 0, 0, 0], "SecurityResult OK");
        io.write_u8(1).await.expect("ClientInit shared");

        let init = read_n(&mut io, 24 + FAKE_DESKTOP.len()).await;
        assert_eq!(init[..4], [0x02, 0x80, 0x01, 0xe0], "640x480");
        assert_eq!(init[4], 32, "bits per pixel");
        assert_eq!(init[20..24], [0, 0, 0, 11]);
        assert_eq!(&init[24..], b"vmhost-fake");

        // Messages the server must skip by their sizes, then an update request.
        let mut messages = vec![0u8, 0, 0, 0];
        messages.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        messages.extend_from_slice(&[2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21]);
        messages.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 0x0d]);
        messages.extend_from_slice(&[5, 0, 0, 10, 0, 20]);
        messages.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 3]);
        messages.extend_from_slice(b"abc");
        messages.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0xe0]);
        io.write_all(&messages).await.expect("client messages");
        let update = read_n(&mut io, 20).await;
        assert_eq!(
            update[..4],
            [0, 0, 0, 1],
            "FramebufferUpdate, one rectangle"
        );
        assert_eq!(update[4..12], [0, 0, 0, 0, 0, 1, 0, 1], "1x1 at 0,0");
        assert_eq!(update[12..16], [0, 0, 0, 0], "raw encoding");

        // An incremental request is answered the same way.
        io.write_all(&[3, 1, 0, 0, 0, 0, 0, 1, 0, 1])
            .await
            .expect("request");
        assert_eq!(read_n(&mut io, 20).await, update);

        assert_eq!(fake.vnc_sessions("vm"), 1);
        let second = fake.open_vnc("vm").await.expect("a second viewer");
        assert_eq!(fake.vnc_sessions("vm"), 2, "viewers share the display");
        drop(io);
        drop(second);
        wait_count(|| fake.vnc_sessions("vm"), 0).await;
    }

    #[tokio::test]
    async fn fake_vnc_closes_on_an_unknown_message() {
        let fake = running("vm").await;
        let mut io = fake.open_vnc("vm").await.expect("open_vnc");
        read_n(&mut io, 12).await;
        io.write_all(b"RFB 003.008\n").await.expect("version");
        read_n(&mut io, 2).await;
        io.write_all(&[1, 1, 99])
            .await
            .expect("None, ClientInit, junk");
        let rest = read_to_end(&mut io).await;
        assert_eq!(
            rest.len(),
            4 + 24 + FAKE_DESKTOP.len(),
            "result and ServerInit"
        );
        wait_count(|| fake.vnc_sessions("vm"), 0).await;
    }

    #[tokio::test]
    async fn fake_serial_echoes_and_a_new_attach_replaces_the_old() {
        let fake = running("vm").await;
        let mut first = fake.open_serial("vm").await.expect("open_serial");
        first.write_all(b"echo 42-ok\r").await.expect("type");
        let want = b"echo 42-ok\r42-ok\r\n";
        assert_eq!(read_n(&mut first, want.len()).await, want);
        assert_eq!(fake.serial_sessions("vm"), 1);

        let mut second = fake.open_serial("vm").await.expect("second attach");
        assert!(
            read_to_end(&mut first).await.is_empty(),
            "first session ended"
        );
        second.write_all(b"ls\necho hi\n").await.expect("type");
        let want = b"ls\necho hi\nhi\r\n";
        assert_eq!(read_n(&mut second, want.len()).await, want);
        wait_count(|| fake.serial_sessions("vm"), 1).await;
        drop(second);
        wait_count(|| fake.serial_sessions("vm"), 0).await;
    }

    #[tokio::test]
    async fn consoles_need_a_running_domain_and_end_when_it_stops() {
        let fake = running("vm").await;
        let e = console_error(fake.open_vnc("absent").await);
        assert!(matches!(e, BackendError::NoSuchDomain { .. }), "{e:?}");

        let mut vnc = fake.open_vnc("vm").await.expect("open_vnc");
        let mut serial = fake.open_serial("vm").await.expect("open_serial");
        fake.destroy("vm").await.expect("destroy");
        read_to_end(&mut vnc).await;
        assert!(read_to_end(&mut serial).await.is_empty());
        wait_count(|| fake.vnc_sessions("vm") + fake.serial_sessions("vm"), 0).await;
        for r in [fake.open_vnc("vm").await, fake.open_serial("vm").await] {
            let e = console_error(r);
            assert!(
                matches!(&e, BackendError::NotRunning { name } if name == "vm"),
                "{e:?}"
            );
        }

        // A new boot has consoles again; the guest powering off ends them too.
        fake.start("vm").await.expect("start");
        let mut serial = fake.open_serial("vm").await.expect("open_serial");
        fake.simulate_stop("vm", StopCause::GuestShutdown);
        assert!(read_to_end(&mut serial).await.is_empty());
    }
}
