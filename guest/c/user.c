/*
 * castor-guest: the workloads, in 64-bit ring 3 (native speed on kvm_pvm).
 * Each vCPU works on its own slice of the memory pool and prints a progress
 * line every interval_ms: "cpu=C seq=S t_us=T ops=N ...", where seq goes up by
 * exactly one per line, so continuity across a checkpoint, restore or failover
 * can be read from outside.
 */
#include "guest.h"

struct ctx {
    u64 cpu;
    u64 *base;          /* this vCPU's slice */
    u64 words;          /* its size in 8-byte words */
    u64 rng;
    u64 seq;
    u64 ops;
    u64 t0;             /* TSC at start */
    u64 next_line;      /* TSC of the next progress line */
    u64 period;         /* TSC ticks between lines */
    u64 pace_t0, pace_ops; /* rate control baseline */
    u64 errors;         /* verify: corruptions found */
};

static void progress(struct ctx *c, u64 now, const char *extra_key, u64 extra) {
    struct line l = {0};
    c->seq++;
    line_kv(&l, "cpu", c->cpu);
    line_kv(&l, "seq", c->seq);
    line_kv(&l, "t_us", tsc_to_us(now - c->t0));
    line_kv(&l, "ops", c->ops);
    if (extra_key) line_kv(&l, extra_key, extra);
    line_emit(&l);
}

/*
 * Called after every batch of operations: prints the progress line when due
 * and paces to cfg.rate. After a long stop (a pause, a restore) it neither
 * bursts lines nor runs flat out to catch up: the schedule restarts from now.
 */
static void tick(struct ctx *c, const char *extra_key, u64 extra) {
    u64 now = rdtsc();
    if (now >= c->next_line) {
        progress(c, now, extra_key, extra);
        c->next_line += c->period;
        if (now >= c->next_line) c->next_line = now + c->period;
    }
    if (cfg.rate) {
        u64 hz = cfg.tsc_khz * 1000;
        for (;;) {
            now = rdtsc();
            u64 due = c->pace_t0 + (c->ops - c->pace_ops) * (hz / cfg.rate);
            if (now >= due) {
                if (now - due > hz / 10) { c->pace_t0 = now; c->pace_ops = c->ops; }
                break;
            }
            if (now >= c->next_line) {
                progress(c, now, extra_key, extra);
                c->next_line += c->period;
                if (now >= c->next_line) c->next_line = now + c->period;
            }
            cpu_relax();
        }
    }
}

static u64 batch_for(u64 per_op_cost_hint) {
    /* operations between ticks: small enough to pace smoothly */
    if (!cfg.rate) return per_op_cost_hint;
    u64 b = cfg.rate / 1000;
    if (b < 1) b = 1;
    if (b > per_op_cost_hint) b = per_op_cost_hint;
    return b;
}

static void run_counter(struct ctx *c) {
    for (;;) {
        u64 now = rdtsc();
        if (now >= c->next_line) {
            c->ops++;
            progress(c, now, 0, 0);
            c->next_line += c->period;
            if (now >= c->next_line) c->next_line = now + c->period;
        }
        cpu_relax();
    }
}

static void run_sparse(struct ctx *c) {
    u64 batch = batch_for(256);
    for (;;) {
        for (u64 i = 0; i < batch; i++) {
            u64 r = xorshift(&c->rng);
            c->base[r % c->words] = r;
        }
        c->ops += batch;
        tick(c, 0, 0);
    }
}

static void run_pages(struct ctx *c) {
    u64 pages = c->words / 512;
    u64 batch = batch_for(4);
    for (;;) {
        for (u64 i = 0; i < batch; i++) {
            u64 *p = c->base + (xorshift(&c->rng) % pages) * 512;
            for (int w = 0; w < 512; w++) p[w] = xorshift(&c->rng);
        }
        c->ops += batch;
        tick(c, 0, 0);
    }
}

/* kv: open-addressed table of 64-byte records {key, version, value[6]}, half full;
 * keys drawn log-uniformly (P(k) ~ 1/k, Zipf with s = 1), hashed to scatter them. */
static u64 mix64(u64 x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53UL;
    x ^= x >> 33;
    return x;
}

static u64 kv_slot(struct ctx *c, u64 slots, u64 key) {
    u64 s = mix64(key) % slots;
    for (;;) {
        u64 *rec = c->base + s * 8;
        if (rec[0] == key || rec[0] == 0) return s;
        s = s + 1 == slots ? 0 : s + 1;
    }
}

static void run_kv(struct ctx *c) {
    u64 slots = c->words / 8;
    u64 keys = slots / 2;
    int bits = 0;
    while ((2UL << bits) <= keys) bits++;
    for (u64 k = 1; k <= keys; k++) {
        u64 *rec = c->base + kv_slot(c, slots, k) * 8;
        rec[0] = k;
        rec[1] = 0;
    }
    u64 batch = batch_for(128);
    for (;;) {
        for (u64 i = 0; i < batch; i++) {
            u64 k;
            do {
                u64 r = xorshift(&c->rng);
                u64 e = r % (u64)(bits + 1);
                k = (1UL << e) + ((r >> 8) & ((1UL << e) - 1));
            } while (k > keys);
            u64 *rec = c->base + kv_slot(c, slots, k) * 8;
            u64 v = ++rec[1];
            rec[2] = v ^ k;
            rec[3] = mix64(v);
            rec[4] = c->ops + i;
        }
        c->ops += batch;
        tick(c, 0, 0);
    }
}

/* log: sequential appends of fixed-size records through a ring. */
static void run_log(struct ctx *c) {
    u64 rw = cfg.record / 8;
    u64 nrec = c->words / rw;
    u64 head = 0;
    u64 batch = batch_for(64);
    for (;;) {
        for (u64 i = 0; i < batch; i++) {
            u64 *r = c->base + head * rw;
            u64 lsn = c->ops + i + 1;
            r[0] = lsn;
            r[1] = cfg.record;
            for (u64 w = 2; w < rw; w++) r[w] = lsn * 0x9E3779B97F4A7C15UL + w;
            head = head + 1 == nrec ? 0 : head + 1;
        }
        c->ops += batch;
        tick(c, "lsn", c->ops);
    }
}

/* verify: 4 KiB blocks whose every word is a function of (block, generation).
 * Each operation checks one random block and rewrites it at the next generation;
 * any word that does not match is reported as corruption. */
static u64 verify_word(u64 block, u64 gen, u64 w) { return mix64(block * 4096 + w) ^ (gen * 0x9E3779B97F4A7C15UL); }

static void verify_fill(u64 *b, u64 block, u64 gen) {
    b[0] = block;
    b[1] = gen;
    for (u64 w = 2; w < 512; w++) b[w] = verify_word(block, gen, w);
}

static void run_verify(struct ctx *c) {
    u64 blocks = c->words / 512;
    for (u64 i = 0; i < blocks; i++) verify_fill(c->base + i * 512, i, 0);
    u64 batch = batch_for(16);
    for (;;) {
        for (u64 i = 0; i < batch; i++) {
            u64 blk = xorshift(&c->rng) % blocks;
            u64 *b = c->base + blk * 512;
            u64 gen = b[1];
            u64 bad = b[0] != blk;
            for (u64 w = 2; w < 512 && !bad; w++) bad = b[w] != verify_word(blk, gen, w);
            if (bad) {
                c->errors++;
                struct line l = {0};
                line_str(&l, "CORRUPT");
                line_kv(&l, "cpu", c->cpu);
                line_kv(&l, "block", blk);
                line_kv(&l, "gen", gen);
                line_emit(&l);
            }
            verify_fill(b, blk, bad ? 0 : gen + 1);
        }
        c->ops += batch;
        tick(c, "errors", c->errors);
    }
}

/* net: the key-value service over UDP (net.c) on vCPU 0; ops = requests served. */
static struct ctx *net_ctx;

static void net_progress(u64 served, u64 rx, u64 tx) {
    struct ctx *c = net_ctx;
    (void)tx;
    c->ops = served;
    u64 now = rdtsc();
    if (now >= c->next_line && cfg.workload == WL_KVDISK) {
        /* the progress line, plus the log and the disk's counters */
        struct line l = {0};
        c->seq++;
        line_kv(&l, "cpu", c->cpu);
        line_kv(&l, "seq", c->seq);
        line_kv(&l, "t_us", tsc_to_us(now - c->t0));
        line_kv(&l, "ops", c->ops);
        line_kv(&l, "rx", rx);
        line_kv(&l, "log", kvdisk_records);
        line_kv(&l, "dwrites", blk_st.writes);
        line_kv(&l, "flushes", blk_st.flushes);
        line_kv(&l, "derrors", blk_st.errors);
        line_emit(&l);
        c->next_line += c->period;
        if (now >= c->next_line) c->next_line = now + c->period;
    } else if (now >= c->next_line) {
        progress(c, now, "rx", rx);
        c->next_line += c->period;
        if (now >= c->next_line) c->next_line = now + c->period;
    }
}

static void run_net(struct ctx *c) {
    if (c->cpu != 0) run_counter(c);
    net_ctx = c;
    run_net_service(net_progress, (u64)c->base, c->words * 8);
}

void user_main(u64 cpu) {
    struct ctx c = {0};
    u64 slice = ((cfg.pool_end - cfg.pool_start) / cfg.cpus) & ~0xFFFUL;
    u64 bytes = cfg.mib ? cfg.mib << 20 : 0;
    if (bytes > slice) bytes = slice;
    c.cpu = cpu;
    c.base = (u64 *)(cfg.pool_start + cpu * slice);
    c.words = bytes / 8;
    c.rng = mix64(cfg.seed + cpu + 1) | 1;
    c.t0 = rdtsc();
    c.period = cfg.tsc_khz * cfg.interval_ms;
    c.next_line = c.t0 + c.period;
    c.pace_t0 = c.t0;
    switch (cfg.workload) {
    case WL_COUNTER: run_counter(&c); break;
    case WL_SPARSE: run_sparse(&c); break;
    case WL_PAGES: run_pages(&c); break;
    case WL_KV: run_kv(&c); break;
    case WL_LOG: run_log(&c); break;
    case WL_VERIFY: run_verify(&c); break;
    case WL_NET: run_net(&c); break;
    case WL_KVDISK: run_net(&c); break;
    }
    for (;;) cpu_relax();
}
