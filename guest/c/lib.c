/* castor-guest: freestanding helpers shared by ring 0 and ring 3. */
#include "guest.h"

void *memset(void *d, int c, unsigned long n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

unsigned long strlen(const char *s) {
    unsigned long n = 0;
    while (s[n]) n++;
    return n;
}

int str_eq(const char *a, const char *b) {
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}

void line_str(struct line *l, const char *s) {
    while (*s && l->len < (int)sizeof(l->buf) - 1) l->buf[l->len++] = *s++;
}

void line_u64(struct line *l, u64 v) {
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n && l->len < (int)sizeof(l->buf) - 1) l->buf[l->len++] = tmp[--n];
}

void line_hex(struct line *l, u64 v) {
    static const char digits[] = "0123456789abcdef";
    line_str(l, "0x");
    int started = 0;
    for (int i = 60; i >= 0; i -= 4) {
        int d = (int)((v >> i) & 0xF);
        if (d || started || i == 0) {
            started = 1;
            if (l->len < (int)sizeof(l->buf) - 1) l->buf[l->len++] = digits[d];
        }
    }
}

void line_kv(struct line *l, const char *key, u64 v) {
    if (l->len) line_str(l, " ");
    line_str(l, key);
    line_str(l, "=");
    line_u64(l, v);
}

/* The console lock: several vCPUs print whole lines to one port. */
static volatile u32 console_lock;

static void lock(void) {
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE)) {
        while (console_lock) cpu_relax();
    }
}

static void unlock(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

/* The 8250 here is always ready to transmit (castor's and QEMU's), so the
 * transmitter-empty bit is not polled: one port write per byte. */
void console_write_unlocked(const char *s, int n) {
    for (int i = 0; i < n; i++) outb(COM1, (u8)s[i]);
}

void console_write(const char *s, int n) {
    lock();
    console_write_unlocked(s, n);
    unlock();
}

static int in_ring3(void) {
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 3;
}

/*
 * Ring 3 cannot use port I/O on kvm_pvm (returning to ring 3 leaves IOPL at 0
 * there), so when castor offers its console window (mmio_console=ADDR) ring 3
 * writes there: a store of the 8-byte word at ADDR + 8 * (n - 1) carries n
 * bytes (1..8). The window is unbacked guest-physical space; KVM turns each
 * store into one MMIO exit, 8 bytes at a time. Elsewhere (QEMU) ring 3 uses
 * the 8250 directly with IOPL 3.
 */
static void mmio_write(const char *s, int n) {
    volatile u64 *win = (volatile u64 *)cfg.mmio_console;
    while (n > 0) {
        int k = n < 8 ? n : 8;
        u64 w = 0;
        for (int i = 0; i < k; i++) w |= (u64)(u8)s[i] << (8 * i);
        win[k - 1] = w;
        s += k;
        n -= k;
    }
}

static void emit(const char *s, int n) {
    if (cfg.mmio_console && in_ring3()) {
        lock();
        mmio_write(s, n);
        unlock();
    } else {
        console_write(s, n);
    }
}

void line_emit(struct line *l) {
    l->buf[l->len++] = '\n';
    emit(l->buf, l->len);
    l->len = 0;
}

void puts_locked(const char *s) { emit(s, (int)strlen(s)); }

u64 xorshift(u64 *s) {
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

u64 tsc_to_us(u64 ticks) { return ticks / cfg.tsc_khz * 1000 + (ticks % cfg.tsc_khz) * 1000 / cfg.tsc_khz; }

u64 parse_u64(const char *s, int *ok) {
    u64 v = 0;
    *ok = 0;
    if (!*s) return 0;
    while (*s) {
        if (*s < '0' || *s > '9') return 0;
        v = v * 10 + (u64)(*s - '0');
        s++;
    }
    *ok = 1;
    return v;
}
