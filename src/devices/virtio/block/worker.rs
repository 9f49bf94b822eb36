//! The block device's I/O threads: a few workers take requests the event loop parsed,
//! do the file I/O straight into guest memory (preadv/pwritev on host pointers), write
//! the status byte, and post the completion through an eventfd the event loop watches.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::virtio::chain::HostSlice;
use crate::devices::virtio::{Completion, Outcome};

/// iovecs one preadv/pwritev takes at most (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;
/// The buffer for writing zeroes where the file cannot make them itself.
const ZERO_CHUNK: usize = 64 << 10;

pub(super) enum Op {
    /// `direct`: through the O_DIRECT file (the request fits its alignment).
    Read { iov: Vec<HostSlice>, offset: u64, direct: bool },
    Write { iov: Vec<HostSlice>, offset: u64, direct: bool },
    Flush,
    /// (offset, length) in bytes; the data may read back as anything after.
    Discard { ranges: Vec<(u64, u64)> },
    /// (offset, length) in bytes; must read back as zeroes after.
    WriteZeroes { ranges: Vec<(u64, u64)>, unmap: bool },
}

pub(super) struct Job {
    pub op: Op,
    pub head: u16,
    /// Where the status byte goes (checked inside guest RAM by the parser).
    pub status: GuestAddress,
    /// The used length on success (data written to the guest plus the status byte).
    pub used_len: u32,
    pub bytes: u64,
    /// Keeps the guest RAM that `op`'s host pointers address mapped.
    pub mem: GuestMemoryMmap,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Jobs submitted whose completion is not yet in `done` (queued or running).
    in_flight: usize,
    done: Vec<Completion>,
    closing: bool,
}

/// The disk opened a second time with O_DIRECT, and the alignment a request must
/// have to use it (from statx's STATX_DIOALIGN; 4 KiB where the kernel cannot say).
pub(super) struct DirectIo {
    file: File,
    mem_align: usize,
    offset_align: u64,
}

impl DirectIo {
    pub fn open(path: &std::path::Path, read_only: bool) -> io::Result<DirectIo> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_DIRECT).open(path)?;
        let (mem_align, offset_align) = dio_alignment(&file).unwrap_or((4096, 4096));
        if mem_align == 0 || offset_align == 0 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "its file system does not do direct I/O"));
        }
        Ok(DirectIo { file, mem_align: mem_align as usize, offset_align: u64::from(offset_align) })
    }

    /// Whether every buffer's address and length, and the offset and total, are
    /// aligned as O_DIRECT on this file needs.
    fn fits(&self, iov: &[HostSlice], offset: u64) -> bool {
        let total: u64 = iov.iter().map(|s| s.len as u64).sum();
        iov.iter().all(|s| (s.ptr as usize).is_multiple_of(self.mem_align) && s.len.is_multiple_of(self.mem_align))
            && offset.is_multiple_of(self.offset_align)
            && total.is_multiple_of(self.offset_align)
    }
}

/// (memory alignment, offset alignment) for O_DIRECT on `file`, if statx says.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: libc::statx is a plain struct of integers: all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx fills `stx` for an fd we hold open; the empty path with
    // AT_EMPTY_PATH names the fd itself.
    let rc = unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

struct Shared {
    file: Arc<File>,
    direct: Option<DirectIo>,
    state: Mutex<State>,
    /// Signalled when a job is queued, and at close.
    work: Condvar,
    /// Signalled when a job finishes.
    idle: Condvar,
    event: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(file: Arc<File>, direct: Option<DirectIo>, workers: usize, name: &str) -> io::Result<Pool> {
        let shared = Arc::new(Shared {
            file,
            direct,
            state: Mutex::default(),
            work: Condvar::new(),
            idle: Condvar::new(),
            event: EventFd::new(EFD_NONBLOCK)?,
        });
        let mut pool = Pool { shared, threads: Vec::new() };
        for i in 0..workers {
            let s = pool.shared.clone();
            // On an error, dropping `pool` ends the threads already started.
            let t = std::thread::Builder::new().name(format!("{name}-io{i}")).spawn(move || worker(&s))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    pub fn submit(&self, job: Job) {
        let mut st = self.shared.lock();
        st.in_flight += 1;
        st.jobs.push_back(job);
        drop(st);
        self.shared.work.notify_one();
    }

    pub fn file(&self) -> &File {
        &self.shared.file
    }

    /// The fd a read or write goes through: the O_DIRECT one where the parser chose it.
    pub fn data_fd(&self, op: &Op) -> RawFd {
        match (op, &self.shared.direct) {
            (Op::Read { direct: true, .. } | Op::Write { direct: true, .. }, Some(d)) => d.file.as_raw_fd(),
            _ => self.shared.file.as_raw_fd(),
        }
    }

    /// Whether a request with these buffers at `offset` can go through O_DIRECT.
    pub fn fits_direct(&self, iov: &[HostSlice], offset: u64) -> bool {
        self.shared.direct.as_ref().is_some_and(|d| d.fits(iov, offset))
    }

    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    pub fn event_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    /// The completions posted so far.
    pub fn take_done(&self) -> Vec<Completion> {
        let _ = self.shared.event.read();
        std::mem::take(&mut self.shared.lock().done)
    }

    /// Waits until no job is queued or running, then returns every completion. After
    /// this no worker touches guest memory until the next submit.
    pub fn quiesce(&self) -> Vec<Completion> {
        let mut st = self.shared.lock();
        while st.in_flight > 0 {
            st = self.shared.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let _ = self.shared.event.read();
        std::mem::take(&mut st.done)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.closing {
                    return;
                }
                if let Some(job) = st.jobs.pop_front() {
                    break job;
                }
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let outcome = settle(&job, execute(shared, &job.op).is_ok());
        let head = job.head;
        drop(job); // guest memory is no longer touched past this point
        {
            let mut st = shared.lock();
            st.done.push(Completion { queue: 0, head, outcome });
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        shared.idle.notify_all();
        let _ = shared.event.write(1);
    }
}

/// Writes a finished job's status byte and returns what the used ring gets.
pub(super) fn settle(job: &Job, ok: bool) -> Outcome {
    let status = if ok { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR } as u8;
    // The parser checked the address; a failure here cannot be reported anyway.
    let _ = job.mem.write_obj(status, job.status);
    if ok { Outcome { used_len: job.used_len, bytes: job.bytes, refused: false } } else { Outcome { used_len: 1, bytes: 0, refused: false } }
}

fn execute(shared: &Shared, op: &Op) -> io::Result<()> {
    let fd = shared.file.as_raw_fd();
    // The parser set `direct` only where the O_DIRECT file exists.
    let data_fd = |direct: bool| match (&shared.direct, direct) {
        (Some(d), true) => d.file.as_raw_fd(),
        _ => fd,
    };
    match op {
        Op::Read { iov, offset, direct } => transfer(data_fd(*direct), iov, *offset, false),
        Op::Write { iov, offset, direct } => transfer(data_fd(*direct), iov, *offset, true),
        Op::Flush => {
            // SAFETY: fdatasync on a file descriptor this pool's file keeps open.
            cvt(unsafe { libc::fdatasync(fd) })
        }
        Op::Discard { ranges } => {
            for &(offset, len) in ranges {
                match fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                    // A discard is a hint: a file that cannot punch holes keeps its data.
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    r => r?,
                }
            }
            Ok(())
        }
        Op::WriteZeroes { ranges, unmap } => {
            let mode = if *unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
            for &(offset, len) in ranges {
                match fallocate(fd, mode | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeroes(fd, offset, len)?,
                    r => r?,
                }
            }
            Ok(())
        }
    }
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    loop {
        // SAFETY: fallocate on an open fd; it touches only the file.
        let rc = unsafe { libc::fallocate(fd, mode, off, len) };
        match cvt(rc) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Writes zeroes the slow way, for files that cannot zero a range themselves.
fn write_zeroes(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK];
    let iov = [HostSlice { ptr: zeroes.as_ptr().cast_mut(), len: ZERO_CHUNK }];
    let mut at = offset;
    let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    while at < end {
        let n = (end - at).min(ZERO_CHUNK as u64);
        let piece = [HostSlice { len: n as usize, ..iov[0] }];
        // pwritev only reads from the buffer, so handing it `zeroes` (shared) is sound.
        transfer(fd, &piece, at, true)?;
        at += n;
    }
    Ok(())
}

/// preadv/pwritev of all of `iov` at `offset`, however the kernel splits it.
fn transfer(fd: RawFd, iov: &[HostSlice], offset: u64, write: bool) -> io::Result<()> {
    let mut pending: VecDeque<HostSlice> = iov.iter().copied().filter(|s| s.len > 0).collect();
    let mut offset = offset;
    let how = if write { How::Write } else { How::Read };
    match move_bytes(fd, &mut pending, &mut offset, how)? {
        true => Ok(()),
        false => Err(io::ErrorKind::WouldBlock.into()), // only a cached read stops early
    }
}

/// A read served from the host's page cache on the calling thread (preadv2 with
/// RWF_NOWAIT), so a request whose data is cached needs no hand-off to a worker.
/// Returns true when all of it was read; false when the rest is not cached, with
/// `op` advanced past what was read, to be finished by a worker.
pub(super) fn read_cached(file: &File, op: &mut Op) -> io::Result<bool> {
    // A direct read is meant to bypass the cache: it goes to a worker as it is.
    let Op::Read { iov, offset, direct: false } = op else { return Ok(false) };
    let mut pending: VecDeque<HostSlice> = iov.iter().copied().filter(|s| s.len > 0).collect();
    let done = move_bytes(file.as_raw_fd(), &mut pending, offset, How::ReadCached)?;
    *iov = pending.into();
    Ok(done)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    Read,
    Write,
    /// A read of what the page cache holds: stops (false) where it would wait.
    ReadCached,
}

/// Moves the bytes of `pending` at `offset`, advancing both, until all moved (true)
/// or, for a cached read, the rest is not cached (false). Every round moves at least
/// one byte or ends, so it ends.
fn move_bytes(fd: RawFd, pending: &mut VecDeque<HostSlice>, offset: &mut u64, how: How) -> io::Result<bool> {
    let mut vecs: Vec<libc::iovec> = Vec::with_capacity(pending.len().min(IOV_MAX));
    while !pending.is_empty() {
        vecs.clear();
        vecs.extend(pending.iter().take(IOV_MAX).map(|s| libc::iovec { iov_base: s.ptr.cast(), iov_len: s.len }));
        let off = i64::try_from(*offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let count = vecs.len() as libc::c_int; // at most IOV_MAX
        // SAFETY: each iovec addresses guest RAM (or a live local buffer for writes of
        // zeroes) that stays mapped for the call: the job holds the GuestMemoryMmap. The
        // kernel writes only into the buffers for a read; for a write it only reads them.
        let n = unsafe {
            match how {
                How::Write => libc::pwritev(fd, vecs.as_ptr(), count, off),
                How::Read => libc::preadv(fd, vecs.as_ptr(), count, off),
                How::ReadCached => libc::preadv2(fd, vecs.as_ptr(), count, off, libc::RWF_NOWAIT),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not cached, or this file cannot say: a worker reads the rest.
                Some(libc::EAGAIN | libc::EOPNOTSUPP) if how == How::ReadCached => return Ok(false),
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into()); // the file shrank under us
        }
        let mut moved = n as usize;
        *offset += moved as u64;
        while moved > 0 {
            let Some(front) = pending.front_mut() else { break };
            if moved >= front.len {
                moved -= front.len;
                pending.pop_front();
            } else {
                // SAFETY: `moved < front.len`, so the pointer stays inside the same buffer.
                front.ptr = unsafe { front.ptr.add(moved) };
                front.len -= moved;
                moved = 0;
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (File, vmm_sys_util::tempfile::TempFile) {
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().write_all(bytes).unwrap();
        t.as_file().sync_all().unwrap();
        (t.as_file().try_clone().unwrap(), t)
    }

    /// Two buffers of 8 KiB each, as a read's iovec.
    fn read_op(bufs: &mut [Vec<u8>], offset: u64) -> Op {
        let iov = bufs.iter_mut().map(|b| HostSlice { ptr: b.as_mut_ptr(), len: b.len() }).collect();
        Op::Read { iov, offset, direct: false }
    }

    #[test]
    fn a_cached_read_is_done_on_the_calling_thread() {
        let data: Vec<u8> = (0..32768u32).map(|i| (i % 253) as u8).collect();
        let (file, _t) = file_of(&data);
        let mut bufs = vec![vec![0u8; 8192], vec![0u8; 8192]];
        let mut op = read_op(&mut bufs, 4096);
        // Just written: in the page cache (a file system that cannot say reads nothing).
        if read_cached(&file, &mut op).unwrap() {
            assert_eq!(bufs.concat(), data[4096..4096 + 16384]);
        }
    }

    #[test]
    fn an_uncached_rest_is_left_for_a_worker_with_the_op_advanced() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let (file, _t) = file_of(&data);
        // Drop the file's pages, then bring back only the first 4 KiB.
        // SAFETY: fadvise on an open fd only changes caching.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut first = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut first, 0).unwrap();
        let mut bufs = vec![vec![0u8; 8192], vec![0u8; 8192]];
        let mut op = read_op(&mut bufs, 0);
        let done = read_cached(&file, &mut op).unwrap();
        if !done {
            // What the cache did not hold, a worker's plain read finishes.
            let Op::Read { iov, offset, .. } = &op else { panic!("the op changed kind") };
            assert_eq!(*offset as usize + iov.iter().map(|s| s.len).sum::<usize>(), 16384);
            transfer(file.as_raw_fd(), iov, *offset, false).unwrap();
        }
        assert_eq!(bufs.concat(), data[..16384]);
    }

    #[test]
    fn only_reads_are_tried_at_once() {
        let (file, _t) = file_of(&[0u8; 4096]);
        let mut op = Op::Flush;
        assert!(!read_cached(&file, &mut op).unwrap());
    }
}
