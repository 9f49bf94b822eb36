//! virtio-blk (device ID 2) on a raw image file or a host block device.
//!
//! The event-loop thread parses each request (header, data buffers, status byte),
//! reads at once what the host's page cache holds, submits the other reads and the
//! writes to an io_uring whose completions it reaps ([`uring`]), and hands flush,
//! discard and write-zeroes (and, without io_uring, everything) to a small worker
//! pool ([`worker`]); GET_ID and malformed requests are answered at once. A read-write disk holds an exclusive `flock`, a read-only one a
//! shared lock, so two skiffs never write the same image.

mod uring;
mod worker;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{Chain, host_slices, read_stream, write_stream};
use super::{Completion, DeviceState, Handled, Outcome, VirtioDevice, VirtioError};
use uring::Ring;
use worker::{DirectIo, Job, Op, Pool};

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data buffers per request (the queue size less the header and the status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Discard and write-zeroes limits: sectors per segment and segments per request.
const MAX_RANGE_SECTORS: u32 = 1 << 16;
const MAX_RANGE_SEGS: u32 = 16;
/// Discards are split at 4 KiB, the granularity a file system punches holes at.
const DISCARD_ALIGN_SECTORS: u32 = 8;
const WORKERS: usize = 4;
const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
const CONFIG_LEN: usize = 60;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {path}: cannot open: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("disk {path}: is a directory, not a disk image")]
    Directory { path: String },
    #[error("disk {path}: neither a regular file nor a block device")]
    NotADisk { path: String },
    #[error("disk {path}: size {size} is not a multiple of 512 bytes")]
    NotSectors { path: String, size: u64 },
    #[error("disk {path}: in use by another skiff (it holds the lock)")]
    InUse { path: String },
    #[error("disk {path}: cannot lock: {err}")]
    Lock { path: String, err: std::io::Error },
    #[error("disk {path}: cannot find its size: {err}")]
    Size { path: String, err: std::io::Error },
    #[error("disk {path}: id {id:?} is longer than 20 bytes")]
    IdTooLong { path: String, id: String },
    #[error("disk {path}: starting its I/O threads: {err}")]
    Workers { path: String, err: std::io::Error },
    #[error("disk {path}: direct: the file cannot be opened with O_DIRECT here: {err}")]
    Direct { path: String, err: std::io::Error },
}

pub struct Block {
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    features: u64,
    config: [u8; CONFIG_LEN],
    /// Reads and writes, where the kernel has io_uring (see [`uring`]).
    ring: Option<Ring>,
    /// Flush, discard and write-zeroes, and everything where there is no ring.
    pool: Pool,
}

impl Block {
    /// Opens a disk image or block device for a guest; `direct` also opens it with
    /// O_DIRECT for the requests that fit its alignment.
    pub fn open(path: &Path, read_only: bool, id: Option<String>, direct: bool) -> Result<Block, BlockError> {
        let shown = path.display().to_string();
        // Looked at before opening: opening a FIFO would block.
        let meta = std::fs::metadata(path).map_err(|err| BlockError::Open { path: shown.clone(), err })?;
        if meta.is_dir() {
            return Err(BlockError::Directory { path: shown });
        }
        if !(meta.file_type().is_file() || meta.file_type().is_block_device()) {
            return Err(BlockError::NotADisk { path: shown });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|err| BlockError::Open { path: shown.clone(), err })?;
        lock(&file, read_only).map_err(|err| match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => BlockError::InUse { path: shown.clone() },
            _ => BlockError::Lock { path: shown.clone(), err },
        })?;
        let capacity = (&file).seek(SeekFrom::End(0)).map_err(|err| BlockError::Size { path: shown.clone(), err })?;
        if capacity % SECTOR != 0 {
            return Err(BlockError::NotSectors { path: shown, size: capacity });
        }
        let id = match id {
            Some(s) if s.len() > ID_BYTES => return Err(BlockError::IdTooLong { path: shown, id: s }),
            Some(s) => pad_id(s.as_bytes()),
            None => pad_id(default_serial(meta.dev(), meta.ino()).as_bytes()),
        };
        let direct = match direct {
            true => Some(DirectIo::open(path, read_only).map_err(|err| BlockError::Direct { path: shown.clone(), err })?),
            false => None,
        };
        let pool = Pool::start(Arc::new(file), direct, WORKERS, "skiff-blk")
            .map_err(|err| BlockError::Workers { path: shown.clone(), err })?;
        let features = if read_only {
            bit(VIRTIO_BLK_F_RO)
        } else {
            bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        } | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        // SKIFF_BLOCK_IO=pool sends reads and writes to the worker pool too (to compare).
        let ring = match std::env::var_os("SKIFF_BLOCK_IO") {
            Some(v) if v == "pool" => None,
            _ => Ring::new(u32::from(QUEUE_SIZE)).ok(),
        };
        Ok(Block { read_only, capacity, id, features, config: config_space(capacity / SECTOR), ring, pool })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity / SECTOR
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Parses one request; `Err` is the status to answer with at once.
    fn request(&self, chain: &Chain, mem: &GuestMemoryMmap, status: GuestAddress) -> Result<Work, Refusal> {
        let mut header = [0u8; HEADER_LEN as usize];
        if !read_stream(mem, chain.readable(), 0, &mut header) {
            return Err(Refusal::Malformed);
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let extra_in = chain.readable_len() - HEADER_LEN; // readable beyond the header
        let data_out = chain.writable_len() - 1; // writable before the status byte
        let job = |op, used_len, bytes| Work::Job(Job { op, head: chain.head, status, used_len, bytes, mem: mem.clone() });
        match kind {
            VIRTIO_BLK_T_IN => {
                if extra_in != 0 {
                    return Err(Refusal::Malformed); // read data must go in writable buffers
                }
                let offset = self.range(sector, data_out)?;
                let iov = host_slices(mem, chain.writable(), 0, data_out).ok_or(Refusal::Malformed)?;
                let direct = self.pool.fits_direct(&iov, offset);
                Ok(job(Op::Read { iov, offset, direct }, data_out as u32 + 1, data_out))
            }
            VIRTIO_BLK_T_OUT => {
                if data_out != 0 {
                    return Err(Refusal::Malformed); // write data must come in readable buffers
                }
                if self.read_only {
                    return Err(Refusal::Status(VIRTIO_BLK_S_IOERR));
                }
                let offset = self.range(sector, extra_in)?;
                let iov = host_slices(mem, chain.readable(), HEADER_LEN, extra_in).ok_or(Refusal::Malformed)?;
                let direct = self.pool.fits_direct(&iov, offset);
                Ok(job(Op::Write { iov, offset, direct }, 1, extra_in))
            }
            VIRTIO_BLK_T_FLUSH => Ok(job(Op::Flush, 1, 0)),
            VIRTIO_BLK_T_GET_ID => {
                let n = (data_out as usize).min(ID_BYTES);
                let id = self.id.get(..n).ok_or(Refusal::Malformed)?;
                if !write_stream(mem, chain.writable(), 0, id) {
                    return Err(Refusal::Malformed);
                }
                Ok(Work::Now(Outcome { used_len: n as u32 + 1, bytes: n as u64, refused: false }))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(Refusal::Status(VIRTIO_BLK_S_IOERR));
                }
                let (ranges, unmap) = self.segments(chain, mem, kind == VIRTIO_BLK_T_DISCARD)?;
                let op = if kind == VIRTIO_BLK_T_DISCARD { Op::Discard { ranges } } else { Op::WriteZeroes { ranges, unmap } };
                Ok(job(op, 1, 0))
            }
            _ => Err(Refusal::Status(VIRTIO_BLK_S_UNSUPP)),
        }
    }

    /// A read whose data the host has cached is done here, on the event loop: no
    /// hand-off to a worker and back (two thread wake-ups a request). Anything else,
    /// or the part of a read that is not cached, goes to a worker, so the event loop
    /// never waits for the disk.
    fn try_now(&self, job: &mut Job) -> Option<Outcome> {
        match worker::read_cached(self.pool.file(), &mut job.op) {
            Ok(true) => Some(worker::settle(job, true)),
            Ok(false) => None,
            Err(_) => Some(worker::settle(job, false)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if whole sectors inside the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Refusal> {
        let offset = sector.checked_mul(SECTOR).ok_or(Refusal::Status(VIRTIO_BLK_S_IOERR))?;
        let end = offset.checked_add(len).ok_or(Refusal::Status(VIRTIO_BLK_S_IOERR))?;
        if !len.is_multiple_of(SECTOR) || end > self.capacity {
            return Err(Refusal::Status(VIRTIO_BLK_S_IOERR));
        }
        Ok(offset)
    }

    /// The byte ranges of a discard or write-zeroes request, and its unmap flag.
    fn segments(&self, chain: &Chain, mem: &GuestMemoryMmap, discard: bool) -> Result<(Vec<(u64, u64)>, bool), Refusal> {
        let body = chain.readable_len() - HEADER_LEN;
        let count = body / SEGMENT_LEN;
        if !body.is_multiple_of(SEGMENT_LEN) || count == 0 || count > u64::from(MAX_RANGE_SEGS) {
            return Err(Refusal::Malformed);
        }
        let mut ranges = Vec::with_capacity(count as usize);
        let mut unmap = true;
        for i in 0..count {
            let mut seg = [0u8; SEGMENT_LEN as usize];
            if !read_stream(mem, chain.readable(), HEADER_LEN + i * SEGMENT_LEN, &mut seg) {
                return Err(Refusal::Malformed);
            }
            let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            // Unknown flags, or UNMAP on a discard, are not supported (virtio 1.2, 5.2.6.2).
            let known = if discard { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
            if flags & !known != 0 {
                return Err(Refusal::Status(VIRTIO_BLK_S_UNSUPP));
            }
            if sectors > MAX_RANGE_SECTORS {
                return Err(Refusal::Status(VIRTIO_BLK_S_IOERR));
            }
            unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let len = u64::from(sectors) * SECTOR;
            ranges.push((self.range(sector, len)?, len));
        }
        Ok((ranges, unmap))
    }
}

/// What a parsed request needs.
enum Work {
    Now(Outcome),
    Job(Job),
}

/// Why a request is answered at once with an error.
enum Refusal {
    /// A well-formed request the device turns down (read-only, out of range, unknown type).
    Status(u32),
    /// The chain does not hold a request as virtio-blk lays it out.
    Malformed,
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// The serial (GET_ID) of a disk given no `id=`: unique per file on this host, and
/// stable across runs (cut to the field's 20 bytes). A restore on a copy keeps the
/// original's.
pub fn default_serial(dev: u64, ino: u64) -> String {
    let mut s = format!("{dev:x}-{ino:x}");
    s.truncate(ID_BYTES);
    s
}

fn pad_id(bytes: &[u8]) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    for (d, s) in id.iter_mut().zip(bytes) {
        *d = *s;
    }
    id
}

fn lock(file: &File, shared: bool) -> std::io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The virtio_blk_config the guest reads (virtio 1.2, 5.2.4), little-endian.
fn config_space(sectors: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, &sectors.to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_RANGE_SEGS.to_le_bytes()); // max_discard_seg
    put(44, &DISCARD_ALIGN_SECTORS.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_RANGE_SEGS.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = self.config.get(from..).unwrap_or(&[]);
        for (d, s) in data.iter_mut().zip(src) {
            *d = *s;
        }
    }

    fn reset(&mut self) {
        // Waits for the ring and the workers: nothing writes into guest memory after this.
        drop(self.quiesce());
    }

    fn ready_for_more(&self, _index: u16) -> bool {
        self.pool.in_flight() + self.ring.as_ref().map_or(0, Ring::in_flight) < usize::from(QUEUE_SIZE)
    }

    fn handle_chain(&mut self, _index: u16, chain: Chain, mem: &GuestMemoryMmap) -> Handled {
        let Some(status) = chain.last_writable_byte() else {
            return Handled::Done(Outcome::refused(0)); // nowhere to say what went wrong
        };
        let (code, refused) = match self.request(&chain, mem, status) {
            Ok(Work::Job(mut job)) => {
                if let Some(outcome) = self.try_now(&mut job) {
                    return Handled::Done(outcome);
                }
                let job = match &mut self.ring {
                    Some(ring) if Ring::takes(&job.op) => {
                        let fd = self.pool.data_fd(&job.op);
                        match ring.submit(job, fd) {
                            Ok(()) => return Handled::Queued,
                            Err(job) => job,
                        }
                    }
                    _ => job,
                };
                self.pool.submit(job);
                return Handled::Queued;
            }
            Ok(Work::Now(outcome)) => {
                let _ = mem.write_obj(VIRTIO_BLK_S_OK as u8, status);
                return Handled::Done(outcome);
            }
            Err(Refusal::Status(code)) => (code, false),
            Err(Refusal::Malformed) => (VIRTIO_BLK_S_IOERR, true),
        };
        let _ = mem.write_obj(code as u8, status);
        Handled::Done(Outcome { used_len: 1, bytes: 0, refused })
    }

    fn refuse_chain(&mut self, _index: u16, partial: &Chain, mem: &GuestMemoryMmap) -> u32 {
        match partial.last_writable_byte() {
            Some(status) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status).is_ok() => 1,
            _ => 0,
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.pool.event_fd()];
        fds.extend(self.ring.as_ref().map(Ring::event_fd));
        fds
    }

    fn backend_ready(&mut self, i: usize) -> Vec<Completion> {
        match (i, &mut self.ring) {
            (1, Some(ring)) => ring.take_done(),
            _ => self.pool.take_done(),
        }
    }

    fn quiesce(&mut self) -> Vec<Completion> {
        let mut done = self.pool.quiesce();
        if let Some(ring) = &mut self.ring {
            done.extend(ring.quiesce());
        }
        done
    }

    fn state(&self) -> DeviceState {
        DeviceState::Block { capacity_sectors: self.capacity_sectors(), read_only: self.read_only, id: self.id.to_vec() }
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        let mine = self.state();
        if *state != mine {
            return Err(VirtioError::Device(format!("the snapshot's disk was {state:?}, this one is {mine:?}")));
        }
        Ok(())
    }
}
