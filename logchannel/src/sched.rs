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

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// The real-time priority used (1 is the lowest, 99 the highest); low, so
/// that the kernel's own threaded interrupt handlers (50) still come
/// first.
pub const PRIORITY: i32 = 10;

/// Whether threads that call [`promote_current_thread`] are promoted.
static REALTIME: AtomicBool = AtomicBool::new(false);

/// Asks for real-time scheduling of the channel threads started from now
/// on. Returns the error if this process may not use it (no
/// `CAP_SYS_NICE`, a container's seccomp policy, a zero RT budget), in
/// which case they run at normal priority; the caller says so.
pub fn enable_realtime() -> io::Result<()> {
    // Try on a thread of our own, so that a refusal changes nothing.
    let probe = std::thread::Builder::new()
        .name("sched-probe".into())
        .spawn(set_current_thread_fifo)?;
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
    if realtime() {
        let _ = set_current_thread_fifo();
    }
}

fn set_current_thread_fifo() -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: PRIORITY,
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

/// The calling thread's scheduling policy (for tests and status).
pub fn current_policy() -> i32 {
    // SAFETY: pid 0 names the calling thread; the call reads only.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        if enabled {
            assert_eq!(policy, libc::SCHED_FIFO);
        } else {
            assert_eq!(policy, libc::SCHED_OTHER);
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
    }
}
