//! Re-protection, the survivor's side: a new backup joins the VM while it
//! runs, by an iterative pre-copy of guest memory, a short pause for the
//! last dirty pages and the machine state, and then the log from that
//! position on (docs/ARCHITECTURE.md, "Re-protection").
//!
//! A [`JoinService`] thread waits for joiners on the survivor's join
//! address. It copies memory while the guest runs; only the vCPU thread may
//! touch the VM itself (the dirty log, the vCPU state), so the service asks
//! it through a [`Desk`], which the vCPU loop serves between exits
//! ([`crate::timeline::Timeline::attend_machine`]). The pause is the
//! handover request: the vCPU thread takes the state, sends the last pages
//! and the handover, and makes the session the sink's new link, all at
//! one position.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logchannel::channel::{error_chain, ChannelConfig, Hello, Security};
use logchannel::join::{JoinListener, JoinSession, PAGES_PER_MESSAGE, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use super::arbiter::Arbiter;
use super::events::Event;
use super::metrics::Metrics;
use crate::doorbell::Doorbell;
use crate::memory::{self, DirtyPages, GuestMem};
use crate::stop;
use crate::timeline::record::PERIODIC_DIGEST_TAG;
use crate::timeline::StateDigest;
use crate::vcpu::MachineAccess;

/// Pre-copy ends once a round leaves this few dirty pages (1 MiB): the
/// pause then sends about that much.
const CONVERGED_PAGES: u64 = 256;
/// ... or after this many rounds, whatever is left (a guest that dirties
/// memory faster than the link sends it never converges by itself).
const MAX_ROUNDS: u32 = 12;
/// How long the service waits for the vCPU thread to serve a request. The
/// vCPU thread serves one within an exit or an idle slice (20 ms); a guest
/// that never exits would hold it longer, and the join is then given up.
const DESK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a survivor needs to let a backup join.
#[derive(Clone)]
pub struct JoinPlan {
    /// Where joiners connect.
    pub listen: SocketAddr,
    /// Our Hello as a primary (join set); its epoch is updated per join.
    pub hello: Hello,
    pub security: Security,
    /// The new pair's link timing.
    pub config: ChannelConfig,
    /// Gives each new pairing its epoch; without one, the epoch goes up by
    /// one.
    pub arbiter: Option<Arbiter>,
}

/// How a join went, for logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct JoinReport {
    pub epoch: u64,
    /// The position the joiner resumes from.
    pub exit: u64,
    /// How long the guest was paused for the handover.
    pub blackout: Duration,
    /// From the joiner's arrival to the handover.
    pub total: Duration,
    pub bytes: u64,
    pub rounds: u32,
    pub pages: u64,
}

/// What the vCPU thread is asked to do.
pub enum Request {
    /// Start dirty tracking (KVM's log and the VMM's own writes); the
    /// answer is the guest memory to copy from.
    StartTracking(SyncSender<Result<GuestMem, String>>),
    /// The pages dirtied since the last call.
    TakeDirty(SyncSender<Result<DirtyPages, String>>),
    /// The join was given up: stop tracking.
    StopTracking,
    /// Pause, send the last pages and the state, and pair over `session`.
    Handover(Box<Handover>),
}

/// The pause's work, handed to the vCPU thread.
pub struct Handover {
    pub session: JoinSession,
    pub epoch: u64,
    pub config: ChannelConfig,
    /// When the joiner arrived, for the report.
    pub started: Instant,
    pub rounds: u32,
    pub pages: u64,
    /// Every page's CRC as last sent (see [`memory::digest_of_page_crcs`]).
    pub crcs: Vec<u32>,
    pub reply: SyncSender<Result<JoinReport, String>>,
}

/// Requests from the join service to the vCPU thread. The flag is read at
/// every exit, so it must be cheap: one relaxed load.
pub struct Desk {
    pending: AtomicBool,
    slot: Mutex<Option<Request>>,
    /// The world's bell: rings an idle guest's wait.
    bell: Doorbell,
    /// The sink has a backup (a joiner is refused).
    paired: AtomicBool,
}

impl Desk {
    pub fn new(bell: Doorbell, paired: bool) -> Arc<Desk> {
        Arc::new(Desk {
            pending: AtomicBool::new(false),
            slot: Mutex::new(None),
            bell,
            paired: AtomicBool::new(paired),
        })
    }

    /// True when a request waits for the vCPU thread.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// The waiting request, taken (vCPU thread).
    pub fn take(&self) -> Option<Request> {
        let r = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.pending.store(false, Ordering::SeqCst);
        r
    }

    fn put(&self, r: Request) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.pending.store(true, Ordering::SeqCst);
        self.bell.ring();
    }

    pub fn set_paired(&self, paired: bool) {
        self.paired.store(paired, Ordering::SeqCst);
    }

    pub fn paired(&self) -> bool {
        self.paired.load(Ordering::SeqCst)
    }

    /// Asks and waits for the answer (bounded; a stop request ends it).
    fn call<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, String>>) -> Request,
    ) -> Result<T, String> {
        let (tx, rx) = sync_channel(1);
        self.put(make(tx));
        wait_reply(&rx)
    }
}

fn wait_reply<T>(rx: &Receiver<Result<T, String>>) -> Result<T, String> {
    let deadline = Instant::now() + DESK_TIMEOUT;
    loop {
        match rx.recv_timeout(stop::SLICE) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the vCPU thread dropped the request".into())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if stop::requested() {
                    return Err("stopped".into());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the vCPU thread did not answer within {} s",
                        DESK_TIMEOUT.as_secs()
                    ));
                }
            }
        }
    }
}

/// The thread that waits for joiners and pre-copies memory to them.
pub struct JoinService {
    desk: Arc<Desk>,
    addr: SocketAddr,
    _thread: JoinHandle<()>,
}

impl JoinService {
    /// Binds the join address now (a port in use is an error at start),
    /// and serves joiners until the process ends. `paired`: the sink
    /// starts with a backup, so joiners are refused until it loses it.
    pub fn start(
        plan: JoinPlan,
        bell: Doorbell,
        metrics: Arc<Metrics>,
        epoch: u64,
        paired: bool,
    ) -> Result<JoinService, super::Error> {
        let listener = JoinListener::bind(plan.listen).map_err(super::Error::JoinListen)?;
        let addr = listener.local_addr();
        let desk = Desk::new(bell, paired);
        let thread = {
            let desk = desk.clone();
            std::thread::Builder::new()
                .name("join-service".into())
                .spawn(move || {
                    logchannel::sched::keep_off_vcpu();
                    serve(listener, plan, desk, metrics, epoch)
                })
                .map_err(|e| super::Error::Spawn("join-service", e))?
        };
        tracing::info!("joiners may connect to {addr}");
        Ok(JoinService {
            desk,
            addr,
            _thread: thread,
        })
    }

    pub fn desk(&self) -> &Arc<Desk> {
        &self.desk
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(
    listener: JoinListener,
    plan: JoinPlan,
    desk: Arc<Desk>,
    metrics: Arc<Metrics>,
    mut epoch: u64,
) {
    loop {
        if stop::requested() {
            return;
        }
        let mut hello = plan.hello.clone();
        hello.epoch = epoch;
        let session = match listener.accept(&hello, &plan.security, stop::SLICE) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("refused a joiner: {}", error_chain(&e));
                continue;
            }
        };
        if desk.paired() {
            // Spares ask often: not worth a warning each time.
            tracing::info!("refused a joiner: this VM already has a backup");
            session.refuse("this VM already has a backup");
            continue;
        }
        let started = Instant::now();
        let next = match &plan.arbiter {
            Some(a) => match a.new_epoch() {
                Ok(e) => e,
                Err(e) => {
                    let why = format!("the arbiter gave no epoch for the new pair: {e}");
                    tracing::warn!("refused a joiner: {why}");
                    session.refuse(&why);
                    continue;
                }
            },
            None => epoch + 1,
        };
        tracing::warn!("a backup joins (epoch {next}): copying memory while the guest runs");
        metrics.event(Event::JoinStarted { epoch: next });
        match transfer(session, next, started, &plan, &desk) {
            Ok(report) => {
                epoch = report.epoch;
                metrics.join_done(report.blackout, report.total, report.bytes);
                metrics.event(Event::Protected {
                    epoch: report.epoch,
                    exit: report.exit,
                    blackout_us: report.blackout.as_micros() as u64,
                    total_ms: report.total.as_millis() as u64,
                    bytes: report.bytes,
                });
                tracing::warn!(
                    "protected again: the new backup resumes after exit {} (epoch {}); paused {} µs, {} rounds, {} pages, {} bytes in {} ms",
                    report.exit,
                    report.epoch,
                    report.blackout.as_micros(),
                    report.rounds,
                    report.pages,
                    report.bytes,
                    report.total.as_millis()
                );
            }
            Err(why) => {
                desk.put(Request::StopTracking);
                metrics.event(Event::JoinFailed { why: why.clone() });
                tracing::warn!("the join failed, still running alone: {why}");
            }
        }
    }
}

/// Pre-copies memory to the joiner, then hands the session to the vCPU
/// thread for the pause.
fn transfer(
    mut session: JoinSession,
    epoch: u64,
    started: Instant,
    plan: &JoinPlan,
    desk: &Desk,
) -> Result<JoinReport, String> {
    let err = |e: logchannel::channel::Error| error_chain(&e);
    session.offer(epoch).map_err(err)?;
    let mem = desk.call(Request::StartTracking)?;
    let mem = &mem;
    let total_pages = page_count(mem);
    let mut pages = 0;
    let mut buf = Vec::with_capacity(PAGES_PER_MESSAGE * PAGE_SIZE);
    // The CRC of every page as sent, for the handover digest.
    let zero_crc = memory::page_crc(&[0u8; PAGE_SIZE]);
    let mut crcs = vec![zero_crc; total_pages as usize];
    // Round 0: everything, zero pages as runs.
    let mut zero_run: Option<(u64, u64)> = None;
    let mut data = vec![0u8; PAGE_SIZE];
    for page in 0..total_pages {
        read_page(mem, page, &mut data)?;
        if data.iter().all(|&b| b == 0) {
            flush_pages(&mut session, &mut buf, page).map_err(err)?;
            zero_run = Some(match zero_run {
                Some((first, n)) => (first, n + 1),
                None => (page, 1),
            });
            continue;
        }
        if let Some((first, n)) = zero_run.take() {
            session.send_zeros(first, n).map_err(err)?;
        }
        crcs[page as usize] = memory::page_crc(&data);
        append_page(&mut session, &mut buf, page, &data).map_err(err)?;
        pages += 1;
        if stop::requested() {
            return Err("stopped".into());
        }
    }
    flush_pages(&mut session, &mut buf, total_pages).map_err(err)?;
    if let Some((first, n)) = zero_run.take() {
        session.send_zeros(first, n).map_err(err)?;
    }
    session.send_round(0, pages).map_err(err)?;
    let mut round = 0;
    loop {
        round += 1;
        let dirty = desk.call(Request::TakeDirty)?;
        let n = dirty.count();
        send_dirty(&mut session, mem, &dirty, &mut crcs).map_err(err)?;
        session.send_round(round, n).map_err(err)?;
        pages += n;
        if n <= CONVERGED_PAGES || round >= MAX_ROUNDS {
            break;
        }
        if stop::requested() {
            return Err("stopped".into());
        }
    }
    let (tx, rx) = sync_channel(1);
    desk.put(Request::Handover(Box::new(Handover {
        session,
        epoch,
        config: plan.config,
        started,
        rounds: round + 1,
        pages,
        crcs,
        reply: tx,
    })));
    wait_reply(&rx)
}

/// The guest's pages, counted from guest-physical 0.
pub fn page_count(mem: &GuestMem) -> u64 {
    memory::mem_size(mem) / PAGE_SIZE as u64
}

fn read_page(mem: &GuestMem, page: u64, out: &mut [u8]) -> Result<(), String> {
    mem.read_slice(out, GuestAddress(page * PAGE_SIZE as u64))
        .map_err(|e| format!("cannot read guest page {page}: {e}"))
}

/// Adds one page to the run being built in `buf`, which must end just
/// before `page`; a full or broken run is sent first.
fn append_page(
    session: &mut JoinSession,
    buf: &mut Vec<u8>,
    page: u64,
    data: &[u8],
) -> Result<(), logchannel::channel::Error> {
    let held = (buf.len() / PAGE_SIZE) as u64;
    if held > 0 && held as usize == PAGES_PER_MESSAGE {
        flush_pages(session, buf, page)?;
    }
    buf.extend_from_slice(data);
    Ok(())
}

/// Sends the run in `buf`, which ends just before page `end`.
fn flush_pages(
    session: &mut JoinSession,
    buf: &mut Vec<u8>,
    end: u64,
) -> Result<(), logchannel::channel::Error> {
    if buf.is_empty() {
        return Ok(());
    }
    let n = (buf.len() / PAGE_SIZE) as u64;
    let data = std::mem::replace(buf, Vec::with_capacity(PAGES_PER_MESSAGE * PAGE_SIZE));
    session.send_pages(end - n, data)
}

/// Sends every page in `dirty`, as runs of consecutive pages, and keeps
/// each page's CRC as sent in `crcs`.
pub fn send_dirty(
    session: &mut JoinSession,
    mem: &GuestMem,
    dirty: &DirtyPages,
    crcs: &mut [u32],
) -> Result<(), logchannel::channel::Error> {
    let mut buf = Vec::with_capacity(PAGES_PER_MESSAGE * PAGE_SIZE);
    let mut next: Option<u64> = None;
    let mut page_buf = vec![0u8; PAGE_SIZE];
    for page in dirty.iter() {
        if next != Some(page) {
            if let Some(end) = next {
                flush_pages(session, &mut buf, end)?;
            }
        }
        let Some(crc) = crcs.get_mut(page as usize) else {
            // A dirty bit beyond memory: nothing to send.
            continue;
        };
        if read_page(mem, page, &mut page_buf).is_err() {
            continue;
        }
        *crc = memory::page_crc(&page_buf);
        if buf.len() / PAGE_SIZE == PAGES_PER_MESSAGE {
            flush_pages(session, &mut buf, page)?;
        }
        buf.extend_from_slice(&page_buf);
        next = Some(page + 1);
    }
    if let Some(end) = next {
        flush_pages(session, &mut buf, end)?;
    }
    Ok(())
}

/// The vCPU thread's side of a handover: takes the state at this position,
/// sends the last dirty pages and the handover, and returns the new link.
/// The guest is paused for exactly this call.
pub fn hand_over(
    job: Handover,
    machine: &mut dyn MachineAccess,
    first_seq: u64,
    clock_ns: u64,
) -> Result<(logchannel::channel::PrimaryLink, JoinReport), String> {
    let paused = Instant::now();
    let Handover {
        mut session,
        epoch,
        config,
        started,
        rounds,
        pages,
        mut crcs,
        ..
    } = job;
    let state = machine.save().map_err(|e| error_chain(&e))?;
    let dirty = machine.take_dirty().map_err(|e| error_chain(&e))?;
    let last = dirty.count();
    let saved = paused.elapsed();
    let mem = machine.memory().clone();
    send_dirty(&mut session, &mem, &dirty, &mut crcs).map_err(|e| error_chain(&e))?;
    let sent = paused.elapsed();
    // The memory digest is over the pages' CRCs as sent, kept up to date
    // through pre-copy: the pause hashes only the last pages, whatever the
    // memory size. It shows that the joiner holds what was sent; that what
    // was sent is all that changed is checked by the digest the sink logs
    // right after pairing, from the page CRCs its own digests keep, which
    // the joiner replays against its memory.
    let digest = StateDigest {
        regs_crc: machine.regs_crc().map_err(|e| error_chain(&e))?,
        mem_crc: memory::digest_of_page_crcs(&crcs),
        tag: PERIODIC_DIGEST_TAG,
    };
    let hashed = paused.elapsed();
    let _ = machine.stop_dirty_tracking();
    let encoded = postcard::to_allocvec(&state).map_err(|e| e.to_string())?;
    let exit = state.exits;
    let handover = logchannel::join::Handover {
        exit,
        first_seq,
        clock_ns,
        regs_crc: digest.regs_crc,
        mem_crc: digest.mem_crc,
        machine: encoded,
    };
    let bytes = session.sent_bytes();
    let link = session
        .hand_over(handover, config)
        .map_err(|e| error_chain(&e))?;
    let blackout = paused.elapsed();
    tracing::info!(
        "handover at exit {exit}: {last} last pages, digest {digest}, paused {} µs (state {} µs, last pages {} µs, digest {} µs, handover {} µs)",
        blackout.as_micros(),
        saved.as_micros(),
        (sent - saved).as_micros(),
        (hashed - sent).as_micros(),
        (blackout - hashed).as_micros()
    );
    Ok((
        link,
        JoinReport {
            epoch,
            exit,
            blackout,
            total: started.elapsed(),
            bytes,
            rounds,
            pages: pages + last,
        },
    ))
}
