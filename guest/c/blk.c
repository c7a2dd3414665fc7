/*
 * castor-guest: a polling virtio-blk driver (virtio 1.x over virtio-mmio), in
 * ring 3. One request at a time: header, one data buffer, status byte; the
 * used ring is polled until the device returns the chain. No interrupts.
 */
#include "guest.h"

#define VIRTIO_MAGIC 0x74726976
#define BQSIZE 16
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4

struct bdesc { u64 addr; u32 len; u16 flags; u16 next; };
struct bavail { u16 flags; u16 idx; u16 ring[BQSIZE]; u16 used_event; };
struct bused_elem { u32 id; u32 len; };
struct bused { u16 flags; u16 idx; struct bused_elem ring[BQSIZE]; u16 avail_event; };
struct bhdr { u32 type; u32 reserved; u64 sector; };

static volatile u32 *bregs;
static struct bdesc *desc;
static struct bavail *avail;
static volatile struct bused *used;
static u16 avail_idx, used_seen;
static struct bhdr *hdr;
static volatile u8 *status;

u64 blk_sectors;
struct blk_stats blk_st;

#define R(off) (bregs[(off) / 4])
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static u64 take(u64 *cursor, u64 bytes) {
    u64 a = (*cursor + 4095) & ~4095UL;
    *cursor = a + bytes;
    return a;
}

const char *blk_init(u64 base, u64 *cursor) {
    bregs = (volatile u32 *)base;
    if (R(0x000) != VIRTIO_MAGIC) return "no virtio-mmio device at blk_mmio";
    if (R(0x004) != 2) return "not a virtio 1.x (mmio version 2) device";
    if (R(0x008) != 2) return "the virtio device is not a block device";
    R(0x070) = 0;
    R(0x070) = 1 | 2; /* ACKNOWLEDGE | DRIVER */
    R(0x014) = 1;
    if (!(R(0x010) & 1)) return "the disk does not offer VIRTIO_F_VERSION_1";
    R(0x014) = 0;
    if (!(R(0x010) & (1u << 9))) return "the disk does not offer VIRTIO_BLK_F_FLUSH";
    R(0x024) = 0; R(0x020) = 1u << 9;  /* FLUSH */
    R(0x024) = 1; R(0x020) = 1;        /* VERSION_1 */
    R(0x070) = 1 | 2 | 8;              /* FEATURES_OK */
    if (!(R(0x070) & 8)) return "the disk refused the features";
    R(0x030) = 0;
    if (R(0x034) < BQSIZE) return "the disk's queue is too small";
    desc = (struct bdesc *)take(cursor, sizeof(struct bdesc) * BQSIZE);
    avail = (struct bavail *)take(cursor, sizeof(struct bavail));
    used = (volatile struct bused *)take(cursor, sizeof(struct bused));
    hdr = (struct bhdr *)take(cursor, 4096);
    status = (volatile u8 *)(hdr + 1);
    memset(desc, 0, sizeof(struct bdesc) * BQSIZE);
    memset(avail, 0, sizeof(struct bavail));
    memset((void *)used, 0, sizeof(struct bused));
    avail_idx = 0;
    used_seen = 0;
    R(0x038) = BQSIZE;
    u64 d = (u64)desc, a = (u64)avail, u = (u64)used;
    R(0x080) = (u32)d; R(0x084) = (u32)(d >> 32);
    R(0x090) = (u32)a; R(0x094) = (u32)(a >> 32);
    R(0x0a0) = (u32)u; R(0x0a4) = (u32)(u >> 32);
    R(0x044) = 1;
    R(0x070) = 1 | 2 | 8 | 4; /* DRIVER_OK */
    volatile u32 *cfgw = (volatile u32 *)(base + 0x100);
    blk_sectors = (u64)cfgw[0] | ((u64)cfgw[1] << 32);
    return 0;
}

/* One request; returns the device's status (0 ok), or 0xFF after 5 s. */
static int request(u32 type, u64 sector, void *buf, u64 bytes) {
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xFF;
    u16 n = 0;
    desc[0].addr = (u64)hdr; desc[0].len = 16; desc[0].flags = 1; desc[0].next = 1;
    n = 1;
    if (bytes) {
        desc[1].addr = (u64)buf;
        desc[1].len = (u32)bytes;
        desc[1].flags = 1 | (type == T_IN ? 2 : 0);
        desc[1].next = 2;
        n = 2;
    }
    desc[n].addr = (u64)status; desc[n].len = 1; desc[n].flags = 2; desc[n].next = 0;
    avail->ring[avail_idx % BQSIZE] = 0;
    barrier();
    avail_idx++;
    avail->idx = avail_idx;
    barrier();
    R(0x050) = 0;
    u64 t0 = rdtsc(), limit = cfg.tsc_khz * 5000;
    while (used->idx == used_seen) {
        if (rdtsc() - t0 > limit) return 0xFF;
        cpu_relax();
    }
    barrier();
    used_seen++;
    return *status;
}

int blk_read(u64 sector, void *buf, u64 bytes) {
    int s = request(T_IN, sector, buf, bytes);
    if (s == 0) { blk_st.reads++; blk_st.read_bytes += bytes; } else blk_st.errors++;
    return s;
}

int blk_write(u64 sector, const void *buf, u64 bytes) {
    int s = request(T_OUT, sector, (void *)buf, bytes);
    if (s == 0) { blk_st.writes++; blk_st.write_bytes += bytes; } else blk_st.errors++;
    return s;
}

int blk_flush(void) {
    int s = request(T_FLUSH, 0, 0, 0);
    if (s == 0) blk_st.flushes++; else blk_st.errors++;
    return s;
}
