//! Every way a snapshot file is refused, and fuzz-style damage at many positions:
//! each gives one error line, nothing panics.

use super::*;

fn err(b: &[u8]) -> SnapshotError {
    match decode(b) {
        Ok(_) => panic!("accepted"),
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "one line: {e}");
            e
        }
    }
}

/// Rewrites section `i`'s checksum (and the header's) so damage inside reaches the
/// decoders instead of stopping at the CRC.
fn reframe(s: &Snapshot, f: impl FnOnce(&mut Vec<OutSection>)) -> Vec<u8> {
    let mut sections = out_sections(s);
    f(&mut sections);
    frame(&s.header, &sections).unwrap()
}

#[test]
fn wrong_magic() {
    assert!(matches!(err(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"), SnapshotError::BadMagic));
    assert!(matches!(err(b"SKIFFMEM"), SnapshotError::BadMagic));
    assert!(matches!(err(b"x"), SnapshotError::BadMagic));
    let mut b = encode(&sample(1)).unwrap();
    b[0] ^= 0x20;
    assert_eq!(err(&b).to_string(), "not a skiff snapshot (wrong magic)");
}

#[test]
fn truncated_at_every_length() {
    let b = encode(&sample(1)).unwrap();
    for len in 0..b.len() {
        match err(&b[..len]) {
            SnapshotError::Truncated { len: l, .. } => assert_eq!(l, len as u64),
            e => panic!("{len}: {e}"),
        }
    }
    let e = err(&b[..b.len() - 1]).to_string();
    assert!(e.starts_with("truncated: section"), "{e}");
}

#[test]
fn extended_by_any_amount() {
    let b = encode(&sample(1)).unwrap();
    for extra in [1usize, 2, 7, 24, 4096] {
        let mut x = b.clone();
        x.extend(std::iter::repeat_n(0u8, extra));
        assert!(matches!(err(&x), SnapshotError::TrailingBytes(n) if n == extra as u64));
    }
    // A whole valid snapshot appended is still trailing bytes.
    assert!(matches!(err(&[&b[..], &b[..]].concat()), SnapshotError::TrailingBytes(_)));
}

#[test]
fn checksum_mismatch_names_the_section() {
    let s = sample(2);
    let b = encode(&s).unwrap();
    // The header: a byte of its body.
    let mut x = b.clone();
    x[30] ^= 1;
    assert!(matches!(err(&x), SnapshotError::HeaderChecksum));
    // The last byte is the network section's payload (the last section: the sample
    // machine has a TAP and vsock).
    let mut x = b.clone();
    *x.last_mut().unwrap() ^= 0x10;
    assert_eq!(err(&x).to_string(), "checksum mismatch in section 8 (network)");
    // A flipped "required" flag is caught by the section's checksum, not skipped.
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let mut x = b.clone();
    x[24 + header_len + 8] ^= 1;
    assert_eq!(err(&x).to_string(), "checksum mismatch in section 0 (vcpu)");
}

#[test]
fn newer_format_is_refused_before_anything_else() {
    let mut b = encode(&sample(1)).unwrap();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(err(&b).to_string(), "format version 2 is newer than this skiff reads (up to 1)");
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(err(&b), SnapshotError::NewerFormat { found: u32::MAX }));
}

#[test]
fn unknown_required_section() {
    let s = sample(1);
    let b = reframe(&s, |v| v.insert(2, (0x7f01, 1, true, vec![1, 2, 3])));
    assert_eq!(err(&b).to_string(), "section 2 is of kind 32513, which this skiff does not know and may not skip");
}

#[test]
fn section_version_this_skiff_cannot_read() {
    let s = sample(1);
    for (kind, version) in [(SectionKind::Vcpu, 2), (SectionKind::Devices, DEVICE_STATE_VERSION + 1), (SectionKind::MemoryMap, 0)] {
        let b = reframe(&s, |v| v.iter_mut().filter(|x| x.0 == kind as u32).for_each(|x| x.1 = version));
        match err(&b) {
            SnapshotError::SectionVersion { kind: k, found, supported } => {
                assert_eq!((k, found, supported), (kind.name(), version, kind.version()))
            }
            e => panic!("{e}"),
        }
    }
}

#[test]
fn missing_and_duplicate_sections() {
    let s = sample(2);
    for kind in [SectionKind::Vcpu, SectionKind::Chipset, SectionKind::Devices, SectionKind::MemoryMap, SectionKind::MemoryFile, SectionKind::PatchedSites, SectionKind::Machine] {
        let b = reframe(&s, |v| v.retain(|x| x.0 != kind as u32));
        assert_eq!(err(&b).to_string(), format!("no {} section", kind.name()));
    }
    let b = reframe(&s, |v| {
        let dev = v.iter().find(|x| x.0 == SectionKind::Devices as u32).unwrap().clone();
        v.push(dev);
    });
    assert_eq!(err(&b).to_string(), "a second devices section");
    // Two vCPU 0s (and so no vCPU 1).
    let b = reframe(&s, |v| v[1] = v[0].clone());
    assert!(matches!(err(&b), SnapshotError::Invalid { kind: "vcpu", .. }));
    // A vCPU section missing a part of the declared list.
    let b = reframe(&sample(1), |v| {
        let parts = &mut v[0].3;
        // Re-encode vCPU 0 without its msrs part.
        let decoded: (u32, Vec<(String, Vec<u8>)>) = bincode::Options::deserialize(bincode::DefaultOptions::new(), parts).unwrap();
        let kept: Vec<_> = decoded.1.into_iter().filter(|p| p.0 != "msrs").collect();
        *parts = bincode::Options::serialize(bincode::DefaultOptions::new(), &(decoded.0, kept)).unwrap();
    });
    assert_eq!(err(&b).to_string(), "section vcpu: vCPU 0: part msrs is missing");
}

#[test]
fn inconsistent_memory_sections() {
    // Each is refused by the reader (framed by hand) and already by the writer.
    let bad_map = |f: &dyn Fn(&mut Snapshot)| {
        let mut s = sample(1);
        f(&mut s);
        let e = err(&frame(&s.header, &out_sections(&s)).unwrap()).to_string();
        assert_eq!(encode(&s).err().map(|e| e.to_string()), Some(e.clone()));
        e
    };
    assert!(bad_map(&|s| s.memory_map[0].len = 4095).contains("not page-aligned"));
    assert!(bad_map(&|s| s.memory_map[1].file_offset = 4096).contains("overlap"));
    assert!(bad_map(&|s| s.memory_map[1].guest_addr = u64::MAX - 4095).contains("not page-aligned"));
    assert!(bad_map(&|s| s.memory_file.size -= 4096).contains("inside"));
    assert!(bad_map(&|s| s.memory_map.clear()).contains("0 ranges"));
    let diff = |pages: Vec<(u64, u64)>| DiffOf { parent_snapshot: "p".into(), parent_size: 1, parent_memory_id: [0; 16], pages };
    assert!(bad_map(&|s| s.memory_file.diff = Some(diff(vec![(4, 1), (2, 1)]))).contains("out of order"));
    assert!(bad_map(&|s| s.memory_file.diff = Some(diff(vec![(u64::MAX, 2)]))).contains("out of order"));
    assert!(bad_map(&|s| s.memory_file.diff = Some(diff(vec![(0, 0)]))).contains("out of order"));
    assert!(bad_map(&|s| _ = s.patched_sites[0].patched.pop()).contains("site 0x1000000"));
    let mut s = sample(1);
    s.vcpus.clear();
    assert!(encode(&s).is_err());
}

#[test]
fn header_fields_out_of_bounds() {
    let b = encode(&sample(1)).unwrap();
    let mut x = b.clone();
    x[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(err(&x), SnapshotError::Invalid { kind: "header", .. }));
    let mut x = b.clone();
    x[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(err(&x), SnapshotError::Invalid { kind: "header", .. }));
}

/// Every byte flipped three ways, at every position: refused, never accepted, never a
/// panic (the checksums see every change).
#[test]
fn every_flipped_byte_is_refused() {
    let b = encode(&sample(1)).unwrap();
    let mut x = b.clone();
    for i in 0..b.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            x[i] ^= mask;
            assert!(decode(&x).is_err(), "byte {i} ^ {mask:#x} accepted");
            x[i] ^= mask;
        }
    }
}

/// A small deterministic generator for the damage below.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Damage inside each section's payload with the checksums made right again, so the
/// decoders themselves meet garbage: flipped bytes, cut or grown payloads, huge
/// length prefixes. Each is refused or read; none panics or allocates wildly.
#[test]
fn damaged_payloads_behind_good_checksums_never_panic() {
    let s = sample(2);
    let clean = out_sections(&s);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut outcomes = [0u32; 2];
    for (i, sec) in clean.iter().enumerate() {
        for round in 0..300 {
            let mut p = sec.3.clone();
            match round % 5 {
                0 => {
                    let at = rng.below(p.len());
                    p[at] ^= 1 << rng.below(8);
                }
                1 => p.truncate(rng.below(p.len())),
                2 => p.extend((0..rng.below(40) + 1).map(|_| rng.next() as u8)),
                3 => {
                    // A varint length prefix made enormous.
                    let at = rng.below(p.len());
                    let end = (at + 9).min(p.len());
                    p[at..end].fill(0xff);
                }
                _ => {
                    for _ in 0..8 {
                        let at = rng.below(p.len());
                        p[at] = rng.next() as u8;
                    }
                }
            }
            let mut sections = clean.clone();
            sections[i].3 = p;
            let b = frame(&s.header, &sections).unwrap();
            outcomes[decode(&b).is_ok() as usize] += 1;
        }
    }
    // Most damage is refused; a byte inside a register value is just another value.
    assert!(outcomes[0] > outcomes[1], "{outcomes:?}");
}

/// The same for the header and the section preambles: random bytes anywhere in the
/// first KiB with the header checksum recomputed.
#[test]
fn damaged_headers_never_panic() {
    let b = encode(&sample(1)).unwrap();
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let mut rng = XorShift(42);
    for _ in 0..2000 {
        let mut x = b.clone();
        let at = 8 + rng.below(header_len + 16);
        x[at] = rng.next() as u8;
        let crc = crc32fast::hash(&[&x[..20], &x[24..24 + header_len]].concat());
        x[20..24].copy_from_slice(&crc.to_le_bytes());
        let _ = decode(&x);
    }
}

#[test]
fn a_missing_or_unreadable_file_is_one_line() {
    let dir = TmpDir::new("missing");
    let e = read_snapshot(&dir.path("nope.snap")).err().unwrap().to_string();
    assert!(e.contains("nope.snap: opening: ") && !e.contains('\n'), "{e}");
    let e = read_snapshot(&dir.0).err().unwrap().to_string();
    assert!(e.contains("reading"), "{e}");
}
