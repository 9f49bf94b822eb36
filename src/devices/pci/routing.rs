//! The VM's GSI routing table with MSI routes, and the KVM calls the PCI functions
//! make at run time (ioeventfds that follow a BAR, irqfds for MSI-X vectors).
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so every update carries the
//! in-kernel irqchip's default routes too: GSI 0-15 to both PICs and the I/O APIC pin
//! of the same number, 16-23 to the I/O APIC (skiff's virtio-mmio devices use 16+).
//! MSI vectors take GSIs from [`FIRST_MSI_GSI`] up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::msix::MsiMessage;

/// The I/O APIC's pins (KVM's in-kernel I/O APIC has 24).
pub const IOAPIC_PINS: u32 = 24;
/// The first GSI given to an MSI vector.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES on x86), and so on GSIs.
pub const MAX_GSI: u32 = 4096;

/// One routing entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    Msi { gsi: u32, msg: MsiMessage },
}

/// KVM's default routes for its in-kernel irqchip (PIC pair and I/O APIC).
pub fn irqchip_routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        routes.push(Route::Irqchip { gsi, chip: KVM_IRQCHIP_IOAPIC, pin: gsi });
        if gsi < 16 {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            routes.push(Route::Irqchip { gsi, chip, pin: gsi % 8 });
        }
    }
    routes
}

fn kvm_entry(r: &Route) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry::default();
    match *r {
        Route::Irqchip { gsi, chip, pin } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip = kvm_bindings::kvm_irq_routing_irqchip { irqchip: chip, pin };
        }
        Route::Msi { gsi, msg } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_MSI;
            e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                address_lo: msg.addr as u32,
                address_hi: (msg.addr >> 32) as u32,
                data: msg.data,
                ..Default::default()
            };
        }
    }
    e
}

/// The VM handle PCI functions use, and the MSI part of its routing table. Without a
/// VM (unit tests) it only keeps the table.
pub struct Kvm {
    vm: Option<Arc<VmFd>>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: AtomicU32,
    /// Routing-table updates made (for --stats).
    updates: AtomicU32,
}

impl Kvm {
    pub fn new(vm: Option<Arc<VmFd>>) -> Self {
        Kvm { vm, msi: Mutex::new(BTreeMap::new()), next_gsi: AtomicU32::new(FIRST_MSI_GSI), updates: AtomicU32::new(0) }
    }

    /// `n` GSIs of their own for MSI vectors (at machine build time).
    pub fn allocate_gsis(&self, n: u32) -> Result<u32, String> {
        let first = self.next_gsi.fetch_add(n, Ordering::Relaxed);
        match first.checked_add(n) {
            Some(end) if end <= MAX_GSI => Ok(first),
            _ => Err(format!("no GSIs left for {n} MSI-X vectors")),
        }
    }

    /// The whole table: the irqchip's routes, then every MSI route.
    pub fn table(&self) -> Vec<Route> {
        let msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        let mut routes = irqchip_routes();
        routes.extend(msi.iter().map(|(&gsi, &msg)| Route::Msi { gsi, msg }));
        routes
    }

    /// Routes `gsi` to `msg` (or removes its route) and gives KVM the whole table.
    pub fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match msg {
            Some(m) => msi.insert(gsi, m) != Some(m),
            None => msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let mut routes = irqchip_routes();
        routes.extend(msi.iter().map(|(&gsi, &msg)| Route::Msi { gsi, msg }));
        drop(msi);
        self.updates.fetch_add(1, Ordering::Relaxed);
        let Some(vm) = &self.vm else { return Ok(()) };
        let entries: Vec<_> = routes.iter().map(kvm_entry).collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| format!("routing table: {e:?}"))?;
        vm.set_gsi_routing(&table).map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }

    pub fn route_updates(&self) -> u32 {
        self.updates.load(Ordering::Relaxed)
    }

    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), String> {
        match &self.vm {
            Some(vm) => vm.register_irqfd(fd, gsi).map_err(|e| format!("KVM_IRQFD for GSI {gsi}: {e}")),
            None => Ok(()),
        }
    }

    /// An ioeventfd on a 2-byte MMIO write of `value` at `addr`.
    pub fn register_notifier(&self, fd: &EventFd, addr: u64, value: u16) -> Result<(), String> {
        match &self.vm {
            Some(vm) => vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), value).map_err(|e| format!("KVM_IOEVENTFD at {addr:#x}: {e}")),
            None => Ok(()),
        }
    }

    pub fn unregister_notifier(&self, fd: &EventFd, addr: u64, value: u16) -> Result<(), String> {
        match &self.vm {
            Some(vm) => vm.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), value).map_err(|e| format!("KVM_IOEVENTFD deassign at {addr:#x}: {e}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_irqchip_routes_beside_msi_ones() {
        let kvm = Kvm::new(None);
        let first = kvm.allocate_gsis(3).unwrap();
        assert_eq!(first, 24);
        assert_eq!(kvm.allocate_gsis(1).unwrap(), 27);
        let msg = MsiMessage { addr: 0xfee0_0000, data: 0x41 };
        kvm.set_msi_route(25, Some(msg)).unwrap();
        let t = kvm.table();
        // 16 ISA GSIs on two chips each, 8 I/O APIC-only pins, one MSI route.
        assert_eq!(t.len(), 16 * 2 + 8 + 1);
        assert!(t.contains(&Route::Irqchip { gsi: 0, chip: KVM_IRQCHIP_PIC_MASTER, pin: 0 }));
        assert!(t.contains(&Route::Irqchip { gsi: 9, chip: KVM_IRQCHIP_PIC_SLAVE, pin: 1 }));
        assert!(t.contains(&Route::Irqchip { gsi: 4, chip: KVM_IRQCHIP_IOAPIC, pin: 4 }));
        for gsi in 16..24 {
            assert!(t.contains(&Route::Irqchip { gsi, chip: KVM_IRQCHIP_IOAPIC, pin: gsi }), "virtio-mmio GSI {gsi}");
        }
        assert_eq!(t.last(), Some(&Route::Msi { gsi: 25, msg }));
        // Setting the same route again is no update; removing one is.
        kvm.set_msi_route(25, Some(msg)).unwrap();
        assert_eq!(kvm.route_updates(), 1);
        kvm.set_msi_route(25, None).unwrap();
        assert_eq!(kvm.table().len(), 40);
        assert!(kvm.allocate_gsis(5000).is_err());
    }

    /// KVM takes the table (a real VM with its irqchip) and an irqfd on an MSI GSI.
    #[test]
    fn kvm_takes_the_table() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let k = Kvm::new(Some(Arc::new(vm)));
        let gsi = k.allocate_gsis(1).unwrap();
        k.set_msi_route(gsi, Some(MsiMessage { addr: 0xfee0_0000, data: 0x30 })).unwrap();
        let fd = EventFd::new(0).unwrap();
        k.register_irqfd(&fd, gsi).unwrap();
        k.register_notifier(&fd, 0xe000_3000, 1).unwrap();
        k.unregister_notifier(&fd, 0xe000_3000, 1).unwrap();
    }
}
