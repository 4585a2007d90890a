//! vmhost: a host agent that turns UCloud compute Jobs into libvirt/QEMU virtual machines.
pub mod accel;
pub mod backend;
pub mod cloud_init;
pub mod images;
