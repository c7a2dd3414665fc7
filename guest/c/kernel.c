/*
 * castor-guest: ring 0. Parses the multiboot info and command line, sets up
 * the per-CPU TSS, IDT and SYSCALL MSRs, then either drops to ring 3 (the
 * workloads, native speed on kvm_pvm) or, with irq=1, runs the interrupt-driven
 * counter in ring 0 on the local APIC timer (x2APIC, periodic mode).
 */
#include "guest.h"

#define MB_BOOT_MAGIC 0x2BADB002
#define CASTOR_AP_MAGIC 0x43535452
#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xFF
#define KSTACK_SIZE 16384
#define USTACK_SIZE 65536

struct config cfg;

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
    u16 off_lo;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off_mid;
    u32 off_hi;
    u32 zero;
} __attribute__((packed));

extern u64 gdt_tss[];
extern u8 _end[];
extern void halt_forever(void);
extern void timer_entry(void);
extern void spurious_entry(void);
extern void exc_0(void), exc_1(void), exc_2(void), exc_3(void), exc_4(void), exc_5(void),
    exc_6(void), exc_7(void), exc_8(void), exc_9(void), exc_10(void), exc_11(void),
    exc_12(void), exc_13(void), exc_14(void), exc_15(void), exc_16(void), exc_17(void),
    exc_18(void), exc_19(void);

static void (*const exc_stubs[20])(void) = {
    exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7, exc_8, exc_9,
    exc_10, exc_11, exc_12, exc_13, exc_14, exc_15, exc_16, exc_17, exc_18, exc_19,
};

static struct tss tss[MAX_CPUS];
static struct idt_entry idt[256] __attribute__((aligned(16)));
static u8 exc_stacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(16)));
static u8 user_stacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(16)));
static volatile u32 boot_info_ready;
static char cmdline[512];

static u64 counter_seq[MAX_CPUS];
static u64 irq_t0;

static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static void fatal(const char *what, const char *detail) {
    struct line l = {0};
    line_str(&l, "castor-guest: error: ");
    line_str(&l, what);
    line_str(&l, detail);
    line_emit(&l);
    halt_forever();
}

/* ---- command line ---- */

struct defaults { const char *name; int id; u64 rate, mib, interval_ms; };
static const struct defaults workloads[] = {
    {"counter", WL_COUNTER, 0, 0, 10},
    {"sparse", WL_SPARSE, 100000, 64, 100},
    {"pages", WL_PAGES, 1000, 64, 100},
    {"kv", WL_KV, 100000, 64, 100},
    {"log", WL_LOG, 20000, 16, 100},
    {"verify", WL_VERIFY, 5000, 16, 100},
    {"net", WL_NET, 0, 16, 100},
    {"kvdisk", WL_KVDISK, 0, 16, 100},
};

static void parse_cmdline(char *s) {
    u64 rate = ~0UL, mib = ~0UL, interval = ~0UL;
    const char *wl = "counter";
    while (*s) {
        while (*s == ' ') s++;
        if (!*s) break;
        char *key = s;
        while (*s && *s != ' ' && *s != '=') s++;
        char *val = s;
        if (*s == '=') { *s++ = 0; val = s; while (*s && *s != ' ') s++; }
        if (*s) *s++ = 0;
        if (str_eq(key, "workload")) { wl = val; continue; }
        int ok = 0;
        u64 v = parse_u64(val, &ok);
        if (!ok) fatal("bad value for parameter ", key);
        if (str_eq(key, "rate")) rate = v;
        else if (str_eq(key, "mib")) mib = v;
        else if (str_eq(key, "interval_ms")) interval = v;
        else if (str_eq(key, "record")) cfg.record = v;
        else if (str_eq(key, "seed")) cfg.seed = v;
        else if (str_eq(key, "cpus")) cfg.cpus = (u32)v;
        else if (str_eq(key, "tsc_khz")) cfg.tsc_khz = v;
        else if (str_eq(key, "irq")) cfg.irq = v != 0;
        else if (str_eq(key, "mmio_console")) cfg.mmio_console = v;
        else if (str_eq(key, "net_mmio")) cfg.net_mmio = v;
        else if (str_eq(key, "blk_mmio")) cfg.blk_mmio = v;
        else if (str_eq(key, "ip")) cfg.net_ip = v;
        else if (str_eq(key, "port")) cfg.net_port = v;
        else fatal("unknown parameter ", key);
    }
    const struct defaults *d = 0;
    for (unsigned i = 0; i < sizeof(workloads) / sizeof(workloads[0]); i++)
        if (str_eq(wl, workloads[i].name)) d = &workloads[i];
    if (!d) fatal("unknown workload ", wl);
    cfg.workload = d->id;
    for (int i = 0; i < 15 && d->name[i]; i++) cfg.name[i] = d->name[i];
    cfg.rate = rate != ~0UL ? rate : d->rate;
    cfg.mib = mib != ~0UL ? mib : d->mib;
    cfg.interval_ms = interval != ~0UL ? interval : d->interval_ms;
    if (!cfg.interval_ms) cfg.interval_ms = 1;
    if (!cfg.record) cfg.record = 128;
    if (cfg.record < 16 || cfg.record > 4096 || cfg.record % 8) fatal("record must be 16..4096 and a multiple of 8", "");
    if (!cfg.seed) cfg.seed = 0x9E3779B97F4A7C15UL;
    if (!cfg.cpus) cfg.cpus = 1;
    if (cfg.cpus > MAX_CPUS) fatal("too many cpus", "");
    if ((cfg.workload == WL_NET || cfg.workload == WL_KVDISK) && !cfg.net_mmio) fatal("the net and kvdisk workloads need a network card (net_mmio=)", "");
    if (cfg.workload == WL_KVDISK && !cfg.blk_mmio) fatal("the kvdisk workload needs a disk (blk_mmio=)", "");
    if (!cfg.net_port) cfg.net_port = 7000;
}

/* Measure the TSC against PIT channel 2 (used when castor did not pass tsc_khz). */
static u64 calibrate_tsc_khz(void) {
    const u32 count = 11932; /* 10 ms at 1.193182 MHz */
    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xB0);
    outb(0x42, count & 0xFF);
    outb(0x42, count >> 8);
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20)) {}
    return (rdtsc() - t0) / 10;
}

/* ---- per-CPU set-up ---- */

static void set_gate(int vec, void (*fn)(void)) {
    u64 a = (u64)fn;
    idt[vec].off_lo = (u16)a;
    idt[vec].sel = 0x08;
    idt[vec].ist = 0;
    idt[vec].type = 0x8E;
    idt[vec].off_mid = (u16)(a >> 16);
    idt[vec].off_hi = (u32)(a >> 32);
    idt[vec].zero = 0;
}

static void cpu_setup(u64 cpu) {
    struct tss *t = &tss[cpu];
    t->rsp[0] = (u64)&exc_stacks[cpu][KSTACK_SIZE];
    t->iomap_base = sizeof(struct tss);
    u64 base = (u64)t, limit = sizeof(struct tss) - 1;
    gdt_tss[cpu * 2] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) |
                       (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    gdt_tss[cpu * 2 + 1] = base >> 32;
    u16 sel = (u16)(0x30 + cpu * 16);
    __asm__ volatile("ltr %0" ::"r"(sel));

    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));

    wrmsr(0xC0000081, (0x18UL << 48) | (0x08UL << 32)); /* STAR */
    wrmsr(0xC0000082, (u64)halt_forever);                /* LSTAR: no system calls */
    wrmsr(0xC0000084, 0x700);                            /* FMASK: IF, TF, DF */
}

void exception_handler(u64 *frame) {
    struct line l = {0};
    line_str(&l, "castor-guest: exception");
    line_kv(&l, "vector", frame[0]);
    line_str(&l, " error=");
    line_hex(&l, frame[1]);
    line_str(&l, " rip=");
    line_hex(&l, frame[2]);
    line_str(&l, " cs=");
    line_hex(&l, frame[3]);
    l.buf[l.len++] = '\n';
    console_write_unlocked(l.buf, l.len); /* never wait for a lock here */
    halt_forever();
}

/* ---- interrupt-driven counter (ring 0) ---- */

void timer_tick(void) {
    u64 cpu = rdmsr(0x802); /* x2APIC ID == castor's vCPU index */
    if (cpu >= MAX_CPUS) cpu = 0;
    u64 seq = ++counter_seq[cpu];
    struct line l = {0};
    line_kv(&l, "cpu", cpu);
    line_kv(&l, "seq", seq);
    line_kv(&l, "t_us", tsc_to_us(rdtsc() - irq_t0));
    line_kv(&l, "ops", seq);
    line_str(&l, " mode=irq");
    line_emit(&l);
    wrmsr(0x80B, 0); /* EOI */
}

static void irq_counter(u64 cpu) {
    (void)cpu;
    wrmsr(0x1B, rdmsr(0x1B) | (1UL << 11) | (1UL << 10)); /* APIC enable + x2APIC */
    wrmsr(0x80F, 0x100 | SPURIOUS_VECTOR);
    /* Calibrate the APIC timer against the TSC over 1 ms, one-shot and masked. */
    wrmsr(0x83E, 0xB); /* divide by 1 */
    wrmsr(0x832, (1UL << 16) | TIMER_VECTOR);
    wrmsr(0x838, 0xFFFFFFFF);
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < cfg.tsc_khz) {}
    u64 per_ms = 0xFFFFFFFFUL - rdmsr(0x839);
    if (!per_ms) per_ms = 1000000;
    wrmsr(0x832, (1UL << 17) | TIMER_VECTOR); /* periodic, unmasked */
    wrmsr(0x838, per_ms * cfg.interval_ms);
    for (;;) __asm__ volatile("sti; hlt; cli");
}

/* ---- entry ---- */

static void enter_user(u64 cpu) {
    u64 sp = (u64)&user_stacks[cpu][USTACK_SIZE];
    __asm__ volatile(
        "xor %%eax, %%eax\n\t"
        "mov %%ax, %%ds\n\t"
        "mov %%ax, %%es\n\t"
        "mov %0, %%rsp\n\t"
        "mov $0x3002, %%r11\n\t" /* RFLAGS: IOPL 3, interrupts off */
        "sysretq"
        ::"r"(sp), "c"((u64)user_main), "D"(cpu)
        : "rax", "r11", "memory");
    __builtin_unreachable();
}

void kmain(u64 magic, u64 arg, u64 cpu) {
    if (cpu == 0) {
        if (magic != MB_BOOT_MAGIC) fatal("not started by a multiboot loader", "");
        const u32 *mbi = (const u32 *)arg;
        u32 flags = mbi[0];
        if (!(flags & 1)) fatal("the loader gave no memory size", "");
        cfg.mem_bytes = 0x100000UL + (u64)mbi[2] * 1024;
        if (flags & 4) {
            const char *c = (const char *)(u64)mbi[4];
            unsigned i = 0;
            while (c[i] && i + 1 < sizeof(cmdline)) { cmdline[i] = c[i]; i++; }
            cmdline[i] = 0;
        }
        /* Loaders put the kernel's name first: skip a first word with no '='. */
        char *c = cmdline;
        int has_eq = 0;
        for (char *p = c; *p && *p != ' '; p++) has_eq |= *p == '=';
        if (!has_eq) while (*c && *c != ' ') c++;
        parse_cmdline(c);
        if (!cfg.tsc_khz) cfg.tsc_khz = calibrate_tsc_khz();
        u64 top = cfg.mem_bytes < 0xC0000000UL ? cfg.mem_bytes : 0xC0000000UL;
        cfg.pool_start = ((u64)_end + 0x1FFFFF) & ~0x1FFFFFUL;
        cfg.pool_end = top & ~0xFFFUL;
        if (cfg.pool_end <= cfg.pool_start) fatal("not enough memory", "");
        if (cfg.mib && cfg.mib * 0x100000UL * cfg.cpus > cfg.pool_end - cfg.pool_start)
            fatal("mib x cpus does not fit in guest memory", "");
        for (int v = 0; v < 20; v++) set_gate(v, exc_stubs[v]);
        set_gate(TIMER_VECTOR, timer_entry);
        set_gate(SPURIOUS_VECTOR, spurious_entry);
        irq_t0 = rdtsc();
        struct line l = {0};
        line_str(&l, "castor-guest: workload=");
        line_str(&l, cfg.name);
        line_kv(&l, "cpus", cfg.cpus);
        line_kv(&l, "mem_mib", cfg.mem_bytes >> 20);
        line_kv(&l, "mib", cfg.mib);
        line_kv(&l, "rate", cfg.rate);
        line_kv(&l, "interval_ms", cfg.interval_ms);
        line_kv(&l, "tsc_khz", cfg.tsc_khz);
        line_str(&l, cfg.irq ? " mode=irq" : " mode=user");
        line_emit(&l);
        __atomic_store_n(&boot_info_ready, 1, __ATOMIC_RELEASE);
    } else {
        if (magic != CASTOR_AP_MAGIC) halt_forever();
        while (!__atomic_load_n(&boot_info_ready, __ATOMIC_ACQUIRE)) cpu_relax();
        if (cpu >= cfg.cpus) halt_forever();
    }
    cpu_setup(cpu);
    if (cfg.irq) irq_counter(cpu);
    enter_user(cpu);
}
