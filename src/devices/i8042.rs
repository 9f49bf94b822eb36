//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status / command),
//! with a PS/2 keyboard behind it, on ISA IRQ 1.
//!
//! Enough of both for Linux's i8042 and atkbd drivers to find a keyboard, so the host
//! can press Ctrl+Alt+Del (`PUT /actions {"action_type": "SendCtrlAltDel"}`, as
//! Firecracker offers): the guest kernel then reboots or tells its init. Command
//! 0xfe (and any pulse of output line 0) resets the machine, as on a PC.
//!
//! There is no auxiliary (mouse) port, as on AT-style controllers: its commands are
//! not recognised, and a byte written after one goes to the keyboard, which answers
//! "resend". Linux's probe reads that answer and concludes at once that there is no
//! mouse port (a controller that stayed silent would cost it a 500 ms timeout).
//!
//! Every byte the guest writes is a command or a parameter from a closed set; the
//! output queue is bounded, so a guest that never reads cannot grow it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use super::state::{DeviceState, RestoreError};
use crate::control::{Control, StopReason};

/// Status register bits (port 0x64, read).
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Set while the keyboard is not inhibited (the key lock is open).
const STATUS_NOT_INHIBITED: u8 = 0x10;

/// Controller configuration byte bits.
const CONFIG_KBD_INTERRUPT: u8 = 0x01;
const CONFIG_SYSTEM_FLAG: u8 = 0x04;
const CONFIG_KBD_DISABLED: u8 = 0x10;
const CONFIG_AUX_DISABLED: u8 = 0x20;
const CONFIG_TRANSLATE: u8 = 0x40;
/// What firmware leaves: keyboard interrupt on, POST passed, no mouse port, scan
/// codes translated to set 1.
const CONFIG_AT_POWER_ON: u8 = CONFIG_KBD_INTERRUPT | CONFIG_SYSTEM_FLAG | CONFIG_AUX_DISABLED | CONFIG_TRANSLATE;

/// Bytes waiting for the guest; more are dropped (a real controller holds one).
const OUTPUT_LIMIT: usize = 32;

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
/// An MF2 keyboard's identity.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Controller self-test and interface-test answers.
const CONTROLLER_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

/// Ctrl, Alt, Delete pressed, then released in reverse order: in scan code set 1
/// (what a translating controller delivers) and set 2 (what the keyboard sends).
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: &[u8] = &[0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

/// A byte written to port 0x60 that completes an earlier command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// Controller command 0x60: the byte is the new configuration.
    WriteConfig,
    /// Controller command 0xd1: the byte drives the output port (bit 0: reset line).
    WriteOutputPort,
    /// Controller command 0xd2: the byte comes back as if the keyboard sent it.
    KeyboardLoop,
    /// A keyboard command that takes a parameter (0xed LEDs, 0xf0 scan code set,
    /// 0xf3 typematic rate).
    KeyboardParameter(u8),
}

/// The controller's and the keyboard's state: what a snapshot carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Regs {
    pub config: u8,
    pub output: Vec<u8>,
    pub pending: Option<Pending>,
    pub last_was_command: bool,
    /// The keyboard sends key codes (after 0xf4, until 0xf5).
    pub scanning: bool,
}

impl Default for I8042Regs {
    fn default() -> Self {
        Self { config: CONFIG_AT_POWER_ON, output: Vec::new(), pending: None, last_was_command: false, scanning: true }
    }
}

/// The model's working state.
struct Controller {
    config: u8,
    output: VecDeque<u8>,
    pending: Option<Pending>,
    last_was_command: bool,
    scanning: bool,
}

/// What a write asks of the machine.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    None,
    Reset,
}

impl Controller {
    fn from_regs(r: &I8042Regs) -> Self {
        let mut output: VecDeque<u8> = r.output.iter().copied().collect();
        output.truncate(OUTPUT_LIMIT);
        Self { config: r.config, output, pending: r.pending, last_was_command: r.last_was_command, scanning: r.scanning }
    }

    fn regs(&self) -> I8042Regs {
        I8042Regs {
            config: self.config,
            output: self.output.iter().copied().collect(),
            pending: self.pending,
            last_was_command: self.last_was_command,
            scanning: self.scanning,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_NOT_INHIBITED;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.config & CONFIG_SYSTEM_FLAG != 0 {
            s |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    /// Queues bytes for the guest; true when the output buffer went from empty to full
    /// (an interrupt is due).
    fn push(&mut self, bytes: &[u8]) -> bool {
        let was_empty = self.output.is_empty();
        for &b in bytes {
            if self.output.len() < OUTPUT_LIMIT {
                self.output.push_back(b);
            }
        }
        was_empty && !self.output.is_empty()
    }

    /// Port 0x64: a controller command. Returns whether an interrupt is due.
    fn command(&mut self, cmd: u8) -> (bool, Effect) {
        self.last_was_command = true;
        self.pending = None;
        let irq = match cmd {
            0x20 => self.push(&[self.config]),
            // The rest of the controller's RAM reads as zero.
            0x21..=0x3f => self.push(&[0]),
            0x60 => {
                self.pending = Some(Pending::WriteConfig);
                false
            }
            0xaa => {
                self.config |= CONFIG_SYSTEM_FLAG;
                self.push(&[CONTROLLER_TEST_PASSED])
            }
            0xab => self.push(&[INTERFACE_TEST_PASSED]),
            0xad => {
                self.config |= CONFIG_KBD_DISABLED;
                false
            }
            0xae => {
                self.config &= !CONFIG_KBD_DISABLED;
                false
            }
            // Input port: no key lock, colour display.
            0xc0 => self.push(&[0x00]),
            // Output port: reset line high, A20 on, output buffer state.
            0xd0 => {
                let full = u8::from(!self.output.is_empty());
                self.push(&[0x03 | (full << 4)])
            }
            0xd1 => {
                self.pending = Some(Pending::WriteOutputPort);
                false
            }
            0xd2 => {
                self.pending = Some(Pending::KeyboardLoop);
                false
            }
            // Pulse output lines for 6 us: a low bit 0 pulses the CPU reset line.
            0xf0..=0xff if cmd & 1 == 0 => return (false, Effect::Reset),
            // No mouse port (0xa7-0xa9, 0xd3, 0xd4) and nothing else: not recognised.
            _ => false,
        };
        (irq, Effect::None)
    }

    /// Port 0x60: a parameter for the controller, or a byte for the keyboard.
    fn data(&mut self, byte: u8) -> (bool, Effect) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(Pending::WriteConfig) => {
                let was_enabled = self.config & CONFIG_KBD_INTERRUPT != 0;
                self.config = byte;
                // Enabling the interrupt with a byte waiting raises it.
                let irq = !was_enabled && byte & CONFIG_KBD_INTERRUPT != 0 && !self.output.is_empty();
                (irq, Effect::None)
            }
            Some(Pending::WriteOutputPort) if byte & 1 == 0 => (false, Effect::Reset),
            Some(Pending::WriteOutputPort) => (false, Effect::None),
            Some(Pending::KeyboardLoop) => (self.push(&[byte]), Effect::None),
            Some(Pending::KeyboardParameter(cmd)) => (self.keyboard_parameter(cmd, byte), Effect::None),
            None => (self.keyboard(byte), Effect::None),
        }
    }

    /// A command for the keyboard; its answers go to the output buffer.
    fn keyboard(&mut self, cmd: u8) -> bool {
        // Writing to the keyboard enables its interface.
        self.config &= !CONFIG_KBD_DISABLED;
        match cmd {
            0xed | 0xf0 | 0xf3 => {
                self.pending = Some(Pending::KeyboardParameter(cmd));
                self.push(&[KBD_ACK])
            }
            0xee => self.push(&[KBD_ECHO]),
            0xf2 => self.push(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            0xf4 => {
                self.scanning = true;
                self.push(&[KBD_ACK])
            }
            0xf5 => {
                self.scanning = false;
                self.push(&[KBD_ACK])
            }
            0xf6..=0xfd => self.push(&[KBD_ACK]),
            0xff => {
                self.scanning = true;
                self.push(&[KBD_ACK, KBD_SELF_TEST_PASSED])
            }
            _ => self.push(&[KBD_RESEND]),
        }
    }

    fn keyboard_parameter(&mut self, cmd: u8, param: u8) -> bool {
        match (cmd, param) {
            // Scan code set 0 asks which is in use: set 2, always.
            (0xf0, 0) => self.push(&[KBD_ACK, 0x02]),
            (0xf0, 1..=3) | (0xed | 0xf3, _) => self.push(&[KBD_ACK]),
            _ => self.push(&[KBD_RESEND]),
        }
    }

    /// Port 0x60 read: the head of the output buffer; true when another byte follows
    /// (an interrupt is due for it).
    fn read_data(&mut self) -> (u8, bool) {
        let byte = self.output.pop_front().unwrap_or(0);
        (byte, !self.output.is_empty())
    }

    /// Queues Ctrl+Alt+Del as key presses; refused while the guest has the keyboard
    /// off or would lose the bytes.
    fn ctrl_alt_del(&mut self) -> Result<bool, String> {
        if !self.scanning || self.config & CONFIG_KBD_DISABLED != 0 {
            return Err("the guest has not enabled its keyboard (no i8042 driver, or it is not probed yet)".into());
        }
        let codes = if self.config & CONFIG_TRANSLATE != 0 { CTRL_ALT_DEL_SET1 } else { CTRL_ALT_DEL_SET2 };
        if self.output.len() + codes.len() > OUTPUT_LIMIT {
            return Err("the guest is not reading its keyboard".into());
        }
        Ok(self.push(codes))
    }
}

/// The i8042 on the port bus.
pub struct I8042 {
    ctl: Mutex<Controller>,
    irq: EventFd,
    control: Arc<Control>,
}

impl I8042 {
    /// `irq` is the eventfd KVM injects ISA IRQ 1 for.
    pub fn new(control: Arc<Control>, irq: EventFd) -> Self {
        Self { ctl: Mutex::new(Controller::from_regs(&I8042Regs::default())), irq, control }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Controller> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises IRQ 1 when the guest enabled the keyboard interrupt.
    fn interrupt(&self, ctl: &Controller, due: bool) {
        if due && ctl.config & CONFIG_KBD_INTERRUPT != 0 {
            // A full eventfd counter still means "raise": nothing is lost.
            let _ = self.irq.write(1);
        }
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), String> {
        let mut ctl = self.lock();
        let due = ctl.ctrl_alt_del()?;
        self.interrupt(&ctl, due);
        Ok(())
    }

    fn effect(&self, effect: Effect) {
        if effect == Effect::Reset {
            self.control.request_stop(StopReason::Reboot("i8042 reset line"));
        }
    }
}

impl BusDevice for I8042 {
    fn state(&self) -> DeviceState {
        DeviceState::Keyboard(self.lock().regs())
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        let regs = match state {
            // Snapshots from before the keyboard: a controller as firmware leaves it.
            DeviceState::I8042 => I8042Regs::default(),
            DeviceState::Keyboard(regs) => regs.clone(),
            other => return Err(RestoreError::wrong_kind(other, "i8042")),
        };
        if regs.output.len() > OUTPUT_LIMIT {
            return Err(RestoreError::Invalid { device: "i8042", reason: format!("{} bytes queued, at most {OUTPUT_LIMIT}", regs.output.len()) });
        }
        *self.lock() = Controller::from_regs(&regs);
        Ok(())
    }
    fn reset(&self) {
        *self.lock() = Controller::from_regs(&I8042Regs::default());
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut ctl = self.lock();
        let byte = match offset {
            0 => {
                let (byte, more) = ctl.read_data();
                self.interrupt(&ctl, more);
                byte
            }
            4 => ctl.status(),
            _ => 0xff,
        };
        if let Some(b) = data.first_mut() {
            *b = byte;
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        let mut ctl = self.lock();
        let (due, effect) = match offset {
            0 => ctl.data(byte),
            4 => ctl.command(byte),
            _ => return,
        };
        self.interrupt(&ctl, due);
        drop(ctl);
        self.effect(effect);
    }
}

#[cfg(test)]
mod tests;
