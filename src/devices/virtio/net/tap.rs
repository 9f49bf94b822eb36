//! A TAP device as the host kernel's `tun` driver offers it (linux/if_tun.h): opened
//! from /dev/net/tun and attached by name with TUNSETIFF, frames preceded by a
//! virtio-net header (IFF_VNET_HDR) of the size virtio 1.x uses (12 bytes, with
//! `num_buffers`), so guest frames go to the TAP as they are, headers and all.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::devices::virtio::chain::HostSlice;

/// virtio 1.x's header in front of every frame: virtio_net_hdr_v1 (with num_buffers).
pub const VNET_HDR_LEN: usize = 12;
const IFNAMSIZ: usize = 16;
/// struct ifreq: the name, then a union whose first member we use is `short flags`.
const IFREQ_LEN: usize = 40;

/// TUNSETOFFLOAD bits (what the TAP may hand us: the guest's receive offloads).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--net tap={0}: the name must be 1 to 15 bytes of letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("--net tap={0}: no such network interface (create it first: ip tuntap add {0} mode tap)")]
    Missing(String),
    #[error("--net tap={0}: not a TAP device (a TUN device, or another kind of interface)")]
    NotTap(String),
    #[error("--net tap={0}: busy (another process has it open)")]
    Busy(String),
    #[error("--net tap={0}: permission denied (needs CAP_NET_ADMIN, or a TAP owned by this user)")]
    Permission(String),
    #[error("--net tap={0}: {1}")]
    Other(String, String),
}

pub struct Tap {
    file: File,
    name: String,
}

fn ifreq(name: &str, flags: i16) -> [u8; IFREQ_LEN] {
    let mut req = [0u8; IFREQ_LEN];
    for (d, s) in req.iter_mut().zip(name.as_bytes()) {
        *d = *s;
    }
    if let Some(f) = req.get_mut(IFNAMSIZ..IFNAMSIZ + 2) {
        f.copy_from_slice(&flags.to_ne_bytes());
    }
    req
}

/// A name the kernel would take for an interface (dev_valid_name, minus what we never want).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Tap {
    /// Attaches to the existing TAP `name`. TUNSETIFF would create a missing one;
    /// skiff does not (a typo must not make a new, unconnected interface).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        // Asked of the kernel in this thread's network namespace (sysfs shows the
        // namespace it was mounted in, which need not be ours).
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
        // SAFETY: a NUL-terminated name that lives across the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| TapError::Other(name.into(), format!("opening /dev/net/tun: {e}")))?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        let mut req = ifreq(name, flags);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is one (40 bytes) and
        // lives across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Other(name.into(), format!("TUNSETIFF: {e}")),
            });
        }
        let tap = Tap { file, name: name.into() };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is live.
        if unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::Other(name.into(), format!("TUNSETVNETHDRSZ: {}", std::io::Error::last_os_error())));
        }
        tap.set_offload(0).map_err(|e| TapError::Other(name.into(), format!("TUNSETOFFLOAD: {e}")))?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// What the TAP may send us: TUN_F_* bits (the guest's negotiated receive offloads).
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// One frame (header first) from the TAP into `iov`; Ok(None) when none is waiting.
    pub fn read_frame(&self, iov: &[HostSlice]) -> std::io::Result<Option<usize>> {
        let v: Vec<libc::iovec> = iov.iter().map(|s| libc::iovec { iov_base: s.ptr.cast(), iov_len: s.len }).collect();
        let n = v.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: every iovec is a piece of mapped guest RAM (chain::host_slices) that the
        // caller's GuestMemoryMmap keeps mapped; readv writes at most their lengths.
        let r = unsafe { libc::readv(self.fd(), v.as_ptr(), n) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(r as usize))
    }

    /// One frame (header first) from `iov` to the TAP. The kernel takes the frame
    /// whole or refuses it (a bad header: EINVAL).
    pub fn write_frame(&self, iov: &[HostSlice]) -> std::io::Result<usize> {
        let v: Vec<libc::iovec> = iov.iter().map(|s| libc::iovec { iov_base: s.ptr.cast(), iov_len: s.len }).collect();
        let n = v.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: as in read_frame; writev only reads the buffers.
        let r = unsafe { libc::writev(self.fd(), v.as_ptr(), n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

#[cfg(test)]
pub mod testing {
    //! A TAP made inside a network namespace of the calling thread's own (unshare),
    //! for tests: nothing is visible from the host's namespace, and it goes away with
    //! the thread.
    use super::*;

    /// Moves this thread into a fresh network namespace; false where that is refused
    /// (no CAP_SYS_ADMIN): the caller skips.
    pub fn private_netns() -> bool {
        // SAFETY: unshare changes only this thread's namespaces.
        unsafe { libc::unshare(libc::CLONE_NEWNET) == 0 }
    }

    /// Creates a persistent TAP `name` (in this thread's namespace) and sets it up.
    pub fn make_tap(name: &str) {
        let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
        let mut req = ifreq(name, (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16);
        // SAFETY: TUNSETIFF with a live 40-byte ifreq.
        assert!(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) } >= 0);
        // SAFETY: TUNSETPERSIST takes its argument by value.
        assert!(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } >= 0);
        drop(f);
        // No IPv6 on it: the kernel's router and multicast chatter would reach the
        // guest side between a test's own frames.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        set_up(name);
    }

    /// `ip link set NAME up`, by SIOCSIFFLAGS.
    pub fn set_up(name: &str) {
        // SAFETY: a plain socket call; the fd is closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        let mut req = ifreq(name, 0);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a live 40-byte ifreq.
        unsafe {
            assert!(libc::ioctl(s, libc::SIOCGIFFLAGS, req.as_mut_ptr()) >= 0);
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            assert!(libc::ioctl(s, libc::SIOCSIFFLAGS, req.as_mut_ptr()) >= 0);
            libc::close(s);
        }
    }

    /// `ip link set NAME mtu MTU`, by SIOCSIFMTU.
    pub fn set_mtu(name: &str, mtu: i32) {
        // SAFETY: a plain socket call; the fd is closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        let mut req = ifreq(name, 0);
        req[16..20].copy_from_slice(&mtu.to_ne_bytes());
        // SAFETY: SIOCSIFMTU reads a live 40-byte ifreq.
        unsafe {
            assert!(libc::ioctl(s, libc::SIOCSIFMTU, req.as_mut_ptr()) >= 0);
            libc::close(s);
        }
    }

    /// Waits (up to 3 s) until `name` is running: its carrier came on when a reader
    /// attached, and the kernel's link watch (which may take a second) activated its
    /// queue; frames sent before are dropped.
    pub fn wait_running(name: &str) {
        // SAFETY: a plain socket call; the fd is closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        for _ in 0..300 {
            let mut req = ifreq(name, 0);
            // SAFETY: SIOCGIFFLAGS writes a live 40-byte ifreq.
            assert!(unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, req.as_mut_ptr()) } >= 0);
            if i16::from_ne_bytes([req[16], req[17]]) & libc::IFF_RUNNING as i16 != 0 {
                // The queue is activated just after the state changes.
                std::thread::sleep(std::time::Duration::from_millis(100));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SAFETY: closing the socket made above.
        unsafe { libc::close(s) };
    }

    /// The interface index of `name`.
    pub fn index(name: &str) -> i32 {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(c.as_ptr()) as i32 }
    }
}
