//! The only code in Duet that touches `kvm_ioctls`.
//!
//! It owns the VM and its single vCPU, puts the vCPU in long mode at the
//! guest's entry point, and converts KVM's exits into Duet's own [`Exit`],
//! which owns its data. Owning the data lets the vCPU loop read registers
//! (for the position) while it handles the exit, and keeps `kvm_ioctls`
//! types out of every layer above.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_fpu, kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::errno;

use crate::boot;

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
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
}

impl Vm {
    /// Opens `/dev/kvm`, creates the VM, maps `mem` at guest-physical 0 and
    /// creates the vCPU with synchronized registers enabled (so reading RIP
    /// at every exit costs no ioctl).
    pub fn new(mem: &GuestMemoryMmap, kvm_path: &Path) -> Result<Self, Error> {
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
        }
        let mut vcpu = vm.create_vcpu(0).map_err(Error::CreateVcpu)?;
        // CPUID has no effect on kvm_pvm (docs/ARCHITECTURE.md, platform facts), but on real KVM the
        // guest needs the host's features (SSE, long mode) reported.
        if let Ok(cpuid) = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            vcpu.set_cpuid2(&cpuid).map_err(Error::SetupRegs)?;
        }
        vcpu.set_sync_valid_reg(SyncReg::Register);
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            vcpu,
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
