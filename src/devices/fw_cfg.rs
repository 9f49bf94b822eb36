//! QEMU's firmware configuration interface (fw_cfg), its traditional port-I/O form:
//! a 16-bit selector register at port 0x510 picks an item and rewinds it, and each
//! byte read from the data register at 0x511 returns the item's next byte (zero past
//! its end). Items: the signature "QEMU", the interface ID (bit 0: traditional
//! interface; no DMA), the RAM size, the CPU count, and a file directory (big-endian
//! count, then 64-byte entries: be32 size, be16 select, be16 reserved, 56-byte
//! NUL-padded name) listing the user's `--fw-cfg` files, selected from 0x0020 on.
//! Linux finds it through ACPI (`_HID` "QEMU0002"), so its qemu_fw_cfg driver shows
//! the files under /sys/firmware/qemu_fw_cfg. Facts from QEMU's docs/specs/fw_cfg.rst.

use std::sync::{Arc, Mutex};

use super::BusDevice;
use super::state::{DeviceState, RestoreError};

/// The selector port; the data port is the next one.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports the device decodes (selector and data: no DMA register).
pub const FW_CFG_PORTS: u8 = 2;

pub const KEY_SIGNATURE: u16 = 0x0000;
pub const KEY_ID: u16 = 0x0001;
pub const KEY_UUID: u16 = 0x0002;
pub const KEY_RAM_SIZE: u16 = 0x0003;
pub const KEY_NB_CPUS: u16 = 0x0005;
pub const KEY_MAX_CPUS: u16 = 0x000f;
pub const KEY_FILE_DIR: u16 = 0x0019;
pub const KEY_FILE_FIRST: u16 = 0x0020;
/// The selector's write-channel bit (writes are not supported: it selects the same item).
const WRITE_CHANNEL: u16 = 0x4000;
/// Files skiff lists at most (selectors stay below the write-channel bit with room).
pub const MAX_FILES: usize = 1024;
/// Bytes of a directory entry, and of the name inside it.
const DIR_ENTRY: usize = 64;
const NAME_BYTES: usize = 56;

/// One file for the directory.
#[derive(Debug)]
pub struct FwCfgFile {
    pub name: String,
    pub data: Arc<[u8]>,
}

#[derive(Debug)]
pub struct FwCfg {
    /// Items sorted by key.
    items: Vec<(u16, Arc<[u8]>)>,
    /// The selected key and the next byte's offset in it.
    cursor: Mutex<(u16, u32)>,
}

impl FwCfg {
    /// The items for a machine of `cpus` vCPUs and `ram` bytes, and its files (names
    /// already checked: at most 55 bytes; sorted here, as QEMU lists them).
    pub fn new(cpus: u8, ram: u64, mut files: Vec<FwCfgFile>) -> Result<Self, String> {
        if files.len() > MAX_FILES {
            return Err(format!("{} fw_cfg files, at most {MAX_FILES}", files.len()));
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = files.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(format!("fw_cfg file {} given twice", w[0].name));
        }
        let mut dir = Vec::with_capacity(4 + files.len() * DIR_ENTRY);
        dir.extend_from_slice(&(files.len() as u32).to_be_bytes());
        let mut items: Vec<(u16, Arc<[u8]>)> = vec![
            (KEY_SIGNATURE, Arc::from(&b"QEMU"[..])),
            (KEY_ID, Arc::from(&1u32.to_le_bytes()[..])),
            (KEY_UUID, Arc::from(&[0u8; 16][..])),
            (KEY_RAM_SIZE, Arc::from(&ram.to_le_bytes()[..])),
            (KEY_NB_CPUS, Arc::from(&u16::from(cpus).to_le_bytes()[..])),
            (KEY_MAX_CPUS, Arc::from(&u16::from(cpus).to_le_bytes()[..])),
        ];
        for (i, f) in files.into_iter().enumerate() {
            let select = KEY_FILE_FIRST + i as u16;
            let size = u32::try_from(f.data.len()).map_err(|_| format!("fw_cfg file {}: larger than 4 GiB", f.name))?;
            if f.name.len() >= NAME_BYTES {
                return Err(format!("fw_cfg file name {} is longer than {} bytes", f.name, NAME_BYTES - 1));
            }
            let mut name = [0u8; NAME_BYTES];
            name.iter_mut().zip(f.name.bytes()).for_each(|(d, s)| *d = s);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&select.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            dir.extend_from_slice(&name);
            items.push((select, f.data));
        }
        items.push((KEY_FILE_DIR, dir.into()));
        items.sort_by_key(|(k, _)| *k);
        Ok(Self { items, cursor: Mutex::new((0, 0)) })
    }

    fn item(&self, key: u16) -> &[u8] {
        let key = key & !WRITE_CHANNEL;
        match self.items.binary_search_by_key(&key, |(k, _)| *k) {
            Ok(i) => self.items.get(i).map_or(&[][..], |(_, d)| &d[..]),
            Err(_) => &[],
        }
    }
}

impl BusDevice for FwCfg {
    fn state(&self) -> DeviceState {
        let (selector, offset) = *self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        DeviceState::FwCfg { selector, offset }
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::FwCfg { selector, offset } => {
                *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = (*selector, *offset);
                Ok(())
            }
            other => Err(RestoreError::wrong_kind(other, "fw-cfg")),
        }
    }
    fn reset(&self) {
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0);
    }
    /// The data port: the selected item's next bytes, one per byte of the access.
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset != 1 {
            return;
        }
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let item = self.item(cursor.0);
        for b in data.iter_mut() {
            *b = usize::try_from(cursor.1).ok().and_then(|i| item.get(i)).copied().unwrap_or(0);
            cursor.1 = cursor.1.saturating_add(1);
        }
    }
    /// The selector port: selects an item and rewinds it. Data writes are ignored (a
    /// deprecated interface QEMU no longer honours either).
    fn write(&self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let lo = data.first().copied().unwrap_or(0);
        let hi = data.get(1).copied().unwrap_or(0);
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = (u16::from_le_bytes([lo, hi]), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(d: &FwCfg, key: u16, n: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        let mut out = vec![0u8; n];
        for b in out.iter_mut() {
            let mut one = [0u8];
            d.read(1, &mut one);
            *b = one[0];
        }
        out
    }

    #[test]
    fn items_and_directory() {
        let files = vec![
            FwCfgFile { name: "opt/zeta".into(), data: Arc::from(&b"last"[..]) },
            FwCfgFile { name: "opt/alpha".into(), data: Arc::from(&b"first file"[..]) },
        ];
        let d = FwCfg::new(4, 256 << 20, files).unwrap();
        assert_eq!(read_item(&d, KEY_SIGNATURE, 6), b"QEMU\0\0", "zero past the end");
        assert_eq!(read_item(&d, KEY_ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&d, KEY_NB_CPUS, 2), [4, 0]);
        assert_eq!(read_item(&d, KEY_RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
        let dir = read_item(&d, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        assert_eq!(&dir[4..8], &10u32.to_be_bytes(), "sorted by name: opt/alpha first");
        assert_eq!(&dir[8..10], &0x20u16.to_be_bytes());
        assert_eq!(&dir[12..21], b"opt/alpha");
        assert_eq!(dir[21], 0);
        assert_eq!(&dir[68 + 8..68 + 16], b"opt/zeta");
        assert_eq!(read_item(&d, 0x20, 10), b"first file");
        assert_eq!(read_item(&d, 0x21, 4), b"last");
        assert_eq!(read_item(&d, 0x22, 3), [0, 0, 0], "no such item");
        // A wide read takes successive bytes; the selector port reads 0.
        d.write(0, &KEY_SIGNATURE.to_le_bytes());
        let mut four = [0u8; 4];
        d.read(1, &mut four);
        assert_eq!(&four, b"QEMU");
        d.read(0, &mut four);
        assert_eq!(four, [0; 4]);
        // State round trip, and reset rewinds.
        d.write(0, &[0x20, 0]);
        d.read(1, &mut four);
        let s = d.state();
        assert_eq!(s, DeviceState::FwCfg { selector: 0x20, offset: 4 });
        d.reset();
        d.restore(&s).unwrap();
        let mut rest = [0u8; 6];
        d.read(1, &mut rest);
        assert_eq!(&rest, b"t file");
    }

    #[test]
    fn duplicate_and_overlong_names_are_refused() {
        let f = |n: &str| FwCfgFile { name: n.into(), data: Arc::from(&b""[..]) };
        assert!(FwCfg::new(1, 1 << 26, vec![f("opt/a"), f("opt/a")]).unwrap_err().contains("twice"));
        assert!(FwCfg::new(1, 1 << 26, vec![f(&"x".repeat(56))]).is_err());
        // An offset at the end of u32 reads zero, never wraps.
        let d = FwCfg::new(1, 1 << 26, vec![]).unwrap();
        d.restore(&DeviceState::FwCfg { selector: 0, offset: u32::MAX }).unwrap();
        let mut b = [9u8; 2];
        d.read(1, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
