//! vmhost: a host agent that turns UCloud compute Jobs into libvirt/QEMU virtual machines.
//!
//! ```text
//!   HTTP / WebSocket ──▶ api ──▶ jobs (manager + one runner per job) ──▶ backend (VmBackend)
//!                                  │        │          │                    ├─ libvirt
//!                                  ▼        ▼          ▼                    └─ fake
//!                                store   images   cloud_init
//! ```
//!
//! `api` translates the UCloud Jobs API; `jobs` decides (state machine, validation) and owns
//! each job's VMs through its runner; `backend` is the only door to the hypervisor; `store`
//! is the durable truth; `images` resolves base images; `cloud_init` renders seeds; `accel`
//! chooses KVM or TCG; `server` wires it together.
pub mod accel;
pub mod api;
pub mod backend;
pub mod client;
pub mod cloud_init;
pub mod config;
pub mod console;
pub mod images;
pub mod jobs;
pub mod network;
pub mod provider;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod ucloud;
