//! Every vCPU thread of a machine, moved together: pause all (and know they are out
//! of KVM_RUN), resume all, power all on, collect their statistics, end them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::Control;
use crate::stats::ExitStats;
use crate::vcpu::thread::{ThreadError, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vcpu::state::VcpuState;
use crate::vcpu::{BootEntry, Vcpu, VcpuError};

/// Profile samples: (milliseconds since the start, vCPU index, guest RIP).
pub type Samples = Vec<(u32, u8, u64)>;

/// How long a vCPU may take to answer: leaving KVM_RUN after a kick takes
/// microseconds; a power-on a few ioctls. Beyond this something is wrong.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VcpusError {
    #[error("{0}")]
    Thread(#[from] ThreadError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("the vCPUs are running (pause first)")]
    Running,
}

pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    /// Whether every vCPU is known to be out of KVM_RUN.
    paused: bool,
}

impl VcpuSet {
    /// Starts a thread per vCPU, each paused. On an error the threads already started
    /// are ended before it is returned.
    pub fn spawn(vcpus: Vec<Vcpu>, control: &Arc<Control>, crash_first: bool) -> Result<Self, VcpusError> {
        let mut set = VcpuSet { handles: Vec::with_capacity(vcpus.len()), paused: true };
        for vcpu in vcpus {
            let crash = crash_first && vcpu.index == 0;
            match VcpuHandle::spawn(vcpu, control.clone(), crash) {
                Ok(h) => set.handles.push(h),
                Err(e) => {
                    let _ = set.exit_all();
                    return Err(e.into());
                }
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// A debugger's port to every vCPU (valid until `exit_all`).
    pub fn debug_ports(&self) -> Vec<crate::vcpu::thread::DebugPort> {
        self.handles.iter().map(VcpuHandle::debug_port).collect()
    }

    /// The threads to kick when a stop is requested (valid until `exit_all`).
    pub fn pthreads(&self) -> Vec<libc::pthread_t> {
        self.handles.iter().filter_map(VcpuHandle::pthread).collect()
    }

    /// Sends `event` to every vCPU, then waits for every answer (all kicked at once,
    /// so the wait is the slowest vCPU's, not the sum).
    fn all(&self, event: impl Fn() -> VcpuEvent) -> Result<Vec<VcpuResponse>, VcpusError> {
        for h in &self.handles {
            h.send(event())?;
        }
        let deadline = Instant::now() + ANSWER_WITHIN;
        let mut answers = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            answers.push(h.answer(deadline)?);
        }
        Ok(answers)
    }

    /// Brings every vCPU out of KVM_RUN and holds it there; returns how long that took
    /// (from the request to the last vCPU's answer).
    pub fn pause_all(&mut self) -> Result<Duration, VcpusError> {
        let t = Instant::now();
        for (h, a) in self.handles.iter().zip(self.all(|| VcpuEvent::Pause)?) {
            if !matches!(a, VcpuResponse::Paused) {
                return Err(ThreadError::OutOfTurn(h.index).into());
            }
        }
        self.paused = true;
        Ok(t.elapsed())
    }

    pub fn resume_all(&mut self) -> Result<(), VcpusError> {
        self.all(|| VcpuEvent::Resume)?;
        self.paused = false;
        Ok(())
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Powers every (paused) vCPU on at `entry`.
    pub fn power_on_all(&self, entry: BootEntry, diagnose_shutdown: bool) -> Result<(), VcpusError> {
        for a in self.all(|| VcpuEvent::PowerOn(entry, diagnose_shutdown))? {
            if let VcpuResponse::PoweredOn(r) = a {
                r?;
            }
        }
        Ok(())
    }

    /// Every (paused) vCPU's state, in vCPU order, for a snapshot.
    pub fn save_all(&self) -> Result<Vec<VcpuState>, VcpusError> {
        if !self.paused {
            return Err(VcpusError::Running);
        }
        let mut states = Vec::with_capacity(self.handles.len());
        for (h, a) in self.handles.iter().zip(self.all(|| VcpuEvent::SaveState)?) {
            match a {
                VcpuResponse::State(s) => states.push(*s?),
                _ => return Err(ThreadError::OutOfTurn(h.index).into()),
            }
        }
        Ok(states)
    }

    /// A request and answer to every vCPU thread, changing nothing.
    pub fn ping_all(&self) -> Result<(), VcpusError> {
        self.all(|| VcpuEvent::Ping).map(|_| ())
    }

    /// Every vCPU's exit statistics (merged) and profile samples (ms, vCPU, RIP) since
    /// the last call.
    pub fn take_stats(&self) -> Result<(ExitStats, Samples), VcpusError> {
        let mut stats = ExitStats::default();
        let mut samples = Vec::new();
        for (h, a) in self.handles.iter().zip(self.all(|| VcpuEvent::TakeStats)?) {
            if let VcpuResponse::Stats(s, rips) = a {
                stats.merge(&s);
                samples.extend(rips.into_iter().map(|(ms, rip)| (ms, h.index, rip)));
            }
        }
        Ok((stats, samples))
    }

    /// Ends and joins every thread (each bounded); the first failure is returned after
    /// all were tried.
    pub fn exit_all(&mut self) -> Result<(), VcpusError> {
        let mut first = Ok(());
        for h in self.handles.drain(..) {
            if let Err(e) = h.exit(ANSWER_WITHIN)
                && first.is_ok()
            {
                first = Err(e.into());
            }
        }
        first
    }
}
