//! Ring 0: the whole kernel of a Duet guest.
//!
//! Ring 0 is emulated on the development platform (about 0.6 µs per
//! instruction) while ring 3 runs natively, so the kernel does only what ring
//! 3 cannot: it fills the IDT, programs the PIC, PIT and COM1, then `iretq`s
//! into ring 3 for good. After that ring 0 runs only to take interrupts, and
//! those handlers are a handful of instructions in assembly that save only
//! the registers they use and never touch SSE state.
//!
//! Vector map (gates are interrupt gates, selector 0x08, IST1, DPL0):
//!
//! | vector | handler |
//! |---|---|
//! | 0x20 (IRQ0, PIT) | increments [`ticks`](crate::ticks), EOI |
//! | 0x24 (IRQ4, COM1) | increments [`serial_irqs`](crate::serial_irqs), EOI |
//! | 0x25 (IRQ5, virtio-net) | increments [`net_irqs`](crate::net_irqs), EOI (masked until an image calls [`enable_irq`](crate::enable_irq)`(5)`) |
//! | 0x27 (IRQ7) | spurious: `iretq` without EOI |
//! | 0x2f (IRQ15) | spurious: EOI to the master only |
//! | anything else | fatal: report on COM1 and power off (see [`exit_code`]) |

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::pv;

/// Exit codes (the low byte written to the power-off register) for fatal
/// ends of a guest.
pub mod exit_code {
    /// CPU exception `v` with `v <= 14` ends with `EXCEPTION_BASE + v`:
    /// 0x70 #DE, 0x71 #DB, 0x72 NMI, 0x73 #BP, 0x74 #OF, 0x75 #BR, 0x76 #UD,
    /// 0x77 #NM, 0x78 #DF, 0x79 (coprocessor overrun), 0x7a #TS, 0x7b #NP,
    /// 0x7c #SS, 0x7d #GP, 0x7e #PF.
    pub const EXCEPTION_BASE: u8 = 0x70;
    /// Any other vector that reaches the fatal handler: exceptions 15..=31
    /// (#MF, #AC, #MC, #XM, ...) and interrupts nobody expected.
    pub const OTHER_VECTOR: u8 = 0x7f;
    /// A Rust panic in the guest.
    pub const PANIC: u8 = 0x6f;
}

/// Exit code for a fatal `vector`.
pub const fn fatal_exit_code(vector: u64) -> u8 {
    if vector <= 14 {
        exit_code::EXCEPTION_BASE + vector as u8
    } else {
        exit_code::OTHER_VECTOR
    }
}

// The ring-0 kernel. AT&T syntax, so that `push $sym` is unambiguous.
//
// _start runs at CPL0 with interrupts off, RSP on the boot stack and RDI =
// guest memory size (docs/ARCHITECTURE.md, "Guest ABI").
global_asm!(
    r#"
    .section .text.duet_start, "ax", @progbits
    .code64
    .global _start
_start:
    movq %rdi, DUET_MEM_SIZE(%rip)
    cld

    /* Every gate first points at its fatal stub (16 bytes apart). */
    leaq __duet_vector_stubs(%rip), %rax
    movl $0x8000, %edi
    movl $256, %ecx
1:
    call __duet_set_gate
    addq $16, %rax
    addq $16, %rdi
    decl %ecx
    jnz 1b

    /* Then the interrupts we expect get their real handlers. */
    leaq __duet_irq0(%rip), %rax
    movl $(0x8000 + 0x20 * 16), %edi
    call __duet_set_gate
    leaq __duet_irq4(%rip), %rax
    movl $(0x8000 + 0x24 * 16), %edi
    call __duet_set_gate
    leaq __duet_irq5(%rip), %rax
    movl $(0x8000 + 0x25 * 16), %edi
    call __duet_set_gate
    leaq __duet_irq7(%rip), %rax
    movl $(0x8000 + 0x27 * 16), %edi
    call __duet_set_gate
    leaq __duet_irq15(%rip), %rax
    movl $(0x8000 + 0x2f * 16), %edi
    call __duet_set_gate

    /* PIC pair: ICW1 (edge, cascade, ICW4 follows), ICW2 vector bases
       0x20/0x28, ICW3 slave on IRQ2, ICW4 8086 mode. */
    movb $0x11, %al
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x20, %al
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xa1
    movb $0x04, %al
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xa1
    movb $0x01, %al
    outb %al, $0x21
    outb %al, $0xa1
    /* Masks: only IRQ0 (PIT), IRQ2 (cascade) and IRQ4 (COM1) open; an
       image opens others with duet_rt::enable_irq (which keeps its own
       copy of these values, PIC_MASKS in lib.rs). */
    movb $0xea, %al
    outb %al, $0x21
    movb $0xff, %al
    outb %al, $0xa1

    /* PIT channel 0, lobyte/hibyte, mode 2 (rate generator), binary. The
       divisor comes from the image (duet_rt::entry!). */
    movb $0x34, %al
    outb %al, $0x43
    movw DUET_PIT_DIVISOR(%rip), %ax
    outb %al, $0x40
    movb %ah, %al
    outb %al, $0x40

    /* COM1: 115200 8N1, FIFO on, DTR|RTS|OUT2, interrupt on received data. */
    movw $0x3f9, %dx
    xorb %al, %al
    outb %al, %dx
    movw $0x3fb, %dx
    movb $0x80, %al
    outb %al, %dx
    movw $0x3f8, %dx
    movb $0x01, %al
    outb %al, %dx
    movw $0x3f9, %dx
    xorb %al, %al
    outb %al, %dx
    movw $0x3fb, %dx
    movb $0x03, %al
    outb %al, %dx
    movw $0x3fa, %dx
    movb $0xc7, %al
    outb %al, %dx
    movw $0x3fc, %dx
    movb $0x0b, %al
    outb %al, %dx
    movw $0x3f9, %dx
    movb $0x01, %al
    outb %al, %dx

    /* Into ring 3 for good: SS, RSP, RFLAGS (IF=1, IOPL=3), CS, RIP. */
    leaq __duet_stack_top(%rip), %rax
    pushq $0x1b
    pushq %rax
    pushq $0x3202
    pushq $0x23
    leaq __duet_user_entry(%rip), %rax
    pushq %rax
    iretq

/* Writes the 16-byte interrupt gate at (%rdi) for handler %rax:
   selector 0x08, IST1, present, DPL0, 64-bit interrupt gate (type 0xe).
   Clobbers %rdx and %r8. */
__duet_set_gate:
    movq %rax, %rdx
    andq $0xffff, %rdx
    movq %rax, %r8
    shrq $16, %r8
    andq $0xffff, %r8
    shlq $48, %r8
    orq %r8, %rdx
    movabsq $0x00008e0100080000, %r8
    orq %r8, %rdx
    movq %rdx, (%rdi)
    movq %rax, %rdx
    shrq $32, %rdx
    movq %rdx, 8(%rdi)
    ret

/* IRQ0: the PIT tick. */
    .p2align 4
__duet_irq0:
    incq DUET_TICKS(%rip)
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20
    popq %rax
    iretq

/* IRQ4: COM1 received data. Ring 3 reads the data; this only wakes it. */
    .p2align 4
__duet_irq4:
    incq DUET_SERIAL_IRQS(%rip)
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20
    popq %rax
    iretq

/* IRQ5: the virtio-net device. Ring 3 acknowledges the device and
   drains its queues; this only wakes it. */
    .p2align 4
__duet_irq5:
    incq DUET_NET_IRQS(%rip)
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20
    popq %rax
    iretq

/* Spurious IRQ7: the master never set ISR bit 7, so no EOI. */
    .p2align 4
__duet_irq7:
    iretq

/* Spurious IRQ15: the slave did not set ISR bit 7, but the master did set
   bit 2 for the cascade, so only the master gets an EOI. */
    .p2align 4
__duet_irq15:
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20
    popq %rax
    iretq

/* One 16-byte stub per vector: push a zero error code where the CPU pushes
   none, push the vector, go to the fatal handler. */
    .p2align 4
__duet_vector_stubs:
    .set duet_vec, 0
    .rept 256
    .if (duet_vec == 8) || (duet_vec == 10) || (duet_vec == 11) || (duet_vec == 12) || (duet_vec == 13) || (duet_vec == 14) || (duet_vec == 17) || (duet_vec == 21) || (duet_vec == 29) || (duet_vec == 30)
    .else
    pushq $0
    .endif
    pushq $duet_vec
    jmp __duet_fatal_vector
    .p2align 4
    .set duet_vec, duet_vec + 1
    .endr
__duet_vector_stubs_end:

/* Stack (IST1): vector, error code, RIP, CS, RFLAGS, RSP, SS. */
__duet_fatal_vector:
    movq (%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    andq $-16, %rsp
    call {fatal}
    ud2

/* First ring-3 instruction: align the stack for the SysV ABI, enter Rust. */
__duet_user_entry:
    andq $-16, %rsp
    call {user_start}
    ud2

    .section .data.duet, "aw", @progbits
    .p2align 3
    .global DUET_TICKS
DUET_TICKS:
    .quad 0
    .global DUET_SERIAL_IRQS
DUET_SERIAL_IRQS:
    .quad 0
    .global DUET_NET_IRQS
DUET_NET_IRQS:
    .quad 0
    .global DUET_MEM_SIZE
DUET_MEM_SIZE:
    .quad 0

    .section .duet_stack, "aw", @nobits
    .p2align 12
    .space 256 * 1024
__duet_stack_top:

    .text
"#,
    fatal = sym fatal,
    user_start = sym user_start,
    options(att_syntax),
);

/// Set once the fatal handler runs, so that a fault inside it powers off
/// at once instead of recursing.
static IN_FATAL: AtomicBool = AtomicBool::new(false);

/// Reports an unexpected vector on COM1 and powers off. Runs in ring 0 on
/// the IST1 stack; it never returns, so clobbering SSE state is harmless.
extern "C" fn fatal(vector: u64, error_code: u64, rip: u64) -> ! {
    let code = fatal_exit_code(vector);
    if IN_FATAL.swap(true, Ordering::Relaxed) {
        pv::power_off(code);
    }
    crate::println!(
        "guest exception {} rip {:x} err {:x}",
        vector,
        rip,
        error_code
    );
    pv::power_off(code)
}

/// First Rust code, in ring 3: clear .bss, set up the heap, run the image.
extern "C" fn user_start() -> ! {
    extern "C" {
        static mut __duet_bss_start: u8;
        static mut __duet_bss_end: u8;
    }
    extern "Rust" {
        fn duet_main() -> !;
    }
    // SAFETY: the linker script brackets .bss with these symbols; nothing
    // lives there yet (the interrupt counters and the stack are elsewhere),
    // so zeroing it cannot clobber live state.
    unsafe {
        let start = &raw mut __duet_bss_start;
        let end = &raw mut __duet_bss_end;
        core::ptr::write_bytes(start, 0, end as usize - start as usize);
    }
    #[cfg(feature = "alloc")]
    crate::heap::init();
    // SAFETY: `duet_main` is defined by the image through `duet_rt::entry!`.
    unsafe { duet_main() }
}
