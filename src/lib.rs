//! vmhost: a host agent that turns UCloud compute Jobs into libvirt/QEMU virtual machines.
pub mod backend;
pub mod client;
pub mod cloud_init;
pub mod images;
pub mod accel;
pub mod api;
pub mod config;
pub mod jobs;
pub mod server;
pub mod store;
pub mod telemetry;
