//! The CMOS real-time clock (MC146818) at ports 0x70/0x71: an index register and a
//! data register. Time registers read the host's UTC clock in BCD, 24-hour mode;
//! the rest of the 128 bytes of CMOS RAM are kept as written.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;
use super::state::{DeviceState, RestoreError};

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Register B: 24-hour mode (bit 1), BCD (bit 2 clear).
const REG_B_DEFAULT: u8 = 0x02;
/// Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const REG_A_DEFAULT: u8 = 0x26;
/// Register D: valid RAM and time (bit 7).
const REG_D_VRT: u8 = 0x80;

struct State {
    index: u8,
    ram: [u8; 128],
}

pub struct Cmos(Mutex<State>);

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = REG_A_DEFAULT;
        ram[REG_B as usize] = REG_B_DEFAULT;
        ram[REG_D as usize] = REG_D_VRT;
        Self(Mutex::new(State { index: 0, ram }))
    }
}

/// A UTC calendar date and time.
#[derive(Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u32,
}

/// Converts seconds since the Unix epoch to a UTC date (proleptic Gregorian).
pub fn utc_from_unix(secs: u64) -> DateTime {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // 1970-01-01 was a Thursday (weekday 5 when Sunday is 1).
    let weekday = ((days + 4) % 7) as u32 + 1;
    let mut year = 1970u32;
    let mut days_left = days;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days_left < len {
            break;
        }
        days_left -= len;
        year += 1;
    }
    let month_lengths = [31, if is_leap(year) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1u32;
    for len in month_lengths {
        if days_left < len {
            break;
        }
        days_left -= len;
        month += 1;
    }
    DateTime {
        year,
        month,
        day: days_left as u32 + 1,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        weekday,
    }
}

fn is_leap(y: u32) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

impl Cmos {
    fn read_register(state: &State, index: u8) -> u8 {
        let binary = state.ram[REG_B as usize] & 0x04 != 0;
        let enc = |v: u32| if binary { v as u8 } else { bcd(v) };
        let now = || {
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            utc_from_unix(secs)
        };
        match index {
            REG_SECONDS => enc(now().second),
            REG_MINUTES => enc(now().minute),
            REG_HOURS => enc(now().hour),
            REG_WEEKDAY => enc(now().weekday),
            REG_DAY => enc(now().day),
            REG_MONTH => enc(now().month),
            REG_YEAR => enc(now().year % 100),
            REG_CENTURY => enc(now().year / 100),
            // Reading C clears pending interrupt flags; none are ever raised here.
            REG_C => 0,
            i => state.ram[(i & 0x7f) as usize],
        }
    }
}

impl BusDevice for Cmos {
    fn state(&self) -> DeviceState {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        DeviceState::Cmos { index: state.index, ram: state.ram.to_vec() }
    }
    fn restore(&self, saved: &DeviceState) -> Result<(), RestoreError> {
        let DeviceState::Cmos { index, ram } = saved else { return Err(RestoreError::wrong_kind(saved, "cmos")) };
        let ram: [u8; 128] = ram.as_slice().try_into().map_err(|_| RestoreError::Invalid {
            device: "cmos",
            reason: format!("{} bytes of CMOS RAM, not 128", ram.len()),
        })?;
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        state.index = index & 0x7f;
        state.ram = ram;
        Ok(())
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = if offset == 1 { Self::read_register(&state, state.index) } else { 0xff };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => state.index = v & 0x7f,
            1 => {
                let i = state.index;
                match i {
                    // Time registers follow the host clock; writes are ignored.
                    0x00..=0x09 | REG_CENTURY | REG_C | REG_D => {}
                    // UIP is read-only.
                    REG_A => state.ram[i as usize] = v & 0x7f,
                    _ => state.ram[(i & 0x7f) as usize] = v,
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(
            utc_from_unix(0),
            DateTime { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0, weekday: 5 }
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(
            utc_from_unix(951_827_696),
            DateTime { year: 2000, month: 2, day: 29, hour: 12, minute: 34, second: 56, weekday: 3 }
        );
        // 2026-11-22 00:00:00 UTC, a Sunday.
        let d = utc_from_unix(1_795_305_600);
        assert_eq!((d.year, d.month, d.day, d.weekday), (2026, 11, 22, 1));
    }

    #[test]
    fn bcd_registers_and_ram() {
        let rtc = Cmos::default();
        let read = |i: u8| {
            rtc.write(0, &[i]);
            let mut d = [0u8];
            rtc.read(1, &mut d);
            d[0]
        };
        assert_eq!(read(REG_B), REG_B_DEFAULT);
        assert_eq!(read(REG_D), REG_D_VRT);
        let year = read(REG_YEAR);
        assert!(year >> 4 <= 9 && year & 0xf <= 9, "BCD year {year:#x}");
        assert_eq!(read(REG_CENTURY), 0x20);
        // NMI-mask bit is ignored for the index; plain RAM keeps what is written.
        rtc.write(0, &[0x80 | 0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(0x40), 0x5a);
        // Time registers ignore writes.
        rtc.write(0, &[REG_CENTURY]);
        rtc.write(1, &[0x19]);
        assert_eq!(read(REG_CENTURY), 0x20);
    }
}
