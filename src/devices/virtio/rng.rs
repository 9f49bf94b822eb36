//! virtio-rng (entropy device, ID 4): one queue whose device-writable buffers are
//! filled from the host's `getrandom`.

use vm_memory::{Bytes, GuestMemoryMmap};

use super::chain::Chain;
use super::{DeviceState, Handled, Outcome, VirtioDevice, VirtioError};

/// Bytes given for one request at most (a driver asking for more gets this much).
pub const MAX_PER_REQUEST: usize = 64 << 10;
const QUEUE_SIZES: [u16; 1] = [256];

#[derive(Default)]
pub struct Rng {
    buf: Vec<u8>,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

/// Fills `buf` from getrandom; returns how much it filled (all of it, unless the host
/// refuses, which a guest can do nothing about).
fn fill(buf: &mut [u8]) -> usize {
    let mut done = 0;
    // Each round makes progress or ends; interruptions are retried a bounded number of times.
    let mut tries = 0;
    while done < buf.len() && tries < 16 {
        let Some(rest) = buf.get_mut(done..) else { break };
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            tries += 1;
            continue;
        }
        done += n as usize;
    }
    done
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn handle_chain(&mut self, _index: u16, chain: Chain, mem: &GuestMemoryMmap) -> Handled {
        // Every buffer of an entropy request is the device's to write.
        if chain.readable().next().is_some() {
            return Handled::Done(Outcome::refused(0));
        }
        let mut given = 0usize;
        for d in chain.writable() {
            let want = (d.len as usize).min(MAX_PER_REQUEST - given);
            if want == 0 {
                break;
            }
            self.buf.resize(want, 0);
            let Some(buf) = self.buf.get_mut(..want) else { break };
            let got = fill(buf);
            let Some(filled) = buf.get(..got) else { break };
            if mem.write_slice(filled, d.addr).is_err() {
                break;
            }
            given += got;
            if got < want {
                break;
            }
        }
        Handled::Done(Outcome { used_len: given as u32, bytes: given as u64, refused: false })
    }

    fn state(&self) -> DeviceState {
        DeviceState::Rng
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        match state {
            DeviceState::Rng => Ok(()),
            other => Err(VirtioError::Device(format!("an entropy device cannot take {other:?}"))),
        }
    }
}
