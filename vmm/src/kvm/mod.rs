//! The only code in Duet that touches `kvm_ioctls`.
//!
//! It owns the VM and its single vCPU, puts the vCPU in long mode at the
//! guest's entry point, and converts KVM's exits into Duet's own [`Exit`],
//! which owns its data. Owning the data lets the vCPU loop read registers
//! (for the position) while it handles the exit, and keeps `kvm_ioctls`
//! types out of every layer above.

pub mod state;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_userspace_memory_region, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::errno;

use crate::boot;
use crate::memory::{DirtyPages, GuestMem, PAGE_SIZE};
pub use state::VcpuState;

/// Errors from setting up or running the KVM machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {}", path.display())]
    OpenKvm { path: PathBuf, source: errno::Error },
    #[error("{} is not a KVM device", .0.display())]
    NotKvm(PathBuf),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] errno::Error),
    #[error("KVM_CREATE_VCPU failed")]
    CreateVcpu(#[source] errno::Error),
    #[error("guest memory has no host mapping")]
    HostAddress,
    #[error("KVM_SET_USER_MEMORY_REGION failed")]
    SetMemory(#[source] errno::Error),
    #[error("setting up vCPU registers failed")]
    SetupRegs(#[source] errno::Error),
    #[error("reading vCPU registers failed")]
    GetRegs(#[source] errno::Error),
    #[error("KVM_RUN failed")]
    Run(#[source] errno::Error),
    #[error("KVM_INTERRUPT failed for vector {vector:#x}")]
    Inject { vector: u8, source: errno::Error },
    /// Reading one part of the vCPU state failed (`part` names it).
    #[error("saving the vCPU's {part} failed")]
    SaveState {
        part: &'static str,
        source: errno::Error,
    },
    /// Loading one part of a saved state failed.
    #[error("restoring the vCPU's {part} failed")]
    RestoreState {
        part: &'static str,
        source: errno::Error,
    },
    /// KVM read or wrote fewer MSRs than asked; `index` is the first it
    /// did not.
    #[error("MSR {index:#x} cannot be {}", if *.write { "written" } else { "read" })]
    Msr { index: u32, write: bool },
    /// A saved state that cannot be loaded as it is (a wrong-sized XSAVE
    /// area, too many XCRs): it comes from another machine or is corrupt.
    #[error("the saved vCPU state is malformed: {0}")]
    BadState(&'static str),
    /// Completing the pending I/O before a save did not stop where it
    /// should (KVM entered the guest, or failed).
    #[error("completing the pending exit before a save returned {0}")]
    Complete(String),
    #[error("changing dirty logging on memory slot {slot} failed")]
    DirtyLogging { slot: u32, source: errno::Error },
    #[error("KVM_GET_DIRTY_LOG failed on memory slot {slot}")]
    GetDirtyLog { slot: u32, source: errno::Error },
}

/// A KVM exit, converted at the boundary and owning its data.
///
/// Only `IoIn`, `IoOut`, `MmioRead`, `MmioWrite` and `Hlt` are synchronous
/// exits, and only they count as positions (docs/ARCHITECTURE.md, Positions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `in` (or `rep ins`): `len` bytes wanted, to be given with [`Vm::complete_read`].
    IoIn { port: u16, len: usize },
    /// `out` (or `rep outs`): all bytes written, `size` at a time.
    IoOut {
        port: u16,
        size: usize,
        data: Vec<u8>,
    },
    /// MMIO read of `len` bytes, to be given with [`Vm::complete_read`].
    MmioRead { addr: u64, len: usize },
    /// MMIO write.
    MmioWrite { addr: u64, data: Vec<u8> },
    /// `hlt` in ring 0; the VMM implements the wait itself.
    Hlt,
    /// KVM_RUN returned early (EINTR or `immediate_exit`); not a position.
    Interrupted,
    /// The guest triple-faulted or otherwise shut down.
    Shutdown,
    /// KVM could not continue; the string says why.
    Failed(String),
}

impl Exit {
    /// True for the exits that are positions: one exact dynamic instruction in the guest.
    pub fn is_synchronous(&self) -> bool {
        matches!(
            self,
            Exit::IoIn { .. }
                | Exit::IoOut { .. }
                | Exit::MmioRead { .. }
                | Exit::MmioWrite { .. }
                | Exit::Hlt
        )
    }

    /// A small code for the exit kind, logged with events so that replay can
    /// check it stopped at the same kind of exit.
    pub fn kind_code(&self) -> u8 {
        match self {
            Exit::IoIn { .. } => 1,
            Exit::IoOut { .. } => 2,
            Exit::MmioRead { .. } => 3,
            Exit::MmioWrite { .. } => 4,
            Exit::Hlt => 5,
            Exit::Interrupted => 6,
            Exit::Shutdown => 7,
            Exit::Failed(_) => 8,
        }
    }
}

// KVM_INTERRUPT = _IOW(KVMIO, 0x86, struct kvm_interrupt); kvm-ioctls has no wrapper.
vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

/// The KVM VM with its one vCPU.
pub struct Vm {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    /// The memory slots as registered, to re-register them with dirty
    /// logging on or off.
    slots: Vec<kvm_userspace_memory_region>,
}

impl Vm {
    /// Opens `/dev/kvm`, creates the VM, maps `mem` at guest-physical 0 and
    /// creates the vCPU with synchronized registers enabled (so reading RIP
    /// at every exit costs no ioctl).
    pub fn new(mem: &GuestMem, kvm_path: &Path) -> Result<Self, Error> {
        let path = CString::new(kvm_path.as_os_str().as_bytes())
            .map_err(|_| Error::NotKvm(kvm_path.to_path_buf()))?;
        let kvm = Kvm::new_with_path(&path).map_err(|source| Error::OpenKvm {
            path: kvm_path.to_path_buf(),
            source,
        })?;
        if kvm.get_api_version() != 12 {
            return Err(Error::NotKvm(kvm_path.to_path_buf()));
        }
        let vm = kvm.create_vm().map_err(Error::CreateVm)?;
        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| Error::HostAddress)?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` points at a live mapping of `memory_size` bytes
            // owned by `mem`, which outlives the VM in every caller (Machine
            // holds both, memory dropped after the VM).
            unsafe { vm.set_user_memory_region(desc) }.map_err(Error::SetMemory)?;
            slots.push(desc);
        }
        let mut vcpu = vm.create_vcpu(0).map_err(Error::CreateVcpu)?;
        // CPUID has no effect on kvm_pvm (docs/ARCHITECTURE.md, platform facts), but on real KVM the
        // guest needs the host's features (SSE, long mode) reported.
        if let Ok(cpuid) = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            vcpu.set_cpuid2(&cpuid).map_err(Error::SetupRegs)?;
        }
        vcpu.set_sync_valid_reg(SyncReg::Register);
        Ok(Vm {
            kvm,
            vm,
            vcpu,
            slots,
        })
    }

    /// Puts the vCPU in 64-bit long mode, ring 0, using the tables that
    /// [`boot::write_tables`] placed in guest memory.
    pub fn setup_long_mode(&mut self, entry: u64, stack: u64, arg: u64) -> Result<(), Error> {
        let mut sregs = self.vcpu.get_sregs().map_err(Error::SetupRegs)?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: boot::SEL_KERNEL_CODE,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: boot::SEL_KERNEL_DATA,
            type_: 0x3,
            l: 0,
            db: 1,
            ..code
        };
        let tss = kvm_segment {
            base: boot::TSS_ADDR,
            limit: boot::TSS_LIMIT,
            selector: boot::SEL_TSS,
            type_: 0xb,
            s: 0,
            l: 0,
            g: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = boot::GDT_ADDR;
        sregs.gdt.limit = boot::GDT_LIMIT;
        sregs.idt.base = boot::IDT_ADDR;
        sregs.idt.limit = boot::IDT_LIMIT;
        sregs.cr3 = boot::PML4_ADDR;
        sregs.cr4 = boot::CR4;
        sregs.cr0 = boot::CR0;
        sregs.efer = boot::EFER;
        self.vcpu.set_sregs(&sregs).map_err(Error::SetupRegs)?;

        // x87 and SSE in their reset state: the prebuilt core uses SSE.
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.vcpu.set_fpu(&fpu).map_err(Error::SetupRegs)?;

        let regs = kvm_regs {
            rip: entry,
            rsp: stack,
            rdi: arg,
            rflags: 0x2,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(Error::SetupRegs)
    }

    /// Runs the vCPU until the next exit and converts it.
    pub fn run(&mut self) -> Result<Exit, Error> {
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.set_kvm_immediate_exit(0);
                return Ok(Exit::Interrupted);
            }
            Err(e) => return Err(Error::Run(e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => Exit::IoIn {
                port,
                len: data.len(),
            },
            VcpuExit::IoOut(port, data) => {
                // The slice is count * size bytes; recover size from the run struct.
                let len = data.len();
                let data = data.to_vec();
                // SAFETY: the exit reason was KVM_EXIT_IO, so `io` is the
                // active union member.
                let size = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.io.size } as usize;
                Exit::IoOut {
                    port,
                    size: size.clamp(1, len.max(1)),
                    data,
                }
            }
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead {
                addr,
                len: data.len(),
            },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite {
                addr,
                data: data.to_vec(),
            },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::FailEntry(reason, _) => {
                Exit::Failed(format!("entry failed, hardware reason {reason:#x}"))
            }
            VcpuExit::InternalError => Exit::Failed("KVM internal error".to_string()),
            other => Exit::Failed(format!("unexpected exit {other:?}")),
        })
    }

    /// Gives the guest the bytes of the `IoIn` or `MmioRead` it exited on.
    /// Must be called before the next [`Vm::run`].
    pub fn complete_read(&mut self, bytes: &[u8]) {
        let run = self.vcpu.get_kvm_run();
        match run.exit_reason {
            kvm_bindings::KVM_EXIT_IO => {
                // SAFETY: exit_reason says `io` is the active union member.
                let io = unsafe { run.__bindgen_anon_1.io };
                let len = (io.size as usize * io.count as usize).min(bytes.len());
                let base = run as *mut kvm_bindings::kvm_run as *mut u8;
                // SAFETY: KVM places the I/O data at `data_offset` inside the
                // vCPU's kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE bytes), and
                // `len` is at most size * count, the space it reserved there.
                // kvm-ioctls computes the same pointer for its IoIn slice.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        base.add(io.data_offset as usize),
                        len,
                    )
                };
            }
            kvm_bindings::KVM_EXIT_MMIO => {
                // SAFETY: exit_reason says `mmio` is the active union member.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let len = (mmio.len as usize).min(bytes.len()).min(8);
                mmio.data[..len].copy_from_slice(&bytes[..len]);
            }
            _ => {}
        }
    }

    /// The general registers as of the last exit, from the synchronized
    /// register area (no ioctl).
    pub fn regs(&mut self) -> kvm_regs {
        // SAFETY: kvm_valid_regs has KVM_SYNC_X86_REGS set since `new`, so
        // KVM fills `s.regs` at every exit; the union's `regs` member is
        // the x86 layout.
        unsafe { self.vcpu.get_kvm_run().s.regs.regs }
    }

    /// All registers via ioctls, for state digests (not on the hot path).
    pub fn full_regs(&self) -> Result<(kvm_regs, kvm_bindings::kvm_sregs), Error> {
        let regs = self.vcpu.get_regs().map_err(Error::GetRegs)?;
        let sregs = self.vcpu.get_sregs().map_err(Error::GetRegs)?;
        Ok((regs, sregs))
    }

    /// True when KVM can take an interrupt now (IF set, no interrupt shadow).
    pub fn ready_for_injection(&mut self) -> bool {
        let run = self.vcpu.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    /// Queues an external interrupt; the guest takes it at the next
    /// instruction boundary after the current exit.
    pub fn inject(&self, vector: u8) -> Result<(), Error> {
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer we
        // pass, which lives for the duration of the call; the fd is a vCPU.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(Error::Inject {
                vector,
                source: errno::Error::last(),
            });
        }
        Ok(())
    }
}

/// Machine state and dirty tracking, for moving a running guest to a new
/// VM (re-protection). Kept apart from the exit path above.
impl Vm {
    /// Finishes the exit the vCPU last returned, without running the guest:
    /// KVM completes a pending `in` or MMIO read (it copies the data the
    /// VMM gave with [`Vm::complete_read`] into the register or memory
    /// operand, and advances RIP) only at the next KVM_RUN. With
    /// `immediate_exit` set that KVM_RUN does the completion, then returns
    /// EINTR before entering the guest; on the way out it refreshes the
    /// synchronized registers. Until this runs, the registers KVM reports
    /// are those of the half-done instruction, and a state saved from them
    /// would replay the read.
    pub fn complete_pending(&mut self) -> Result<(), Error> {
        self.vcpu.set_kvm_immediate_exit(1);
        let outcome = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(Error::Complete(e.to_string())),
            Ok(exit) => Err(Error::Complete(format!("exit {exit:?}"))),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        outcome
    }

    /// Completes any pending I/O or MMIO read (see `complete_pending`) and
    /// reads the whole vCPU state. Call on the vCPU thread between exits,
    /// after the exit was handled; the guest can go on running afterwards.
    pub fn save_state(&mut self) -> Result<VcpuState, Error> {
        self.complete_pending()?;
        let get = |part: &'static str| move |source| Error::SaveState { part, source };
        let regs = self.vcpu.get_regs().map_err(get("registers"))?;
        let sregs = self.vcpu.get_sregs().map_err(get("special registers"))?;
        let fpu = self.vcpu.get_fpu().map_err(get("FPU"))?;
        let xsave = if self.kvm.check_extension(Cap::Xsave) {
            let x = self.vcpu.get_xsave().map_err(get("XSAVE area"))?;
            Some(state::xsave_words(&x))
        } else {
            None
        };
        let xcrs = if self.kvm.check_extension(Cap::Xcrs) {
            state::xcr_pairs(&self.vcpu.get_xcrs().map_err(get("XCRs"))?)
        } else {
            Vec::new()
        };
        let entries: Vec<kvm_msr_entry> = state::SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::BadState("too many MSRs"))?;
        let read = self.vcpu.get_msrs(&mut msrs).map_err(get("MSRs"))?;
        if read < entries.len() {
            return Err(Error::Msr {
                index: entries[read].index,
                write: false,
            });
        }
        let msrs = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let events = self.vcpu.get_vcpu_events().map_err(get("pending events"))?;
        let mp = self.vcpu.get_mp_state().map_err(get("MP state"))?;
        Ok(VcpuState {
            regs: state::Regs::from(&regs),
            sregs: state::Sregs::from(&sregs),
            fpu: state::Fpu::from(&fpu),
            xsave,
            xcrs,
            msrs,
            events: state::Events::from(&events),
            mp_state: mp.mp_state,
        })
    }

    /// Loads a saved state onto this vCPU, which has not run yet (a fresh
    /// VM from [`Vm::new`]; [`Vm::setup_long_mode`] is not needed). The
    /// order matters: control registers and EFER before the registers and
    /// MSRs that only make sense in long mode, pending events after the
    /// state they refer to.
    ///
    /// The synchronized register area is never marked dirty, so KVM keeps
    /// what is set here; a KVM_RUN that exits at once then refreshes that
    /// area, so that [`Vm::regs`] and [`Vm::ready_for_injection`] answer
    /// for the restored state even before the next exit.
    pub fn restore_state(&mut self, s: &VcpuState) -> Result<(), Error> {
        let xsave = match &s.xsave {
            Some(words) => Some(
                state::xsave_from_words(words).ok_or(Error::BadState("XSAVE area not 4 KiB"))?,
            ),
            None => None,
        };
        let xcrs = state::xcrs_from_pairs(&s.xcrs).ok_or(Error::BadState("too many XCRs"))?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::BadState("too many MSRs"))?;

        let set = |part: &'static str| move |source| Error::RestoreState { part, source };
        self.vcpu
            .set_sregs(&kvm_bindings::kvm_sregs::from(&s.sregs))
            .map_err(set("special registers"))?;
        self.vcpu
            .set_regs(&kvm_regs::from(&s.regs))
            .map_err(set("registers"))?;
        self.vcpu
            .set_fpu(&kvm_fpu::from(&s.fpu))
            .map_err(set("FPU"))?;
        if let Some(x) = &xsave {
            // SAFETY: KVM_SET_XSAVE reads the 4 KiB kvm_xsave that `x` is;
            // it would read beyond only for dynamically enabled XSTATE
            // features (AMX), which Duet never asks for
            // (ARCH_REQ_XCOMP_GUEST_PERM), so the area is exactly that size.
            unsafe { self.vcpu.set_xsave(x) }.map_err(set("XSAVE area"))?;
        }
        if !s.xcrs.is_empty() {
            self.vcpu.set_xcrs(&xcrs).map_err(set("XCRs"))?;
        }
        let written = self.vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
        if written < entries.len() {
            return Err(Error::Msr {
                index: entries[written].index,
                write: true,
            });
        }
        self.vcpu
            .set_vcpu_events(&kvm_bindings::kvm_vcpu_events::from(&s.events))
            .map_err(set("pending events"))?;
        self.vcpu
            .set_mp_state(state::mp_state(s.mp_state))
            .map_err(set("MP state"))?;
        self.complete_pending()
    }

    /// Turns KVM's dirty page logging on or off for every memory slot.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), Error> {
        for desc in &mut self.slots {
            desc.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the same mapping as registered in `new`, still owned
            // by the caller's guest memory, which outlives the VM; only the
            // flags change.
            unsafe { self.vm.set_user_memory_region(*desc) }.map_err(|source| {
                Error::DirtyLogging {
                    slot: desc.slot,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// ORs into `into` the pages the guest wrote since the last call (or
    /// since logging was turned on), and clears KVM's log.
    pub fn dirty_log(&self, into: &mut DirtyPages) -> Result<(), Error> {
        for desc in &self.slots {
            let bits = self
                .vm
                .get_dirty_log(desc.slot, desc.memory_size as usize)
                .map_err(|source| Error::GetDirtyLog {
                    slot: desc.slot,
                    source,
                })?;
            into.or_bitmap(desc.guest_phys_addr / PAGE_SIZE, &bits);
        }
        Ok(())
    }
}
