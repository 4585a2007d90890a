//! Wiring: builds every component from the config, reconciles, and serves the API.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;

use crate::api::{self, AppState};
use crate::backend::{fake::FakeBackend, libvirt::LibvirtBackend, Accel, VmBackend};
use crate::config::{BackendKind, Config, UserConfig};
use crate::images::{Catalog, ImageCache};
use crate::jobs::{JobManager, JobManagerDeps, VmNaming};
use crate::network::guard::FirewallGuard;
use crate::network::nft::{FakeFirewall, Firewall, NftFirewall};
use crate::network::public_ips::PublicIps;
use crate::provider::auth::CoreVerifier;
use crate::provider::control::CoreClient;
use crate::provider::reporter;
use crate::store::Store;

/// A vmhost ready to serve: its router and the manager behind it.
pub struct Daemon {
    pub state: AppState,
    pub router: axum::Router,
    /// The task reporting to UCloud/Core, when vmhost is its provider.
    pub reporter: Option<tokio::task::AbortHandle>,
}

/// Builds the daemon from `config` and reconciles the store with the hypervisor.
pub async fn build(config: Config) -> anyhow::Result<Daemon> {
    let backend: Arc<dyn VmBackend> = match config.backend {
        BackendKind::Libvirt => Arc::new(
            LibvirtBackend::connect(&config.libvirt_uri)
                .await
                .with_context(|| format!("connecting to libvirt at {}", config.libvirt_uri))?,
        ),
        BackendKind::Fake => Arc::new(FakeBackend::default()),
    };
    let firewall: Arc<dyn Firewall> = match config.backend {
        BackendKind::Libvirt => Arc::new(NftFirewall::default()),
        BackendKind::Fake => Arc::new(FakeFirewall::default()),
    };
    let accel = match config.backend {
        BackendKind::Libvirt => crate::accel::resolve(config.accel)
            .await
            .context("choosing the accelerator")?,
        BackendKind::Fake => Accel::Tcg,
    };
    build_with(config, backend, firewall, accel).await
}

/// [`build`] with a given hypervisor and firewall; tests pass fakes they keep a handle to.
pub async fn build_with(
    mut config: Config,
    backend: Arc<dyn VmBackend>,
    firewall: Arc<dyn Firewall>,
    accel: Accel,
) -> anyhow::Result<Daemon> {
    config.validate().context("checking the configuration")?;
    let core = match &config.ucloud {
        Some(ucloud) => Some((
            CoreVerifier::new(&ucloud.public_key).context("reading [ucloud] public_key")?,
            CoreClient::new(ucloud).context("setting up the client of UCloud/Core")?,
        )),
        None => None,
    };
    create_dir_traversable(&config.data_dir)?;
    create_dir_traversable(&config.vm_dir())?;
    let store = Store::open(&config.store_path()).context("opening the store")?;
    let agent_id = store.agent_id().await?;
    tracing::info!(?accel, backend = ?config.backend, %agent_id, "hypervisor ready");
    let catalog = Catalog::load(config.catalog.as_deref()).context("loading the image catalog")?;
    let templates = crate::cloud_init::load_templates(config.cloud_init_dir.as_deref())
        .context("loading cloud-init templates")?;
    if config.users.is_empty() {
        config.users.push(default_user(&config.data_dir)?);
    }
    let naming = VmNaming {
        prefix: config.domain_prefix.clone(),
        vm_dir: config.vm_dir(),
        agent_id,
    };
    if let Some(private) = config.private_network() {
        backend
            .ensure_network(&private.spec())
            .await
            .with_context(|| format!("starting the private network {}", private.name))?;
    }
    if !config.public_pools.is_empty() && config.backend == BackendKind::Libvirt {
        // Without br_netfilter, bridged traffic to public addresses would bypass the firewall.
        NftFirewall::prepare_host()
            .await
            .context("preparing the host to filter bridged traffic to public IPs")?;
    }
    let images = ImageCache::new(config.image_dir.clone(), config.image_cache_dir());
    let users = config.users.clone();
    let config = Arc::new(config);
    let guard = Arc::new(FirewallGuard::new(
        config.clone(),
        naming.agent_id.clone(),
        store.clone(),
        firewall,
    ));
    let public_ips = PublicIps::new(config.clone(), store.clone(), guard.clone());
    let manager = JobManager::new(JobManagerDeps {
        config,
        store,
        backend,
        catalog: Arc::new(catalog),
        images,
        templates,
        accel,
        naming,
        guard: guard.clone(),
    });
    manager.spawn_event_router();
    manager
        .reconcile()
        .await
        .context("reconciling with the hypervisor")?;
    guard
        .sync()
        .await
        .context("installing the firewall rules of existing VMs")?;
    let mut state = AppState::new(manager, public_ips, &users);
    let mut reporter = None;
    if let Some((verifier, client)) = core {
        tracing::info!("serving UCloud/Core as its provider");
        let changes = state.manager.subscribe();
        let store = state.manager.store().clone();
        reporter = Some(reporter::spawn(store, client, changes).abort_handle());
        state = state.with_core(verifier);
    }
    let router = api::router(state.clone());
    Ok(Daemon {
        state,
        router,
        reporter,
    })
}

/// Runs until SIGINT/SIGTERM. VMs keep running when vmhost exits.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let daemon = build(config).await?;
    let listener = bind(listen)
        .with_context(|| format!("binding {listen}"))?
        // Console keystrokes and small screen updates must not wait for Nagle's algorithm.
        .tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY on a client connection");
            }
        });
    tracing::info!(%listen, "vmhost is serving");
    axum::serve(listener, daemon.router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("vmhost stopped; virtual machines keep running");
    Ok(())
}

/// Connections the kernel may hold for vmhost before it accepts them; Linux caps it at
/// `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// The API's listening socket. Its backlog is deep because consoles come in storms: every
/// open browser tab reconnects at once when vmhost restarts, and with the usual backlog of 128
/// the kernel drops the SYNs past it, which those clients only retry a second later.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails without a signal driver");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// QEMU runs as its own user and must reach the disks below these directories.
fn create_dir_traversable(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting permissions of {}", dir.display()))?;
    Ok(())
}

/// Without configured users, one user `user` gets a random token kept in the data directory.
fn default_user(data_dir: &Path) -> anyhow::Result<UserConfig> {
    let path = data_dir.join("user-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(token) => token.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::Rng;
            let bytes: [u8; 24] = rand::thread_rng().gen();
            let token = hex::encode(bytes);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &token).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, &path)?;
            token
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    tracing::info!(token_file = %path.display(), "no [[users]] configured: user \"user\" authenticates with the token in this file");
    Ok(UserConfig {
        name: "user".to_owned(),
        token,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Connections past a backlog of 128 would have their SYNs dropped and retried a second
    /// later; with vmhost's backlog a storm of 300 is queued at once, before any accept.
    #[tokio::test]
    async fn a_connect_storm_is_queued_before_vmhost_accepts() {
        let listener = bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr().expect("its address");
        let connects = (0..300).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let results = futures::future::join_all(connects).await;
        let queued = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(queued, 300, "connections held in the accept queue");
        drop(listener);
    }
}
