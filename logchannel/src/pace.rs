//! When a channel thread reads its socket.
//!
//! On this platform a wake-up that preempts a running vCPU costs the guest
//! about 90 µs (a thread waking 1000 times a second on each core, doing a
//! microsecond of work each time, slowed a solo `compute` by 9 %; 4000
//! times, by 39 %). A busy pair exchanges a message or two per flush each
//! way, every millisecond, and with both cores running a vCPU each read
//! preempted one. Most of those reads are not waited on: a progress report
//! to a primary whose guest only computes updates a lag figure, a batch to
//! a backup that is still replaying the last one joins its queue.
//!
//! So a channel thread that has just woken to read does not wait on its
//! socket again for [`ReadPace`]'s quiet period, unless somebody waits on
//! what it reads: a thread blocked in [`LinkState::wait_until`] or on the
//! backup's record queue (their cores are then free, so the wake-up
//! preempts nobody), or an output, recently, anywhere on the link (a batch
//! that asked for its ack at once): while outputs flow, acks are read the
//! moment they arrive, as before. Bytes that arrive meanwhile wait in the
//! socket and are all taken by the next read. Silence is still timed only
//! while the thread reads, so pacing never looks like a silent peer.
//!
//! [`LinkState::wait_until`]: crate::channel::LinkState::wait_until

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// For how long after a batch that asked for its ack at once reads stay
/// unpaced: longer than any gap between the replies of an interactive
/// client, so that a service's outputs never wait on the pace, and short
/// enough that a guest that stopped talking and computes gets paced.
const INTERACTIVE: Duration = Duration::from_secs(1);

/// How many bytes must wait in the socket before it counts as readable
/// while the reader keeps quiet: more than any report or heartbeat, and
/// than a compute guest's batches; a backlog this large is read at once.
const QUIET_LOW_MARK: i32 = 64 * 1024;

/// Sets the socket's `SO_RCVLOWAT`: epoll reports it readable (and wakes
/// a waiter) only once this many bytes wait, and on setting it Linux
/// signals readiness if they already do. False if the socket refused.
fn set_low_mark(fd: RawFd, bytes: i32) -> bool {
    // SAFETY: `fd` is the link's socket, open while its reader lives (the
    // caller holds it); the option value is an int, as SO_RCVLOWAT takes.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// See the module documentation. Shared by the channel thread that reads
/// and the threads that wait on what it reads.
#[derive(Debug)]
pub(crate) struct ReadPace {
    /// The quiet period in µs; 0 turns pacing off.
    quiet_us: AtomicU64,
    /// Threads blocked on what the channel thread reads.
    waiters: AtomicUsize,
    /// When (µs after `base`, plus one; 0 for never) a batch last asked
    /// for its ack at once.
    asked_us: AtomicU64,
    base: Instant,
    wake: tokio::sync::Notify,
}

impl Default for ReadPace {
    fn default() -> Self {
        ReadPace {
            quiet_us: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            asked_us: AtomicU64::new(0),
            base: Instant::now(),
            wake: tokio::sync::Notify::new(),
        }
    }
}

/// While alive, the channel thread reads at once; see
/// [`ReadPace::waiting`].
pub(crate) struct Waiting<'a>(&'a ReadPace);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReadPace {
    pub(crate) fn set_quiet(&self, quiet: Duration) {
        self.quiet_us
            .store(quiet.as_micros() as u64, Ordering::Relaxed);
    }

    /// A batch asked for its ack at once (an output waits on it): reads
    /// are unpaced for a while.
    pub(crate) fn asked(&self) {
        let now = self.base.elapsed().as_micros() as u64 + 1;
        self.asked_us.store(now, Ordering::Relaxed);
        self.wake.notify_waiters();
    }

    /// The calling thread is about to block on what the channel thread
    /// reads: it reads at once until the guard is dropped.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_waiters();
        Waiting(self)
    }

    fn urgent(&self) -> bool {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            return true;
        }
        match self.asked_us.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let now = self.base.elapsed().as_micros() as u64 + 1;
                now.saturating_sub(at) < INTERACTIVE.as_micros() as u64
            }
        }
    }

    /// Called by the channel thread before a read that may wait on the
    /// socket (nothing is buffered): returns once it may, at most one
    /// quiet period after the previous such read began (`last`, which
    /// this updates), or at once if somebody waits or starts to.
    pub(crate) async fn turn(&self, last: &mut Option<tokio::time::Instant>, fd: RawFd) {
        let quiet = Duration::from_micros(self.quiet_us.load(Ordering::Relaxed));
        if let Some(at) = *last {
            let until = at + quiet;
            // Registered before urgency is looked at, so that a waiter
            // arriving in between is not missed.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            if !quiet.is_zero() && tokio::time::Instant::now() < until && !self.urgent() {
                // Not woken by each message meanwhile: the runtime's epoll
                // would wake this thread for every one even though no task
                // reads. Setting the mark back signals what has arrived.
                let lowered = set_low_mark(fd, QUIET_LOW_MARK);
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = &mut woken => {}
                }
                if lowered {
                    set_low_mark(fd, 1);
                }
            }
        }
        *last = Some(tokio::time::Instant::now());
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_quiet_reader_waits_its_period_and_a_waiter_cuts_it_short() {
        let pace = std::sync::Arc::new(ReadPace::default());
        pace.set_quiet(Duration::from_secs(5));
        let rt = rt();
        let mut last = None;
        // The first read never waits.
        let t = Instant::now();
        rt.block_on(pace.turn(&mut last, -1));
        assert!(t.elapsed() < Duration::from_secs(1));
        // The next would wait 5 s; a thread that starts waiting on what
        // is read ends that at once.
        let p = pace.clone();
        let waiter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let _w = p.waiting();
            std::thread::sleep(Duration::from_millis(100));
        });
        let t = Instant::now();
        rt.block_on(pace.turn(&mut last, -1));
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(90) && took < Duration::from_secs(2),
            "{took:?}"
        );
        waiter.join().unwrap();
    }

    #[test]
    fn outputs_unpace_reads_and_without_them_the_period_is_kept() {
        let pace = ReadPace::default();
        pace.set_quiet(Duration::from_millis(200));
        let rt = rt();
        let mut last = None;
        rt.block_on(pace.turn(&mut last, -1));
        let t = Instant::now();
        rt.block_on(pace.turn(&mut last, -1));
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        pace.asked();
        let t = Instant::now();
        rt.block_on(pace.turn(&mut last, -1));
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn no_quiet_period_is_no_pacing() {
        let pace = ReadPace::default();
        let rt = rt();
        let mut last = None;
        let t = Instant::now();
        for _ in 0..100 {
            rt.block_on(pace.turn(&mut last, -1));
        }
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    /// What pacing is for: while the reader keeps quiet, a few bytes from
    /// the peer do not make the socket readable (the runtime's thread
    /// stays asleep); when the period ends they do, and none is lost.
    #[test]
    fn a_paced_socket_is_not_readable_for_small_messages_until_its_turn() {
        use std::os::fd::AsRawFd;
        use tokio::io::AsyncWriteExt;
        let rt = rt();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut peer = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (ours, _) = listener.accept().await.unwrap();
            let fd = ours.as_raw_fd();
            // As after the reader's last read: nothing waits, and the
            // runtime knows it.
            let mut buf = [0u8; 16];
            let nothing = ours.try_read(&mut buf).unwrap_err();
            assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
            let pace = ReadPace::default();
            pace.set_quiet(Duration::from_millis(400));
            let mut last = None;
            pace.turn(&mut last, fd).await;
            let started = tokio::time::Instant::now();
            let readable = async {
                ours.readable().await.unwrap();
                started.elapsed()
            };
            let writes = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                peer.write_all(b"report").await.unwrap();
            };
            let turn = async {
                pace.turn(&mut last, fd).await;
                started.elapsed()
            };
            let (seen, (), turned) = tokio::join!(readable, writes, turn);
            assert!(turned >= Duration::from_millis(350), "turn took {turned:?}");
            assert!(
                seen + Duration::from_millis(5) >= turned,
                "readable after {seen:?}, before the turn ended at {turned:?}"
            );
            let n = ours.try_read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"report");
        });
    }
}
