//! Running a built machine: the vCPU threads start paused, the event loop takes over
//! the main thread, and the machine's lifecycle is driven from there. A stop request
//! (poweroff, reboot, error, signal) wakes the loop; it pauses every vCPU (they are
//! out of KVM_RUN when that returns), then either resets the machine in place and
//! resumes it, or ends the run.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::event_loop::{EventLoop, Source};
use super::reboot::StormWatch;
use super::vcpus::VcpuSet;
use crate::api::ApiServer;
use crate::devices::serial::StdinFeed;
use super::*;

/// How the in-place reboots so far went, carried between stops.
#[derive(Default)]
struct Lifecycle {
    reboots: RebootSummary,
    storm: StormWatch,
    /// When the latest reboot was requested, until its next boot is looked at.
    pending: Option<Instant>,
    boot_started: Option<Instant>,
    console_before: u64,
    /// skiff's threads while the machine is idle: what a reboot's report should find.
    idle_threads: u64,
    /// Exit statistics already taken from the vCPUs (by `GET /stats`).
    stats: ExitStats,
}

/// What to do after a stop was handled.
enum AfterStop {
    Resumed,
    Finished,
}

impl Vmm {
    /// Runs the machine until it stops for good; an in-place reboot runs it again.
    /// Returns why it stopped, with the statistics.
    pub fn run(mut self, started: Instant, mut api: Option<ApiServer>) -> Result<RunReport, VmmError> {
        kick::install_handler().map_err(|e| VmmError::Device(format!("signal handler: {e}")))?;

        // On an error path out of here the guest's last output still reaches the
        // console (as long as it takes it); the normal path drains it below.
        struct Drain(Arc<Console>);
        impl Drop for Drain {
            fn drop(&mut self) {
                self.0.drain(crate::output::STALL);
                self.0.close();
            }
        }
        let _drain = Drain(self.console.clone());

        // A sampling profiler for diagnosing slow guests: SKIFF_PROFILE=FILE kicks every
        // vCPU 100 times a second and writes "ms vcpu rip" lines to FILE at exit
        // (scripts/symbolize-profile turns them into guest functions).
        let profile = std::env::var_os("SKIFF_PROFILE").map(std::path::PathBuf::from);
        let mut lp = self.event_loop(profile.is_some())?;
        if let Some(a) = &api {
            lp.add(a.fd(), Source::Api).map_err(|e| VmmError::Device(format!("event loop: the API socket: {e}")))?;
        }
        // Host input on the event loop where epoll can watch stdin; a thread otherwise.
        let _stdin = match lp.add(libc::STDIN_FILENO, Source::Stdin) {
            Ok(()) => None,
            Err(_) => Some(spawn_stdin_pump(self.devices.legacy.serial.clone()).map_err(VmmError::Thread)?),
        };
        let mut stdin = StdinFeed::new(self.devices.legacy.serial.clone());
        let mut vcpus = std::mem::take(&mut self.vcpus);
        let pv_enforced = !vcpus.is_empty() && vcpus.iter().all(|v| v.pv_enforced);
        if profile.is_some() {
            for v in &mut vcpus {
                v.rip_samples = Some((started, Vec::new()));
            }
        }
        let mut set = VcpuSet::spawn(vcpus, &self.control, test_hook("vcpu-return")).map_err(|e| VmmError::Device(e.to_string()))?;
        let pthreads = set.pthreads();
        self.control.set_kicker(Box::new(move || {
            for t in &pthreads {
                // SAFETY: the kicker is retired (under its lock) before any of these
                // threads is joined, so every id here names a live or unjoined thread.
                unsafe {
                    libc::pthread_kill(*t, kick::kick_signal());
                }
            }
        }));
        // The gdb stub talks to the vCPU threads through their event channels.
        let gdb = match self.gdb.take() {
            Some((listener, wait)) => match crate::gdb::GdbServer::start(listener, set.debug_ports(), self.mem.clone(), wait) {
                Ok(server) => Some(server),
                Err(e) => {
                    self.control.request_fatal(e);
                    None
                }
            },
            None => None,
        };
        let mut life = Lifecycle { idle_threads: thread_and_fd_counts(None).0, ..Default::default() };
        let result = self.drive(&mut lp, &mut set, &mut life, &mut stdin, api.as_mut());
        // Whatever happened, no vCPU thread outlives the run.
        self.control.request_stop(StopReason::Error("the event loop ended".into()));
        // Before the vCPU threads are joined: the stub holds their thread ids.
        if let Some(g) = gdb {
            g.stop();
        }
        let _ = set.pause_all();
        self.control.retire_kicker();
        let (mut stats, mut samples) = set.take_stats().unwrap_or_default();
        stats.merge(&life.stats);
        let _ = set.exit_all();
        result?;
        if let Some(path) = profile {
            samples.sort_unstable();
            let text: String = samples.iter().map(|(ms, cpu, rip)| format!("{ms} {cpu} {rip:#x}\n")).collect();
            if let Err(e) = std::fs::write(&path, text) {
                crate::output::stderr(&format!("skiff: writing the profile to {}: {e}\n", path.display()));
            }
        }
        Ok(self.report(stats, life.reboots, started, pv_enforced))
    }

    /// The event loop with every device fd the machine has.
    fn event_loop(&self, profiling: bool) -> Result<EventLoop, VmmError> {
        let err = |e: std::io::Error| VmmError::Device(format!("event loop: {e}"));
        let mut lp = EventLoop::new().map_err(err)?;
        if let Some(bells) = self.devices.buses.doorbell_set() {
            for (i, fd) in bells.fds().into_iter().enumerate() {
                lp.add(fd, Source::Doorbell(i)).map_err(err)?;
            }
        }
        for (device, v) in self.devices.virtio.iter().enumerate() {
            for (queue, fd) in &v.notifiers {
                lp.add(fd.as_raw_fd(), Source::Queue { device, queue: *queue }).map_err(err)?;
            }
            for (index, fd) in v.device.backend_fds().into_iter().enumerate() {
                lp.add(fd, Source::Backend { device, index }).map_err(err)?;
            }
        }
        lp.add(self.devices.legacy.serial.room().as_raw_fd(), Source::SerialRoom).map_err(err)?;
        if profiling {
            lp.add_profile_tick(Duration::from_millis(10)).map_err(err)?;
        }
        Ok(lp)
    }

    /// The event loop proper: runs until the machine stops for good.
    fn drive(
        &mut self,
        lp: &mut EventLoop,
        set: &mut VcpuSet,
        life: &mut Lifecycle,
        stdin: &mut StdinFeed,
        mut api: Option<&mut ApiServer>,
    ) -> Result<(), VmmError> {
        life.boot_started = Some(Instant::now());
        if !self.start_paused {
            // (A restore without --resume waits for the API to resume the guest.)
            self.first_resume = Some(Instant::now());
            if let Err(e) = set.resume_all() {
                // A vCPU thread that is already gone stopped the machine with its reason.
                self.control.request_fatal(e.to_string());
                return Ok(());
            }
        }
        let mut hooks = TestHooks::from_env();
        loop {
            let ready = lp.wait(hooks.wait_at_most()).map_err(|e| VmmError::Device(format!("event loop: {e}")))?;
            hooks.after_wait(self, set);
            for source in ready {
                match source {
                    Source::Wake => {
                        self.on_wake();
                        self.apply_patches(set);
                    }
                    Source::ProfileTick => self.control.kick(),
                    Source::Doorbell(i) => {
                        if let Some(bells) = self.devices.buses.doorbell_set() {
                            bells.ring(i);
                        }
                        hooks.after_doorbell(self, set);
                    }
                    Source::Queue { device, queue } => self.on_queue_notify(device, queue),
                    Source::Stdin => {
                        if !stdin.on_stdin() {
                            let _ = lp.remove(libc::STDIN_FILENO);
                        }
                    }
                    Source::SerialRoom => {
                        // Watched again only if it was taken off (a second add fails).
                        if stdin.on_room() {
                            let _ = lp.add(libc::STDIN_FILENO, Source::Stdin);
                        }
                    }
                    Source::Backend { device, index } => {
                        if let Some(v) = self.devices.virtio.get(device) {
                            v.device.backend_ready(index);
                        }
                    }
                    Source::Api => {
                        if let Some(server) = api.as_deref_mut() {
                            super::api::serve(server, super::api::Api { vmm: self, set, stats: &mut life.stats });
                        }
                    }
                }
            }
            if self.control.stopping() {
                match self.on_stop(set, life)? {
                    AfterStop::Resumed => life.boot_started = Some(Instant::now()),
                    AfterStop::Finished => return Ok(()),
                }
            }
        }
    }

    /// KVM signalled a virtio queue's notifier: take the count and tell the device.
    fn on_queue_notify(&self, device: usize, queue: u16) {
        let Some(v) = self.devices.virtio.get(device) else { return };
        if let Some((_, fd)) = v.notifiers.iter().find(|(q, _)| *q == queue)
            && fd.read().is_ok()
        {
            v.device.notify(queue);
        }
    }

    /// Hypercall sites a vCPU asked to have rewritten (hypercall/trap.rs): written with
    /// every vCPU paused, then resumed (unless the machine was paused already, by the
    /// API, or is stopping: then it stays as it was).
    fn apply_patches(&self, set: &mut VcpuSet) {
        let hc = self.devices.hypercalls.as_ref().filter(|h| !h.patches.is_empty());
        let tpr = self.tpr.as_ref().filter(|t| t.has_pending());
        if (hc.is_none() && tpr.is_none()) || self.control.stopping() {
            return;
        }
        let was_paused = set.paused();
        if !was_paused && set.pause_all().is_err() {
            return;
        }
        if let Some(h) = hc {
            let (done, refused) = crate::hypercall::trap::apply(&self.mem, &h.patches.take());
            h.counters.sites_patched.fetch_add(done, Ordering::Relaxed);
            h.counters.patches_refused.fetch_add(refused, Ordering::Relaxed);
        }
        // TPR sites (src/tpr/): each still holding the access a vCPU reported.
        if let Some(t) = tpr {
            t.apply(&self.mem);
        }
        if !was_paused && !self.control.stopping() && let Err(e) = set.resume_all() {
            self.control.request_fatal(e.to_string());
        }
    }

    /// A signal or a stop request woke the loop.
    fn on_wake(&self) {
        if control::CHECK_TRANSLATE_SIGNAL.swap(false, Ordering::SeqCst) {
            self.control.request_translate_check();
        }
        let sig = control::STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            self.control.request_stop(StopReason::Error(format!("stopped by signal {sig}")));
        }
    }

    /// The machine stopped: pause every vCPU, then reset in place (a reboot, with
    /// `--on-reboot=reset`) and resume, or finish.
    fn on_stop(&mut self, set: &mut VcpuSet, life: &mut Lifecycle) -> Result<AfterStop, VmmError> {
        // The API may have paused the machine as the guest asked for a reboot (in the
        // same turn of the loop): the reset machine then stays paused, as asked.
        let paused_by_api = set.paused();
        if let Err(e) = set.pause_all() {
            // A vCPU thread that is gone or stuck: nothing sound to reset.
            self.control.request_fatal(e.to_string());
            return Ok(AfterStop::Finished);
        }
        // Every vCPU is out: nothing deferred may be lost to a reset or the end.
        self.devices.buses.flush_coalesced();
        self.devices.buses.drain_doorbells();
        let reached_marker = self.devices.legacy.marker.this_boot();
        if let Some(t) = life.pending.take()
            && let Some(m) = reached_marker
        {
            life.reboots.set_latest_marker(m.saturating_duration_since(t).as_secs_f64() * 1e3);
        }
        let source = match self.control.reason() {
            Some(StopReason::Reboot(source)) if self.config.on_reboot == OnReboot::Reset => source,
            _ => return Ok(AfterStop::Finished),
        };
        let printed = self.console_bytes.load(Ordering::Relaxed) != life.console_before;
        let boot_time = life.boot_started.map_or(Duration::ZERO, |t| t.elapsed());
        if life.storm.reboot(boot_time, printed || reached_marker.is_some()) {
            self.control.request_fatal(life.storm.describe(source));
            return Ok(AfterStop::Finished);
        }
        // Registers at the triple fault that would complete a storm, for its report
        // (none kept from a boot that did not).
        self.control.take_diagnostic();
        let diagnose = self.config.on_reboot == OnReboot::Exit || life.storm.next_completes();
        let t = Instant::now();
        self.reset_machine(set, diagnose)?;
        let reset_ms = t.elapsed().as_secs_f64() * 1e3;
        let (threads, fds) = thread_and_fd_counts(Some(life.idle_threads));
        life.reboots.push(source, reset_ms, threads, fds, rss_report(&self.mem));
        life.pending = Some(t);
        life.console_before = self.console_bytes.load(Ordering::Relaxed);
        if self.config.stats || self.config.boot_time {
            let r = life.reboots.latest().map(|r| r.describe()).unwrap_or_default();
            crate::output::stderr(&format!("\r\nskiff: {r}\r\n"));
        }
        if !self.control.rearm_after_reboot() {
            return Ok(AfterStop::Finished);
        }
        if paused_by_api {
            return Ok(AfterStop::Resumed);
        }
        if let Err(e) = set.resume_all() {
            self.control.request_fatal(e.to_string());
            return Ok(AfterStop::Finished);
        }
        Ok(AfterStop::Resumed)
    }

    /// Resets the whole machine in place, as a PC's reset line does, and loads the
    /// guest again: RAM cleared, chipset and devices to power-up state, every vCPU to
    /// RESET and then to its boot entry state. Runs with every vCPU paused.
    fn reset_machine(&mut self, set: &VcpuSet, diagnose: bool) -> Result<(), VmmError> {
        // Devices first: a disk's reset waits for the requests it has in flight, so
        // no worker writes into the next guest's memory after it is cleared.
        self.devices.reset();
        // Guest memory is cleared: no TPR site stays patched.
        if let Some(t) = &self.tpr {
            t.reset();
        }
        // RAM leaves the VM while it is cleared and reloaded, so KVM forgets every
        // translation of the old contents (see memory::unregister_from_kvm).
        memory::unregister_from_kvm(&self.vm, &self.mem)?;
        memory::clear(&self.mem)?;
        // A diff on top of the last snapshot would miss the cleared pages.
        self.diff_base = None;
        self.vm_pristine
            .put(&self.vm)
            .map_err(|e| VmmError::Device(format!("resetting the chipset: {e}")))?;
        let kernel = loader::load_kernel_for(&self.mem, &self.config)?;
        let entry = write_guest_tables(&self.mem, &kernel, &self.config, &self.cmdline, &self.devices.acpi_devices(), tpr_variant(self.config.cpus, &self.quirks))?;
        memory::register_with_kvm(&self.vm, &self.mem)?;
        set.power_on_all(entry, diagnose).map_err(|e| VmmError::Device(e.to_string()))
    }

    /// What a finished run reports.
    fn report(mut self, stats: ExitStats, reboots: RebootSummary, started: Instant, pv_enforced: bool) -> RunReport {
        // What the guest wrote reaches the console before skiff reports and exits, as
        // long as the console takes it (a console nobody reads does not hold the stop).
        let console_unwritten = self.console.drain(crate::output::STALL);
        self.console.close();
        let since = |t: Option<&Instant>| t.map(|t| t.duration_since(started).as_secs_f64() * 1e3);
        let boot = BootTimes {
            running_ms: since(self.first_resume.as_ref()),
            first_console_byte_ms: since(self.console_first_byte.get()),
            init_marker_ms: since(self.devices.legacy.marker.reached.get()),
            exit_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        let buses = &self.devices.buses;
        let pv_features = self.pv_report(pv_enforced);
        RunReport {
            reason: self.control.reason().unwrap_or(StopReason::Error("stopped without a reason".into())),
            stats,
            quirks: self.quirks,
            probe_origin: self.probe_origin,
            boot,
            unclaimed: buses.pio.unclaimed(),
            unclaimed_mmio: buses.mmio.unclaimed(),
            coalesced: (buses.pio.coalesced_writes(), buses.mmio.coalesced_writes()),
            coalescing: self.coalescing,
            doorbells_rung: buses.doorbells_rung(),
            doorbells: self.doorbells,
            failure_bytes: self.failure_bytes,
            rss: rss_report(&self.mem),
            cmdline: self.cmdline,
            reboots,
            diagnostic: self.control.take_diagnostic(),
            restore_phases: std::mem::take(&mut self.restore_phases),
            virtio: self.devices.virtio.iter().map(|v| format!("{}: {}", v.name, v.device.stats())).collect(),
            hypercalls: self.devices.hypercalls.as_ref().map(|h| h.report()).unwrap_or_default(),
            tpr: format!("tpr patching: {}\n{}", self.tpr_why, self.tpr.as_ref().map(|t| t.report()).unwrap_or_default()),
            pv_features,
            console_unwritten,
        }
    }
}

/// Test hooks that drive the lifecycle (SKIFF_TEST_HOOK, see `test_hook`):
/// - `pause-storm`: when the guest first rings the boot marker (its /init started),
///   pause and resume every vCPU 100 times and report the latencies and whether
///   skiff's threads or fds grew;
/// - `pause-bench`: the same 300 ms after the start, then power off (bench/pause.py).
struct TestHooks {
    pause_storm: bool,
    bench_at: Option<Instant>,
}

impl TestHooks {
    fn from_env() -> Self {
        let bench_at = test_hook("pause-bench").then(|| Instant::now() + Duration::from_millis(300));
        TestHooks { pause_storm: test_hook("pause-storm"), bench_at }
    }

    /// How long the event loop may sleep before a hook is due.
    fn wait_at_most(&self) -> Option<Duration> {
        self.bench_at.map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn after_wait(&mut self, vmm: &Vmm, set: &mut VcpuSet) {
        if self.bench_at.is_some_and(|t| Instant::now() >= t) && !vmm.control.stopping() {
            self.bench_at = None;
            let line = pause_storm(set, 100).unwrap_or_else(|e| format!("failed: {e}"));
            crate::output::stderr(&format!("skiff: pause storm: {line}\n"));
            vmm.control.request_stop(StopReason::Poweroff);
        }
    }

    fn after_doorbell(&mut self, vmm: &Vmm, set: &mut VcpuSet) {
        if self.pause_storm && vmm.devices.legacy.marker.reached.get().is_some() {
            self.pause_storm = false;
            let line = match pause_storm(set, 100) {
                Ok(l) => l,
                Err(e) => format!("failed: {e}"),
            };
            crate::output::stderr(&format!("\r\nskiff: pause storm: {line}\r\n"));
        }
    }
}

/// Pauses and resumes every vCPU `n` times; a line with the pause latencies
/// (min/median/max) and skiff's thread and fd counts before and after.
pub fn pause_storm(set: &mut VcpuSet, n: usize) -> Result<String, super::vcpus::VcpusError> {
    let (threads_before, fds_before) = thread_and_fd_counts(None);
    let mut us = Vec::with_capacity(n);
    let mut floor = Vec::with_capacity(n);
    for _ in 0..n {
        us.push(set.pause_all()?.as_secs_f64() * 1e6);
        // The floor: the same request and answer to every vCPU thread while none is in
        // KVM_RUN (what a pause costs beyond leaving the guest).
        let t = Instant::now();
        set.ping_all()?;
        floor.push(t.elapsed().as_secs_f64() * 1e6);
        set.resume_all()?;
        // Let the guest run between pauses, as it would between API requests.
        std::thread::sleep(Duration::from_millis(2));
    }
    let (threads_after, fds_after) = thread_and_fd_counts(Some(threads_before));
    let (a, b) = (spread(&mut us), spread(&mut floor));
    Ok(format!(
        "{n} pauses of {} vCPUs: min {:.1} us, median {:.1} us, max {:.1} us; floor (paused round trip) min {:.1} us, median {:.1} us, max {:.1} us; threads {threads_before} -> {threads_after}, fds {fds_before} -> {fds_after}",
        set.len(),
        a.0,
        a.1,
        a.2,
        b.0,
        b.1,
        b.2,
    ))
}

/// Min, median and max.
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let pick = |i: usize| v.get(i).copied().unwrap_or(0.0);
    (pick(0), pick(v.len() / 2), pick(v.len().saturating_sub(1)))
}
