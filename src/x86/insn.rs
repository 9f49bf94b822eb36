//! Fetching and decoding the guest instruction at CS:RIP: the linear address from the
//! code segment, each page translated through the guest's own tables (paging.rs) with
//! execute access, up to 15 bytes read, and iced-x86 decoding in the vCPU's mode.

use std::fmt;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use kvm_bindings::kvm_sregs;

use super::paging::{Access, FailReason, PagingContext, PhysMem, Segment, Translation, for_each_piece, linear_address};

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

const CR0_PE: u64 = 1;
const EFER_LMA: u64 = 1 << 10;

/// An instruction read from guest memory.
#[derive(Clone, Debug)]
pub struct FetchedInsn {
    pub bytes: [u8; MAX_INSN_LEN],
    /// How many bytes could be fetched (the instruction may be shorter).
    pub len: usize,
    pub insn: Instruction,
    pub bitness: u32,
    /// Linear address of the first byte.
    pub rip: u64,
}

impl FetchedInsn {
    /// The instruction's bytes.
    pub fn bytes(&self) -> &[u8] {
        let n = self.insn.len().clamp(1, self.len.max(1));
        self.bytes.get(..n).unwrap_or(&[])
    }

    /// Intel-syntax disassembly.
    pub fn disasm(&self) -> String {
        let mut out = String::new();
        IntelFormatter::new().format(&self.insn, &mut out);
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The first byte's page did not translate: retry (not present) or fail.
    Translate(Translation),
    /// The bytes do not decode to a valid instruction.
    Decode { bytes: Vec<u8> },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            FetchError::Translate(t) => write!(f, "{t}"),
            FetchError::Decode { bytes } => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                write!(f, "bytes {} do not decode to an instruction", hex.join(" "))
            }
        }
    }
}

/// The code size the vCPU runs at: 64 in long mode with CS.L, 32 with CS.D, else 16.
pub fn bitness(sregs: &kvm_sregs) -> u32 {
    if sregs.cr0 & CR0_PE == 0 {
        16
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

/// Fetches and decodes the instruction at CS:RIP: segmentation first (CS base and
/// limit outside 64-bit mode), then each page through the guest's tables with execute
/// access. An instruction may cross into a page that does not translate; what was
/// fetched before the boundary is decoded, and is good if the instruction ends there.
pub fn fetch<M: PhysMem>(mem: &M, sregs: &kvm_sregs, rip: u64, rflags: u64) -> Result<FetchedInsn, FetchError> {
    fetch_in(mem, sregs, &PagingContext::from_sregs(sregs, rflags), rip)
}

/// [`fetch`] through a given walk (the vCPU's MAXPHYADDR, for one).
pub fn fetch_in<M: PhysMem>(mem: &M, sregs: &kvm_sregs, ctx: &PagingContext, rip: u64) -> Result<FetchedInsn, FetchError> {
    let bits = bitness(sregs);
    // 64-bit mode ignores CS's base (only FS and GS keep one).
    let cs = if bits == 64 { Segment::default() } else { Segment::from_kvm(&sregs.cs) };
    // The limit check is for the first byte; bytes past the limit are cut below.
    let linear = linear_address(&cs, rip, 1, bits).map_err(|r| FetchError::Translate(Translation::Fail(r)))?;
    let mut want = MAX_INSN_LEN;
    if bits != 64 {
        let offset = rip & 0xffff_ffff;
        let room = u64::from(sregs.cs.limit).saturating_sub(offset).saturating_add(1);
        want = want.min(room.min(MAX_INSN_LEN as u64) as usize);
    }
    let mut bytes = [0u8; MAX_INSN_LEN];
    let mut len = 0usize;
    let first = for_each_piece(mem, ctx, linear, want, Access::Execute, |gpa, done, n| {
        if len == done && bytes.get_mut(done..done + n).is_some_and(|dst| mem.read_bytes(gpa, dst)) {
            len += n;
        }
    });
    if let Err((addr, t)) = first
        && addr == linear
    {
        return Err(FetchError::Translate(t));
    }
    if len == 0 {
        return Err(FetchError::Translate(Translation::Fail(FailReason::NotRam { level: 0, gpa: linear })));
    }
    let mut decoder = Decoder::with_ip(bits, &bytes[..len], rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(FetchError::Decode { bytes: bytes[..len].to_vec() });
    }
    Ok(FetchedInsn { bytes, len, insn, bitness: bits, rip: linear })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn long_sregs() -> kvm_sregs {
        let mut s = kvm_sregs { cr0: 0x8000_0011, cr3: 0x1000, cr4: 0x20, efer: 0x500, ..Default::default() };
        s.cs.l = 1;
        // Left over from RESET; 64-bit mode ignores it.
        s.cs.base = 0xffff_0000;
        s
    }

    /// Identity-maps the first 16 MiB with 2 MiB pages (PML4 0x1000, PDPT 0x2000, PD 0x3000).
    fn identity(m: &GuestMemoryMmap) {
        m.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        for i in 0..8u64 {
            m.write_obj((i << 21) | 0x83, GuestAddress(0x3000 + i * 8)).unwrap();
        }
    }

    #[test]
    fn decodes_in_long_mode() {
        let m = mem();
        identity(&m);
        m.write_slice(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], GuestAddress(0x10_0000)).unwrap();
        let f = fetch(&m, &long_sregs(), 0x10_0000, 2).unwrap();
        assert_eq!(f.bitness, 64);
        assert_eq!(f.insn.len(), 5);
        assert_eq!(f.bytes(), &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
        assert_eq!(f.disasm(), "lock cmpxchg16b [rdi]");
    }

    #[test]
    fn real_mode_uses_cs_base() {
        let m = mem();
        m.write_slice(&[0xea, 0x5b, 0xe0, 0x00, 0xf0], GuestAddress(0xffff0)).unwrap();
        let mut s = kvm_sregs::default();
        s.cs.base = 0xf0000;
        s.cs.limit = 0xffff;
        let f = fetch(&m, &s, 0xfff0, 2).unwrap();
        assert_eq!(f.bitness, 16);
        assert_eq!(f.disasm(), "jmp far 0E05Bh,0F000h");
        assert_eq!(f.rip, 0xffff0);
    }

    #[test]
    fn crossing_into_a_missing_page() {
        let m = mem();
        identity(&m);
        // Unmap the 2 MiB page after 0x200000 and put a 1-byte instruction at its edge.
        m.write_obj(0u64, GuestAddress(0x3000 + 8)).unwrap();
        m.write_slice(&[0xcc], GuestAddress(0x1f_ffff)).unwrap();
        let f = fetch(&m, &long_sregs(), 0x1f_ffff, 2).unwrap();
        assert_eq!(f.disasm(), "int3");
        // The first byte's page itself not present: retry.
        assert!(matches!(fetch(&m, &long_sregs(), 0x20_0000, 2), Err(FetchError::Translate(Translation::Retry { level: 2, .. }))));
    }

    #[test]
    fn invalid_bytes() {
        let m = mem();
        identity(&m);
        m.write_slice(&[0x0f, 0x0b], GuestAddress(0x10_0000)).unwrap(); // ud2 is valid
        assert_eq!(fetch(&m, &long_sregs(), 0x10_0000, 2).unwrap().disasm(), "ud2");
        m.write_slice(&[0x06], GuestAddress(0x10_0000)).unwrap(); // push es: invalid in 64-bit
        assert!(matches!(fetch(&m, &long_sregs(), 0x10_0000, 2), Err(FetchError::Decode { .. })));
    }

    #[test]
    fn instruction_across_two_pages_mapped_apart() {
        let m = mem();
        identity(&m);
        // PD entry 4 -> a page table at 0x5000: virtual 0x800000 -> 0x9000 and
        // 0x801000 -> 0x6000, so the instruction's halves are physically apart.
        m.write_obj(0x5003u64, GuestAddress(0x3000 + 4 * 8)).unwrap();
        m.write_obj(0x9003u64, GuestAddress(0x5000)).unwrap();
        m.write_obj(0x6003u64, GuestAddress(0x5008)).unwrap();
        // mov rax, 0x1122334455667788 (10 bytes), 3 before the boundary.
        let insn = [0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11];
        m.write_slice(&insn[..3], GuestAddress(0x9ffd)).unwrap();
        m.write_slice(&insn[3..], GuestAddress(0x6000)).unwrap();
        let f = fetch(&m, &long_sregs(), 0x80_0ffd, 2).unwrap();
        assert_eq!(f.bytes(), &insn);
        assert_eq!(f.disasm(), "mov rax,1122334455667788h");
        // With the second page gone, the instruction is cut short: it cannot decode.
        m.write_obj(0u64, GuestAddress(0x5008)).unwrap();
        assert!(matches!(fetch(&m, &long_sregs(), 0x80_0ffd, 2), Err(FetchError::Decode { .. })));
    }

    #[test]
    fn segment_limit_cuts_the_fetch() {
        let m = mem();
        m.write_slice(&[0x90, 0x90], GuestAddress(0x1fffe)).unwrap();
        let mut s = kvm_sregs { cr0: 1, ..Default::default() };
        s.cs.base = 0x10000;
        s.cs.limit = 0xffff;
        s.cs.db = 1;
        s.cs.s = 1;
        s.cs.type_ = 0xb;
        assert_eq!(fetch(&m, &s, 0xfffe, 2).unwrap().disasm(), "nop");
        assert!(matches!(
            fetch(&m, &s, 0x10000, 2),
            Err(FetchError::Translate(Translation::Fail(FailReason::SegmentLimit { .. })))
        ));
    }
}
