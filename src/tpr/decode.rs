//! The six instruction forms a 32-bit guest uses to reach the TPR through MMIO, matched
//! from raw bytes (no prefixes, 32-bit code, an absolute disp32 address), and what each
//! is rewritten into. Everything here is a pure function of byte arrays: the report
//! that led here is never trusted, the bytes are.

/// One of the six forms. `reg` is the ModRM reg field (EAX = 0 ... EDI = 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `89 /r` mov [abs], r32 (6 bytes).
    StoreReg(u8),
    /// `8b /r` mov r32, [abs] (6 bytes).
    LoadReg(u8),
    /// `a1` mov eax, [abs] (5 bytes).
    LoadEax,
    /// `a3` mov [abs], eax (5 bytes).
    StoreEax,
    /// `c7 /0` mov dword [abs], imm32 (10 bytes).
    StoreImm(u32),
    /// `ff /6` push dword [abs] (6 bytes).
    Push,
}

impl Form {
    pub fn is_write(self) -> bool {
        matches!(self, Form::StoreReg(_) | Form::StoreEax | Form::StoreImm(_))
    }

    pub fn size(self) -> usize {
        match self {
            Form::LoadEax | Form::StoreEax => 5,
            Form::StoreReg(_) | Form::LoadReg(_) | Form::Push => 6,
            Form::StoreImm(_) => 10,
        }
    }

    /// A short name for `--stats` and the benchmark.
    pub fn name(self) -> &'static str {
        match self {
            Form::StoreReg(_) => "mov [tpr],r32",
            Form::LoadReg(_) => "mov r32,[tpr]",
            Form::LoadEax => "mov eax,[tpr]",
            Form::StoreEax => "mov [tpr],eax",
            Form::StoreImm(_) => "mov [tpr],imm32",
            Form::Push => "push [tpr]",
        }
    }

    /// Index into per-form counters (the order of [`FORM_NAMES`]).
    pub fn index(self) -> usize {
        match self {
            Form::StoreReg(_) => 0,
            Form::LoadReg(_) => 1,
            Form::LoadEax => 2,
            Form::StoreEax => 3,
            Form::StoreImm(_) => 4,
            Form::Push => 5,
        }
    }
}

pub const FORM_NAMES: [&str; 6] = ["mov [tpr],r32", "mov r32,[tpr]", "mov eax,[tpr]", "mov [tpr],eax", "mov [tpr],imm32", "push [tpr]"];

/// A matched access: its form and the absolute (DS-relative) address it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TprAccess {
    pub form: Form,
    pub addr: u32,
}

/// ModRM with mod = 00 and r/m = 101: a bare disp32 in 32-bit code (no base, no
/// index, no SIB; in 64-bit code this would be RIP-relative, which skiff never
/// matches because it only looks at 32-bit code).
fn abs_modrm(modrm: u8) -> bool {
    modrm & 0xc7 == 0x05
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes)
}

/// The form starting at `bytes[0]`, if it is one of the six (32-bit code assumed).
/// A prefix of any kind (segment override, operand or address size, lock, rep) is
/// not matched: each changes what the instruction does.
pub fn match_form(bytes: &[u8]) -> Option<TprAccess> {
    let op = *bytes.first()?;
    let modrm = bytes.get(1).copied();
    let reg = modrm.map(|m| (m >> 3) & 7);
    let (form, addr_at) = match (op, modrm) {
        (0x89, Some(m)) if abs_modrm(m) => (Form::StoreReg(reg?), 2),
        // Loading the TPR into ESP is no TPR access a kernel makes: not patched.
        (0x8b, Some(m)) if abs_modrm(m) && reg != Some(4) => (Form::LoadReg(reg?), 2),
        (0xa1, _) => (Form::LoadEax, 1),
        (0xa3, _) => (Form::StoreEax, 1),
        (0xc7, Some(m)) if abs_modrm(m) && reg == Some(0) => (Form::StoreImm(le32(bytes, 6)?), 2),
        (0xff, Some(m)) if abs_modrm(m) && reg == Some(6) => (Form::Push, 2),
        _ => return None,
    };
    let addr = le32(bytes, addr_at)?;
    Some(TprAccess { form, addr })
}

/// Where a write was reported with RIP already past it (KVM paths that report after
/// the instruction completed): the write form that ends exactly at the end of
/// `before` (the bytes just before the reported RIP), and its length. The three
/// write forms are tried shortest first; a match must end exactly at RIP.
pub fn match_write_ending(before: &[u8]) -> Option<(TprAccess, usize)> {
    for len in [5usize, 6, 10] {
        let Some(start) = before.len().checked_sub(len) else { continue };
        if let Some(a) = before.get(start..).and_then(match_form)
            && a.form.is_write()
            && a.form.size() == len
        {
            return Some((a, len));
        }
    }
    None
}

/// Entry points of the helper (guest/tpr/helper.S), as offsets in its page.
pub mod entry {
    pub const SET_STACK: u32 = 0x00;
    pub const SET_EAX: u32 = 0x10;
    pub const GET_STACK: u32 = 0x20;
    /// `mov reg, [TPR]`: 0x30 + 0x10 * reg.
    pub const GET_REG: u32 = 0x30;
}

/// The bytes that replace `form` at linear address `site` (as long as the form),
/// calling the helper mapped at linear `helper`. 32-bit code: `call rel32` wraps at
/// 4 GiB, so every helper address is in reach.
pub fn patched(form: Form, site: u32, helper: u32) -> Vec<u8> {
    let call = |at_end: usize, target: u32| -> [u8; 5] {
        let rel = target.wrapping_sub(site.wrapping_add(at_end as u32)).to_le_bytes();
        [0xe8, rel[0], rel[1], rel[2], rel[3]]
    };
    let mut out = Vec::with_capacity(form.size());
    match form {
        Form::LoadEax => out.extend(call(5, helper.wrapping_add(entry::GET_REG))),
        Form::StoreEax => out.extend(call(5, helper.wrapping_add(entry::SET_EAX))),
        Form::StoreReg(r) => {
            out.push(0x50 + (r & 7)); // push r32
            out.extend(call(6, helper.wrapping_add(entry::SET_STACK)));
        }
        Form::LoadReg(r) => {
            out.push(0x90); // nop
            out.extend(call(6, helper.wrapping_add(entry::GET_REG + 0x10 * u32::from(r & 7))));
        }
        Form::StoreImm(imm) => {
            out.push(0x68); // push imm32
            out.extend(imm.to_le_bytes());
            out.extend(call(10, helper.wrapping_add(entry::SET_STACK)));
        }
        Form::Push => {
            out.push(0x50); // push eax: the slot the helper fills
            out.extend(call(6, helper.wrapping_add(entry::GET_STACK)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions};

    const TPR: [u8; 4] = [0x80, 0x00, 0xe0, 0xfe];

    fn with_tpr(head: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut v = head.to_vec();
        v.extend(TPR);
        v.extend(tail);
        v
    }

    fn iced(bytes: &[u8]) -> iced_x86::Instruction {
        Decoder::new(32, bytes, DecoderOptions::NONE).decode()
    }

    #[test]
    fn the_six_forms() {
        let cases: [(Vec<u8>, Form, Code); 7] = [
            (with_tpr(&[0x89, 0x0d], &[]), Form::StoreReg(1), Code::Mov_rm32_r32),
            (with_tpr(&[0x8b, 0x1d], &[]), Form::LoadReg(3), Code::Mov_r32_rm32),
            (with_tpr(&[0xa1], &[]), Form::LoadEax, Code::Mov_EAX_moffs32),
            (with_tpr(&[0xa3], &[]), Form::StoreEax, Code::Mov_moffs32_EAX),
            (with_tpr(&[0xc7, 0x05], &[0x40, 0, 0, 0]), Form::StoreImm(0x40), Code::Mov_rm32_imm32),
            (with_tpr(&[0xff, 0x35], &[]), Form::Push, Code::Push_rm32),
            (with_tpr(&[0x89, 0x05], &[]), Form::StoreReg(0), Code::Mov_rm32_r32),
        ];
        for (bytes, form, code) in cases {
            let a = match_form(&bytes).unwrap_or_else(|| panic!("{bytes:02x?}"));
            assert_eq!(a, TprAccess { form, addr: 0xfee0_0080 });
            // iced agrees on the instruction and its length: the site is one instruction.
            let i = iced(&bytes);
            assert_eq!(i.code(), code, "{bytes:02x?}");
            assert_eq!(i.len(), form.size(), "{bytes:02x?}");
            assert_eq!(i.memory_displacement32(), 0xfee0_0080);
            // Trailing bytes change nothing.
            let mut longer = bytes.clone();
            longer.extend([0x90; 4]);
            assert_eq!(match_form(&longer), Some(a));
        }
    }

    #[test]
    fn near_misses_are_refused() {
        let misses: [Vec<u8>; 14] = [
            with_tpr(&[0x89, 0x45], &[]),             // mov [ebp+disp8], eax: a base register
            with_tpr(&[0x89, 0x04, 0x25], &[]),       // SIB form of an absolute address
            with_tpr(&[0x89, 0x85], &[]),             // mov [ebp+disp32], eax
            with_tpr(&[0x89, 0xc5], &[]),             // register to register
            with_tpr(&[0x8b, 0x25], &[]),             // mov esp, [abs]
            with_tpr(&[0xc7, 0x0d], &[0, 0, 0, 0]),   // c7 /1: undefined
            with_tpr(&[0xff, 0x05], &[]),             // inc [abs]
            with_tpr(&[0xff, 0x15], &[]),             // call [abs]
            with_tpr(&[0x66, 0x89, 0x05], &[]),       // 16-bit store: a prefix
            with_tpr(&[0x3e, 0xa3], &[]),             // segment override
            with_tpr(&[0x88, 0x05], &[]),             // byte store
            vec![0xa1, 0x80, 0x00],                   // cut short
            vec![0xc7, 0x05, 0x80, 0x00, 0xe0, 0xfe, 0x40, 0x00], // immediate cut short
            vec![],
        ];
        for m in misses {
            assert_eq!(match_form(&m), None, "{m:02x?}");
        }
    }

    #[test]
    fn other_addresses_are_matched_but_named() {
        // The form alone does not make a TPR access: the caller checks the address.
        let a = match_form(&[0xa1, 0x00, 0x10, 0x00, 0x00]).unwrap();
        assert_eq!(a.addr, 0x1000);
    }

    #[test]
    fn looking_back_for_writes() {
        let store = with_tpr(&[0xa3], &[]);
        let mut before = vec![0x90, 0x90];
        before.extend(&store);
        assert_eq!(match_write_ending(&before), Some((TprAccess { form: Form::StoreEax, addr: 0xfee0_0080 }, 5)));
        let imm = with_tpr(&[0xc7, 0x05], &[0x10, 0, 0, 0]);
        assert_eq!(match_write_ending(&imm).map(|(a, l)| (a.form, l)), Some((Form::StoreImm(0x10), 10)));
        let reg = with_tpr(&[0x89, 0x15], &[]);
        assert_eq!(match_write_ending(&reg).map(|(a, l)| (a.form, l)), Some((Form::StoreReg(2), 6)));
        // A read ending there is no write to look back for.
        assert_eq!(match_write_ending(&with_tpr(&[0xa1], &[])), None);
        // A write that does not end exactly at RIP.
        let mut off = store.clone();
        off.push(0x90);
        assert_eq!(match_write_ending(&off), None);
        assert_eq!(match_write_ending(&[0x90; 3]), None);
    }

    #[test]
    fn patches_are_as_long_as_the_site_and_call_the_right_entry() {
        let helper = 0xdd000u32;
        let site = 0x10_0000u32;
        let forms = [Form::StoreReg(2), Form::LoadReg(7), Form::LoadEax, Form::StoreEax, Form::StoreImm(0x20), Form::Push];
        for f in forms {
            let p = patched(f, site, helper);
            assert_eq!(p.len(), f.size(), "{f:?}");
            // Decode the patch as the guest will and follow the call.
            let mut d = Decoder::with_ip(32, &p, u64::from(site), DecoderOptions::NONE);
            let mut last = d.decode();
            while d.can_decode() {
                last = d.decode();
            }
            assert_eq!(last.code(), Code::Call_rel32_32, "{f:?}");
            assert_eq!(last.next_ip(), u64::from(site) + f.size() as u64);
            let want = helper
                + match f {
                    Form::StoreReg(_) | Form::StoreImm(_) => entry::SET_STACK,
                    Form::StoreEax => entry::SET_EAX,
                    Form::Push => entry::GET_STACK,
                    Form::LoadEax => entry::GET_REG,
                    Form::LoadReg(r) => entry::GET_REG + 0x10 * u32::from(r),
                };
            assert_eq!(last.near_branch32(), want, "{f:?}");
        }
        assert_eq!(patched(Form::StoreReg(2), site, helper)[0], 0x52, "push edx");
        assert_eq!(&patched(Form::StoreImm(0x20), site, helper)[..5], &[0x68, 0x20, 0, 0, 0]);
        // A helper below the site: the call goes backwards, wrapping at 4 GiB.
        let p = patched(Form::LoadEax, 0xc010_0000, 0x1000);
        assert_eq!(Decoder::with_ip(32, &p, 0xc010_0000, DecoderOptions::NONE).decode().near_branch32(), 0x1000 + entry::GET_REG);
    }
}
