//! virtio-vsock (device ID 19).
