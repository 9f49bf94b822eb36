//! Descriptor chains of a split virtqueue, walked and checked before a device sees them.
//!
//! virtio-queue's own chain iterator ends a chain silently on a fault; skiff walks the
//! descriptor table itself so that every fault has a name, the walk is bounded by the
//! table sizes, and a device gets a chain whose buffers all lie inside guest RAM,
//! device-readable ones first.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Bytes of one descriptor table entry.
pub const DESC_SIZE: u64 = 16;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the guest reads it back).
    pub writable: bool,
}

/// A chain: its head index (what goes back in the used ring) and its buffers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
}

impl Chain {
    pub fn readable(&self) -> impl Iterator<Item = &Desc> {
        self.descs.iter().filter(|d| !d.writable)
    }
    pub fn writable(&self) -> impl Iterator<Item = &Desc> {
        self.descs.iter().filter(|d| d.writable)
    }
    /// Total bytes the device may read (fits u64: a chain carries less than 4 GiB).
    pub fn readable_len(&self) -> u64 {
        self.readable().map(|d| u64::from(d.len)).sum()
    }
    pub fn writable_len(&self) -> u64 {
        self.writable().map(|d| u64::from(d.len)).sum()
    }
    /// The guest address of the last device-writable byte (where virtio-blk puts its
    /// status), if the chain ends in a non-empty writable buffer.
    pub fn last_writable_byte(&self) -> Option<GuestAddress> {
        let last = self.descs.last().filter(|d| d.writable && d.len > 0)?;
        last.addr.checked_add(u64::from(last.len) - 1)
    }
}

#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor index {index} is past the end of its table of {size}")]
    IndexOutOfRange { index: u16, size: u16 },
    #[error("chain visits more than {limit} descriptors (a loop)")]
    Loop { limit: u32 },
    #[error("chain has more than {limit} buffers")]
    TooLong { limit: u32 },
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor also has the NEXT flag")]
    IndirectWithNext,
    #[error("indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    #[error("indirect table at {addr:#x} of {len} bytes is empty, not whole entries, too large or outside RAM")]
    BadIndirectTable { addr: u64, len: u32 },
    #[error("descriptor table entry at {0:#x} is outside guest RAM")]
    TableOutsideRam(u64),
    #[error("buffer {addr:#x}+{len:#x} is outside guest RAM")]
    BufferOutsideRam { addr: u64, len: u32 },
    #[error("chain carries 4 GiB or more")]
    TooManyBytes,
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
}

/// One raw entry of a descriptor table.
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemoryMmap, table: GuestAddress, index: u16) -> Result<RawDesc, ChainError> {
    let at = table.checked_add(u64::from(index) * DESC_SIZE).ok_or(ChainError::TableOutsideRam(table.0))?;
    let mut raw = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut raw, at).map_err(|_| ChainError::TableOutsideRam(at.0))?;
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
    Ok(RawDesc {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    })
}

/// Walks the chain at `head` of the descriptor table at `table` (`size` entries).
/// On a fault, returns it with the buffers read before it (a device may still find
/// somewhere to report the error). Visits at most `size` entries of the table and at
/// most `size` of an indirect table, whatever the guest wrote.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
    indirect_ok: bool,
) -> Result<Chain, (ChainError, Chain)> {
    let mut chain = Chain { head, descs: Vec::new() };
    match walk_into(mem, table, size, head, indirect_ok, &mut chain) {
        Ok(()) => Ok(chain),
        Err(e) => Err((e, chain)),
    }
}

fn walk_into(
    mem: &GuestMemoryMmap,
    mut table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_ok: bool,
    chain: &mut Chain,
) -> Result<(), ChainError> {
    let mut size = queue_size;
    let mut index = head;
    // Entries left to visit in the current table: more would revisit one (a loop).
    let mut budget = u32::from(size);
    let mut in_indirect = false;
    let mut total: u32 = 0;
    let mut seen_writable = false;
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        if budget == 0 {
            return Err(ChainError::Loop { limit: u32::from(size) });
        }
        budget -= 1;
        let d = read_desc(mem, table, index)?;
        if d.flags & F_INDIRECT != 0 {
            if !indirect_ok {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if d.flags & F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = u64::from(d.len) / DESC_SIZE;
            let bad = ChainError::BadIndirectTable { addr: d.addr, len: d.len };
            if d.len == 0 || !u64::from(d.len).is_multiple_of(DESC_SIZE) || entries > u64::from(queue_size) {
                return Err(bad);
            }
            if !GuestMemoryBackend::check_range(mem, GuestAddress(d.addr), d.len as usize) {
                return Err(bad);
            }
            table = GuestAddress(d.addr);
            size = entries as u16; // entries <= queue_size, a u16
            budget = u32::from(size);
            index = 0;
            in_indirect = true;
            continue;
        }
        let writable = d.flags & F_WRITE != 0;
        if !writable && seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        seen_writable |= writable;
        total = total.checked_add(d.len).ok_or(ChainError::TooManyBytes)?;
        if d.len > 0 && !GuestMemoryBackend::check_range(mem, GuestAddress(d.addr), d.len as usize) {
            return Err(ChainError::BufferOutsideRam { addr: d.addr, len: d.len });
        }
        if chain.descs.len() >= usize::from(queue_size) {
            return Err(ChainError::TooLong { limit: u32::from(queue_size) });
        }
        chain.descs.push(Desc { addr: GuestAddress(d.addr), len: d.len, writable });
        if d.flags & F_NEXT == 0 {
            return Ok(());
        }
        index = d.next;
    }
}

/// A piece of guest RAM as a host pointer, for preadv/pwritev.
#[derive(Clone, Copy, Debug)]
pub struct HostSlice {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: a HostSlice is only an address range in guest RAM; whoever dereferences it
// (the block workers) keeps a clone of the GuestMemoryMmap that maps it, so it stays
// mapped, and guest RAM is shared with the guest anyway (no Rust references into it).
unsafe impl Send for HostSlice {}

/// The host pieces of bytes `[skip, skip + take)` of the stream formed by `descs`, split
/// where a buffer ends or crosses from one RAM region to another. `None` if the stream
/// is shorter or a piece is not in RAM (walk() already checked, so that is a bug).
pub fn host_slices<'a>(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = &'a Desc>,
    mut skip: u64,
    mut take: u64,
) -> Option<Vec<HostSlice>> {
    let mut out = Vec::new();
    for d in descs {
        if take == 0 {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let mut addr = d.addr.checked_add(skip)?;
        let mut left = (len - skip).min(take);
        take -= left;
        skip = 0;
        // Each round ends a region: bounded by the number of regions a buffer crosses.
        while left > 0 {
            let (region, at) = mem.to_region_addr(addr)?;
            let piece = (region.len() - at.raw_value()).min(left);
            let ptr = region.get_host_address(at).ok()?;
            out.push(HostSlice { ptr, len: usize::try_from(piece).ok()? });
            left -= piece;
            addr = addr.checked_add(piece)?;
        }
    }
    (take == 0).then_some(out)
}

/// Copies bytes `[offset, offset + buf.len())` of the stream formed by `descs` into `buf`.
/// Returns false if the stream is shorter or not in RAM.
pub fn read_stream<'a>(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = &'a Desc>,
    offset: u64,
    buf: &mut [u8],
) -> bool {
    copy_stream(descs, offset, buf.len(), |addr, from, len| {
        buf.get_mut(from..from + len).is_some_and(|b| mem.read_slice(b, addr).is_ok())
    })
}

/// Copies `buf` into bytes `[offset, ...)` of the stream formed by `descs`.
pub fn write_stream<'a>(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = &'a Desc>,
    offset: u64,
    buf: &[u8],
) -> bool {
    copy_stream(descs, offset, buf.len(), |addr, from, len| {
        buf.get(from..from + len).is_some_and(|b| mem.write_slice(b, addr).is_ok())
    })
}

/// Calls `f(guest address, offset into the caller's buffer, length)` for each piece.
fn copy_stream<'a>(
    descs: impl Iterator<Item = &'a Desc>,
    mut skip: u64,
    total: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
) -> bool {
    let mut done = 0usize;
    for d in descs {
        if done == total {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let piece = usize::try_from(len - skip).unwrap_or(usize::MAX).min(total - done);
        let Some(addr) = d.addr.checked_add(skip) else { return false };
        if !f(addr, done, piece) {
            return false;
        }
        done += piece;
        skip = 0;
    }
    done == total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + u64::from(i) * 16);
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
        mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
        mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
    }

    #[test]
    fn walks_a_direct_chain() {
        let m = mem();
        put(&m, 0, 0, 0x1000, 16, F_NEXT, 2);
        put(&m, 0, 2, 0x2000, 512, F_NEXT | F_WRITE, 1);
        put(&m, 0, 1, 0x3000, 1, F_WRITE, 0);
        let c = walk(&m, GuestAddress(0), 4, 0, false).unwrap();
        assert_eq!(c.descs.len(), 3);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
        assert_eq!(c.last_writable_byte(), Some(GuestAddress(0x3000)));
    }

    #[test]
    fn every_fault_is_named_and_bounded() {
        let m = mem();
        // A loop 0 -> 1 -> 0.
        put(&m, 0, 0, 0x1000, 16, F_NEXT, 1);
        put(&m, 0, 1, 0x1000, 16, F_NEXT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 2, 0, false).unwrap_err().0, ChainError::Loop { limit: 2 });
        // Next index past the table.
        put(&m, 0, 1, 0x1000, 16, F_NEXT, 9);
        assert_eq!(
            walk(&m, GuestAddress(0), 2, 0, false).unwrap_err().0,
            ChainError::IndexOutOfRange { index: 9, size: 2 }
        );
        // A buffer in the hole between the regions, and one wrapping the address space.
        put(&m, 0, 0, 0x1_8000, 16, 0, 0);
        assert!(matches!(walk(&m, GuestAddress(0), 2, 0, false), Err((ChainError::BufferOutsideRam { .. }, _))));
        put(&m, 0, 0, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(walk(&m, GuestAddress(0), 2, 0, false), Err((ChainError::BufferOutsideRam { .. }, _))));
        // A buffer longer than RAM.
        put(&m, 0, 0, 0x1000, u32::MAX, F_NEXT, 1);
        assert!(matches!(walk(&m, GuestAddress(0), 2, 0, false), Err((ChainError::BufferOutsideRam { .. }, _))));
        // Readable after writable.
        put(&m, 0, 0, 0x1000, 16, F_NEXT | F_WRITE, 1);
        put(&m, 0, 1, 0x1000, 16, 0, 0);
        let (e, partial) = walk(&m, GuestAddress(0), 2, 0, false).unwrap_err();
        assert_eq!(e, ChainError::ReadableAfterWritable);
        assert_eq!(partial.descs.len(), 1);
        // The table itself outside RAM.
        assert!(matches!(walk(&m, GuestAddress(0xfff8), 4, 1, false), Err((ChainError::TableOutsideRam(_), _))));
    }

    #[test]
    fn lengths_adding_past_4_gib() {
        // Buffers in RAM may overlap: 3 GiB twice (reserved, never touched).
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 3 << 30)]).unwrap();
        put(&m, 0, 0, 0x1000, 3 << 30 >> 1, F_NEXT, 1);
        put(&m, 0, 1, 0x1000, 3 << 30 >> 1, F_NEXT, 2);
        put(&m, 0, 2, 0x1000, 3 << 30 >> 1, 0, 0);
        let (e, partial) = walk(&m, GuestAddress(0), 4, 0, false).unwrap_err();
        assert_eq!(e, ChainError::TooManyBytes);
        assert_eq!(partial.descs.len(), 2);
    }

    #[test]
    fn indirect_tables_are_checked() {
        let m = mem();
        put(&m, 0x800, 0, 0x1000, 16, F_NEXT, 1);
        put(&m, 0x800, 1, 0x3000, 1, F_WRITE, 0);
        put(&m, 0, 0, 0x800, 32, F_INDIRECT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0, false).unwrap_err().0, ChainError::IndirectNotNegotiated);
        let c = walk(&m, GuestAddress(0), 4, 0, true).unwrap();
        assert_eq!(c.descs.len(), 2);
        // Indirect inside indirect.
        put(&m, 0x800, 1, 0x900, 16, F_INDIRECT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0, true).unwrap_err().0, ChainError::NestedIndirect);
        // Odd sizes, too large, with NEXT.
        for (len, flags) in [(0, F_INDIRECT), (24, F_INDIRECT), (16 * 5, F_INDIRECT), (32, F_INDIRECT | F_NEXT)] {
            put(&m, 0, 0, 0x800, len, flags, 1);
            assert!(walk(&m, GuestAddress(0), 4, 0, true).is_err(), "len {len} flags {flags}");
        }
        // A loop inside the indirect table ends too.
        put(&m, 0, 0, 0x800, 32, F_INDIRECT, 0);
        put(&m, 0x800, 1, 0x1000, 16, F_NEXT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 4, 0, true).unwrap_err().0, ChainError::Loop { limit: 2 });
    }

    #[test]
    fn streams_split_across_buffers_and_regions() {
        let m = mem();
        let descs = [
            Desc { addr: GuestAddress(0xfff0), len: 0x20, writable: false }, // crosses into the hole
            Desc { addr: GuestAddress(0x20000), len: 8, writable: false },
        ];
        // The first buffer is not all RAM: no host pieces for it.
        assert!(host_slices(&m, descs.iter(), 0, 0x28).is_none());
        let descs = [
            Desc { addr: GuestAddress(0x100), len: 4, writable: false },
            Desc { addr: GuestAddress(0x20000), len: 8, writable: false },
        ];
        assert!(write_stream(&m, descs.iter(), 2, &[1, 2, 3, 4, 5]));
        let mut back = [0u8; 12];
        assert!(read_stream(&m, descs.iter(), 0, &mut back));
        assert_eq!(back, [0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0]);
        assert!(!read_stream(&m, descs.iter(), 8, &mut [0u8; 5]));
        let s = host_slices(&m, descs.iter(), 3, 6).unwrap();
        assert_eq!(s.iter().map(|s| s.len).collect::<Vec<_>>(), vec![1, 5]);
    }
}
