//! Loopback ports for the processes a test, a benchmark or `duet demo`
//! starts, handed out without races.
//!
//! The old way, binding port 0, reading the port and dropping the listener
//! for a child to bind later, is a race: until the child binds, the kernel
//! may give that same ephemeral port to anyone (the local end of some
//! outgoing connection, another test's port-0 bind). Nor can every child
//! bind port 0 and report its address: a primary and its backup must share
//! one service address for a failover to keep it, and the backup's channel
//! and the `--metrics` listeners do not report what they bound.
//!
//! So the kit hands out ports itself, from a range below the kernel's
//! ephemeral range (read from `/proc/sys/net/ipv4/ip_local_port_range`,
//! 32768-60999 by default), where the kernel never picks a port on its own.
//! Each process starts at an offset taken from its pid and walks the range
//! with an atomic counter, so it never hands out one port twice. A port is
//! taken only if
//!
//! 1. an exclusive `flock` on `$TMPDIR/duet-ports/PORT` is free: the lock
//!    is held until this process exits (the kernel drops it then, even
//!    after a crash), so two processes using the kit (parallel test
//!    binaries, a test and the `duet demo` it started) never share a port;
//! 2. a bind of `127.0.0.1:PORT` succeeds now, so a port that something
//!    outside the kit holds is skipped.
//!
//! What is left is a program outside the kit binding the same port in the
//! moment between the check and the child's bind, in a range nothing picks
//! by itself.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The lowest port handed out.
const LOW: u16 = 20_000;
/// The top of the range when the ephemeral range cannot be read.
const DEFAULT_HIGH: u16 = 32_768;

/// Locks held for the life of the process.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
/// Ports tried so far by this process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The range handed out: `LOW` up to the start of the ephemeral range.
fn range() -> (u16, u16) {
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_HIGH)
        .min(DEFAULT_HIGH);
    if high > LOW + 1024 {
        (LOW, high)
    } else {
        (1024, high.max(2048))
    }
}

/// Takes the lock of `port`, if no other process holds it.
fn lock(port: u16) -> std::io::Result<Option<File>> {
    let dir = std::env::temp_dir().join("duet-ports");
    std::fs::create_dir_all(&dir)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))?;
    // SAFETY: flock(2) on a descriptor we own, open for the whole call; it
    // touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

/// A loopback port that no other user of the kit has, nothing listens on
/// now, and this process has not handed out before.
pub fn take() -> std::io::Result<u16> {
    let (low, high) = range();
    let span = u32::from(high - low);
    let start = std::process::id().wrapping_mul(97) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + ((start + n) % span) as u16;
        let Some(file) = lock(port)? else { continue };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            continue; // held outside the kit; the lock goes with `file`
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
        return Ok(port);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {low}..{high}"),
    ))
}

/// `127.0.0.1` with a port from [`take`].
pub fn loopback() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, take()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let (_, high) = range();
        let ports: Vec<u16> = (0..20).map(|_| take().unwrap()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!(p < high, "{p} is in the ephemeral range");
            // Free for the child to bind, and locked against other users.
            drop(TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap());
            assert!(lock(p).unwrap().is_none(), "{p} is not locked");
        }
    }
}
