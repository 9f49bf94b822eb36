//! The device manager: every device of the machine declared in one place, with its
//! bus range, interrupt line and ACPI entry. The buses, the irqfds, the DSDT's device
//! list, KVM's coalesced zones and doorbells, and reset are all derived from that one
//! list, so a device cannot be on the bus but missing from ACPI, or reset but forgotten.

use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::VmmError;
use super::acpi::{AcpiDevice, AcpiHid, AcpiIrq, AcpiWindow};
use super::layout::*;
use crate::control::Control;
use crate::devices::i8042::I8042;
use crate::devices::legacy::{BootMarker, PostPort, ResetControl};
use crate::devices::pm::{PM_BLOCK_LEN, PmBlock};
use crate::devices::rtc::Cmos;
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::pci::routing::Kvm as PciKvm;
use crate::devices::pci::{CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN, HostBridge, PciFunction, PciRoot, PciWindow};
use crate::devices::virtio::{MMIO_SIZE, QUEUE_NOTIFY, VirtioDevice, VirtioMmio, VirtioPci, VirtioStats};
use crate::devices::state::{DEVICE_STATE_VERSION, DeviceState, device_state_readable};
use crate::devices::{BusDevice, Buses};

/// Where virtio-mmio devices sit: one 4 KiB window per slot in the MMIO hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The first virtio device's GSI (I/O APIC pins 16-23: no ISA device uses them).
pub const VIRTIO_GSI_BASE: u32 = 16;
pub const VIRTIO_SLOTS: usize = 8;

/// The hypercall ports' name in the device list (a snapshot may predate them).
const HYPERCALL_PORTS: &str = "hypercall ports";

/// ISA IRQ of the PC-standard RTC.
pub const RTC_IRQ: u32 = 8;
/// The RTC/CMOS decodes an index and a data port.
const RTC_PORT_LEN: u8 = 2;
/// A 16550 UART decodes eight consecutive ports.
const UART_PORT_LEN: u8 = 8;

/// Which address space a device sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Space {
    Pio,
    Mmio,
    /// A function on PCI bus 0 (base = device number), reached through the PCI root's
    /// configuration ports and the BAR window, not on a bus of its own.
    Pci,
}

/// How a write-only part of a device's range may skip the exit to skiff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastWrite {
    /// Writes may wait in KVM's coalesced ring until the next exit.
    Coalesced,
    /// Only "the guest wrote" matters: an ioeventfd instead of an exit.
    Doorbell,
}

/// One device as the machine declares it.
pub struct Declared {
    pub name: &'static str,
    pub space: Space,
    pub base: u64,
    pub len: u64,
    pub device: Arc<dyn BusDevice>,
    /// Its ACPI entry, if the OS should find it there.
    pub acpi: Option<AcpiDevice>,
    /// Part of the range (absolute base, length) whose writes need no exit.
    pub fast: Option<(u64, u64, FastWrite)>,
}

/// One device's state in a snapshot, named by where it sits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedDevice {
    pub version: u32,
    pub space: Space,
    pub base: u64,
    pub state: DeviceState,
}

/// The legacy PC devices, each with what it needs from the machine.
pub struct Legacy {
    pub serial: Arc<SerialDevice>,
    pub marker: Arc<BootMarker>,
    /// The keyboard controller, for the host's Ctrl+Alt+Del.
    pub i8042: Arc<I8042>,
}

/// A virtio device behind either transport.
pub enum VirtioTransport {
    Mmio(Arc<VirtioMmio>),
    Pci(Arc<VirtioPci>),
}

impl VirtioTransport {
    pub fn notify(&self, queue: u16) {
        match self {
            VirtioTransport::Mmio(d) => d.notify(queue),
            VirtioTransport::Pci(d) => d.notify(queue),
        }
    }
    pub fn backend_fds(&self) -> Vec<std::os::fd::RawFd> {
        match self {
            VirtioTransport::Mmio(d) => d.backend_fds(),
            VirtioTransport::Pci(d) => d.backend_fds(),
        }
    }
    pub fn backend_ready(&self, i: usize) {
        match self {
            VirtioTransport::Mmio(d) => d.backend_ready(i),
            VirtioTransport::Pci(d) => d.backend_ready(i),
        }
    }
    pub fn stats(&self) -> VirtioStats {
        match self {
            VirtioTransport::Mmio(d) => d.stats(),
            VirtioTransport::Pci(d) => d.stats(),
        }
    }
}

/// One virtio device and the eventfds KVM signals when its queues are notified
/// (empty where KVM took none: the notification then exits and the transport handles it).
pub struct VirtioSlot {
    pub name: String,
    pub device: VirtioTransport,
    /// (queue index, eventfd KVM signals for a notification of that queue).
    pub notifiers: Vec<(u16, EventFd)>,
}

/// What the PCI bus is built from (with `--virtio-transport pci`).
pub struct PciParts {
    /// The VM handle functions use at run time (ioeventfds, MSI routes, irqfds).
    pub kvm: Arc<PciKvm>,
    /// The 0xcf9 reset control register, which the PCI root's ports take in.
    reset_control: Arc<dyn BusDevice>,
    /// Functions by device number - 1 (device 0 is the host bridge).
    functions: Vec<Arc<dyn PciFunction>>,
}

/// The machine's devices and the buses built from them.
pub struct DeviceManager {
    pub buses: Arc<Buses>,
    pub declared: Vec<Declared>,
    pub legacy: Legacy,
    pub virtio: Vec<VirtioSlot>,
    pub pci: Option<PciParts>,
    /// skiff's hypercall handler (its ports are declared with the others).
    pub hypercalls: Option<Arc<crate::hypercall::Hypercalls>>,
}

impl DeviceManager {
    /// Declares the legacy devices; `serial_out` is the console the UART writes to.
    /// With `pci` (the VM handle its functions use), virtio devices go on a PCI bus.
    pub fn new(vm: &VmFd, control: &Arc<Control>, serial_out: ConsoleOut, pci: Option<Arc<PciKvm>>) -> Result<Self, VmmError> {
        let serial_irq = irq_line(vm, COM1_IRQ, "COM1")?;
        let serial = Arc::new(SerialDevice::new(serial_irq, serial_out, control.clone()).map_err(|e| VmmError::Device(format!("eventfd: {e}")))?);
        let marker = Arc::new(BootMarker::default());
        let i8042 = Arc::new(I8042::new(control.clone(), irq_line(vm, I8042_IRQ, "i8042")?));
        let pio = |name, base: u16, len: u64, device: Arc<dyn BusDevice>| Declared {
            name,
            space: Space::Pio,
            base: base as u64,
            len,
            device,
            acpi: None,
            fast: None,
        };
        let reset_control: Arc<dyn BusDevice> = Arc::new(ResetControl::new(control.clone(), "0xcf9 reset control"));
        let mut declared = vec![
            Declared {
                acpi: Some(com1_acpi()),
                ..pio("COM1 16550 UART", COM1_PORT, UART_PORT_LEN as u64, serial.clone())
            },
            Declared { acpi: Some(i8042_acpi()), ..pio("i8042", I8042_PORT, 5, i8042.clone()) },
            Declared {
                acpi: Some(rtc_acpi()),
                // The index write can wait: the data port's exit delivers it first.
                fast: Some((RTC_PORT as u64, 1, FastWrite::Coalesced)),
                ..pio("CMOS RTC", RTC_PORT, RTC_PORT_LEN as u64, Arc::new(Cmos::default()))
            },
            Declared {
                fast: Some((POST_PORT as u64, 1, FastWrite::Coalesced)),
                ..pio("POST port", POST_PORT, 1, Arc::new(PostPort::default()))
            },
            pio("ACPI PM block", PM1A_EVT_PORT, PM_BLOCK_LEN, Arc::new(PmBlock::new(control.clone()))),
            Declared {
                fast: Some((BOOT_MARKER_PORT as u64, 1, FastWrite::Doorbell)),
                ..pio("boot marker", BOOT_MARKER_PORT, 1, marker.clone())
            },
        ];
        let pci = match pci {
            // The PCI root's ports (0xcf8-0xcff) take the reset register in.
            Some(kvm) => Some(PciParts { kvm, reset_control, functions: Vec::new() }),
            None => {
                declared.insert(4, pio("0xcf9 reset control", RESET_CF9_PORT, 1, reset_control));
                None
            }
        };
        Ok(DeviceManager { buses: Arc::new(Buses::default()), declared, legacy: Legacy { serial, marker, i8042 }, virtio: Vec::new(), pci, hypercalls: None })
    }

    /// Declares the devices for people who test kernels: fw_cfg, always (QEMU's
    /// firmware interface: CPU count, RAM size and the `--fw-cfg` files; an ACPI
    /// `QEMU0002` entry, as Linux's qemu_fw_cfg driver looks for), and the exit-status
    /// device when `--exit-device` asks for it (no ACPI entry, as in QEMU).
    pub fn add_kernel_test_devices(&mut self, control: &Arc<Control>, config: &crate::config::VmConfig) -> Result<(), VmmError> {
        use crate::devices::exit::ExitDevice;
        use crate::devices::fw_cfg::{FW_CFG_PORT, FW_CFG_PORTS, FwCfg, FwCfgFile};
        let files = config.fw_cfg.iter().map(|f| FwCfgFile { name: f.name.clone(), data: f.data.clone() }).collect();
        let fw_cfg = FwCfg::new(config.cpus, config.memory, files).map_err(VmmError::Device)?;
        self.declared.push(Declared {
            name: "fw_cfg",
            space: Space::Pio,
            base: u64::from(FW_CFG_PORT),
            len: u64::from(FW_CFG_PORTS),
            device: Arc::new(fw_cfg),
            acpi: Some(AcpiDevice {
                name: "FWCF".into(),
                hid: AcpiHid::Str("QEMU0002"),
                uid: None,
                window: AcpiWindow::Io { port: FW_CFG_PORT, len: FW_CFG_PORTS },
                irq: None,
            }),
            fast: None,
        });
        if let Some(exit) = config.exit_device {
            self.declared.push(Declared {
                name: "exit device",
                space: Space::Pio,
                base: u64::from(exit.port),
                len: u64::from(exit.size),
                device: Arc::new(ExitDevice::new(control.clone(), exit.size)),
                acpi: None,
                fast: None,
            });
        }
        Ok(())
    }

    /// Declares skiff's hypercall ports (hypercall/mod.rs): the direct and patched
    /// stubs' ports, whose exits the vCPU handles with the registers, and the ring's
    /// doorbell (an ioeventfd: the event loop flushes the ring).
    pub fn add_hypercalls(&mut self, mem: &vm_memory::GuestMemoryMmap, control: &Arc<Control>, console: ConsoleOut) {
        use crate::hypercall::{Hypercalls, PORT_DIRECT, PORT_RING, PORTS_LEN};
        let h = Arc::new(Hypercalls::new(mem.clone(), control.clone(), console, self.legacy.marker.clone()));
        self.declared.push(Declared {
            name: HYPERCALL_PORTS,
            space: Space::Pio,
            base: u64::from(PORT_DIRECT),
            len: PORTS_LEN,
            device: h.clone(),
            acpi: None,
            fast: Some((u64::from(PORT_RING), 1, FastWrite::Doorbell)),
        });
        self.hypercalls = Some(h);
    }

    /// Declares a virtio-mmio device in the next slot: its registers at
    /// [`VIRTIO_MMIO_BASE`] + slot * 4 KiB, its interrupt on GSI [`VIRTIO_GSI_BASE`] +
    /// slot (edge-triggered through an irqfd), its ACPI entry an `LNRO0005` device
    /// (what Linux's virtio_mmio driver binds to).
    pub fn add_virtio(&mut self, vm: &VmFd, mem: &vm_memory::GuestMemoryMmap, name: String, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        if self.pci.is_some() {
            return self.add_virtio_pci(mem, name, device);
        }
        let slot = self.virtio.len();
        if slot >= VIRTIO_SLOTS {
            return Err(VmmError::Device(format!("{name}: no free virtio slot (at most {VIRTIO_SLOTS} devices)")));
        }
        let base = VIRTIO_MMIO_BASE + slot as u64 * MMIO_SIZE;
        let gsi = VIRTIO_GSI_BASE + slot as u32;
        let irq = irq_line(vm, gsi, &name)?;
        let transport = Arc::new(VirtioMmio::new(device, mem.clone(), irq).map_err(|e| VmmError::Device(format!("{name}: {e}")))?);
        self.declared.push(Declared {
            name: "virtio-mmio",
            space: Space::Mmio,
            base,
            len: MMIO_SIZE,
            device: transport.clone(),
            acpi: Some(AcpiDevice {
                name: format!("VR{slot:02}"),
                hid: AcpiHid::Str("LNRO0005"),
                uid: u8::try_from(slot).ok(),
                window: AcpiWindow::Mmio { base: base as u32, len: MMIO_SIZE as u32 },
                irq: Some(AcpiIrq::EdgeGsi(gsi)),
            }),
            fast: None,
        });
        self.virtio.push(VirtioSlot { name, device: VirtioTransport::Mmio(transport), notifiers: Vec::new() });
        Ok(())
    }

    /// Declares a virtio-pci function at the next device number (1, 2, ...), its BAR 0
    /// placed by skiff (as firmware would) at [`PCI_MMIO_START`] + (number - 1) * the
    /// BAR size; its queue notifiers are ioeventfds from the start.
    fn add_virtio_pci(&mut self, mem: &vm_memory::GuestMemoryMmap, name: String, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        use crate::devices::virtio::pci::BAR_SIZE;
        let Some(pci) = self.pci.as_mut() else { return Err(VmmError::Device(format!("{name}: no PCI bus"))) };
        let number = pci.functions.len() + 1;
        let bar = PCI_MMIO_START + (number as u64 - 1) * BAR_SIZE;
        if number >= crate::devices::pci::MAX_DEVICES || bar + BAR_SIZE > PCI_MMIO_START + PCI_MMIO_SIZE {
            return Err(VmmError::Device(format!("{name}: no free PCI device number")));
        }
        let function = Arc::new(VirtioPci::new(device, mem.clone(), pci.kvm.clone(), bar).map_err(|e| VmmError::Device(format!("{name}: {e}")))?);
        pci.functions.push(function.clone());
        self.declared.push(Declared { name: "virtio-pci", space: Space::Pci, base: number as u64, len: 1, device: function.clone(), acpi: None, fast: None });
        let notifiers = (0..function.queue_count()).filter_map(|q| Some((u16::try_from(q).ok()?, function.notifier(q)?))).collect();
        self.virtio.push(VirtioSlot { name, device: VirtioTransport::Pci(function), notifiers });
        Ok(())
    }

    /// Declares the PCI root (configuration ports), the host bridge and the BAR window,
    /// once every function is declared.
    fn declare_pci_bus(&mut self) {
        let Some(pci) = self.pci.as_ref() else { return };
        let bridge: Arc<dyn PciFunction> = Arc::new(HostBridge::default());
        let mut devices = vec![bridge.clone()];
        devices.extend(pci.functions.iter().cloned());
        let root = Arc::new(PciRoot::new(pci.reset_control.clone(), devices));
        let window = Arc::new(PciWindow::new(PCI_MMIO_START, pci.functions.clone()));
        self.declared.push(Declared {
            name: "PCI configuration ports",
            space: Space::Pio,
            base: u64::from(CONFIG_ADDRESS_PORT),
            len: CONFIG_PORTS_LEN,
            device: root,
            acpi: Some(AcpiDevice {
                name: "PCI0".into(),
                hid: AcpiHid::Eisa("PNP0A08"),
                uid: Some(0),
                window: AcpiWindow::PciRoot { mmio_base: PCI_MMIO_START as u32, mmio_len: PCI_MMIO_SIZE as u32 },
                irq: None,
            }),
            fast: None,
        });
        self.declared.push(Declared { name: "PCI host bridge", space: Space::Pci, base: 0, len: 1, device: bridge, acpi: None, fast: None });
        self.declared.push(Declared { name: "PCI BAR window", space: Space::Mmio, base: PCI_MMIO_START, len: PCI_MMIO_SIZE, device: window, acpi: None, fast: None });
    }

    /// Has KVM signal an eventfd for each virtio queue's notification (an ioeventfd on
    /// QueueNotify matching the queue's index) instead of exiting. Returns a line for
    /// `--stats`; what KVM refuses keeps exiting to the transport.
    pub fn setup_queue_notifiers(&mut self, vm: &VmFd) -> String {
        use kvm_ioctls::IoEventAddress;
        let mut taken = 0;
        let mut refused = Vec::new();
        for (slot, v) in self.virtio.iter_mut().enumerate() {
            // virtio-pci functions registered theirs where their BAR is (and move them).
            let device = match &v.device {
                VirtioTransport::Mmio(d) => d,
                VirtioTransport::Pci(d) => {
                    taken += d.notifiers_registered();
                    continue;
                }
            };
            let notify = IoEventAddress::Mmio(VIRTIO_MMIO_BASE + slot as u64 * MMIO_SIZE + QUEUE_NOTIFY);
            for q in 0..device.queue_count() {
                let Ok(q) = u16::try_from(q) else { break };
                let registered = EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| e.to_string())
                    .and_then(|fd| vm.register_ioevent(&fd, &notify, u32::from(q)).map(|()| fd).map_err(|e| e.to_string()));
                match registered {
                    Ok(fd) => {
                        v.notifiers.push((q, fd));
                        taken += 1;
                    }
                    Err(e) => refused.push(format!("{} queue {q} ({e})", v.name)),
                }
            }
        }
        let mut line = format!("{taken} virtio queues notify by ioeventfd");
        if !refused.is_empty() {
            line.push_str(&format!("; exiting instead: {}", refused.join(", ")));
        }
        line
    }

    /// Puts every declared device on its bus. Call once, after every declaration.
    pub fn build_buses(&mut self) -> Result<(), VmmError> {
        self.declare_pci_bus();
        let mut buses = Buses::default();
        for d in &self.declared {
            let bus = match d.space {
                Space::Pio => &mut buses.pio,
                Space::Mmio => &mut buses.mmio,
                Space::Pci => continue,
            };
            let err = |e: crate::devices::bus::BusError| VmmError::Device(format!("{}: {e}", d.name));
            bus.insert(d.device.clone(), d.base, d.len).map_err(err)?;
            match d.fast {
                Some((base, len, FastWrite::Coalesced)) => bus.mark_coalescable(base, len).map_err(err)?,
                Some((base, len, FastWrite::Doorbell)) => bus.mark_doorbell(base, len).map_err(err)?,
                None => {}
            }
        }
        self.buses = Arc::new(buses);
        Ok(())
    }

    /// The DSDT's device list.
    pub fn acpi_devices(&self) -> Vec<AcpiDevice> {
        self.declared.iter().filter_map(|d| d.acpi.clone()).collect()
    }

    /// Every declared device's state, named by where it sits (for a snapshot).
    pub fn save(&self) -> Vec<SavedDevice> {
        self.declared
            .iter()
            .map(|d| SavedDevice { version: DEVICE_STATE_VERSION, space: d.space, base: d.base, state: d.device.state() })
            .collect()
    }

    /// Puts `saved` back, one state into each declared device: every device must find
    /// exactly its own, and nothing may be left over (a snapshot of another machine).
    pub fn restore(&self, saved: &[SavedDevice]) -> Result<(), String> {
        if saved.len() != self.declared.len() {
            return Err(format!("{} device states for {} devices", saved.len(), self.declared.len()));
        }
        for d in &self.declared {
            let mut mine = saved.iter().filter(|s| s.space == d.space && s.base == d.base);
            if d.name == HYPERCALL_PORTS && !saved.iter().any(|s| s.space == d.space && s.base == d.base) {
                // A snapshot from before the hypercall ports: they start unused.
                d.device.reset();
                continue;
            }
            let (Some(s), None) = (mine.next(), mine.next()) else {
                return Err(format!("{} at {:#x}: not exactly one saved state", d.name, d.base));
            };
            if !device_state_readable(s.version) {
                return Err(format!("{} at {:#x}: state version {} (this skiff reads {DEVICE_STATE_VERSION})", d.name, d.base, s.version));
            }
            d.device.restore(&s.state).map_err(|e| format!("{} at {:#x}: {e}", d.name, d.base))?;
        }
        Ok(())
    }

    /// Every device back to its power-up state (an in-place reboot).
    pub fn reset(&self) {
        for d in &self.declared {
            d.device.reset();
        }
    }
}

/// An edge-triggered interrupt line: an eventfd KVM injects GSI `gsi` for.
pub fn irq_line(vm: &VmFd, gsi: u32, what: &str) -> Result<EventFd, VmmError> {
    let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Device(format!("{what}: eventfd: {e}")))?;
    vm.register_irqfd(&fd, gsi).map_err(|e| VmmError::Device(format!("{what}: KVM_IRQFD for GSI {gsi}: {e}")))?;
    Ok(fd)
}

fn com1_acpi() -> AcpiDevice {
    AcpiDevice {
        name: "COM1".into(),
        hid: AcpiHid::Eisa("PNP0501"),
        uid: Some(0),
        window: AcpiWindow::Io { port: COM1_PORT, len: UART_PORT_LEN },
        irq: Some(AcpiIrq::Isa(COM1_IRQ)),
    }
}

/// `PNP0303`, an AT keyboard controller: how Linux's i8042 driver finds it.
fn i8042_acpi() -> AcpiDevice {
    AcpiDevice {
        name: "KBD_".into(),
        hid: AcpiHid::Eisa("PNP0303"),
        uid: None,
        window: AcpiWindow::IoPair { data: I8042_PORT, command: I8042_COMMAND_PORT },
        irq: Some(AcpiIrq::Isa(I8042_IRQ)),
    }
}

fn rtc_acpi() -> AcpiDevice {
    AcpiDevice {
        name: "RTC_".into(),
        hid: AcpiHid::Eisa("PNP0B00"),
        uid: None,
        window: AcpiWindow::Io { port: RTC_PORT, len: RTC_PORT_LEN },
        irq: Some(AcpiIrq::Isa(RTC_IRQ)),
    }
}

/// The legacy devices' ACPI entries alone (for the ACPI tables' own tests).
pub fn legacy_acpi_devices() -> Vec<AcpiDevice> {
    vec![com1_acpi(), i8042_acpi(), rtc_acpi()]
}

/// Registers every coalescable range of both buses with KVM and attaches the ring to
/// the buses. Capabilities are checked at run time; whatever KVM refuses simply keeps
/// exiting as before. Returns a line for `--stats`.
pub fn setup_coalescing(kvm: &Kvm, vm: &VmFd, vcpu: &kvm_ioctls::VcpuFd, buses: &Buses) -> String {
    use kvm_ioctls::IoEventAddress;
    if !kvm.check_extension(Cap::CoalescedMmio) {
        return "off: KVM lacks KVM_CAP_COALESCED_MMIO (no ring)".into();
    }
    let pio_ok = kvm.check_extension(Cap::CoalescedPio);
    let ring = match crate::devices::coalesced::CoalescedRing::map(vcpu) {
        Ok(r) => r,
        Err(e) => return format!("off: mapping the coalesced ring failed: {e}"),
    };
    // Attached before any zone exists, so no deferred write can go unread.
    if buses.attach_ring(ring).is_err() {
        return "off: a ring was already attached".into();
    }
    let mut zones = Vec::new();
    let mut refused = Vec::new();
    let pio = buses.pio.coalescable().iter().map(|&(b, l)| (true, b, l));
    let mmio = buses.mmio.coalescable().iter().map(|&(b, l)| (false, b, l));
    for (is_pio, base, len) in pio.chain(mmio) {
        let name = if is_pio { format!("port {base:#x}") } else { format!("MMIO {base:#x}") };
        let Ok(size) = u32::try_from(len) else {
            refused.push(format!("{name} (too long)"));
            continue;
        };
        if is_pio && !pio_ok {
            refused.push(format!("{name} (no KVM_CAP_COALESCED_PIO)"));
            continue;
        }
        let addr = if is_pio { IoEventAddress::Pio(base) } else { IoEventAddress::Mmio(base) };
        match vm.register_coalesced_mmio(addr, size) {
            Ok(()) => zones.push(format!("{name}+{len}")),
            Err(e) => refused.push(format!("{name} ({e})")),
        }
    }
    let mut line = if zones.is_empty() { "no zones".to_string() } else { format!("zones {}", zones.join(", ")) };
    if !refused.is_empty() {
        line.push_str(&format!("; not coalesced: {}", refused.join(", ")));
    }
    line
}

/// Registers every doorbell range of the port bus with KVM (KVM_IOEVENTFD, any access
/// size, any value) and attaches them to the buses. What KVM refuses keeps exiting, as
/// before. Returns a line for `--stats`.
pub fn setup_doorbells(kvm: &Kvm, vm: &VmFd, buses: &Buses) -> String {
    use crate::devices::doorbell::{Doorbell, Doorbells};
    use kvm_ioctls::{IoEventAddress, NoDatamatch};
    if !kvm.check_extension(Cap::Ioeventfd) {
        return "off: KVM lacks KVM_CAP_IOEVENTFD".into();
    }
    let mut bells = Vec::new();
    let mut names = Vec::new();
    let mut refused = Vec::new();
    for (port, device, offset) in buses.pio.doorbells() {
        let event = match Doorbells::eventfd() {
            Ok(e) => e,
            Err(e) => {
                refused.push(format!("port {port:#x} (eventfd: {e})"));
                continue;
            }
        };
        match vm.register_ioevent(&event, &IoEventAddress::Pio(port), NoDatamatch) {
            Ok(()) => {
                names.push(format!("port {port:#x}"));
                bells.push(Doorbell { event, device, offset });
            }
            Err(e) => refused.push(format!("port {port:#x} ({e})")),
        }
    }
    if !bells.is_empty() && buses.attach_doorbells(Doorbells::new(bells)).is_err() {
        return "off: doorbells were already attached".into();
    }
    let mut line = if names.is_empty() { "none".to_string() } else { names.join(", ") };
    if !refused.is_empty() {
        line.push_str(&format!("; not doorbells: {}", refused.join(", ")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_list_gives_the_legacy_acpi_entries() {
        // What the ACPI tests check the DSDT against is what the manager declares.
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(e) => panic!("/dev/kvm is needed for this test: {e}"),
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let console = crate::devices::serial::Console::start(Box::new(std::io::sink())).unwrap();
        let mut m = DeviceManager::new(&vm, &Arc::new(Control::new()), ConsoleOut::new(console), None).unwrap();
        m.build_buses().unwrap();
        assert_eq!(m.acpi_devices(), legacy_acpi_devices());
        assert!(m.buses.pio.lookup(COM1_PORT as u64 + 7, 1).is_some());
        assert_eq!(m.buses.pio.coalescable(), &[(RTC_PORT as u64, 1), (POST_PORT as u64, 1)]);
    }

    #[test]
    fn every_device_state_goes_out_and_back_exactly() {
        let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let console = crate::devices::serial::Console::start(Box::new(std::io::sink())).unwrap();
        let mut m = DeviceManager::new(&vm, &Arc::new(Control::new()), ConsoleOut::new(console), None).unwrap();
        m.build_buses().unwrap();
        // Guest-visible changes: CMOS RAM, the UART's scratch register, a POST code.
        m.buses.pio.write(RTC_PORT as u64, &[0x40]);
        m.buses.pio.write(RTC_PORT as u64 + 1, &[0x5a]);
        m.buses.pio.write(COM1_PORT as u64 + 7, &[0xa5]);
        m.buses.pio.write(POST_PORT as u64, &[0x42]);
        let saved = m.save();
        assert_eq!(saved.len(), m.declared.len(), "a state for every declared device");
        m.reset();
        assert_ne!(m.save(), saved, "reset changed nothing?");
        m.restore(&saved).unwrap();
        assert_eq!(m.save(), saved);
        // A snapshot of another machine, a state of the wrong kind, a newer version.
        assert!(m.restore(&saved[1..]).unwrap_err().contains("device states for"));
        let mut swapped = saved.clone();
        swapped[0].state = DeviceState::BootMarker;
        assert!(m.restore(&swapped).unwrap_err().contains("cannot be restored into a serial"));
        let mut newer = saved.clone();
        newer[2].version = DEVICE_STATE_VERSION + 1;
        assert!(m.restore(&newer).unwrap_err().contains("state version"));
        let mut short = saved;
        short[2].state = DeviceState::Cmos { index: 0, ram: vec![0; 12] };
        assert!(m.restore(&short).unwrap_err().contains("not 128"));
    }

    /// With the PCI transport: the root takes ports 0xcf8-0xcff (0xcf9 still resets),
    /// the function is found at 00:01.0 with its BAR in the window, the DSDT gets PCI0
    /// and no virtio-mmio entry, and every state (functions included) goes out and back.
    #[test]
    fn the_pci_bus_is_declared_from_the_same_list() {
        let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let console = crate::devices::serial::Console::start(Box::new(std::io::sink())).unwrap();
        let shared = Arc::new(PciKvm::new(None));
        let control = Arc::new(Control::new());
        let mut m = DeviceManager::new(&vm, &control, ConsoleOut::new(console), Some(shared)).unwrap();
        m.add_virtio(&vm, &mem, "rng".into(), Box::new(crate::devices::virtio::rng::Rng::new())).unwrap();
        m.build_buses().unwrap();
        assert_eq!(m.virtio[0].notifiers.len(), 1, "the event loop watches the PCI notifier");
        let pio = &m.buses.pio;
        pio.write(u64::from(CONFIG_ADDRESS_PORT), &0x8000_0800u32.to_le_bytes());
        let mut id = [0u8; 4];
        pio.read(0xcfc, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        pio.write(u64::from(CONFIG_ADDRESS_PORT), &0x8000_0810u32.to_le_bytes());
        pio.read(0xcfc, &mut id);
        assert_eq!(u32::from_le_bytes(id), PCI_MMIO_START as u32 | 4);
        let mut q = [0u8; 2];
        m.buses.mmio.read(PCI_MMIO_START + 0x12, &mut q);
        assert_eq!(u16::from_le_bytes(q), 1, "num_queues through the window");
        let acpi = m.acpi_devices();
        assert!(acpi.iter().any(|d| d.name == "PCI0") && !acpi.iter().any(|d| d.hid == AcpiHid::Str("LNRO0005")));
        let saved = m.save();
        assert_eq!(saved.len(), m.declared.len());
        assert!(saved.iter().any(|s| s.space == Space::Pci && s.base == 1));
        pio.write(u64::from(CONFIG_ADDRESS_PORT) + 4, &[0]); // command: decode off
        m.reset();
        m.restore(&saved).unwrap();
        assert_eq!(m.save(), saved);
        pio.write(u64::from(RESET_CF9_PORT), &[0x06]);
        assert!(control.stopping(), "0xcf9 resets the machine through the PCI ports");
    }
}
