//! Scheduling of the threads that carry the pair's liveness and the Output
//! Rule's acknowledgements.
//!
//! Each side's log channel thread reads the peer's bytes (the failure
//! detector's clock runs while it waits for them), writes heartbeats, and
//! sends or reads the acks that release held output. On a loaded host
//! those threads compete with the two vCPU threads and with whatever else
//! runs there: measured on this project's 2-core machines with both cores
//! busy, a normal-priority channel thread was kept off the CPU for up to
//! 308 ms, longer than any failure timeout a client would accept, and a
//! woken channel thread waited hundreds of microseconds for a core that a
//! vCPU held, on the path of every held output.
//!
//! So, like cluster membership daemons (corosync runs its token thread
//! under `SCHED_RR` for the same reason), these threads run under
//! `SCHED_FIFO` at a low real-time priority when the process may do so.
//! They block on I/O almost all the time, and the kernel's real-time
//! throttling (`kernel.sched_rt_runtime_us`) still leaves other threads a
//! share should one ever spin.

//!
//! On a host with cores to spare, the vCPU can also have a core of its own
//! ([`dedicate_cpu`], `duet --vcpu-cpu N`): the vCPU thread is pinned there
//! and the channel, gate and backend threads are kept off it. Each time
//! one of them woke on the vCPU's core it preempted the guest, and on this
//! project's nested KVM every switch back costs a vCPU reload whose MSR
//! reads trap to the outer hypervisor: a PING round trip preempted the
//! primary's vCPU 13 times under FT, against once in 5 solo.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::OnceLock;

/// The real-time priority used (1 is the lowest, 99 the highest); low, so
/// that the kernel's own threaded interrupt handlers (50) still come
/// first.
pub const PRIORITY: i32 = 10;

/// The real-time priority of the VMM's device I/O threads (the serial and
/// TAP backends'), which [`promote_io_thread`] gives them: below
/// [`PRIORITY`], so that heartbeats and acks still come first.
///
/// Under FT both of a co-located pair's vCPUs are busy whenever the guest
/// is, so a woken I/O thread at normal priority waited for the scheduler
/// to preempt one: measured with `perf sched` over 300 PINGs, the serial
/// writer that hands a released reply to its client woke to run after
/// 84 µs at the 90th percentile (195 µs at the 99th), against 7 µs solo,
/// where a core is free. These threads block on a socket, a TAP or a
/// bounded queue between every chunk, so they never hold a core.
pub const IO_PRIORITY: i32 = 5;
const _: () = assert!(IO_PRIORITY < PRIORITY && IO_PRIORITY >= 1);

/// Whether threads that call [`promote_current_thread`] are promoted.
static REALTIME: AtomicBool = AtomicBool::new(false);
/// The CPU dedicated to the vCPU, or -1.
static VCPU_CPU: AtomicI64 = AtomicI64::new(-1);
/// The CPUs every other thread may use once a CPU is dedicated.
static OTHERS: OnceLock<libc::cpu_set_t> = OnceLock::new();

/// Why a CPU cannot be dedicated to the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("CPU {cpu} is not one this process may run on (allowed: {allowed})")]
    NotAllowed { cpu: usize, allowed: String },
    #[error("CPU {cpu} is the only one this process may run on: nothing would be left for the other threads")]
    OnlyOne { cpu: usize },
    #[error("cannot read this process's CPU affinity: {0}")]
    Affinity(io::Error),
}

/// Dedicates `cpu` to the vCPU: [`pin_vcpu_thread`] pins the calling
/// thread there, and [`promote_current_thread`] and [`keep_off_vcpu`]
/// keep the others on the remaining allowed CPUs. Call before any such
/// thread starts.
pub fn dedicate_cpu(cpu: usize) -> Result<(), CpuError> {
    let allowed = current_affinity().map_err(CpuError::Affinity)?;
    let list: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `allowed` is an initialised cpu_set_t and i < CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &allowed) })
        .collect();
    if !list.contains(&cpu) {
        let allowed = list
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        return Err(CpuError::NotAllowed { cpu, allowed });
    }
    if list.len() == 1 {
        return Err(CpuError::OnlyOne { cpu });
    }
    let mut others = allowed;
    // SAFETY: as above.
    unsafe { libc::CPU_CLR(cpu, &mut others) };
    let _ = OTHERS.set(others);
    VCPU_CPU.store(cpu as i64, Ordering::SeqCst);
    Ok(())
}

/// The CPU dedicated to the vCPU, if any.
pub fn vcpu_cpu() -> Option<usize> {
    usize::try_from(VCPU_CPU.load(Ordering::SeqCst)).ok()
}

/// Called by the vCPU thread before it first runs the guest: pins it to
/// the dedicated CPU, if there is one.
pub fn pin_vcpu_thread() -> io::Result<()> {
    let Some(cpu) = vcpu_cpu() else {
        return Ok(());
    };
    pin_current_thread(cpu)
}

/// Pins the calling thread to `cpu` alone.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes within the set: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_affinity(&set)
}

/// Called first thing by a VMM thread other than the vCPU's (backends,
/// services): keeps it off the vCPU's dedicated CPU, if there is one. A
/// thread started from the pinned vCPU thread would otherwise inherit its
/// CPU.
pub fn keep_off_vcpu() {
    if let Some(others) = OTHERS.get() {
        let _ = set_affinity(others);
    }
}

fn current_affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel fills at most size_of::<cpu_set_t>() bytes of
    // `set`; pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc == 0 {
        Ok(set)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for real-time scheduling of the channel threads started from now
/// on. Returns the error if this process may not use it (no
/// `CAP_SYS_NICE`, a container's seccomp policy, a zero RT budget), in
/// which case they run at normal priority; the caller says so.
pub fn enable_realtime() -> io::Result<()> {
    // Try on a thread of our own, so that a refusal changes nothing.
    let probe = std::thread::Builder::new()
        .name("sched-probe".into())
        .spawn(|| set_current_thread_fifo(PRIORITY))?;
    match probe.join() {
        Ok(Ok(())) => {
            REALTIME.store(true, Ordering::SeqCst);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the probe thread panicked")),
    }
}

/// Goes back to normal scheduling for threads started from now on.
pub fn disable_realtime() {
    REALTIME.store(false, Ordering::SeqCst);
}

/// True if [`enable_realtime`] succeeded (and was not undone).
pub fn realtime() -> bool {
    REALTIME.load(Ordering::SeqCst)
}

/// Called by a thread that carries liveness or acknowledgements, first
/// thing: promotes it if real-time scheduling was enabled. A refusal here
/// (the permission was checked by [`enable_realtime`]) leaves it at normal
/// priority, which is still correct, only slower under load.
pub fn promote_current_thread() {
    keep_off_vcpu();
    if realtime() {
        let _ = set_current_thread_fifo(PRIORITY);
    }
}

/// Called first thing by a device backend's I/O thread: keeps it off the
/// vCPU's dedicated CPU, and promotes it to [`IO_PRIORITY`] if real-time
/// scheduling was enabled (a solo `duet run` does not enable it).
pub fn promote_io_thread() {
    keep_off_vcpu();
    if realtime() {
        let _ = set_current_thread_fifo(IO_PRIORITY);
    }
}

fn set_current_thread_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // names the calling thread, and nothing else is touched.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy.
    fn current_policy() -> i32 {
        // SAFETY: pid 0 names the calling thread; the call reads only.
        unsafe { libc::sched_getscheduler(0) }
    }

    fn cpus(set: &libc::cpu_set_t) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `set` is an initialised cpu_set_t, i < CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, set) })
            .collect()
    }

    #[test]
    fn a_dedicated_cpu_holds_the_vcpu_thread_and_no_other() {
        let allowed = cpus(&current_affinity().unwrap());
        assert!(matches!(
            dedicate_cpu(libc::CPU_SETSIZE as usize + 1),
            Err(CpuError::NotAllowed { .. })
        ));
        let Some(&cpu) = allowed.last().filter(|_| allowed.len() >= 2) else {
            eprintln!("one CPU only: nothing to dedicate");
            return;
        };
        dedicate_cpu(cpu).unwrap();
        let (vcpu, spawned) = std::thread::spawn(|| {
            pin_vcpu_thread().unwrap();
            let vcpu = cpus(&current_affinity().unwrap());
            // A thread started from the pinned one inherits its CPU until
            // it moves itself off.
            let spawned = std::thread::spawn(|| {
                keep_off_vcpu();
                cpus(&current_affinity().unwrap())
            })
            .join()
            .unwrap();
            (vcpu, spawned)
        })
        .join()
        .unwrap();
        assert_eq!(vcpu, vec![cpu]);
        assert!(!spawned.contains(&cpu), "{spawned:?} holds CPU {cpu}");
        assert_eq!(spawned.len(), allowed.len() - 1, "{spawned:?}");
    }

    /// The calling thread's (policy, real-time priority).
    fn current_scheduling() -> (i32, i32) {
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 names the calling thread; the kernel writes one
        // sched_param into `param`, which outlives the call.
        let rc = unsafe { libc::sched_getparam(0, &mut param) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        (current_policy(), param.sched_priority)
    }

    /// One test, since both toggle the process-wide switch.
    #[test]
    fn a_promoted_thread_runs_fifo_and_others_do_not() {
        // Unprivileged runs cannot enable it: then nothing is promoted.
        let enabled = enable_realtime().is_ok();
        let policy = std::thread::spawn(|| {
            promote_current_thread();
            current_policy()
        })
        .join()
        .unwrap();
        let (io_policy, io_priority) = std::thread::spawn(|| {
            promote_io_thread();
            current_scheduling()
        })
        .join()
        .unwrap();
        if enabled {
            assert_eq!(policy, libc::SCHED_FIFO);
            // Device I/O runs real-time too, below the channel threads.
            assert_eq!((io_policy, io_priority), (libc::SCHED_FIFO, IO_PRIORITY));
        } else {
            assert_eq!(policy, libc::SCHED_OTHER);
            assert_eq!(io_policy, libc::SCHED_OTHER);
        }
        assert_eq!(
            current_policy(),
            libc::SCHED_OTHER,
            "the caller is untouched"
        );
        disable_realtime();
        let policy = std::thread::spawn(|| {
            promote_current_thread();
            current_policy()
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_OTHER);
        let io_policy = std::thread::spawn(|| {
            promote_io_thread();
            current_policy()
        })
        .join()
        .unwrap();
        assert_eq!(io_policy, libc::SCHED_OTHER);
    }
}
