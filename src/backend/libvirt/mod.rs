//! [`LibvirtBackend`]: the [`VmBackend`] on a libvirt daemon (or libvirt's in-process `test:///`
//! driver), through the `virt` crate.
//!
//! Concurrency:
//! - every `virt` call is a blocking FFI call (an RPC to libvirtd for `qemu:///system`). Each one
//!   runs in `tokio::task::spawn_blocking`, at most [`MAX_CONCURRENT_CALLS`] at a time (a
//!   semaphore), with the call and the read of libvirt's thread-local error in the same closure;
//! - `ensure_defined` runs as its own task, so a caller that gives up (timeout, dropped future)
//!   does not interrupt it between creating files and cleaning them up after a failure.
//!
//! Connection and events:
//! - [`LibvirtBackend::connect`] starts libvirt's default event loop (once per process, before
//!   the first `Connect::open`, on the `libvirt-events` thread), opens the connection, sets a
//!   keepalive (5 s × 3) and registers lifecycle, reboot and close callbacks (`events.rs`);
//! - when the connection dies (close callback with libvirtd gone, or a call failing with an RPC
//!   error), the current call returns [`BackendError::Unavailable`] and the next call reconnects
//!   and registers the callbacks again. **Events that happen while the connection is down are
//!   lost**, and a lagging subscriber loses events too: consumers must poll
//!   [`VmBackend::state`] / [`VmBackend::list`] (after a reconnect in particular).
//!
//! Consoles (`console.rs`): the VNC display is a socket from `virDomainOpenGraphicsFD`; the
//! serial port is a libvirt stream attached with FORCE (the newest session replaces an older
//! one) and bridged to async I/O by two dedicated threads per session.
//!
//! The private network (`network_xml.rs` renders and parses it, `ops.rs` applies it): network
//! calls map libvirt's "no network" to [`BackendError::NoSuchNetwork`] and other failures to
//! [`BackendError::Network`]; this process's network changes are serialised (each reads the
//! XML, decides, then updates). Fixed leases are kept in step in the running network and its
//! persistent definition, each checked on its own.
//!
//! Driver differences handled here: `test:///` refuses `shutdown_flags(ACPI_POWER_BTN)` and
//! `undefine_flags(NVRAM)` ("unsupported flags"), so both fall back to flags the driver accepts;
//! it has no consoles, so `open_vnc`/`open_serial` return [`BackendError::NotSupported`]; it
//! refuses `VIR_NETWORK_XML_INACTIVE`, so its live network XML stands for the persistent one.

mod console;
mod disk;
pub mod domain_xml;
mod events;
pub mod network_xml;
mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::{broadcast, Semaphore};
use virt::connect::Connect;
use virt::error::{Error as VirtError, ErrorNumber};

use crate::backend::{
    BackendError, BootMode, ConsoleStream, DhcpHost, DomainInfo, DomainOwner, HostInfo, PowerState,
    PrivateNetworkSpec, StopCause, VmBackend, VmEvent, VmFiles, VmSpec,
};

/// Maximum number of libvirt calls in flight (each holds a blocking-pool thread).
pub const MAX_CONCURRENT_CALLS: usize = 8;
/// Capacity of the event broadcast channel; slower subscribers see `Lagged`.
const EVENT_CAPACITY: usize = 1024;
/// virtlogd keeps this many rotated copies (`console.log.0` …) of a log; `remove` deletes them.
const ROTATED_LOGS: usize = 3;

/// A [`VmBackend`] on libvirt. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct LibvirtBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    uri: String,
    /// Sent to by the event callbacks on the `libvirt-events` thread (one clone per registered
    /// callback); received by [`VmBackend::subscribe`] callers. Never closed while `Inner` lives.
    events: broadcast::Sender<VmEvent>,
    /// Caps concurrent blocking libvirt calls; never closed.
    calls: Arc<Semaphore>,
    /// The current connection; `None` or a dead link means "reconnect on the next call".
    /// A std mutex: held only to clone or swap the `Arc`, never across an `.await`.
    link: Mutex<Option<Arc<Link>>>,
    /// Serialises reconnect attempts so concurrent callers open one connection, not many.
    reconnect: tokio::sync::Mutex<()>,
    /// One lock per domain name with an `ensure_defined` in flight, so two calls for the same
    /// VM do not interleave their file steps (and one's rollback cannot delete the other's
    /// files). Entries are removed by the last holder. A std mutex: never held across `.await`.
    defining: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises this process's network changes: each one reads the network XML, decides,
    /// then updates, and two puts of one MAC must not both decide to add it.
    networks: tokio::sync::Mutex<()>,
}

/// One open connection with its callbacks.
#[derive(Debug)]
struct Link {
    conn: Connect,
    /// Cleared by the close callback (or by a call failing with a connection error).
    alive: Arc<AtomicBool>,
    /// Deregisters the callbacks when the link is dropped.
    _callbacks: events::Registrations,
}

impl Link {
    /// Opens `uri` and registers the callbacks. Blocking.
    fn open(uri: &str, events: &broadcast::Sender<VmEvent>) -> Result<Link, BackendError> {
        events::init_event_loop().map_err(|e| BackendError::Unavailable { err: e.into() })?;
        let conn =
            Connect::open(Some(uri)).map_err(|e| BackendError::Unavailable { err: e.into() })?;
        if let Err(e) = conn.set_keep_alive(5, 3) {
            tracing::debug!(error = %e, "keepalive not supported on this connection");
        }
        let alive = Arc::new(AtomicBool::new(true));
        let callbacks = events::Registrations::register(&conn, events, &alive)
            .map_err(|e| BackendError::Unavailable { err: e.into() })?;
        tracing::info!(uri, "connected to libvirt");
        Ok(Link {
            conn,
            alive,
            _callbacks: callbacks,
        })
    }
}

/// The version of the libvirt library vmhost runs with, such as `9.0.0` (for logs).
pub fn libvirt_version() -> Result<String, BackendError> {
    let v = Connect::version().map_err(|e| BackendError::Unavailable { err: e.into() })?;
    Ok(format!(
        "{}.{}.{}",
        v / 1_000_000,
        (v / 1000) % 1000,
        v % 1000
    ))
}

impl LibvirtBackend {
    /// Connects to `uri` (`qemu:///system`, or `test:///path/node.xml` in tests).
    pub async fn connect(uri: &str) -> Result<Self, BackendError> {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let inner = Arc::new(Inner {
            uri: uri.to_owned(),
            events,
            calls: Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS)),
            link: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(()),
            defining: Mutex::new(HashMap::new()),
            networks: tokio::sync::Mutex::new(()),
        });
        inner.link().await?;
        Ok(LibvirtBackend { inner })
    }

    /// The URI this backend connects to.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Link>> {
        let guard = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        guard
            .as_ref()
            .filter(|l| l.alive.load(Ordering::SeqCst))
            .cloned()
    }

    /// The live connection, reconnecting first if there is none.
    async fn link(&self) -> Result<Arc<Link>, BackendError> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let _one_at_a_time = self.reconnect.lock().await;
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let (uri, events) = (self.uri.clone(), self.events.clone());
        let link = Arc::new(self.blocking(move || Link::open(&uri, &events)).await?);
        let old = self
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(link.clone());
        if old.is_some() {
            tracing::warn!(uri = %self.uri, "reconnected to libvirt; events in between were lost");
        }
        Ok(link)
    }

    /// Runs `f` on the blocking pool under the call semaphore.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<R, BackendError> + Send + 'static,
    ) -> Result<R, BackendError> {
        let permit = self.calls.clone().acquire_owned().await;
        let permit = permit.expect("the call semaphore is never closed");
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        });
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(BackendError::Unavailable { err: e.into() }),
        }
    }

    /// Runs one libvirt operation `op` on domain `name` and maps its error.
    async fn call<R: Send + 'static>(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(&Connect) -> Result<R, VirtError> + Send + 'static,
    ) -> Result<R, BackendError> {
        self.call_mapped(op, name, map_error, f).await
    }

    /// Runs one libvirt operation `op` on network `name` and maps its error.
    async fn call_net<R: Send + 'static>(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(&Connect) -> Result<R, VirtError> + Send + 'static,
    ) -> Result<R, BackendError> {
        self.call_mapped(op, name, map_network_error, f).await
    }

    async fn call_mapped<R: Send + 'static>(
        &self,
        op: &'static str,
        name: &str,
        map: fn(&'static str, String, &Link, VirtError) -> BackendError,
        f: impl FnOnce(&Connect) -> Result<R, VirtError> + Send + 'static,
    ) -> Result<R, BackendError> {
        let link = self.link().await?;
        let name = name.to_owned();
        self.blocking(move || f(&link.conn).map_err(|e| map(op, name, &link, e)))
            .await
    }

    async fn ensure_defined(&self, spec: &VmSpec) -> Result<(), BackendError> {
        validate(spec)?;
        let lock = {
            let mut map = self.defining.lock().unwrap_or_else(PoisonError::into_inner);
            map.entry(spec.name.clone()).or_default().clone()
        };
        let result = {
            let _same_name = lock.lock().await;
            self.ensure_defined_locked(spec).await
        };
        let mut map = self.defining.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's reference and ours: nobody else is waiting.
        if Arc::strong_count(&lock) == 2 {
            map.remove(&spec.name);
        }
        result
    }

    async fn ensure_defined_locked(&self, spec: &VmSpec) -> Result<(), BackendError> {
        if self.existing_domain_is_complete(spec).await? {
            return Ok(());
        }
        if !self.uri.starts_with("test:") {
            warn_untraversable(spec);
        }
        let mut created = Created::default();
        let result = self.create_all(spec, &mut created).await;
        if let Err(e) = &result {
            tracing::warn!(
                domain = %spec.name,
                error = %error_chain(e),
                "define failed; removing what it created"
            );
            created.roll_back().await;
        }
        result
    }

    /// `true` if the domain exists with its files. A domain of this VM that is defined but
    /// lost its files (a crash between steps) is undefined here so it can be created again.
    async fn existing_domain_is_complete(&self, spec: &VmSpec) -> Result<bool, BackendError> {
        let n = spec.name.clone();
        let found = self
            .call("look up", &spec.name, move |c| {
                let Some(d) = ops::lookup(c, &n)? else {
                    return Ok(None);
                };
                Ok(Some((d.xml_desc(0)?, d.is_active()?)))
            })
            .await?;
        let Some((xml, active)) = found else {
            return Ok(false);
        };
        let want = DomainOwner {
            agent_id: spec.agent_id.clone(),
            job_id: spec.job_id.clone(),
            rank: spec.rank,
        };
        if domain_xml::parse_owner(&xml).as_ref() != Some(&want) {
            return Err(BackendError::Hypervisor {
                op: "define",
                name: spec.name.clone(),
                err: "a domain with this name exists and is not this VM".into(),
            });
        }
        let files_present = tokio::fs::try_exists(&spec.overlay).await.unwrap_or(true)
            && (spec.seed_image.is_none()
                || tokio::fs::try_exists(&spec.seed_path).await.unwrap_or(true));
        if files_present || active {
            return Ok(true);
        }
        tracing::warn!(domain = %spec.name, "domain lost its disk files; defining it again");
        let n = spec.name.clone();
        self.call("undefine", &spec.name, move |c| ops::undefine(c, &n))
            .await?;
        Ok(false)
    }

    async fn create_all(&self, spec: &VmSpec, created: &mut Created) -> Result<(), BackendError> {
        let disk_err = |err: Box<dyn std::error::Error + Send + Sync>| BackendError::Disk {
            name: spec.name.clone(),
            err,
        };
        for file in [&spec.overlay, &spec.seed_path, &spec.console_log] {
            let dirs = disk::create_parent_dirs(file).await;
            created.dirs.extend(dirs.map_err(|e| disk_err(e.into()))?);
        }
        let base = &spec.base_image;
        let fmt = &spec.base_format;
        if tokio::fs::try_exists(&spec.overlay)
            .await
            .map_err(|e| disk_err(e.into()))?
        {
            if disk::overlay_matches(&spec.overlay, base, fmt)
                .await
                .map_err(|e| disk_err(e.into()))?
            {
                tracing::info!(domain = %spec.name, "reusing overlay from an interrupted define");
            } else {
                tracing::warn!(domain = %spec.name, "replacing a stale overlay");
                disk::remove_file_if_exists(&spec.overlay)
                    .await
                    .map_err(|e| disk_err(e.into()))?;
            }
        }
        if !tokio::fs::try_exists(&spec.overlay)
            .await
            .map_err(|e| disk_err(e.into()))?
        {
            created.overlay = Some(spec.overlay.clone());
            disk::create_overlay(&spec.overlay, base, fmt, spec.disk_gib)
                .await
                .map_err(|e| disk_err(e.into()))?;
        }
        if let Some(seed_image) = &spec.seed_image {
            created.seed = Some(spec.seed_path.clone());
            disk::write_atomic(&spec.seed_path, seed_image)
                .await
                .map_err(|e| disk_err(e.into()))?;
        }
        let xml = domain_xml::render(spec);
        self.call("define", &spec.name, move |c| {
            c.define_domain_xml(&xml).map(drop)
        })
        .await?;
        tracing::info!(domain = %spec.name, job_id = %spec.job_id, rank = spec.rank, "defined domain");
        Ok(())
    }

    async fn remove(
        &self,
        name: &str,
        owner: &DomainOwner,
        files: &VmFiles,
    ) -> Result<(), BackendError> {
        let (n, o) = (name.to_owned(), owner.clone());
        let removal = self
            .call("remove", name, move |c| ops::remove(c, &n, &o))
            .await?;
        let mut paths: Vec<_> = files.all().into_iter().cloned().collect();
        for i in 0..ROTATED_LOGS {
            let mut rotated = files.console_log.clone().into_os_string();
            rotated.push(format!(".{i}"));
            paths.push(rotated.into());
        }
        for p in &paths {
            disk::remove_file_if_exists(p)
                .await
                .map_err(|e| BackendError::Disk {
                    name: name.to_owned(),
                    err: e.into(),
                })?;
        }
        match removal {
            ops::Removal::Removed => tracing::info!(domain = %name, "removed domain"),
            ops::Removal::NotOurs => tracing::warn!(domain = %name,
                "a domain of this name belongs to someone else; left alone, only this VM's files were deleted"),
            ops::Removal::Absent => {}
        }
        Ok(())
    }
}

/// Files and directories one `ensure_defined` call created, removed again if it fails.
#[derive(Debug, Default)]
struct Created {
    dirs: Vec<std::path::PathBuf>,
    overlay: Option<std::path::PathBuf>,
    seed: Option<std::path::PathBuf>,
}

impl Created {
    async fn roll_back(self) {
        for f in self.seed.iter().chain(self.overlay.iter()) {
            if let Err(e) = disk::remove_file_if_exists(f).await {
                tracing::warn!(path = %f.display(), error = %e, "cannot remove file after failed define");
            }
        }
        disk::remove_created_dirs(&self.dirs).await;
    }
}

/// Rejects specs that cannot be rendered faithfully: libvirt needs absolute UTF-8 paths.
fn validate(spec: &VmSpec) -> Result<(), BackendError> {
    let mut paths = vec![
        &spec.overlay,
        &spec.seed_path,
        &spec.console_log,
        &spec.base_image,
    ];
    if let BootMode::Kernel { kernel, initrd, .. } = &spec.boot {
        paths.extend([kernel, initrd]);
    }
    let bad = paths
        .into_iter()
        .find(|p| !p.is_absolute() || p.to_str().is_none());
    let problem = if spec.name.is_empty() || spec.name.contains('/') {
        Some("the domain name is empty or contains '/'".to_owned())
    } else {
        bad.map(|p| format!("path {} is not absolute UTF-8", p.display()))
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(BackendError::Hypervisor {
            op: "validate spec",
            name: spec.name.clone(),
            err: p.into(),
        }),
    }
}

fn warn_untraversable(spec: &VmSpec) {
    let mut files = vec![spec.overlay.as_path(), &spec.seed_path, &spec.base_image];
    if let BootMode::Kernel { kernel, initrd, .. } = &spec.boot {
        files.extend([kernel.as_path(), initrd]);
    }
    for f in files {
        for dir in disk::untraversable_ancestors(f) {
            tracing::warn!(
                domain = %spec.name,
                dir = %dir.display(),
                "directory is not traversable by the QEMU user (needs o+x); the VM may not start"
            );
        }
    }
}

/// `err: source: source…`, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Logs a change with `changed`, or turns a refusal into an error.
fn lease_result(
    op: &'static str,
    network: &str,
    change: ops::LeaseChange,
    changed: impl FnOnce(),
) -> Result<(), BackendError> {
    match change {
        ops::LeaseChange::Unchanged => Ok(()),
        ops::LeaseChange::Changed => {
            changed();
            Ok(())
        }
        ops::LeaseChange::Refused(reason) => Err(BackendError::Network {
            op,
            name: network.to_owned(),
            err: reason.into(),
        }),
    }
}

/// The opened console, or the error for a domain that is not running or a driver without it.
fn opened_or_error<T>(
    op: &'static str,
    name: &str,
    opened: console::Opened<T>,
) -> Result<T, BackendError> {
    match opened {
        console::Opened::Open(v) => Ok(v),
        console::Opened::NotRunning => Err(BackendError::NotRunning {
            name: name.to_owned(),
        }),
        console::Opened::Unsupported => Err(BackendError::NotSupported { op }),
    }
}

/// [`map_error`] for calls about a network: "no network" and other refusals name the network.
fn map_network_error(op: &'static str, name: String, link: &Link, e: VirtError) -> BackendError {
    if e.code().is(ErrorNumber::NoNetwork) {
        return BackendError::NoSuchNetwork { name };
    }
    match map_error(op, name, link, e) {
        BackendError::Hypervisor { op, name, err } => BackendError::Network { op, name, err },
        other => other,
    }
}

fn map_error(op: &'static str, name: String, link: &Link, e: VirtError) -> BackendError {
    if e.code().is(ErrorNumber::NoDomain) {
        return BackendError::NoSuchDomain { name };
    }
    if ops::is_connection_error(&e) {
        link.alive.store(false, Ordering::SeqCst);
        return BackendError::Unavailable { err: e.into() };
    }
    BackendError::Hypervisor {
        op,
        name,
        err: e.into(),
    }
}

#[async_trait]
impl VmBackend for LibvirtBackend {
    async fn ensure_defined(&self, spec: &VmSpec) -> Result<(), BackendError> {
        let (inner, spec) = (self.inner.clone(), spec.clone());
        match tokio::spawn(async move { inner.ensure_defined(&spec).await }).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(BackendError::Unavailable { err: e.into() }),
        }
    }

    async fn start(&self, name: &str) -> Result<(), BackendError> {
        let n = name.to_owned();
        if self
            .inner
            .call("start", name, move |c| ops::start(c, &n))
            .await?
        {
            tracing::info!(domain = %name, "started domain");
        }
        Ok(())
    }

    async fn shutdown(&self, name: &str) -> Result<(), BackendError> {
        let n = name.to_owned();
        if self
            .inner
            .call("shutdown", name, move |c| ops::shutdown(c, &n))
            .await?
        {
            tracing::info!(domain = %name, "requested ACPI shutdown");
        }
        Ok(())
    }

    async fn destroy(&self, name: &str) -> Result<(), BackendError> {
        let n = name.to_owned();
        if self
            .inner
            .call("destroy", name, move |c| ops::destroy(c, &n))
            .await?
        {
            tracing::info!(domain = %name, "destroyed domain");
        }
        Ok(())
    }

    async fn remove(
        &self,
        name: &str,
        owner: &DomainOwner,
        files: &VmFiles,
    ) -> Result<(), BackendError> {
        self.inner.remove(name, owner, files).await
    }

    async fn state(&self, name: &str) -> Result<Option<PowerState>, BackendError> {
        let n = name.to_owned();
        self.inner
            .call("get state", name, move |c| ops::state(c, &n))
            .await
    }

    async fn stop_cause(&self, name: &str) -> Result<Option<StopCause>, BackendError> {
        let n = name.to_owned();
        self.inner
            .call("get stop cause", name, move |c| ops::stop_cause(c, &n))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<DomainInfo>, BackendError> {
        let prefix = prefix.to_owned();
        self.inner
            .call("list", "*", move |c| ops::list(c, &prefix))
            .await
    }

    async fn host_info(&self) -> Result<HostInfo, BackendError> {
        let info = self
            .inner
            .call("get node info", "host", Connect::node_info)
            .await?;
        Ok(HostInfo {
            cpus: info.cpus,
            memory_mib: info.memory / 1024,
        })
    }

    async fn open_vnc(&self, name: &str) -> Result<ConsoleStream, BackendError> {
        let op = "open_vnc";
        let n = name.to_owned();
        let opened = self
            .inner
            .call(op, name, move |c| console::open_graphics(c, &n))
            .await?;
        let socket = opened_or_error(op, name, opened)?;
        let io_error = |e: std::io::Error| BackendError::Hypervisor {
            op,
            name: name.to_owned(),
            err: e.into(),
        };
        socket.set_nonblocking(true).map_err(io_error)?;
        let socket = tokio::net::UnixStream::from_std(socket).map_err(io_error)?;
        tracing::debug!(domain = %name, "opened the VNC display");
        Ok(Box::new(socket))
    }

    async fn open_serial(&self, name: &str) -> Result<ConsoleStream, BackendError> {
        let op = "open_serial";
        let n = name.to_owned();
        let opened = self
            .inner
            .call(op, name, move |c| console::open_console(c, &n))
            .await?;
        let stream = opened_or_error(op, name, opened)?;
        let io = console::bridge_serial(name, stream).map_err(|e| BackendError::Hypervisor {
            op,
            name: name.to_owned(),
            err: e.into(),
        })?;
        tracing::debug!(domain = %name, "attached to the serial console");
        Ok(io)
    }

    async fn ensure_network(&self, spec: &PrivateNetworkSpec) -> Result<(), BackendError> {
        let op = "ensure_network";
        if let Some(p) = spec.problem() {
            return Err(BackendError::Network {
                op,
                name: spec.name.clone(),
                err: p.into(),
            });
        }
        let _one_change = self.inner.networks.lock().await;
        let s = spec.clone();
        let outcome = self
            .inner
            .call_net(op, &spec.name, move |c| ops::ensure_network(c, &s))
            .await?;
        let net = &spec.name;
        match outcome {
            ops::NetworkEnsured::Created => {
                tracing::info!(network = %net, bridge = %spec.bridge, gateway = %spec.gateway, "defined and started the private network");
            }
            ops::NetworkEnsured::Started => {
                tracing::info!(network = %net, "started the inactive private network");
            }
            ops::NetworkEnsured::Running => {}
            ops::NetworkEnsured::Mismatch(detail) => {
                return Err(BackendError::NetworkMismatch {
                    name: net.clone(),
                    detail,
                });
            }
        }
        Ok(())
    }

    async fn put_dhcp_host(&self, network: &str, host: &DhcpHost) -> Result<(), BackendError> {
        let op = "put_dhcp_host";
        let _one_change = self.inner.networks.lock().await;
        let (n, h) = (network.to_owned(), host.clone());
        let change = self
            .inner
            .call_net(op, network, move |c| ops::put_dhcp_host(c, &n, &h))
            .await?;
        lease_result(op, network, change, || {
            tracing::info!(network, mac = %host.mac, address = %host.address, hostname = %host.hostname, "put DHCP lease");
        })
    }

    async fn remove_dhcp_host(&self, network: &str, mac: &str) -> Result<(), BackendError> {
        let op = "remove_dhcp_host";
        let _one_change = self.inner.networks.lock().await;
        let (n, m) = (network.to_owned(), mac.to_owned());
        let change = self
            .inner
            .call_net(op, network, move |c| ops::remove_dhcp_host(c, &n, &m))
            .await?;
        lease_result(op, network, change, || {
            tracing::info!(network, mac, "removed DHCP lease");
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.inner.events.subscribe()
    }
}
