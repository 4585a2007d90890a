//! In-memory hypervisor — to be filled in.
