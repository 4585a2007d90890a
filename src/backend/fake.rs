//! An in-memory hypervisor: the same contract as libvirt, no processes, no files.
//!
//! Used by component tests and by `backend = "fake"`. Domains boot instantly. Tests can
//! inject failures and simulate what guests and operators do behind vmhost's back (a guest
//! powering off, QEMU crashing, a domain being undefined).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    BackendError, ConsoleStream, DomainInfo, DomainOwner, HostInfo, PowerState, StopCause,
    VmBackend, VmEvent, VmFiles, VmSpec,
};

#[derive(Debug, Clone)]
pub struct FakeDomain {
    pub spec: VmSpec,
    pub state: PowerState,
    /// How often the guest was asked to power off via ACPI.
    pub shutdown_requests: u32,
}

#[derive(Debug)]
pub struct FakeBackend {
    /// Guarded state; never held across an await.
    domains: Mutex<BTreeMap<String, FakeDomain>>,
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
            failures: Mutex::new(Failures::default()),
            events,
            host,
        }
    }

    fn domains(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakeDomain>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
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

    pub fn snapshot(&self) -> BTreeMap<String, FakeDomain> {
        self.domains().clone()
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
            },
        );
    }

    /// The guest (or QEMU) stops on its own.
    pub fn simulate_stop(&self, name: &str, cause: StopCause) {
        if let Some(d) = self.domains().get_mut(name) {
            d.state = PowerState::ShutOff;
        }
        let _ = self.events.send(VmEvent::Stopped {
            name: name.to_owned(),
            cause,
        });
    }

    /// The domain disappears without an event (as while vmhost was down).
    pub fn vanish_silently(&self, name: &str) {
        self.domains().remove(name);
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
        self.domains()
            .entry(spec.name.clone())
            .or_insert_with(|| FakeDomain {
                spec: spec.clone(),
                state: PowerState::ShutOff,
                shutdown_requests: 0,
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
                let _ = self.events.send(VmEvent::Stopped {
                    name: name.to_owned(),
                    cause: StopCause::Destroyed,
                });
            }
        }
        Ok(())
    }

    async fn remove(&self, name: &str, _files: &VmFiles) -> Result<(), BackendError> {
        self.check_available()?;
        if self.domains().remove(name).is_some() {
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

    async fn open_vnc(&self, _name: &str) -> Result<ConsoleStream, BackendError> {
        Err(BackendError::NotSupported { op: "open_vnc" })
    }

    async fn open_serial(&self, _name: &str) -> Result<ConsoleStream, BackendError> {
        Err(BackendError::NotSupported { op: "open_serial" })
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }
}
