/*
 * The refmodel Xen test kernel: a freestanding 64-bit PV kernel that Xen 4.17
 * boots as dom0. It reports how Xen built it (start_info, the P2M, foreign
 * frames, the boot page tables), then runs the *program* in its boot module --
 * hypercalls and guarded memory accesses -- printing one result line each. The
 * program encoding and the output lines are specified in the docstring of
 * refmodel/oracle/xen/program.py; boot.py builds, boots and parses this.
 *
 * Every change to the page tables is one the program asks for: the kernel maps
 * nothing itself (not even shared_info), and never touches SCRATCH_VA or MASK_VA.
 *
 * KERNEL_BASE, SCRATCH_VA, MASK_VA, VCPU_INFO_VA, FOREIGN_BASE, NR_FOREIGN,
 * SYM_BOOT_L4 and SYM_BOOT_L3 come from program.py as -D flags.
 */
#include <stdint.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

/* Hypercall numbers: xen/include/public/xen.h. */
#define HC_set_trap_table    0
#define HC_mmu_update        1
#define HC_multicall        13
#define HC_update_va_mapping 14
#define HC_console_io       18
#define HC_vcpu_op          24
#define HC_mmuext_op        26
#define HC_sched_op         29

#define CONSOLEIO_write           0      /* xen.h */
#define DOMID_SELF                0x7FF0 /* xen.h */
#define SCHEDOP_shutdown          2      /* sched.h */
#define SHUTDOWN_reboot           1      /* sched.h: QEMU's -no-reboot then exits */
#define VCPUOP_register_vcpu_info 10     /* vcpu.h */
/* FLAT_KERNEL_CS = FLAT_RING3_CS64: xen/include/public/arch-x86/xen-x86_64.h. */
#define FLAT_KERNEL_CS            0xe033

/* Page-table entry bits 51:12 hold the frame (program.py ADDR_BITS). */
#define ADDR_BITS 0x000ffffffffff000ull
#define PTE_P     0x1ull
#define PTE_PSE   0x80ull

/* start_info: xen/include/public/xen.h (struct start_info). */
struct start_info {
    char magic[32];
    u64 nr_pages;
    u64 shared_info;
    u32 flags;
    u64 store_mfn;
    u32 store_evtchn;
    u64 console_mfn;
    u32 console_evtchn;
    u64 pt_base;
    u64 nr_pt_frames;
    u64 mfn_list;
    u64 mod_start;
    u64 mod_len;
    /* cmd_line etc. follow; not used */
};

/* xen/include/public/arch-x86/xen.h */
struct trap_info {
    u8 vector;
    u8 flags;   /* bits 0-1: DPL for software int; bit 2: mask events on entry */
    u16 cs;
    u64 address;
};

/* xen/include/public/xen.h */
struct multicall_entry {
    u64 op, result;
    u64 args[6];
};

/* xen/include/public/vcpu.h */
struct vcpu_register_vcpu_info {
    u64 mfn;
    u32 offset;
    u32 rsvd;
};

/* xen/include/public/arch-x86/xen-x86_64.h */
struct iret_context {
    u64 rax, r11, rcx, flags, rip, cs, rflags, rsp, ss;
};

/*
 * Offset of vcpu_info.arch.cr2 (xen/include/public/xen.h struct vcpu_info:
 * u8 evtchn_upcall_pending @0, u8 evtchn_upcall_mask @1, xen_ulong_t
 * evtchn_pending_sel @8, struct arch_vcpu_info arch @16; arch-x86/xen-x86_64.h
 * struct arch_vcpu_info: unsigned long cr2 @0). Xen stores CR2 there when it
 * injects a #PF (arch_set_cr2 in xen/arch/x86/pv/traps.c pv_inject_event).
 */
#define VCPU_INFO_CR2 16

/* The fixed pages placed by link.lds. */
extern u8 vcpu_info_page[4096];

/* head.S */
extern long xp_read(u64 va, u64 *out);
extern long xp_write(u64 va, u64 value);
extern long xp_fetch(u64 va);
extern char xp_read_insn[], xp_write_insn[], xp_fetch_insn[], access_recover[];
#define TRAP_DECL(n) extern char trap_entry_##n[];
TRAP_DECL(0) TRAP_DECL(1) TRAP_DECL(2) TRAP_DECL(3) TRAP_DECL(4) TRAP_DECL(5)
TRAP_DECL(6) TRAP_DECL(7) TRAP_DECL(8) TRAP_DECL(9) TRAP_DECL(10) TRAP_DECL(11)
TRAP_DECL(12) TRAP_DECL(13) TRAP_DECL(14) TRAP_DECL(15) TRAP_DECL(16) TRAP_DECL(17)
TRAP_DECL(18) TRAP_DECL(19) TRAP_DECL(20) TRAP_DECL(21)

/* Shared with head.S. */
volatile u64 access_armed;   /* 0 no, 1 read/write, 2 fetch */
u64 access_rsp;              /* %rsp at the stub's entry */
u64 access_target;           /* a fetch's target */
struct iret_context resume_ctx;

/* What the last fault in a stub was. */
static struct { u64 vector, error_code, cr2; } fault;

/* -- hypercalls: `syscall` from guest kernel mode, number in rax, arguments in
 * rdi, rsi, rdx, r10, r8; Xen clobbers rcx and r11 (entry.S lstar_enter). ---- */
static long hypercall(long nr, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
    long ret;
    register u64 r10 asm("r10") = a4;
    register u64 r8 asm("r8") = a5;
    asm volatile("syscall"
                 : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
                 : "a"(nr)
                 : "rcx", "r11", "memory");
    return ret;
}

/* -- console: each line is one console_io write, so Xen's own messages cannot
 * split it (guest_console_write in xen/drivers/char/console.c writes up to 127
 * bytes under the console lock). ------------------------------------------ */
static char line[512];
static unsigned line_len;

static void put_str(const char *s)
{
    while (*s && line_len < sizeof(line) - 1)
        line[line_len++] = *s++;
}

static void put_hex(u64 v)
{
    char b[19];
    int i = 18;
    b[i] = 0;
    do {
        unsigned d = v & 15;
        b[--i] = d < 10 ? '0' + d : 'a' + d - 10;
        v >>= 4;
    } while (v);
    b[--i] = 'x';
    b[--i] = '0';
    put_str(b + i);
}

static void put_udec(u64 v)
{
    char b[24];
    int i = 23;
    b[i] = 0;
    do {
        b[--i] = '0' + v % 10;
        v /= 10;
    } while (v);
    put_str(b + i);
}

static void put_dec(long v)
{
    if (v < 0) {
        put_str("-");
        put_udec(-(u64)v);
    } else {
        put_udec((u64)v);
    }
}

static void end_line(void)
{
    line[line_len++] = '\n';
    hypercall(HC_console_io, CONSOLEIO_write, line_len, (u64)line, 0, 0);
    line_len = 0;
}

static void __attribute__((noreturn)) shutdown(void)
{
    u64 reason = SHUTDOWN_reboot;
    for (;;)
        hypercall(HC_sched_op, SCHEDOP_shutdown, (u64)&reason, 0, 0, 0);
}

static void __attribute__((noreturn)) fail(const char *what)
{
    line_len = 0;
    put_str("XP error ");
    put_str(what);
    end_line();
    shutdown();
}

/* -- exceptions ------------------------------------------------------------- */
static struct trap_info trap_table[] = {
#define T(n) { n, 0, FLAT_KERNEL_CS, (u64)trap_entry_##n },
    T(0) T(1) T(2) T(3) T(4) T(5) T(6) T(7) T(8) T(9) T(10) T(11) T(12) T(13)
    T(14) T(15) T(16) T(17) T(18) T(19) T(20) T(21)
#undef T
    { 0, 0, 0, 0 }  /* terminator: address 0 (arch-x86/xen.h) */
};

/*
 * Called by head.S with the bounce frame Xen pushed (see trap_common): frame[0]
 * rcx, [1] r11, then, after the error code if any, rip, cs, rflags, rsp, ss.
 * Returns (to resume through HYPERVISOR_iret) only for a #PF or #GP raised by a
 * stub's access; anything else is a crash.
 */
void trap_handler(u64 *frame, u64 vector, u64 has_ec)
{
    u64 *iret = frame + 2 + has_ec;   /* rip, cs, rflags, rsp, ss */
    u64 rip = iret[0];
    u64 armed = access_armed;
    int at_stub = (armed == 1 && (rip == (u64)xp_read_insn || rip == (u64)xp_write_insn)) ||
                  (armed == 2 && (rip == (u64)xp_fetch_insn || rip == access_target));
    if (!at_stub || (vector != 13 && vector != 14)) {
        line_len = 0;
        put_str("XP crash vector=");
        put_udec(vector);
        put_str(" rip=");
        put_hex(rip);
        end_line();
        shutdown();
    }
    fault.vector = vector;
    fault.error_code = frame[2];
    fault.cr2 = vector == 14 ? *(volatile u64 *)(vcpu_info_page + VCPU_INFO_CR2) : 0;
    access_armed = 0;
    /* Resume at access_recover with the stub's entry %rsp (for a fetch the fault
     * happened after `call` pushed its return address). flags 0: Xen restores
     * rcx and r11 from the context (do_iret). rflags as Xen gave them keeps
     * EFLAGS.IF clear, so the event upcall mask stays set. */
    resume_ctx.rax = 1;
    resume_ctx.r11 = 0;
    resume_ctx.rcx = 0;
    resume_ctx.flags = 0;
    resume_ctx.rip = (u64)access_recover;
    resume_ctx.cs = iret[1];
    resume_ctx.rflags = iret[2];
    resume_ctx.rsp = access_rsp;
    resume_ctx.ss = iret[4];
}

/* -- dom0's frames ------------------------------------------------------------ */
static struct start_info *si;
static u64 *p2m;
static u64 nr_pages, boot_l4, boot_l3;
static u64 foreign[NR_FOREIGN];

/* mfns owned by dom0 (QEMU has 512 MiB: RAM frames are below 0x20000). */
#define MAX_MFN 0x100000
static u8 owned[MAX_MFN / 8];

static u64 machine_frame(u64 f)
{
    if (f < nr_pages)
        return p2m[f];
    if (f >= FOREIGN_BASE && f < FOREIGN_BASE + NR_FOREIGN)
        return foreign[f - FOREIGN_BASE];
    if (f == SYM_BOOT_L4)
        return boot_l4;
    if (f == SYM_BOOT_L3)
        return boot_l3;
    return f;
}

/* A readable VA of one of dom0's frames: Xen maps the boot page tables (and the
 * whole bootstrap region) read-only or writable at VA = pfn << 12 (VIRT_BASE 0). */
static const u64 *frame_va(u64 mfn)
{
    for (u64 pfn = 0; pfn < nr_pages; pfn++)
        if (p2m[pfn] == mfn)
            return (const u64 *)(pfn << 12);
    fail("a boot page table is not in the p2m");
}

static void find_foreign(void)
{
    for (u64 pfn = 0; pfn < nr_pages; pfn++)
        if (p2m[pfn] < MAX_MFN)
            owned[p2m[pfn] / 8] |= 1 << (p2m[pfn] % 8);
    /* Above low memory (which Xen may give to DOMID_IO), below 512 MiB. */
    u64 mfn = 0x8000;
    for (unsigned k = 0; k < NR_FOREIGN; k++) {
        while (mfn < 0x20000 && (owned[mfn / 8] >> (mfn % 8)) & 1)
            mfn++;
        if (mfn >= 0x20000)
            fail("no foreign frames");
        foreign[k] = mfn++;
    }
}

/* -- the boot page tables -------------------------------------------------- */
#define MAX_TABLES 64
static u64 dumped[MAX_TABLES];
static unsigned nr_dumped;

static void dump_table(unsigned level, u64 mfn)
{
    for (unsigned i = 0; i < nr_dumped; i++)
        if (dumped[i] == mfn)
            return;
    if (nr_dumped == MAX_TABLES)
        fail("too many boot page tables");
    dumped[nr_dumped++] = mfn;
    const u64 *t = frame_va(mfn);
    put_str("XP table ");
    put_udec(level);
    put_str(" ");
    put_hex(mfn);
    end_line();
    for (unsigned s = 0; s < 512;) {
        if (!t[s]) {
            s++;
            continue;
        }
        unsigned n = 1;
        while (s + n < 512 && t[s + n] == t[s] + n * 0x1000ull)
            n++;
        put_str("XP run ");
        put_hex(mfn);
        put_str(" ");
        put_udec(s);
        put_str(" ");
        put_udec(n);
        put_str(" ");
        put_hex(t[s]);
        end_line();
        s += n;
    }
    if (level == 1)
        return;
    for (unsigned s = 0; s < 512; s++) {
        /* L4 slots 256..271 are Xen's (ROOT_PAGETABLE_FIRST/LAST_XEN_SLOT,
         * xen/arch/x86/include/asm/config.h): printed, not descended into. */
        if (level == 4 && s >= 256 && s < 272)
            continue;
        if ((t[s] & PTE_P) && !(t[s] & PTE_PSE))
            dump_table(level - 1, (t[s] & ADDR_BITS) >> 12);
    }
}

static void report_boot(void)
{
    put_str("XP start nr_pages=");
    put_udec(nr_pages);
    put_str(" pt_base=");
    put_hex(si->pt_base);
    put_str(" l4=");
    put_hex(boot_l4);
    put_str(" l3=");
    put_hex(boot_l3);
    put_str(" shinfo=");
    put_hex(si->shared_info);
    end_line();
    for (unsigned k = 0; k < NR_FOREIGN; k++) {
        put_str("XP foreign ");
        put_udec(k);
        put_str(" ");
        put_hex(foreign[k]);
        end_line();
    }
    for (u64 g = 0; g < nr_pages;) {
        u64 n = 1;
        while (g + n < nr_pages && p2m[g + n] == p2m[g] + n)
            n++;
        put_str("XP p2m ");
        put_hex(g);
        put_str(" ");
        put_udec(n);
        put_str(" ");
        put_hex(p2m[g]);
        end_line();
        g += n;
    }
    dump_table(4, boot_l4);
}

/* -- the program ------------------------------------------------------------- */
enum { K_MMU_UPDATE = 1, K_MMUEXT_OP, K_UPDATE_VA_MAPPING, K_MULTICALL, K_READ, K_WRITE, K_FETCH };
enum { TAG_RAW, TAG_FRAME, TAG_ENTRY };
#define MAX_FIELDS 4096
#define MAX_CALLS 64

static const u64 *prog;
static u64 prog_words, pos;
static u64 vals[MAX_FIELDS];    /* one op's fields, translated */
static struct multicall_entry calls[MAX_CALLS];

static u64 next_word(void)
{
    if (pos >= prog_words)
        fail("truncated program");
    return prog[pos++];
}

static u64 field_value(u64 tag, u64 v)
{
    if (tag == TAG_RAW)
        return v;
    if (tag == TAG_FRAME)
        return machine_frame(v);
    if (tag == TAG_ENTRY)
        return (v & ~ADDR_BITS) | (machine_frame((v & ADDR_BITS) >> 12) << 12);
    fail("unknown tag");
}

/* Whether n fields v[] have the shape of an operation of this kind. */
static int shape_ok(u64 kind, const u64 *v, u64 n, int nested)
{
    switch (kind) {
    case K_MMU_UPDATE:
        return n >= 2 && v[1] <= MAX_FIELDS && n == 2 + 2 * v[1];
    case K_MMUEXT_OP:
        return n >= 2 && v[1] <= MAX_FIELDS && n == 2 + 3 * v[1];
    case K_UPDATE_VA_MAPPING:
        return n == 3;
    case K_MULTICALL: {
        if (nested || n < 1 || v[0] > MAX_CALLS)
            return 0;
        u64 p = 1;
        for (u64 j = 0; j < v[0]; j++) {
            if (p + 2 > n || v[p] < K_MMU_UPDATE || v[p] > K_UPDATE_VA_MAPPING ||
                v[p + 1] > n - p - 2 || !shape_ok(v[p], v + p + 2, v[p + 1], 1))
                return 0;
            p += 2 + v[p + 1];
        }
        return p == n;
    }
    case K_READ:
    case K_FETCH:
        return !nested && n == 1;
    case K_WRITE:
        return !nested && n == 2;
    }
    return 0;
}

/* Read one op's kind and translated fields (into vals); returns its kind. */
static u64 decode_op(u64 *n_out)
{
    u64 kind = next_word();
    u64 n = next_word();
    if (kind < K_MMU_UPDATE || kind > K_FETCH)
        fail("unknown kind");
    if (n > MAX_FIELDS)
        fail("too many fields");
    for (u64 i = 0; i < n; i++) {
        u64 tag = next_word();
        vals[i] = field_value(tag, next_word());
    }
    if (!shape_ok(kind, vals, n, 0))
        fail("malformed operation");
    *n_out = n;
    return kind;
}

static void put_op_start(u64 i)
{
    put_str("R ");
    put_udec(i);
}

static void put_access_fault(void)
{
    if (fault.vector == 14) {
        put_str(" pf cr2=");
        put_hex(fault.cr2);
    } else {
        put_str(" gp");
    }
    put_str(" ec=");
    put_hex(fault.error_code);
}

static void run_op(u64 i)
{
    u64 n;
    u64 kind = decode_op(&n);
    u32 done = 0;
    long ret;
    put_op_start(i);
    switch (kind) {
    case K_MMU_UPDATE:
        /* (ptr, val) pairs are struct mmu_update (xen.h) as they are. */
        ret = hypercall(HC_mmu_update, (u64)(vals + 2), vals[1], (u64)&done, vals[0], 0);
        put_str(" ret=");
        put_dec(ret);
        put_str(" done=");
        put_udec(done);
        break;
    case K_MMUEXT_OP:
        /* (cmd, arg1, arg2) u64 triples are struct mmuext_op (xen.h): an unsigned
         * cmd padded to 8 bytes, then the two 8-byte unions. */
        ret = hypercall(HC_mmuext_op, (u64)(vals + 2), vals[1], (u64)&done, vals[0], 0);
        put_str(" ret=");
        put_dec(ret);
        put_str(" done=");
        put_udec(done);
        break;
    case K_UPDATE_VA_MAPPING:
        ret = hypercall(HC_update_va_mapping, vals[0], vals[1], vals[2], 0, 0);
        put_str(" ret=");
        put_dec(ret);
        break;
    case K_MULTICALL: {
        u64 nc = vals[0], p = 1;
        for (u64 j = 0; j < nc; j++) {
            u64 sub = vals[p];
            const u64 *sv = vals + p + 2;
            struct multicall_entry *e = &calls[j];
            for (unsigned a = 0; a < 6; a++)
                e->args[a] = 0;
            e->result = 0;
            if (sub == K_UPDATE_VA_MAPPING) {
                e->op = HC_update_va_mapping;
                e->args[0] = sv[0];
                e->args[1] = sv[1];
                e->args[2] = sv[2];
            } else {
                /* (array, count, pdone = NULL, foreigndom) */
                e->op = sub == K_MMU_UPDATE ? HC_mmu_update : HC_mmuext_op;
                e->args[0] = (u64)(sv + 2);
                e->args[1] = sv[1];
                e->args[2] = 0;
                e->args[3] = sv[0];
            }
            p += 2 + vals[p + 1];
        }
        ret = hypercall(HC_multicall, (u64)calls, nc, 0, 0, 0);
        put_str(" ret=");
        put_dec(ret);
        put_str(" results=");
        for (u64 j = 0; j < nc; j++) {
            if (j)
                put_str(",");
            put_dec((long)calls[j].result);
        }
        break;
    }
    case K_READ: {
        u64 value = 0;
        if (xp_read(vals[0], &value)) {
            put_access_fault();
        } else {
            put_str(" ok value=");
            put_hex(value);
        }
        break;
    }
    case K_WRITE:
        if (xp_write(vals[0], vals[1]))
            put_access_fault();
        else
            put_str(" ok");
        break;
    case K_FETCH:
        if (xp_fetch(vals[0]))
            put_access_fault();
        else
            put_str(" ok");
        break;
    }
    end_line();
}

void kmain(struct start_info *start)
{
    si = start;
    nr_pages = si->nr_pages;
    p2m = (u64 *)si->mfn_list;
    boot_l4 = p2m[si->pt_base >> 12];   /* VIRT_BASE 0: pfn = va >> 12 */
    boot_l3 = (((const u64 *)si->pt_base)[0] & ADDR_BITS) >> 12;

    /* vcpu_info in our own page, so that CR2 is readable without mapping
     * shared_info (VCPUOP_register_vcpu_info, xen/include/public/vcpu.h). */
    struct vcpu_register_vcpu_info reg = { p2m[(u64)vcpu_info_page >> 12], 0, 0 };
    long rc = hypercall(HC_vcpu_op, VCPUOP_register_vcpu_info, 0, (u64)&reg, 0, 0);
    if (rc)
        fail("VCPUOP_register_vcpu_info failed");
    rc = hypercall(HC_set_trap_table, (u64)trap_table, 0, 0, 0, 0);
    if (rc)
        fail("set_trap_table failed");

    find_foreign();
    report_boot();

    prog = (const u64 *)si->mod_start;
    prog_words = si->mod_len / 8;
    if (si->mod_len < 16 || prog[0] != 0x31474f5250584d52ull)   /* "RMXPROG1" */
        fail("bad magic");
    pos = 1;
    u64 n_ops = next_word();
    /* Check the whole program before running any of it. */
    for (u64 i = 0; i < n_ops; i++) {
        u64 n;
        decode_op(&n);
    }
    if (pos * 8 != si->mod_len)
        fail("trailing data after the program");

    put_str("XP ready");
    end_line();
    pos = 2;
    for (u64 i = 0; i < n_ops; i++)
        run_op(i);
    put_str("XP end ");
    put_udec(n_ops);
    end_line();
    shutdown();
}
