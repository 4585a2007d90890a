//! One task per active job: the only code that changes the job's VMs.
//!
//! The runner loops: read the job from the store, then do what its state asks for —
//! provision an `IN_QUEUE` job, watch a `RUNNING` one (events, periodic sync, deadline), wait
//! on a `SUSPENDED` one, tear down one whose terminate was requested. Every message merely
//! wakes it; it always re-reads the store, so a dropped message or a restart loses nothing.
//!
//! Provisioning writes each VM's store record before creating anything on the host, and a
//! failure removes everything created so far before the job becomes FAILURE.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use super::manager::Inner;
use super::state::{self, JobEvent, JobState, StopKind};
use super::{messages, now_millis, spec, JobError, JobRecord, VmNaming};
use crate::backend::{
    BackendError, BootMode, DhcpHost, DomainOwner, NicAttachment, NicSpec, PowerState, StopCause,
    VmEvent, VmFiles, VmSpec,
};
use crate::cloud_init::{self, NicAddressing, SeedNic, SeedSpec};
use crate::images::BootKind;
use crate::network::firewall::NicRole;
use crate::network::guard::GuardError;
use crate::network::layout::{self, VmNic};
use crate::store::VmRecord;
use crate::telemetry::error_chain;

/// What wakes a runner.
#[derive(Debug)]
pub(super) enum RunnerMsg {
    /// Something changed in the store (terminate, extend): re-read it.
    Wake,
    /// A hypervisor event about one of this job's domains.
    Vm(VmEvent),
}

/// How long to wait before retrying a teardown the hypervisor refused.
const TEARDOWN_RETRY: Duration = Duration::from_secs(5);

pub(super) async fn run(ctx: Arc<Inner>, job_id: String, mut rx: mpsc::Receiver<RunnerMsg>) {
    let span = tracing::info_span!("job", job_id = %job_id);
    async {
        loop {
            let job = match ctx.deps.store.job(&job_id).await {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "cannot read job; runner retries");
                    tokio::time::sleep(TEARDOWN_RETRY).await;
                    continue;
                }
            };
            let step = if job.state.is_final() {
                break;
            } else if job.terminate_requested {
                teardown(&ctx, &job, JobEvent::Terminated).await
            } else {
                match job.state {
                    JobState::InQueue if ctx.is_admitted(&job.id) => provision(&ctx, &job).await,
                    JobState::Running if job.suspend_requested => {
                        suspend(&ctx, &job, &mut rx).await
                    }
                    JobState::Running => watch_running(&ctx, &job, &mut rx).await,
                    _ => wait_for_change(&ctx, &job, &mut rx).await,
                }
            };
            if let Err(e) = step {
                tracing::error!(error = %error_chain(&e), "job step failed; retrying");
                tokio::time::sleep(TEARDOWN_RETRY).await;
            }
        }
        ctx.runner_finished(&job_id);
    }
    .instrument(span)
    .await;
}

/// Prepares and boots every replica of an admitted job.
async fn provision(ctx: &Arc<Inner>, job: &JobRecord) -> Result<(), JobError> {
    let outcome = provision_replicas(ctx, job).await;
    ctx.release_admission(&job.id);
    ctx.reschedule().await?;
    outcome
}

async fn provision_replicas(ctx: &Inner, job: &JobRecord) -> Result<(), JobError> {
    let deps = &ctx.deps;
    let plan = match spec::validate(&job.spec, &deps.config, &deps.catalog) {
        Ok(plan) => plan,
        Err(e) => {
            return refuse_start(ctx, job, &format!("The job can no longer start: {e}")).await
        }
    };
    let local = match deps.images.ensure_local(&plan.image).await {
        Ok(local) => local,
        Err(e) => {
            let why = format!("The base image is not available: {}", error_chain(&e));
            return refuse_start(ctx, job, &why).await;
        }
    };
    let addresses = deps.store.job_addresses(&job.id).await?;
    let hosts = peer_hosts(ctx, &plan).await?;
    let vms: Vec<(VmRecord, Vec<VmNic>)> = (0..plan.replicas)
        .map(|rank| {
            let nics = layout::vm_nics(
                &deps.config,
                &deps.naming.agent_id,
                &job.id,
                rank,
                &addresses,
            );
            (deps.naming.record(&job.id, rank), nics)
        })
        .collect();
    for (record, _) in &vms {
        deps.store.put_vm(record.clone()).await?;
    }
    let started = async {
        for (record, nics) in &vms {
            connect_private_nic(ctx, record, nics).await?;
        }
        // Rules first, for every replica at once: no VM runs unguarded, not even for its
        // first packets.
        deps.guard.sync().await?;
        for (record, nics) in &vms {
            let spec = vm_spec(ctx, job, &plan, &local, record, nics, &hosts)?;
            deps.backend
                .ensure_defined(&spec)
                .await
                .map_err(StartError::Backend)?;
            deps.backend
                .start(&record.domain)
                .await
                .map_err(StartError::Backend)?;
            tracing::info!(rank = record.rank, domain = %record.domain, "VM started");
        }
        Ok::<(), StartError>(())
    };
    if let Err(e) = started.await {
        tracing::error!(error = %error_chain(&e), "failed to start the job's VMs");
        let why = format!(
            "The virtual machine could not be started: {}",
            error_chain(&e)
        );
        return refuse_start(ctx, job, &why).await;
    }
    if job.expires_at.is_none() {
        if let Some(allocation) = job.allocation_ms {
            deps.store
                .set_expires_at(&job.id, now_millis() + allocation)
                .await?;
        }
    }
    ctx.record(&job.id, Some(JobState::Running), messages::RUNNING)
        .await?;
    if job.started_at.is_none() {
        announce_addresses(ctx, job, &addresses).await?;
    }
    Ok(())
}

/// A job that cannot (re)start. A new job fails and leaves nothing behind. An unsuspend keeps
/// everything: the disks hold the user's data, so the job goes back to SUSPENDED, powered off,
/// and can be unsuspended again once the cause is fixed.
async fn refuse_start(ctx: &Inner, job: &JobRecord, why: &str) -> Result<(), JobError> {
    if job.started_at.is_some() {
        stop_replicas(ctx, job).await?;
        let why = format!("{why}; its disk is kept");
        return ctx.record(&job.id, Some(JobState::Suspended), &why).await;
    }
    remove_all(ctx, job).await?;
    fail(ctx, job, why).await
}

/// Powers off every replica of the job. An error leaves the step to be retried: a job the
/// store calls stopped must not keep a replica running.
async fn stop_replicas(ctx: &Inner, job: &JobRecord) -> Result<(), JobError> {
    for vm in ctx.deps.store.vms(&job.id).await? {
        ctx.deps.backend.destroy(&vm.domain).await?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("invalid cloud-init seed")]
    Seed(#[from] cloud_init::SeedError),
    #[error(transparent)]
    Backend(BackendError),
    #[error(transparent)]
    Firewall(#[from] GuardError),
}

/// Makes sure the private network runs (someone may have stopped it since vmhost started) and
/// registers the NIC's fixed DHCP lease, so images that ask DHCP (rather than read cloud-init's
/// static configuration) get the same address.
async fn connect_private_nic(
    ctx: &Inner,
    record: &VmRecord,
    nics: &[VmNic],
) -> Result<(), StartError> {
    let Some(nic) = nics.iter().find(|n| n.role == NicRole::Private) else {
        return Ok(());
    };
    let (NicAttachment::Network(network), Some(private)) =
        (&nic.attachment, ctx.deps.config.private_network())
    else {
        return Ok(());
    };
    ctx.deps
        .backend
        .ensure_network(&private.spec())
        .await
        .map_err(StartError::Backend)?;
    let host = DhcpHost {
        mac: nic.mac.clone(),
        address: nic.address,
        hostname: record.domain.clone(),
    };
    ctx.deps
        .backend
        .put_dhcp_host(network, &host)
        .await
        .map_err(StartError::Backend)
}

/// `/etc/hosts` lines for the job's peers: each name resolves to the peer's rank 0.
async fn peer_hosts(
    ctx: &Inner,
    plan: &spec::LaunchPlan,
) -> Result<Vec<cloud_init::HostEntry>, JobError> {
    let mut hosts = Vec::with_capacity(plan.peers.len());
    for peer in &plan.peers {
        let peer_addresses = ctx.deps.store.job_addresses(&peer.job_id).await?;
        match peer_addresses.private_of(0) {
            Some(address) => hosts.push(cloud_init::HostEntry {
                address,
                name: peer.hostname.clone(),
            }),
            None => tracing::warn!(peer = %peer.job_id, "peer has no private address (it ended)"),
        }
    }
    Ok(hosts)
}

/// Tells the user which addresses their job got, once, when it first runs.
async fn announce_addresses(
    ctx: &Inner,
    job: &JobRecord,
    addresses: &crate::store::JobAddresses,
) -> Result<(), JobError> {
    let ranks = addresses.private.len();
    for (rank, address) in &addresses.private {
        let rank = (ranks > 1).then_some(*rank);
        ctx.record(&job.id, None, &messages::private_address(*address, rank))
            .await?;
    }
    for ip in &addresses.public {
        ctx.record(&job.id, None, &messages::attached_public_ip(ip.address))
            .await?;
    }
    Ok(())
}

fn vm_spec(
    ctx: &Inner,
    job: &JobRecord,
    plan: &spec::LaunchPlan,
    local: &crate::images::LocalImage,
    record: &VmRecord,
    nics: &[VmNic],
    hosts: &[cloud_init::HostEntry],
) -> Result<VmSpec, StartError> {
    let deps = &ctx.deps;
    let naming = &deps.naming;
    let seed_image = if plan.image.cloud_init {
        let seed = SeedSpec {
            instance_id: VmNaming::instance_id(&job.id, record.rank),
            hostname: spec::hostname(
                &job.id,
                job.spec.name.as_deref(),
                record.rank,
                plan.replicas,
            ),
            login_user: plan.image.login_user.clone(),
            ssh_authorized_keys: plan.ssh_keys.clone(),
            extra_user_data: plan.user_data.clone(),
            nics: nics
                .iter()
                .map(|nic| SeedNic {
                    mac: nic.mac.clone(),
                    addressing: NicAddressing::Static {
                        address: nic.address,
                        prefix_len: nic.prefix_len,
                        gateway: nic.default_route.then_some(nic.gateway),
                        dns: nic.dns.clone(),
                    },
                })
                .collect(),
            hosts: hosts.to_vec(),
        };
        Some(cloud_init::vfat_image(&cloud_init::render(
            &seed,
            &deps.templates,
        )?)?)
    } else {
        None
    };
    let boot = match plan.image.boot {
        BootKind::Disk => BootMode::Disk,
        BootKind::Kernel => BootMode::Kernel {
            kernel: local.kernel.clone().unwrap_or_default(),
            initrd: local.initrd.clone().unwrap_or_default(),
            cmdline: plan.image.cmdline.clone().unwrap_or_default(),
        },
    };
    Ok(VmSpec {
        name: record.domain.clone(),
        job_id: job.id.clone(),
        rank: record.rank,
        agent_id: naming.agent_id.clone(),
        vcpus: plan.product.cpu,
        memory_mib: u64::from(plan.product.memory_in_gigs) * 1024,
        accel: deps.accel,
        boot,
        base_image: local.disk.clone(),
        base_format: local.format.clone(),
        overlay: record.overlay.clone(),
        disk_gib: plan.disk_gib,
        seed_path: record.seed.clone(),
        seed_image,
        console_log: record.console_log.clone(),
        nics: nics
            .iter()
            .map(|nic| NicSpec {
                attachment: nic.attachment.clone(),
                mac: nic.mac.clone(),
                tap: nic.tap.clone(),
            })
            .collect(),
    })
}

/// Watches a running job until something needs the main loop: an event that changes its
/// state, a message, its deadline.
async fn watch_running(
    ctx: &Arc<Inner>,
    job: &JobRecord,
    rx: &mut mpsc::Receiver<RunnerMsg>,
) -> Result<(), JobError> {
    let sync_every = Duration::from_secs(ctx.deps.config.sync_interval_secs);
    // The first tick is immediate: a job re-adopted after a restart is checked at once.
    let mut sync = tokio::time::interval(sync_every);
    let deadline = deadline(job);
    loop {
        tokio::select! {
            // A deadline that passed wins over queued messages: expiry is not negotiable.
            biased;
            () = sleep_until_opt(deadline) => {
                return teardown(ctx, job, JobEvent::Expired).await;
            }
            msg = rx.recv() => match msg {
                None | Some(RunnerMsg::Wake) => return Ok(()),
                Some(RunnerMsg::Vm(event)) => {
                    if let Some(event) = classify(&event) {
                        return on_vm_event(ctx, job, event).await;
                    }
                }
            },
            _ = sync.tick() => {
                if let Some(event) = sync_power_state(ctx, job).await? {
                    return on_vm_event(ctx, job, event).await;
                }
            }
        }
    }
}

/// When the job's time allocation runs out, as a timer instant.
fn deadline(job: &JobRecord) -> Option<tokio::time::Instant> {
    job.expires_at.map(|at| {
        let left = u64::try_from(at - now_millis()).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_millis(left)
    })
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The job event a hypervisor event means for a running job, if any.
fn classify(event: &VmEvent) -> Option<JobEvent> {
    match event {
        VmEvent::Stopped { cause, .. } => Some(JobEvent::Stopped(stop_kind(*cause))),
        VmEvent::Undefined { .. } => Some(JobEvent::Vanished),
        VmEvent::Started { .. } | VmEvent::Rebooted { .. } => None,
    }
}

/// What a hypervisor-reported stop means for the job.
fn stop_kind(cause: StopCause) -> StopKind {
    match cause {
        StopCause::GuestShutdown => StopKind::FromInside,
        StopCause::Destroyed => StopKind::FromHost,
        StopCause::Crashed | StopCause::Other => StopKind::Crashed,
    }
}

/// Compares every replica's real power state with RUNNING.
async fn sync_power_state(ctx: &Inner, job: &JobRecord) -> Result<Option<JobEvent>, JobError> {
    for vm in ctx.deps.store.vms(&job.id).await? {
        match ctx.deps.backend.state(&vm.domain).await {
            Ok(None) => return Ok(Some(JobEvent::Vanished)),
            Ok(Some(PowerState::ShutOff)) => {
                // The event may have been missed (or not processed yet): ask libvirt why.
                let cause = ctx.deps.backend.stop_cause(&vm.domain).await.ok().flatten();
                let kind = cause.map_or(StopKind::FromHost, stop_kind);
                return Ok(Some(JobEvent::Stopped(kind)));
            }
            Ok(Some(PowerState::Crashed)) => return Ok(Some(JobEvent::Stopped(StopKind::Crashed))),
            Ok(Some(_)) => {}
            // The hypervisor being unreachable says nothing about the VM; try next tick.
            Err(e) => tracing::warn!(error = %error_chain(&e), "power-state sync failed"),
        }
    }
    Ok(None)
}

async fn on_vm_event(ctx: &Arc<Inner>, job: &JobRecord, event: JobEvent) -> Result<(), JobError> {
    let Ok(next) = state::transition(job.state, event) else {
        return Ok(());
    };
    if event == JobEvent::Stopped(StopKind::FromInside) && job.spec.restart_on_exit == Some(true) {
        for vm in ctx.deps.store.vms(&job.id).await? {
            ctx.deps.backend.start(&vm.domain).await?;
        }
        tracing::info!("guest powered off; started again as restartOnExit asks");
        return ctx.record(&job.id, None, messages::RESTARTED_ON_EXIT).await;
    }
    let message = match event {
        JobEvent::Stopped(StopKind::FromInside) => messages::POWERED_OFF_INSIDE,
        JobEvent::Stopped(StopKind::FromHost) => messages::POWERED_OFF_HOST,
        JobEvent::Stopped(StopKind::Crashed) => messages::CRASHED,
        JobEvent::Vanished => {
            remove_all(ctx, job).await?;
            messages::VANISHED
        }
        _ => return Ok(()),
    };
    if event != JobEvent::Vanished {
        // Stop every other replica too: a job is powered on or off as a whole.
        stop_replicas(ctx, job).await?;
    }
    tracing::info!(
        ?event,
        next = next.as_str(),
        "VM state changed outside vmhost"
    );
    ctx.record(&job.id, Some(next), message).await?;
    ctx.reschedule().await
}

/// A queued or suspended job waits for a message, its deadline or a sync tick. A queued job
/// first asks the scheduler; being admitted wakes it.
async fn wait_for_change(
    ctx: &Arc<Inner>,
    job: &JobRecord,
    rx: &mut mpsc::Receiver<RunnerMsg>,
) -> Result<(), JobError> {
    if job.state == JobState::InQueue {
        ctx.reschedule().await?;
    }
    let sync_every = Duration::from_secs(ctx.deps.config.sync_interval_secs);
    tokio::select! {
        biased;
        () = sleep_until_opt(deadline(job)) => {
            return teardown(ctx, job, JobEvent::Expired).await;
        }
        msg = rx.recv() => {
            if msg.is_none() {
                // Every sender is gone: the manager is shutting down.
                std::future::pending::<()>().await;
            }
        }
        () = tokio::time::sleep(sync_every) => {
            let vms = ctx.deps.store.vms(&job.id).await?;
            for vm in &vms {
                if let Ok(None) = ctx.deps.backend.state(&vm.domain).await {
                    return on_vm_event(ctx, job, JobEvent::Vanished).await;
                }
            }
        }
    }
    Ok(())
}

/// Powers a running job off: ACPI power-button requests, re-sent every `suspend_retry_secs`,
/// then a hard power-off once `suspend_grace_secs` have passed. The disks, the seed and the
/// console logs stay. A terminate requested meanwhile wins: the suspend is abandoned and the
/// main loop tears the job down.
async fn suspend(
    ctx: &Arc<Inner>,
    job: &JobRecord,
    rx: &mut mpsc::Receiver<RunnerMsg>,
) -> Result<(), JobError> {
    let config = &ctx.deps.config;
    let retry = Duration::from_secs(config.suspend_retry_secs);
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(config.suspend_grace_secs);
    let vms = ctx.deps.store.vms(&job.id).await?;
    let graceful = 'suspend: loop {
        if request_power_off(ctx, &vms).await {
            break 'suspend true;
        }
        let next_request = (tokio::time::Instant::now() + retry).min(deadline);
        loop {
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => break 'suspend false,
                msg = rx.recv() => match msg {
                    // A replica stopped: see whether all have.
                    Some(RunnerMsg::Vm(VmEvent::Stopped { .. })) => break,
                    Some(RunnerMsg::Vm(_)) => {}
                    Some(RunnerMsg::Wake) | None => {
                        let terminating = ctx.deps.store.job(&job.id).await?.is_none_or(|j| j.terminate_requested);
                        if terminating {
                            tracing::info!("terminate requested during suspend; it wins");
                            return Ok(());
                        }
                    }
                },
                () = tokio::time::sleep_until(next_request) => break,
            }
        }
    };
    if !graceful {
        for vm in &vms {
            ctx.deps.backend.destroy(&vm.domain).await?;
        }
    }
    let took = started.elapsed().as_secs();
    let message = if graceful {
        format!("The virtual machine was shut down gracefully after {took} s; its disk is kept")
    } else {
        format!(
            "The virtual machine did not shut down within {} s of graceful shutdown requests and was forced off; its disk is kept",
            config.suspend_grace_secs
        )
    };
    tracing::info!(graceful, took_secs = took, "job suspended");
    ctx.record(&job.id, Some(JobState::Suspended), &message)
        .await?;
    ctx.reschedule().await
}

/// Presses the ACPI power button of every replica still running; true once none runs.
async fn request_power_off(ctx: &Inner, vms: &[VmRecord]) -> bool {
    let mut all_off = true;
    for vm in vms {
        match ctx.deps.backend.state(&vm.domain).await {
            Ok(None | Some(PowerState::ShutOff | PowerState::Crashed)) => {}
            Ok(Some(_)) => {
                all_off = false;
                if let Err(e) = ctx.deps.backend.shutdown(&vm.domain).await {
                    tracing::warn!(domain = %vm.domain, error = %error_chain(&e), "ACPI shutdown request failed");
                }
            }
            Err(e) => {
                all_off = false;
                tracing::warn!(domain = %vm.domain, error = %error_chain(&e), "cannot read power state");
            }
        }
    }
    all_off
}

/// Removes every VM of the job and records the final state.
async fn teardown(ctx: &Arc<Inner>, job: &JobRecord, event: JobEvent) -> Result<(), JobError> {
    let next = state::transition(job.state, event).map_err(|denied| JobError::Denied {
        id: job.id.clone(),
        denied,
    })?;
    remove_all(ctx, job).await?;
    let message = if event == JobEvent::Expired {
        messages::EXPIRED
    } else {
        messages::CANCELLED
    };
    tracing::info!(state = next.as_str(), "job torn down");
    ctx.record(&job.id, Some(next), message).await?;
    ctx.reschedule().await
}

/// Removes every VM the store says the job owns; a VM record goes only after its VM is gone.
async fn remove_all(ctx: &Inner, job: &JobRecord) -> Result<(), JobError> {
    for vm in ctx.deps.store.vms(&job.id).await? {
        remove_vm(ctx, &vm).await?;
    }
    // The removed VMs' rules are inert without their taps; a failed sync is repaired by the
    // next one.
    if let Err(e) = ctx.deps.guard.sync().await {
        tracing::warn!(error = %error_chain(&e), "cannot update the firewall after removing VMs");
    }
    Ok(())
}

/// Removes one VM, its files, its DHCP lease and its record. The firewall is synced by the
/// caller once for all VMs it removes (startup reconciliation: the sync that follows it).
pub(super) async fn remove_vm(ctx: &Inner, vm: &VmRecord) -> Result<(), JobError> {
    let files = VmFiles {
        overlay: vm.overlay.clone(),
        seed: vm.seed.clone(),
        console_log: vm.console_log.clone(),
    };
    let owner = DomainOwner {
        agent_id: ctx.deps.naming.agent_id.clone(),
        job_id: vm.job_id.clone(),
        rank: vm.rank,
    };
    loop {
        match ctx.deps.backend.remove(&vm.domain, &owner, &files).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(domain = %vm.domain, error = %error_chain(&e), "remove failed; retrying");
                tokio::time::sleep(TEARDOWN_RETRY).await;
            }
        }
    }
    // The whole directory: it is this VM's alone, and a crash mid-write can leave a temporary
    // seed file in it that no record names.
    match tokio::fs::remove_dir_all(&vm.dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %vm.dir.display(), error = %e, "cannot remove VM directory"),
    }
    disconnect_private_nic(ctx, vm).await;
    ctx.deps.store.delete_vm(&vm.domain).await?;
    Ok(())
}

/// Drops the fixed DHCP lease of a removed VM's private NIC.
async fn disconnect_private_nic(ctx: &Inner, vm: &VmRecord) {
    let Some(private) = ctx.deps.config.private_network() else {
        return;
    };
    let address = match ctx.deps.store.job_addresses(&vm.job_id).await {
        Ok(addresses) => addresses.private_of(vm.rank),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "cannot read the VM's private address");
            None
        }
    };
    if let Some(address) = address {
        let mac = layout::mac_for(address);
        if let Err(e) = ctx.deps.backend.remove_dhcp_host(&private.name, &mac).await {
            tracing::warn!(%mac, error = %error_chain(&e), "cannot remove the DHCP lease");
        }
    }
}

async fn fail(ctx: &Inner, job: &JobRecord, why: &str) -> Result<(), JobError> {
    ctx.record(&job.id, Some(JobState::Failure), why).await
}
