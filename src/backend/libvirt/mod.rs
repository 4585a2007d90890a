//! libvirt backend — to be filled in.
