//! The vCPU's architectural state as plain, serializable values, for
//! moving a running guest to a fresh VM (re-protection).
//!
//! The set is what was shown to resume a guest exactly on this platform
//! (docs/ARCHITECTURE.md, Machine state): registers, special registers,
//! FPU, the 4 KiB XSAVE area, XCRs, a fixed list of MSRs, the pending
//! event state and the MP state. There is no LAPIC to move: the machine
//! has no in-kernel irqchip, the PIC model lives in the VMM.
//!
//! The structs mirror KVM's, field by field, instead of serializing KVM's
//! bytes: a state with a wrong length or a missing part then fails to
//! decode, rather than being padded or cut to fit as kvm-bindings' own
//! serde support does, and the format does not change with the bindings.

use kvm_bindings::{
    kvm_dtable, kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};

/// MSRs that carry guest state in long mode, all shown to read and write
/// back on this KVM. The TSC is left out on purpose: it is not
/// virtualized here and Duet's guests never read it.
pub const SAVED_MSRS: [u32; 13] = [
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0103, // TSC_AUX
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
];

/// Words in KVM's XSAVE area (4 KiB).
pub const XSAVE_WORDS: usize = 1024;
/// The most XCRs KVM reports.
const MAX_XCRS: usize = 16;

/// The whole vCPU state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub regs: Regs,
    pub sregs: Sregs,
    pub fpu: Fpu,
    /// The XSAVE area, [`XSAVE_WORDS`] words; None where KVM has no XSAVE
    /// (the FPU state then carries x87 and SSE alone).
    pub xsave: Option<Vec<u32>>,
    /// XCR index and value pairs; empty without XSAVE.
    pub xcrs: Vec<(u32, u64)>,
    /// MSR index and value pairs, in [`SAVED_MSRS`] order.
    pub msrs: Vec<(u32, u64)>,
    pub events: Events,
    /// KVM_MP_STATE_RUNNABLE, HALTED, ...
    pub mp_state: u32,
}

/// The general registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Regs {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP, R8-R15, in that order.
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

impl From<&kvm_regs> for Regs {
    fn from(r: &kvm_regs) -> Self {
        Regs {
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&Regs> for kvm_regs {
    fn from(r: &Regs) -> Self {
        let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15] = r.gprs;
        kvm_regs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

/// A segment register with its hidden part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Self {
        Segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<&Segment> for kvm_segment {
    fn from(s: &Segment) -> Self {
        kvm_segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Dtable {
    pub base: u64,
    pub limit: u16,
}

/// Segments, descriptor tables, control registers, EFER, the APIC base
/// and KVM's bitmap of pending external interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Sregs {
    /// CS, DS, ES, FS, GS, SS, TR, LDT, in that order.
    pub segments: [Segment; 8],
    pub gdt: Dtable,
    pub idt: Dtable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

impl From<&kvm_sregs> for Sregs {
    fn from(s: &kvm_sregs) -> Self {
        let seg = |x: &kvm_segment| Segment::from(x);
        let dt = |d: &kvm_dtable| Dtable {
            base: d.base,
            limit: d.limit,
        };
        Sregs {
            segments: [
                seg(&s.cs),
                seg(&s.ds),
                seg(&s.es),
                seg(&s.fs),
                seg(&s.gs),
                seg(&s.ss),
                seg(&s.tr),
                seg(&s.ldt),
            ],
            gdt: dt(&s.gdt),
            idt: dt(&s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kvm_sregs {
    fn from(s: &Sregs) -> Self {
        let seg = |i: usize| kvm_segment::from(&s.segments[i]);
        let dt = |d: &Dtable| kvm_dtable {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        };
        kvm_sregs {
            cs: seg(0),
            ds: seg(1),
            es: seg(2),
            fs: seg(3),
            gs: seg(4),
            ss: seg(5),
            tr: seg(6),
            ldt: seg(7),
            gdt: dt(&s.gdt),
            idt: dt(&s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

/// The x87 and SSE state as KVM_GET_FPU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            pad1: 0,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: 0,
        }
    }
}

/// Exceptions, interrupts and NMIs KVM has pending or half-injected, the
/// interrupt shadow, and SMM: `KVM_GET_VCPU_EVENTS`. An interrupt queued
/// with `KVM_INTERRUPT` at the last exit and not yet taken lives here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Events {
    /// injected, nr, has_error_code, pending.
    pub exception: [u8; 4],
    pub exception_error_code: u32,
    /// injected, nr, soft, shadow.
    pub interrupt: [u8; 4],
    /// injected, pending, masked.
    pub nmi: [u8; 3],
    pub sipi_vector: u32,
    pub flags: u32,
    /// smm, pending, smm_inside_nmi, latched_init.
    pub smi: [u8; 4],
    pub triple_fault_pending: u8,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
}

impl From<&kvm_vcpu_events> for Events {
    fn from(e: &kvm_vcpu_events) -> Self {
        Events {
            exception: [
                e.exception.injected,
                e.exception.nr,
                e.exception.has_error_code,
                e.exception.pending,
            ],
            exception_error_code: e.exception.error_code,
            interrupt: [
                e.interrupt.injected,
                e.interrupt.nr,
                e.interrupt.soft,
                e.interrupt.shadow,
            ],
            nmi: [e.nmi.injected, e.nmi.pending, e.nmi.masked],
            sipi_vector: e.sipi_vector,
            flags: e.flags,
            smi: [
                e.smi.smm,
                e.smi.pending,
                e.smi.smm_inside_nmi,
                e.smi.latched_init,
            ],
            triple_fault_pending: e.triple_fault.pending,
            exception_has_payload: e.exception_has_payload,
            exception_payload: e.exception_payload,
        }
    }
}

impl From<&Events> for kvm_vcpu_events {
    fn from(e: &Events) -> Self {
        let mut k = kvm_vcpu_events::default();
        [
            k.exception.injected,
            k.exception.nr,
            k.exception.has_error_code,
            k.exception.pending,
        ] = e.exception;
        k.exception.error_code = e.exception_error_code;
        [
            k.interrupt.injected,
            k.interrupt.nr,
            k.interrupt.soft,
            k.interrupt.shadow,
        ] = e.interrupt;
        [k.nmi.injected, k.nmi.pending, k.nmi.masked] = e.nmi;
        k.sipi_vector = e.sipi_vector;
        // The flags say which optional parts are valid; KVM_SET_VCPU_EVENTS
        // reads exactly those.
        k.flags = e.flags;
        [
            k.smi.smm,
            k.smi.pending,
            k.smi.smm_inside_nmi,
            k.smi.latched_init,
        ] = e.smi;
        k.triple_fault.pending = e.triple_fault_pending;
        k.exception_has_payload = e.exception_has_payload;
        k.exception_payload = e.exception_payload;
        k
    }
}

/// The XSAVE area as words.
pub fn xsave_words(x: &kvm_xsave) -> Vec<u32> {
    x.region.to_vec()
}

/// An XSAVE area from words; None unless there are exactly [`XSAVE_WORDS`].
pub fn xsave_from_words(words: &[u32]) -> Option<kvm_xsave> {
    let region: [u32; XSAVE_WORDS] = words.try_into().ok()?;
    Some(kvm_xsave {
        region,
        ..Default::default()
    })
}

/// The XCRs KVM reported, as pairs.
pub fn xcr_pairs(x: &kvm_xcrs) -> Vec<(u32, u64)> {
    x.xcrs
        .iter()
        .take((x.nr_xcrs as usize).min(MAX_XCRS))
        .map(|x| (x.xcr, x.value))
        .collect()
}

/// KVM's XCR block from pairs; None if there are more than it holds.
pub fn xcrs_from_pairs(pairs: &[(u32, u64)]) -> Option<kvm_xcrs> {
    if pairs.len() > MAX_XCRS {
        return None;
    }
    let mut x = kvm_xcrs {
        nr_xcrs: pairs.len() as u32,
        ..Default::default()
    };
    for (slot, (xcr, value)) in x.xcrs.iter_mut().zip(pairs) {
        slot.xcr = *xcr;
        slot.value = *value;
    }
    Some(x)
}

/// KVM's MP state from its number.
pub fn mp_state(n: u32) -> kvm_mp_state {
    kvm_mp_state { mp_state: n }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut regs = kvm_regs {
            rip: 0x10_1234,
            rflags: 0x246,
            ..Default::default()
        };
        regs.rax = 1;
        regs.r15 = 15;
        let mut sregs = kvm_sregs {
            cr0: 0x8001_0033,
            efer: 0x501,
            ..Default::default()
        };
        sregs.cs.selector = 8;
        sregs.cs.l = 1;
        sregs.tr.base = 0xa000;
        sregs.ldt.unusable = 1;
        sregs.idt.limit = 0xfff;
        sregs.interrupt_bitmap[1] = 1 << 5;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[15][3] = 9;
        let mut events = kvm_vcpu_events::default();
        events.interrupt.injected = 1;
        events.interrupt.nr = 0x20;
        events.flags = 3;
        events.exception_payload = 77;
        VcpuState {
            regs: Regs::from(&regs),
            sregs: Sregs::from(&sregs),
            fpu: Fpu::from(&fpu),
            xsave: Some((0..XSAVE_WORDS as u32).collect()),
            xcrs: vec![(0, 3)],
            msrs: SAVED_MSRS.iter().map(|&m| (m, u64::from(m) * 3)).collect(),
            events: Events::from(&events),
            mp_state: 0,
        }
    }

    #[test]
    fn kvm_structs_convert_both_ways() {
        let s = sample();
        assert_eq!(Regs::from(&kvm_regs::from(&s.regs)), s.regs);
        assert_eq!(kvm_regs::from(&s.regs).r15, 15);
        assert_eq!(Sregs::from(&kvm_sregs::from(&s.sregs)), s.sregs);
        assert_eq!(kvm_sregs::from(&s.sregs).tr.base, 0xa000);
        assert_eq!(Fpu::from(&kvm_fpu::from(&s.fpu)), s.fpu);
        let ev = kvm_vcpu_events::from(&s.events);
        assert_eq!((ev.interrupt.injected, ev.interrupt.nr), (1, 0x20));
        assert_eq!(Events::from(&ev), s.events);
        let xsave = xsave_from_words(s.xsave.as_deref().unwrap()).unwrap();
        assert_eq!(xsave_words(&xsave), s.xsave.clone().unwrap());
        assert!(xsave_from_words(&[0; 10]).is_none());
        assert_eq!(xcr_pairs(&xcrs_from_pairs(&s.xcrs).unwrap()), s.xcrs);
        assert!(xcrs_from_pairs(&[(0, 0); 17]).is_none());
    }

    #[test]
    fn state_round_trips_through_postcard_and_refuses_truncation() {
        let s = sample();
        let bytes = postcard::to_stdvec(&s).unwrap();
        let back: VcpuState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        assert!(postcard::from_bytes::<VcpuState>(&bytes[..bytes.len() - 1]).is_err());
    }
}
