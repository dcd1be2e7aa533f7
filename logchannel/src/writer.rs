//! The link's writing half, shared by the channel thread and the thread
//! that produces the messages (the primary's vCPU thread, which writes its
//! batches itself).
//!
//! Why: on a host whose cores are all running vCPUs, every wake-up of a
//! helper thread preempts a vCPU, and on this platform a preemption costs
//! the vCPU some 60–90 µs (the switch, then reloading its state). Handing
//! each batch to the channel thread was one such wake-up per flush, about
//! a thousand a second. Written by the thread that made it, a batch costs
//! a `write` and no wake-up; the channel thread still writes heartbeats
//! and the goodbye, and reads.
//!
//! The writing thread is not a Tokio thread: it polls the write itself
//! (see [`drive`]). The socket's readiness is still driven by the runtime
//! on the channel thread, which wakes this thread when a full socket
//! drains; and a write that cannot finish because the link failed (the
//! channel thread recorded why, and may have ended) is given up.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::channel::{write_bytes, LinkFailure, Role, Writer};

/// How often a writer blocked on a full socket looks at whether it should
/// give up.
const GIVE_UP_SLICE: Duration = Duration::from_millis(20);

/// The writing half, behind a lock so that messages never interleave.
pub(crate) struct SharedWriter {
    wr: Mutex<Writer>,
    peer: Role,
}

impl SharedWriter {
    pub(crate) fn new(wr: Writer, peer: Role) -> Arc<Self> {
        Arc::new(SharedWriter {
            wr: Mutex::new(wr),
            peer,
        })
    }

    /// Writes one whole message, from the channel thread.
    pub(crate) async fn write(&self, bytes: &[u8]) -> Result<(), LinkFailure> {
        let mut wr = self.wr.lock().await;
        write_bytes(&mut *wr, bytes, self.peer).await
    }

    /// Ends the stream (after the last message), from the channel thread.
    pub(crate) async fn shutdown(&self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.wr.lock().await.shutdown().await;
    }

    /// Writes what `make` encodes once the lock is held, from the channel
    /// thread: what a message says may depend on what the other writer
    /// wrote before it (the backup's acks count on from the last one).
    pub(crate) async fn write_made(
        &self,
        make: impl FnOnce() -> Result<Vec<u8>, LinkFailure>,
    ) -> Result<(), LinkFailure> {
        let mut wr = self.wr.lock().await;
        let bytes = make()?;
        write_bytes(&mut *wr, &bytes, self.peer).await
    }

    /// [`SharedWriter::write_made`] from a thread outside the runtime (see
    /// [`SharedWriter::write_blocking`]).
    pub(crate) fn write_made_blocking(
        &self,
        make: impl FnOnce() -> Result<Vec<u8>, LinkFailure>,
        give_up: impl Fn() -> Option<LinkFailure>,
    ) -> Result<(), LinkFailure> {
        drive(self.write_made(make), give_up)?
    }

    /// Writes one whole message from a thread outside the runtime,
    /// blocking while the socket is full. `give_up` is asked while it
    /// waits: once it returns a failure (the link failed, so the bytes
    /// could never be read), the write stops and returns that failure.
    pub(crate) fn write_blocking(
        &self,
        bytes: &[u8],
        give_up: impl Fn() -> Option<LinkFailure>,
    ) -> Result<(), LinkFailure> {
        drive(
            async {
                let mut wr = self.wr.lock().await;
                write_bytes(&mut *wr, bytes, self.peer).await
            },
            give_up,
        )?
    }
}

/// Wakes the thread that polls a future.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` to completion on this thread, parking between polls, and
/// asks `give_up` at least every [`GIVE_UP_SLICE`]: a future whose waker
/// will never be called (its runtime ended with the link) must not park
/// this thread for ever.
fn drive<F: Future>(
    fut: F,
    give_up: impl Fn() -> Option<LinkFailure>,
) -> Result<F::Output, LinkFailure> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Ok(out);
        }
        if let Some(failure) = give_up() {
            return Err(failure);
        }
        std::thread::park_timeout(GIVE_UP_SLICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_write_that_cannot_finish_gives_up_when_told() {
        // A pipe-like writer that is never ready.
        struct Stuck;
        impl tokio::io::AsyncWrite for Stuck {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Poll::Pending
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Pending
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Pending
            }
        }
        let w = SharedWriter::new(Box::new(Stuck), Role::Backup);
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            f.store(true, Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        let r = w.write_blocking(b"abc", || {
            failed.load(Ordering::SeqCst).then_some(LinkFailure::Closed)
        });
        t.join().unwrap();
        assert!(matches!(r, Err(LinkFailure::Closed)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_write_completes_through_a_real_socket() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = rt.block_on(tokio::net::TcpStream::connect(addr)).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let w = SharedWriter::new(Box::new(stream), Role::Backup);
        // The runtime runs on a thread of its own, as the channel's does.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let driver = std::thread::spawn(move || {
            let _ = rt.block_on(stop_rx);
        });
        // More than a socket buffer holds: the write must wait for the
        // reader, woken through the runtime's reactor.
        let big = vec![7u8; 8 << 20];
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut got = vec![0u8; 8 << 20];
            peer.read_exact(&mut got).unwrap();
            got
        });
        w.write_blocking(&big, || None).unwrap();
        assert_eq!(reader.join().unwrap(), big);
        stop_tx.send(()).unwrap();
        driver.join().unwrap();
    }
}
