//! Re-protection, the joiner's side: a fresh backup receives a running
//! VM's memory and state from the survivor ([`super::join`]), checks that
//! what it restored is what the survivor had, and only then starts taking
//! the log, so that it never acknowledges a record it could not replay.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use logchannel::channel::{self, BackupLink, ChannelConfig, Hello, Security};
use logchannel::join::{Handover, Joiner, Transfer, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use super::join::page_count;
use crate::memory::{self, DirtyPages};
use crate::stop;
use crate::timeline::record::PERIODIC_DIGEST_TAG;
use crate::timeline::StateDigest;
use crate::vcpu::{self, MachineState, Vcpu};

/// Why a join failed. Every one leaves the survivor serving: it gives the
/// join up when the connection ends. The large sources are boxed, so that
/// every `Result` of the join stays small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot join the VM at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Box<channel::Error>,
    },
    #[error("the state transfer from {addr} failed")]
    Transfer {
        addr: SocketAddr,
        #[source]
        source: Box<channel::Error>,
    },
    #[error("the survivor sent pages {first}..{end}, beyond this guest's {pages} pages")]
    PageRange { first: u64, end: u64, pages: u64 },
    #[error("writing guest memory failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("the survivor's machine state does not decode")]
    State(#[source] postcard::Error),
    #[error("cannot restore the survivor's machine state")]
    Restore(#[source] Box<vcpu::Error>),
    #[error(
        "the restored state differs from the survivor's at exit {exit}: ours {ours}, the survivor's {theirs}"
    )]
    DigestMismatch {
        exit: u64,
        ours: StateDigest,
        theirs: StateDigest,
    },
    #[error("the log channel from the survivor could not start")]
    Link(#[source] Box<channel::Error>),
    #[error("no address to join (--join)")]
    NoAddress,
}

/// A finished join: the link carries the log from `handover.first_seq`.
pub struct Joined {
    /// The survivor's address.
    pub from: SocketAddr,
    pub link: BackupLink,
    pub handover: Handover,
    pub epoch: u64,
    pub bytes: u64,
    pub took: Duration,
    /// Our digest at the handover, equal to the survivor's.
    pub digest: StateDigest,
}

/// Joins the VM that runs at `addr`: its memory goes into `vcpu`'s guest
/// memory, its state into `vcpu`, and the returned link carries its log.
pub fn join(
    vcpu: &mut Vcpu,
    addr: SocketAddr,
    hello: &Hello,
    security: &Security,
    connect_timeout: Duration,
    config: ChannelConfig,
    written: &mut DirtyPages,
) -> Result<Joined, Error> {
    let started = Instant::now();
    let mut joiner = Joiner::connect(addr, hello, security, connect_timeout).map_err(|source| {
        Error::Connect {
            addr,
            source: Box::new(source),
        }
    })?;
    let epoch = joiner.epoch();
    tracing::warn!("joining the VM at {addr} (epoch {epoch}): receiving its memory");
    let mem = vcpu.memory().clone();
    let pages = page_count(&mem);
    let stop = stop::flag_handle();
    let zero = vec![0u8; PAGE_SIZE];
    // The pages that may not be zero: the machine was built fresh, so only
    // what the VMM wrote (the boot tables and the image, and an earlier
    // attempt's pages) can hold anything; vm-memory's bitmap saw it all.
    written.union(&memory::take_vmm_writes(&mem));
    let handover = loop {
        let step = joiner.next(&stop).map_err(|source| Error::Transfer {
            addr,
            source: Box::new(source),
        })?;
        match step {
            Transfer::Pages { first, data } => {
                let n = (data.len() / PAGE_SIZE) as u64;
                check_range(first, n, pages)?;
                mem.write_slice(&data, GuestAddress(first * PAGE_SIZE as u64))
                    .map_err(Error::Memory)?;
            }
            Transfer::Zeros { first, count } => {
                check_range(first, count, pages)?;
                // Only pages that may hold something are cleared: the rest
                // is zero already, and stays unallocated (even reading an
                // untouched page costs a fault, ~10 µs here).
                for p in written.iter_range(first, first + count) {
                    mem.write_slice(&zero, GuestAddress(p * PAGE_SIZE as u64))
                        .map_err(Error::Memory)?;
                }
            }
            Transfer::Round { round, pages } => {
                tracing::info!("join: pre-copy round {round}: {pages} pages");
            }
            Transfer::Handover(h) => break h,
        }
    };
    // The survivor's link now waits for our heartbeats: say we are here
    // before the restore and the digest.
    joiner.keepalive().map_err(|source| Error::Transfer {
        addr,
        source: Box::new(source),
    })?;
    written.union(&memory::take_vmm_writes(&mem));
    let state: MachineState = postcard::from_bytes(&handover.machine).map_err(Error::State)?;
    vcpu.restore(&state)
        .map_err(|e| Error::Restore(Box::new(e)))?;
    let crcs = memory::page_crcs_of_written(&mem, written).map_err(Error::Memory)?;
    let digest = StateDigest {
        regs_crc: vcpu
            .full_regs_crc()
            .map_err(|e| Error::Restore(Box::new(e)))?,
        mem_crc: memory::digest_of_page_crcs(&crcs),
        tag: PERIODIC_DIGEST_TAG,
    };
    let theirs = StateDigest {
        regs_crc: handover.regs_crc,
        mem_crc: handover.mem_crc,
        tag: digest.tag,
    };
    if digest != theirs {
        return Err(Error::DigestMismatch {
            exit: handover.exit,
            ours: digest,
            theirs,
        });
    }
    // The digests go on from these CRCs: the first one after the join
    // need not read all of memory.
    vcpu.seed_page_crcs(crcs)
        .map_err(|e| Error::Restore(Box::new(e)))?;
    let bytes = joiner.received_bytes();
    let link = joiner
        .into_link(config, handover.first_seq)
        .map_err(|e| Error::Link(Box::new(e)))?;
    Ok(Joined {
        from: addr,
        link,
        handover,
        epoch,
        bytes,
        took: started.elapsed(),
        digest,
    })
}

/// Joins the first VM of `addrs` that takes a backup. With `wait` (a
/// spare), keeps asking them in turn, every [`SPARE_POLL`], until one does
/// or a stop is requested; without, asks each once.
///
/// Exactly one spare joins each survivor: a survivor serves one joiner at
/// a time and refuses every other while it has a backup, so the spares
/// that lose the race go on waiting.
pub fn join_any(
    vcpu: &mut Vcpu,
    addrs: &[SocketAddr],
    hello: &Hello,
    security: &Security,
    config: ChannelConfig,
    wait: bool,
) -> Result<Joined, Error> {
    let timeout = if wait {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(10)
    };
    // Pages this machine's memory may hold something in, across attempts.
    let mut written = DirtyPages::new(page_count(vcpu.memory()));
    loop {
        let mut last = None;
        for &addr in addrs {
            match join(vcpu, addr, hello, security, timeout, config, &mut written) {
                Ok(j) => return Ok(j),
                // Nobody there, or a VM that has its backup: ask the next.
                Err(e @ Error::Connect { .. }) => {
                    tracing::debug!("spare: {}", channel::error_chain(&e));
                    last = Some(e);
                }
                // Anything later: this join failed; a spare tries again
                // (round 0 rewrites all of memory, and the state is
                // restored anew).
                Err(e) if wait => {
                    tracing::warn!("spare: the join failed: {}", channel::error_chain(&e));
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if !wait || stop::requested() {
            return Err(last.unwrap_or(Error::NoAddress));
        }
        std::thread::sleep(SPARE_POLL);
    }
}

/// How often a spare asks the VMs it watches whether one needs a backup.
pub const SPARE_POLL: Duration = Duration::from_millis(250);

fn check_range(first: u64, count: u64, pages: u64) -> Result<(), Error> {
    match first.checked_add(count) {
        Some(end) if end <= pages => Ok(()),
        end => Err(Error::PageRange {
            first,
            end: end.unwrap_or(u64::MAX),
            pages,
        }),
    }
}
