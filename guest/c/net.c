/*
 * castor-guest: the network workload, in ring 3.
 *
 * A polling virtio-net driver (virtio 1.x over virtio-mmio: no interrupts,
 * the used rings are read in a loop), a minimal Ethernet/ARP/IPv4/UDP layer
 * and a key-value service on UDP port cfg.net_port:
 *
 *   request, 40 bytes, little endian: magic u32 = 0x4B565331 ("KVS1"),
 *     op u32 (1 PUT, 2 GET), client u64, req u64, key u64, value u64
 *   reply, 56 bytes: magic, op | 0x80, status u32 (0 ok, 1 table full,
 *     2 bad request), pad u32, client, req, key, value, version u64
 *
 * A reply is sent only after the update is in the table (in guest memory).
 * A PUT whose (client, req) equals the key's last applied PUT is a retry:
 * it is answered from the table without applying it again. Replies go back
 * to the request's Ethernet source: the service needs no ARP cache.
 *
 * kvdisk (cfg.workload == WL_KVDISK): the same service made durable on the
 * virtio-blk disk (blk.c). Every applied PUT is appended to a log at the
 * start of the disk, 64-byte self-checking records, 64 per 4 KiB block:
 *
 *   magic u32 = 0x4B564C31 ("KVL1"), check u32 (FNV-1a 32 of the other
 *   60 bytes), seq u64 (1, 2, ...), gen u64 (boot generation), client u64,
 *   req u64, key u64, value u64, version u64
 *
 * Group commit: the replies of one poll round (every request, GETs too:
 * they may show a PUT of the same round) are held; the round's records are
 * written in one request, the disk is flushed, and only then are the
 * replies sent. At boot the log is read from the start and replayed into
 * the table (the last record of a key wins, with its client and request
 * id, so retries are still recognised); replay stops at the first record
 * whose magic, checksum or seq is wrong or whose gen is lower than the
 * previous record's (a stale record of an earlier boot's unflushed round
 * behind a rewritten block), and the service appends after it with
 * gen + 1. A PUT that finds the log full gets status 3 (log full) and is
 * not applied. A failed disk write or flush stops the service (the held
 * replies are never sent): nothing un-durable is acknowledged.
 */
#include "guest.h"

#define VIRTIO_MAGIC 0x74726976
#define QSIZE 256
#define BUF 2048
#define HDR 12
#define KV_MAGIC 0x4B565331u

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };

struct vq {
    struct desc *desc;
    struct avail *avail;
    volatile struct used *used;
    u16 avail_idx;  /* next free avail slot */
    u16 used_seen;  /* used entries consumed */
    u8 *bufs;
};

struct net_stats { u64 rx, tx, served, arp, bad; };

static volatile u32 *regs;
static struct vq rxq, txq;
static u8 mac[6];
static u32 my_ip; /* network byte order as stored in frames: a.b.c.d -> bytes */
static u64 *table;
static u64 slots;
static struct net_stats st;

/* kvdisk: the log and the held replies */
#define REC 64
#define PER_BLOCK (4096 / REC)
#define LOGBUF_BLOCKS 16
#define LOG_MAGIC 0x4B564C31u
#define REPLY_LEN (14 + 20 + 8 + 56)
#define MAX_HELD 512
static int durable;
static u8 *logbuf;      /* blocks log_block0.. of the log, the tail included */
static u64 log_block0;
static u64 log_pos;     /* records in the log: the next one's index */
static u64 log_cap;     /* records the disk holds */
static u64 log_gen;
static u64 log_dirty;   /* records appended since the last commit */
static u8 *held;        /* replies waiting for the commit */
static u32 nheld;
u64 kvdisk_records;

#define R(off) (regs[(off) / 4])
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static u64 take(u64 *cursor, u64 bytes) {
    u64 a = (*cursor + 4095) & ~4095UL;
    *cursor = a + bytes;
    return a;
}

static void setup_queue(u32 q, struct vq *v, u64 *cursor) {
    v->desc = (struct desc *)take(cursor, sizeof(struct desc) * QSIZE);
    v->avail = (struct avail *)take(cursor, sizeof(struct avail));
    v->used = (volatile struct used *)take(cursor, sizeof(struct used));
    v->bufs = (u8 *)take(cursor, (u64)QSIZE * BUF);
    memset(v->desc, 0, sizeof(struct desc) * QSIZE);
    memset(v->avail, 0, sizeof(struct avail));
    memset((void *)v->used, 0, sizeof(struct used));
    v->avail_idx = 0;
    v->used_seen = 0;
    R(0x030) = q;
    R(0x038) = QSIZE;
    u64 d = (u64)v->desc, a = (u64)v->avail, u = (u64)v->used;
    R(0x080) = (u32)d; R(0x084) = (u32)(d >> 32);
    R(0x090) = (u32)a; R(0x094) = (u32)(a >> 32);
    R(0x0a0) = (u32)u; R(0x0a4) = (u32)(u >> 32);
    R(0x044) = 1;
}

/* Brings the card up; returns 0 or a reason. Uses memory from *cursor on. */
const char *net_init(u64 base, u64 *cursor) {
    regs = (volatile u32 *)base;
    if (R(0x000) != VIRTIO_MAGIC) return "no virtio-mmio device at net_mmio";
    if (R(0x004) != 2) return "not a virtio 1.x (mmio version 2) device";
    if (R(0x008) != 1) return "the virtio device is not a network card";
    R(0x070) = 0;
    R(0x070) = 1 | 2; /* ACKNOWLEDGE | DRIVER */
    R(0x014) = 1;
    if (!(R(0x010) & 1)) return "the card does not offer VIRTIO_F_VERSION_1";
    R(0x014) = 0;
    if (!(R(0x010) & (1u << 5))) return "the card does not offer VIRTIO_NET_F_MAC";
    R(0x024) = 0; R(0x020) = 1u << 5;  /* MAC */
    R(0x024) = 1; R(0x020) = 1;        /* VERSION_1 */
    R(0x070) = 1 | 2 | 8;              /* FEATURES_OK */
    if (!(R(0x070) & 8)) return "the card refused the features";
    R(0x030) = 0;
    if (R(0x034) < QSIZE) return "the card's queues are too small";
    setup_queue(0, &rxq, cursor);
    setup_queue(1, &txq, cursor);
    volatile u8 *cfgb = (volatile u8 *)(base + 0x100);
    for (int i = 0; i < 6; i++) mac[i] = cfgb[i];
    /* every receive buffer posted, device-writable */
    for (u16 i = 0; i < QSIZE; i++) {
        rxq.desc[i].addr = (u64)(rxq.bufs + (u64)i * BUF);
        rxq.desc[i].len = BUF;
        rxq.desc[i].flags = 2; /* WRITE */
        rxq.avail->ring[i] = i;
    }
    barrier();
    rxq.avail->idx = QSIZE;
    rxq.avail_idx = QSIZE;
    R(0x070) = 1 | 2 | 8 | 4; /* DRIVER_OK */
    R(0x050) = 0;
    return 0;
}

/* ---- transmit ---- */

static int tx_frame(const u8 *frame, u32 len) {
    if (len > BUF - HDR) return -1;
    /* reclaim: the device returns chains synchronously on the notify */
    txq.used_seen = txq.used->idx;
    if ((u16)(txq.avail_idx - txq.used_seen) >= QSIZE) return -1;
    u16 i = txq.avail_idx % QSIZE;
    u8 *b = txq.bufs + (u64)i * BUF;
    memset(b, 0, HDR);
    memcpy(b + HDR, frame, len);
    txq.desc[i].addr = (u64)b;
    txq.desc[i].len = HDR + len;
    txq.desc[i].flags = 0;
    txq.avail->ring[i] = i;
    barrier();
    txq.avail_idx++;
    txq.avail->idx = txq.avail_idx;
    barrier();
    R(0x050) = 1;
    st.tx++;
    return 0;
}

/* ---- protocols ---- */

static u16 be16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u32 rd32(const u8 *p) { u32 v; memcpy(&v, p, 4); return v; }
static u64 rd64(const u8 *p) { u64 v; memcpy(&v, p, 8); return v; }
static void wr32(u8 *p, u32 v) { memcpy(p, &v, 4); }
static void wr64(u8 *p, u64 v) { memcpy(p, &v, 8); }

static u16 ip_checksum(const u8 *h, int n) {
    u32 s = 0;
    for (int i = 0; i < n; i += 2) s += be16(h + i);
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    return (u16)~s;
}

static void arp(const u8 *f, u32 len) {
    if (len < 42 || be16(f + 20) != 1 || rd32(f + 38) != my_ip) return;
    u8 r[42];
    memcpy(r, f + 6, 6);
    memcpy(r + 6, mac, 6);
    put16(r + 12, 0x0806);
    put16(r + 14, 1); put16(r + 16, 0x0800); r[18] = 6; r[19] = 4;
    put16(r + 20, 2);
    memcpy(r + 22, mac, 6);
    wr32(r + 28, my_ip);
    memcpy(r + 32, f + 22, 6);
    memcpy(r + 38, f + 28, 4);
    st.arp++;
    tx_frame(r, 42);
}

static u64 mix(u64 x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53UL;
    x ^= x >> 33;
    return x;
}

/* A record: key, value, version, last PUT's client and request id. */
static u64 *lookup(u64 key, int insert) {
    u64 s = mix(key) % slots;
    for (u64 n = 0; n < slots; n++) {
        u64 *r = table + s * 8;
        if (r[0] == key) return r;
        if (r[0] == 0) {
            if (!insert) return 0;
            r[0] = key;
            return r;
        }
        s = s + 1 == slots ? 0 : s + 1;
    }
    return 0;
}

static void stop_service(const char *why) {
    struct line l = {0};
    line_str(&l, "castor-guest: error: kvdisk: ");
    line_str(&l, why);
    line_str(&l, "; the service stops (no reply that is not durable is sent)");
    line_emit(&l);
    for (;;) cpu_relax();
}

static u32 rec_check(const u8 *r) {
    u32 h = 0x811C9DC5u;
    for (int i = 0; i < REC; i++) {
        if (i >= 4 && i < 8) continue;
        h ^= r[i];
        h *= 0x01000193u;
    }
    return h;
}

/* Writes the records appended since the last commit, flushes the disk, then
 * sends the held replies. */
static void log_commit(void) {
    if (log_dirty) {
        u64 last = (log_pos - 1) / PER_BLOCK;
        u64 n = last - log_block0 + 1;
        if (blk_write(log_block0 * 8, logbuf, n * 4096)) stop_service("writing the log failed");
        if (blk_flush()) stop_service("flushing the disk failed");
        log_dirty = 0;
        /* the tail block (partial, or the next empty one) moves to the front */
        u64 tail = log_pos / PER_BLOCK;
        if (tail != log_block0) {
            if (tail <= last) memcpy(logbuf, logbuf + (tail - log_block0) * 4096, 4096);
            else memset(logbuf, 0, 4096);
            memset(logbuf + 4096, 0, (LOGBUF_BLOCKS - 1) * 4096);
            log_block0 = tail;
        }
    }
    for (u32 i = 0; i < nheld; i++) tx_frame(held + (u64)i * REPLY_LEN, REPLY_LEN);
    nheld = 0;
}

static void log_append(u64 client, u64 req, u64 key, u64 val, u64 version) {
    if ((log_pos / PER_BLOCK) - log_block0 >= LOGBUF_BLOCKS) log_commit();
    u8 *r = logbuf + ((log_pos / PER_BLOCK) - log_block0) * 4096 + (log_pos % PER_BLOCK) * REC;
    log_pos++;
    wr32(r, LOG_MAGIC);
    wr64(r + 8, log_pos); /* seq: 1-based */
    wr64(r + 16, log_gen);
    wr64(r + 24, client);
    wr64(r + 32, req);
    wr64(r + 40, key);
    wr64(r + 48, val);
    wr64(r + 56, version);
    wr32(r + 4, rec_check(r));
    log_dirty++;
    kvdisk_records = log_pos;
}

/* Reads the log from the start and applies every valid record. */
static void log_replay(void) {
    u64 pos = 0, gen = 0;
    int done = 0;
    while (!done && pos < log_cap) {
        u64 b0 = pos / PER_BLOCK;
        u64 nb = LOGBUF_BLOCKS;
        if ((b0 + nb) * PER_BLOCK > log_cap) nb = log_cap / PER_BLOCK - b0;
        if (blk_read(b0 * 8, logbuf, nb * 4096)) stop_service("reading the log failed");
        for (u64 i = 0; i < nb * PER_BLOCK; i++) {
            const u8 *r = logbuf + i * REC;
            u64 g = rd64(r + 16);
            if (rd32(r) != LOG_MAGIC || rd32(r + 4) != rec_check(r) || rd64(r + 8) != pos + 1 || g < gen) {
                done = 1;
                break;
            }
            gen = g;
            u64 *t = lookup(rd64(r + 40), 1);
            if (!t) stop_service("the table is too small for the log");
            t[1] = rd64(r + 48);
            t[2] = rd64(r + 56);
            t[3] = rd64(r + 24);
            t[4] = rd64(r + 32);
            pos++;
        }
    }
    log_pos = pos;
    log_gen = gen + 1;
    kvdisk_records = pos;
    /* the tail block, records after the log's end cleared */
    log_block0 = pos / PER_BLOCK;
    memset(logbuf, 0, LOGBUF_BLOCKS * 4096);
    if (pos % PER_BLOCK) {
        if (blk_read(log_block0 * 8, logbuf, 4096)) stop_service("reading the log failed");
        memset(logbuf + (pos % PER_BLOCK) * REC, 0, 4096 - (pos % PER_BLOCK) * REC);
    }
    struct line l = {0};
    line_str(&l, "castor-guest: kvdisk replayed ");
    line_u64(&l, pos);
    line_str(&l, " records");
    line_kv(&l, "gen", log_gen);
    line_kv(&l, "capacity", log_cap);
    line_emit(&l);
}

static void kv(const u8 *f, u32 len) {
    const u8 *ip = f + 14;
    u32 ihl = (u32)(ip[0] & 0xF) * 4;
    const u8 *udp = ip + ihl;
    const u8 *q = udp + 8;
    if (14 + ihl + 8 + 40 > len) { st.bad++; return; }
    u32 op = rd32(q + 4);
    u64 client = rd64(q + 8), req = rd64(q + 16), key = rd64(q + 24), val = rd64(q + 32);
    u32 status = 0;
    u64 out_v = 0, out_ver = 0;
    if (rd32(q) != KV_MAGIC || (op != 1 && op != 2) || key == 0) {
        status = 2;
    } else {
        u64 *r = lookup(key, 0);
        int retry = op == 1 && r && r[3] == client && r[4] == req;
        if (op == 1 && durable && !retry && log_pos >= log_cap) {
            status = 3; /* log full: not applied */
        } else {
            if (!r && op == 1) r = lookup(key, 1);
            if (!r) {
                status = op == 1 ? 1 : 0;
            } else {
                if (op == 1 && !retry) {
                    r[1] = val;
                    r[2]++;
                    r[3] = client;
                    r[4] = req;
                    if (durable) log_append(client, req, key, val, r[2]);
                }
                out_v = r[1];
                out_ver = r[2];
            }
        }
    }
    u8 o[14 + 20 + 8 + 56];
    memcpy(o, f + 6, 6);
    memcpy(o + 6, mac, 6);
    put16(o + 12, 0x0800);
    u8 *oi = o + 14;
    memset(oi, 0, 20);
    oi[0] = 0x45;
    put16(oi + 2, 20 + 8 + 56);
    oi[8] = 64;
    oi[9] = 17;
    wr32(oi + 12, my_ip);
    memcpy(oi + 16, ip + 12, 4);
    put16(oi + 10, ip_checksum(oi, 20));
    u8 *ou = oi + 20;
    memcpy(ou, udp + 2, 2);   /* source port: the request's destination */
    memcpy(ou + 2, udp, 2);   /* destination: its source */
    put16(ou + 4, 8 + 56);
    put16(ou + 6, 0);         /* no UDP checksum (IPv4 allows it) */
    u8 *p = ou + 8;
    wr32(p, KV_MAGIC);
    wr32(p + 4, op | 0x80);
    wr32(p + 8, status);
    wr32(p + 12, 0);
    wr64(p + 16, client);
    wr64(p + 24, req);
    wr64(p + 32, key);
    wr64(p + 40, out_v);
    wr64(p + 48, out_ver);
    st.served++;
    if (durable) {
        if (nheld == MAX_HELD) log_commit();
        memcpy(held + (u64)nheld * REPLY_LEN, o, sizeof(o));
        nheld++;
    } else {
        tx_frame(o, sizeof(o));
    }
}

static void frame_in(const u8 *f, u32 len) {
    if (len < 14) { st.bad++; return; }
    u16 type = be16(f + 12);
    if (type == 0x0806) { arp(f, len); return; }
    if (type != 0x0800 || len < 14 + 20) return;
    const u8 *ip = f + 14;
    if ((ip[0] >> 4) != 4 || ip[9] != 17 || rd32(ip + 16) != my_ip) return;
    u32 ihl = (u32)(ip[0] & 0xF) * 4;
    if (ihl < 20 || 14 + ihl + 8 > len) { st.bad++; return; }
    if (be16(ip + ihl + 2) != cfg.net_port) return;
    kv(f, len);
}

/* Handles every frame received so far; returns how many. */
static u64 poll_rx(void) {
    u64 n = 0;
    u16 idx = rxq.used->idx;
    barrier();
    while (rxq.used_seen != idx) {
        volatile struct used_elem *e = &rxq.used->ring[rxq.used_seen % QSIZE];
        u32 id = e->id, len = e->len;
        if (id < QSIZE && len > HDR && len <= BUF) {
            st.rx++;
            frame_in(rxq.bufs + (u64)id * BUF + HDR, len - HDR);
        } else {
            st.bad++;
        }
        /* give the buffer back */
        u16 slot = rxq.avail_idx % QSIZE;
        rxq.avail->ring[slot] = (u16)(id < QSIZE ? id : 0);
        rxq.avail_idx++;
        rxq.used_seen++;
        n++;
    }
    if (n) {
        barrier();
        rxq.avail->idx = rxq.avail_idx;
        barrier();
        R(0x050) = 0;
    }
    if (durable && (nheld || log_dirty)) log_commit();
    return n;
}

/* The service loop: never returns. `progress` prints the progress line when due. */
void run_net_service(void (*progress)(u64 served, u64 rx, u64 tx), u64 pool, u64 pool_bytes) {
    u64 cursor = pool;
    my_ip = (u32)cfg.net_ip;
    const char *err = net_init(cfg.net_mmio, &cursor);
    if (err) {
        struct line l = {0};
        line_str(&l, "castor-guest: error: network: ");
        line_str(&l, err);
        line_emit(&l);
        for (;;) cpu_relax();
    }
    durable = cfg.workload == WL_KVDISK;
    if (durable) {
        err = blk_init(cfg.blk_mmio, &cursor);
        if (err) {
            struct line e = {0};
            line_str(&e, "castor-guest: error: disk: ");
            line_str(&e, err);
            line_emit(&e);
            for (;;) cpu_relax();
        }
        cursor = (cursor + 4095) & ~4095UL;
        logbuf = (u8 *)cursor;
        cursor += LOGBUF_BLOCKS * 4096;
        held = (u8 *)cursor;
        cursor += ((u64)MAX_HELD * REPLY_LEN + 4095) & ~4095UL;
        log_cap = blk_sectors * 512 / REC;
    }
    cursor = (cursor + 4095) & ~4095UL;
    if (cursor >= pool + pool_bytes) {
        puts_locked("castor-guest: error: network: no memory left for the table\n");
        for (;;) cpu_relax();
    }
    table = (u64 *)cursor;
    slots = (pool + pool_bytes - cursor) / 64;
    memset(table, 0, slots * 64);
    struct line l = {0};
    line_str(&l, "castor-guest: net up mac=");
    for (int i = 0; i < 6; i++) {
        const char *hx = "0123456789abcdef";
        char b[4] = {hx[mac[i] >> 4], hx[mac[i] & 15], i < 5 ? ':' : 0, 0};
        line_str(&l, b);
    }
    line_kv(&l, "ip", my_ip);
    line_kv(&l, "port", cfg.net_port);
    line_kv(&l, "slots", slots);
    line_emit(&l);
    if (durable) log_replay();
    for (;;) {
        poll_rx();
        progress(st.served, st.rx, st.tx);
        cpu_relax();
    }
}
