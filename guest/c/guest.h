/* castor-guest: shared declarations. Freestanding: no libc, no FPU/SSE. */
#ifndef CASTOR_GUEST_H
#define CASTOR_GUEST_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long i64;

#define MAX_CPUS 16
#define COM1 0x3F8

enum workload {
    WL_COUNTER = 0,
    WL_SPARSE,
    WL_PAGES,
    WL_KV,
    WL_LOG,
    WL_VERIFY,
    WL_NET,
    WL_KVDISK,
};

/* Set by the BSP in ring 0 before any CPU starts its workload; read-only after. */
struct config {
    int workload;
    int irq;            /* 1: interrupt-driven counter in ring 0 (LAPIC timer) */
    u32 cpus;
    u64 tsc_khz;
    u64 rate;           /* target operations per second per vCPU; 0 = unlimited */
    u64 mib;            /* working set per vCPU */
    u64 interval_ms;    /* progress line period */
    u64 record;         /* log: record size in bytes */
    u64 seed;
    u64 pool_start;     /* workload memory: [pool_start, pool_end) */
    u64 pool_end;
    u64 mem_bytes;
    u64 mmio_console;   /* castor's console window for ring 3; 0: use the 8250 */
    u64 net_mmio;       /* the virtio-net card's virtio-mmio window (net workload) */
    u64 net_ip;         /* the guest's IPv4 address, as the 4 bytes of a frame read as a little-endian u32 */
    u64 net_port;       /* the key-value service's UDP port */
    u64 blk_mmio;       /* the virtio-blk disk's virtio-mmio window (kvdisk workload) */
    char name[16];
};

extern struct config cfg;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/* lib.c */
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
unsigned long strlen(const char *s);
int str_eq(const char *a, const char *b);

/* A line buffer that is written to the serial port in one piece. */
struct line {
    char buf[192];
    int len;
};
void line_str(struct line *l, const char *s);
void line_u64(struct line *l, u64 v);
void line_hex(struct line *l, u64 v);
void line_kv(struct line *l, const char *key, u64 v);
void line_emit(struct line *l); /* appends '\n' and writes it under the console lock */
void puts_locked(const char *s);
void console_write(const char *s, int n);          /* ring 0, under the console lock */
void console_write_unlocked(const char *s, int n); /* ring 0, for fatal paths */

u64 xorshift(u64 *s);
u64 tsc_to_us(u64 ticks);
u64 parse_u64(const char *s, int *ok);

/* user.c (ring 3) */
void user_main(u64 cpu);

/* net.c (ring 3) */
void run_net_service(void (*progress)(u64 served, u64 rx, u64 tx), u64 pool, u64 pool_bytes);
extern u64 kvdisk_records; /* records in the log (replayed + appended) */

/* blk.c (ring 3): polling virtio-blk driver; each call returns the status (0 ok) */
struct blk_stats { u64 reads, writes, flushes, read_bytes, write_bytes, errors; };
extern struct blk_stats blk_st;
extern u64 blk_sectors;
const char *blk_init(u64 base, u64 *cursor);
int blk_read(u64 sector, void *buf, u64 bytes);
int blk_write(u64 sector, const void *buf, u64 bytes);
int blk_flush(void);

#endif
