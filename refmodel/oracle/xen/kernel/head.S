/*
 * Entry, exception entries and the guarded memory-access stubs of the refmodel Xen
 * test kernel (a 64-bit PV dom0). See main.c for what the kernel does.
 *
 * Built by refmodel/oracle/xen/boot.py with -DKERNEL_BASE=... etc. taken from
 * refmodel/oracle/xen/program.py.
 */

/* An ELF note Xen's libelf reads: namesz 4 ("Xen\0"), descsz, type
 * (type numbers: xen/include/public/elfnote.h). */
#define NOTE(type, desc_sz) .long 4, desc_sz, type; .asciz "Xen"; .balign 4

    .section .note.Xen, "a", @note
    .balign 4
    NOTE(8, 8)   /* XEN_ELFNOTE_LOADER: "generic" is what a non-Linux PV image uses */
    .asciz "generic"; .balign 4
    NOTE(5, 8)   /* XEN_ELFNOTE_XEN_VERSION: must be "xen-3.0" */
    .asciz "xen-3.0"; .balign 4
    NOTE(6, 9)   /* XEN_ELFNOTE_GUEST_OS */
    .asciz "refmodel"; .balign 4
    NOTE(1, 8)   /* XEN_ELFNOTE_ENTRY */
    .quad _start
    NOTE(3, 8)   /* XEN_ELFNOTE_VIRT_BASE: 0, so a kernel VA below the hole is pfn<<12 */
    .quad 0
    NOTE(4, 8)   /* XEN_ELFNOTE_PADDR_OFFSET */
    .quad 0

    .text
/*
 * Xen starts a PV kernel in long mode (ring 3, guest kernel mode) with %rsi pointing
 * at start_info (xen/include/public/xen.h). Switch to our own stack in .bss so that
 * its size is known, then run kmain(start_info), which never returns.
 */
    .globl _start
_start:
    lea   boot_stack_top(%rip), %rsp
    mov   %rsi, %rdi
    call  kmain
1:  jmp   1b

/*
 * Exception entries, one per vector, registered with HYPERVISOR_set_trap_table.
 * Xen bounces an exception onto the current guest stack (kernel mode: no stack
 * switch), 16-byte aligned, as built by create_bounce_frame in
 * xen/arch/x86/x86_64/entry.S:
 *     %rsp -> rcx, r11, [error code], rip, cs, rflags, rsp, ss
 * (the error code only for vectors that have one, TBF_EXCEPTION_ERRCODE).
 * Each entry passes (frame, vector, has_error_code) to trap_handler() in main.c.
 */
.macro TRAP_ENTRY vec, has_ec
    .globl trap_entry_\vec
trap_entry_\vec:
    mov   %rsp, %rdi
    mov   $\vec, %esi
    mov   $\has_ec, %edx
    jmp   trap_common
.endm

/* Vectors with an error code: 8 #DF, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 14 #PF,
 * 17 #AC, 21 #CP (Intel SDM vol. 3, table 6-1). */
    TRAP_ENTRY 0, 0
    TRAP_ENTRY 1, 0
    TRAP_ENTRY 2, 0
    TRAP_ENTRY 3, 0
    TRAP_ENTRY 4, 0
    TRAP_ENTRY 5, 0
    TRAP_ENTRY 6, 0
    TRAP_ENTRY 7, 0
    TRAP_ENTRY 8, 1
    TRAP_ENTRY 9, 0
    TRAP_ENTRY 10, 1
    TRAP_ENTRY 11, 1
    TRAP_ENTRY 12, 1
    TRAP_ENTRY 13, 1
    TRAP_ENTRY 14, 1
    TRAP_ENTRY 15, 0
    TRAP_ENTRY 16, 0
    TRAP_ENTRY 17, 1
    TRAP_ENTRY 18, 0
    TRAP_ENTRY 19, 0
    TRAP_ENTRY 20, 0
    TRAP_ENTRY 21, 1

/*
 * trap_handler() returns only when the fault happened inside one of the access
 * stubs below; it has then filled resume_ctx, a struct iret_context
 * (xen/include/public/arch-x86/xen-x86_64.h: rax, r11, rcx, flags, rip, cs, rflags,
 * rsp, ss) that resumes at access_recover. HYPERVISOR_iret (__HYPERVISOR_iret = 23,
 * xen/include/public/xen.h) reads that context at the guest %rsp of the hypercall
 * (do_iret in xen/arch/x86/pv/iret.c), so point %rsp at it and make the hypercall.
 * Callee-saved registers survive: only C code that preserves them ran since the
 * fault, and the stub that faulted did not use them.
 */
trap_common:
    and   $-16, %rsp            /* the C ABI's alignment; the frame stays above */
    call  trap_handler
    lea   resume_ctx(%rip), %rsp
    mov   $23, %eax             /* __HYPERVISOR_iret */
    syscall
    .globl not_reached
not_reached:                    /* (also a #UD for the harness's crash test) */
    ud2

/*
 * The guarded accesses. Each records the %rsp at its entry and arms the handler
 * (access_armed = 1, or 2 for a fetch), runs the one instruction that may fault,
 * and returns 0. After a #PF/#GP at that instruction (or, for a fetch, at its
 * target) trap_handler resumes at access_recover with %rsp restored, which
 * returns 1 to the caller.
 *   long xp_read(u64 va, u64 *out);  long xp_write(u64 va, u64 value);
 *   long xp_fetch(u64 va);
 */
    .globl xp_read, xp_write, xp_fetch, xp_read_insn, xp_write_insn, xp_fetch_insn, access_recover
xp_read:
    mov   %rsp, access_rsp(%rip)
    movq  $1, access_armed(%rip)
xp_read_insn:
    mov   (%rdi), %rax
    movq  $0, access_armed(%rip)
    mov   %rax, (%rsi)
    xor   %eax, %eax
    ret

xp_write:
    mov   %rsp, access_rsp(%rip)
    movq  $1, access_armed(%rip)
xp_write_insn:
    mov   %rsi, (%rdi)
    movq  $0, access_armed(%rip)
    xor   %eax, %eax
    ret

xp_fetch:
    mov   %rsp, access_rsp(%rip)
    mov   %rdi, access_target(%rip)
    movq  $2, access_armed(%rip)
xp_fetch_insn:
    call  *%rdi                 /* the program puts a `ret` (0xC3) at the target */
    movq  $0, access_armed(%rip)
    xor   %eax, %eax
    ret

access_recover:
    movq  $0, access_armed(%rip)
    mov   $1, %eax
    ret

    .bss
    .balign 16
boot_stack:
    .skip 65536
boot_stack_top:
