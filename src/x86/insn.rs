//! Fetching and decoding the guest instruction at CS:RIP: the linear address from the
//! code segment, each page translated through the guest's own tables (paging.rs) with
//! execute access, up to 15 bytes read, and iced-x86 decoding in the vCPU's mode.

use std::fmt;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use kvm_bindings::kvm_sregs;

use super::paging::{Access, PagingContext, PhysMem, Translation, translate};

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

/// Fetches and decodes the instruction at CS:RIP.
pub fn fetch<M: PhysMem>(mem: &M, sregs: &kvm_sregs, rip: u64, rflags: u64) -> Result<FetchedInsn, FetchError> {
    let bits = bitness(sregs);
    let linear = match bits {
        64 => rip,
        32 => sregs.cs.base.wrapping_add(rip & 0xffff_ffff) & 0xffff_ffff,
        _ => sregs.cs.base.wrapping_add(rip & 0xffff) & 0xffff_ffff,
    };
    let ctx = PagingContext::from_sregs(sregs, rflags);
    let mut bytes = [0u8; MAX_INSN_LEN];
    let mut len = 0usize;
    // At most two pages: 15 bytes cross at most one page boundary.
    while len < MAX_INSN_LEN {
        let addr = linear.wrapping_add(len as u64);
        let in_page = (0x1000 - (addr & 0xfff)) as usize;
        let n = in_page.min(MAX_INSN_LEN - len);
        match translate(mem, &ctx, addr, Access::Execute) {
            Translation::Ok(gpa) => {
                if !read_bytes(mem, gpa, &mut bytes[len..len + n]) {
                    break;
                }
                len += n;
            }
            t if len == 0 => return Err(FetchError::Translate(t)),
            // The next page does not translate: decode what we have; an instruction
            // that ends before the boundary is still good.
            _ => break,
        }
    }
    let mut decoder = Decoder::with_ip(bits, &bytes[..len], rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(FetchError::Decode { bytes: bytes[..len].to_vec() });
    }
    Ok(FetchedInsn { bytes, len, insn, bitness: bits, rip: linear })
}

fn read_bytes<M: PhysMem>(mem: &M, gpa: u64, out: &mut [u8]) -> bool {
    for (i, b) in out.iter_mut().enumerate() {
        let a = gpa + i as u64;
        let Some(word) = mem.read_u32(a & !3) else { return false };
        *b = (word >> ((a & 3) * 8)) as u8;
    }
    true
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
}
