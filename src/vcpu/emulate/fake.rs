//! A fake vCPU for the emulator's unit tests: 8 MiB of real guest RAM with 4-level
//! page tables built here, an MMIO space that remembers what was written (and reads
//! all ones where nothing was), the XSAVE state as KVM would hold it, and a record
//! of everything injected.

use std::collections::HashMap;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{EmuCpu, Emulated};
use crate::vcpu::xsave::{self, XsaveLayout};
use crate::x86::insn;
use crate::x86::paging::PagingContext;

/// Where the instruction is put (identity-mapped).
pub const CODE: u64 = 0x10_0000;
/// Identity-mapped RAM, writable: 0x20_0000..0x40_0000.
pub const DATA: u64 = 0x20_0000;
/// A present, writable mapping of MMIO space.
pub const MMIO_VA: u64 = 0x40_0000;
pub const MMIO_GPA: u64 = 0xd000_0000;
/// A present, writable mapping of a physical address no RAM and no device has.
pub const HOLE_VA: u64 = 0x40_1000;
pub const UNMAPPED_VA: u64 = 0x40_2000;
pub const READ_ONLY_VA: u64 = 0x40_3000;
/// A user page with protection key 1.
pub const USER_VA: u64 = 0x40_4000;
pub const USER_GPA: u64 = 0x30_4000;
/// Two pages, physically apart: SPLIT_VA -> SPLIT_GPA_LO, SPLIT_VA + 4K -> SPLIT_GPA_HI.
pub const SPLIT_VA: u64 = 0x40_5000;
pub const SPLIT_GPA_LO: u64 = 0x30_9000;
pub const SPLIT_GPA_HI: u64 = 0x30_6000;
/// A PTE with a physical-address bit above MAXPHYADDR (46) set.
pub const RSVD_VA: u64 = 0x40_8000;
pub const MAXPHYADDR: u8 = 46;
/// XCR0 of the fake: x87, SSE, AVX, AVX-512 and PKRU.
pub const XCR0: u64 = 0x2e7;

pub struct Fake {
    pub mem: GuestMemoryMmap,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcr0: u64,
    pub xss: u64,
    pub layout: Arc<XsaveLayout>,
    pub mmio: HashMap<u64, u8>,
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
    pub injected: Vec<(u8, Option<u32>)>,
    pub counts: Vec<&'static str>,
    pub unhandled: Option<String>,
    pub xsave_gets: usize,
    pub xsave_sets: usize,
    pub random_ok: bool,
}

impl Fake {
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        w(0x1000, 0x2007); // PML4[0] -> PDPT (user allowed below)
        w(0x2000, 0x3007); // PDPT[0] -> PD (user allowed below)
        w(0x3000, 0x87); // 0-2 MiB, 2 MiB user page (code runs at any CPL)
        w(0x3008, 0x20_0083); // 2-4 MiB
        w(0x3010, 0x4007); // 4-6 MiB -> PT
        w(0x4000, MMIO_GPA | 3);
        w(0x4008, 0x1_0000_0000 | 3);
        w(0x4018, 0x30_3001);
        w(0x4020, USER_GPA | 7 | 1 << 59);
        w(0x4028, SPLIT_GPA_LO | 3);
        w(0x4030, SPLIT_GPA_HI | 3);
        w(0x4040, 0x30_8000 | 1 << 47 | 3);
        let mut sregs = kvm_sregs { cr0: 0x8001_0033, cr3: 0x1000, cr4: 0x40620, efer: 0xd00, ..Default::default() };
        sregs.cs.l = 1;
        let mut x = kvm_xsave::default();
        {
            let b = super::xsave::kvm_bytes_mut(&mut x);
            xsave::put(b, 0, &xsave::FCW_INIT.to_le_bytes());
            xsave::put(b, xsave::MXCSR, &xsave::MXCSR_INIT.to_le_bytes());
            xsave::put(b, xsave::MXCSR_MASK, &0xffffu32.to_le_bytes());
            xsave::put(b, xsave::HEADER, &3u64.to_le_bytes());
        }
        Fake {
            mem,
            regs: kvm_regs { rip: CODE, rflags: 2, ..Default::default() },
            sregs,
            xsave: x,
            xcr0: XCR0,
            xss: 0,
            layout: Arc::new(crate::vcpu::xsave::tests::layout()),
            mmio: HashMap::new(),
            mmio_writes: Vec::new(),
            injected: Vec::new(),
            counts: Vec::new(),
            unhandled: None,
            xsave_gets: 0,
            xsave_sets: 0,
            random_ok: true,
        }
    }

    pub fn poke(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    pub fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    pub fn xsave_bytes(&mut self) -> &mut [u8] {
        super::xsave::kvm_bytes_mut(&mut self.xsave)
    }

    /// Puts `bytes` at CODE and emulates them once (not a first try: no re-run).
    pub fn run(&mut self, bytes: &[u8]) {
        self.poke(CODE, bytes);
        self.regs.rip = CODE;
        let ctx = PagingContext::for_vcpu(&self.sregs, self.regs.rflags, 0, MAXPHYADDR);
        let fetched = insn::fetch_in(&self.mem, &self.sregs, &ctx, CODE).expect("fetch");
        let (regs, sregs) = (self.regs, self.sregs);
        match super::emulate(self, regs, sregs, &fetched, false).expect("no VMM error") {
            Emulated::Done => {}
            Emulated::Unhandled(d) => self.unhandled = Some(d),
        }
    }

    /// The instruction completed: RIP past it, nothing injected, nothing unhandled.
    pub fn assert_done(&self, len: usize) {
        assert_eq!(self.injected, vec![], "nothing injected ({:?})", self.counts);
        assert_eq!(self.unhandled, None);
        assert_eq!(self.regs.rip, CODE + len as u64, "{:?}", self.counts);
    }

    /// The instruction faulted: RIP at it, `vector` with `code` injected.
    pub fn assert_fault(&self, vector: u8, code: Option<u32>) {
        assert_eq!(self.injected, vec![(vector, code)], "{:?}", self.counts);
        assert_eq!(self.regs.rip, CODE, "a fault leaves RIP at the instruction");
    }

    pub fn assert_page_fault(&self, cr2: u64, code: u32) {
        self.assert_fault(14, Some(code));
        assert_eq!(self.sregs.cr2, cr2);
    }
}

impl EmuCpu for Fake {
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mmio.get(&(gpa + i as u64)).copied().unwrap_or(0xff);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.mmio.insert(gpa + i as u64, *b);
        }
        self.mmio_writes.push((gpa, data.to_vec()));
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), String> {
        self.regs = *regs;
        Ok(())
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), String> {
        self.sregs = *sregs;
        Ok(())
    }
    fn xcr0(&mut self) -> Result<u64, String> {
        Ok(self.xcr0)
    }
    fn xss(&mut self) -> Result<u64, String> {
        Ok(self.xss)
    }
    fn get_xsave(&mut self) -> Result<kvm_xsave, String> {
        self.xsave_gets += 1;
        Ok(kvm_xsave { region: self.xsave.region, ..Default::default() })
    }
    fn set_xsave(&mut self, x: &kvm_xsave) -> Result<(), String> {
        self.xsave_sets += 1;
        self.xsave = kvm_xsave { region: x.region, ..Default::default() };
        Ok(())
    }
    fn inject(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), String> {
        self.injected.push((vector, error_code));
        Ok(())
    }
    fn maxphyaddr(&mut self) -> u8 {
        MAXPHYADDR
    }
    fn xsave_layout(&self) -> Arc<XsaveLayout> {
        self.layout.clone()
    }
    fn random(&mut self, buf: &mut [u8]) -> bool {
        buf.fill(0x5a);
        self.random_ok
    }
    fn count(&mut self, what: &'static str) {
        self.counts.push(what);
    }
}
