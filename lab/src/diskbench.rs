//! `castor bench --disk`: the guest's durable key-value service (`kvdisk`:
//! every PUT appended to a log on a virtio-blk disk and flushed before its
//! reply) with the load generator in a client namespace, PUTs only —
//! durable writes a second and their latency unprotected and protected at
//! 10/25/50 ms and auto, the checkpoints' bytes and the disk's share, the
//! client-seen failover gap; then re-protection after a failover with 1 %
//! and 10 % of a 1 GiB disk changed on the returning node. One Markdown
//! table, written to `--out/disk.md`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::BenchArgs;
use crate::netbench::{self, epoch_arg, epoch_cell, NetRow, Service};
use crate::pair::{self, start_witness, wait_status, Pair, WitnessKind};

/// The section's service: PUTs only, each durable before its reply.
const KVDISK: Service = Service {
    workload: "kvdisk",
    disk_mib: 256,
    put_ratio: 1.0,
    // As many durable writes as the service takes with 256 outstanding
    // PUTs: the guest's receive ring (256 buffers) holds a whole burst of
    // them (more are dropped and retried when an epoch's replies release
    // the next burst at once).
    rate: 0.0,
    concurrency: 256,
};

/// One re-protection row.
#[derive(Debug)]
struct Reprotect {
    changed_pct: u64,
    blocks: u64,
    changed: u64,
    sent_blocks: u64,
    disk_bytes: u64,
    bytes: u64,
    protected_ms: f64,
    /// The new backup's start (its disk opened and digested) → protected.
    start_ms: f64,
}

/// A 1 GiB disk of incompressible data: 1 MiB of random bytes repeated (each
/// block alone is random to the codecs).
fn filled_disk(path: &Path) -> Result<()> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut mib = vec![0u8; 1 << 20];
    for c in mib.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let f = std::fs::File::create(path)?;
    for i in 0..1024u64 {
        f.write_all_at(&mib, i << 20)?;
    }
    Ok(())
}

/// Writes fresh random data into `pct` % of `disk`'s blocks, spread out.
fn change(disk: &Path, pct: u64) -> Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    let blocks = f.metadata()?.len() / 4096;
    let n = blocks * pct / 100;
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ pct;
    let mut buf = [0u8; 4096];
    for i in 0..n {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let b = (i * (100 / pct.max(1)) + (x % (100 / pct.max(1)))) % blocks;
        f.write_all_at(&buf, b * 4096)?;
    }
    Ok(n)
}

/// A pair over 1 GiB disks, a failover, then the killed node back as the
/// backup with `pct` % of its disk changed: hello → protected, and what
/// the first checkpoint carried.
fn reprotect(a: &BenchArgs, pct: u64, link: &[String]) -> Result<Reprotect> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let lab = netbench::lab()?;
    // Both nodes start with the same full disk: what the returning node
    // lacks is real data, not zeros.
    let disks = [dir.join("a.img"), dir.join("b.img")];
    filled_disk(&disks[0])?;
    std::fs::copy(&disks[0], &disks[1])?;
    let pair = Pair::in_dir(dir, ["node-a", "node-b"])?
        .with_taps([lab.taps[0].clone(), lab.taps[1].clone()])
        .with_disks([disks[0].clone(), disks[1].clone()]);
    let (pair, _etcd) = start_witness(WitnessKind::Etcd, pair, dir)?;
    let guest: Vec<String> = [
        "--mem",
        &format!("{}M", a.mem >> 20),
        "--vcpus",
        "1",
        "--workload",
        &format!("kvdisk,ip={}", lab.guest_addr),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (backup, mut primary) = pair.start(link, &guest, ["b.log", "a.log"])?;
    wait_status(
        &primary,
        "protected",
        Duration::from_secs(120),
        pair::protected,
    )?;
    primary.kill();
    wait_status(&backup, "the takeover", Duration::from_secs(10), |s| {
        s.role.runs_guest()
    })?;
    let changed = change(&disks[0], pct)?;
    let t = Instant::now();
    let _newb = pair.start_backup(0, link, "a-2.log")?;
    let s = wait_status(
        &backup,
        "protected again",
        Duration::from_secs(120),
        pair::protected,
    )?;
    let since_start = t.elapsed().as_secs_f64() * 1e3;
    let r = s
        .primary
        .and_then(|p| p.last_resync)
        .context("no resync figures")?;
    Ok(Reprotect {
        changed_pct: pct,
        blocks: r.disk_blocks,
        changed,
        sent_blocks: r.disk_blocks_sent,
        disk_bytes: r.disk_bytes,
        bytes: r.bytes,
        protected_ms: r.protected_ms.unwrap_or(since_start),
        start_ms: since_start,
    })
}

/// `castor bench --disk`.
pub fn disk(a: &BenchArgs, link: &[String], link_bytes_per_s: Option<u64>) -> Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let logs = a.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let lab = netbench::lab()?;
    println!(
        "castor bench --disk: the guest's durable key-value service (kvdisk: each PUT appended to a log on a {} MiB virtio-blk disk, flushed before its reply), {} MiB, 1 vCPU; PUTs only from a client in a network namespace; replication link {}",
        KVDISK.disk_mib,
        a.mem >> 20,
        link.join(" ")
    );
    let mut rows: Vec<NetRow> = vec![netbench::unprotected(a, &lab, &logs, &KVDISK, None)?];
    println!("  {}", netbench::row_line(&rows[0], link_bytes_per_s));
    // The platform's cost alone: KVM's dirty log on, harvested every 25 ms.
    let t = netbench::unprotected(a, &lab, &logs, &KVDISK, Some(25))?;
    println!("  {}", netbench::row_line(&t, link_bytes_per_s));
    rows.push(t);
    let fixed = if a.epochs.is_empty() {
        vec![10, 25, 50]
    } else {
        a.epochs.clone()
    };
    for e in fixed.into_iter().map(Some).chain([None]) {
        let tmp = tempfile::tempdir()?;
        let r = netbench::protected(a, &lab, e, tmp.path(), link, &KVDISK)
            .with_context(|| format!("protected at --epoch-ms {}", epoch_arg(e)))?;
        println!("  {}", netbench::row_line(&r, link_bytes_per_s));
        rows.push(r);
    }
    drop(lab);
    let mut re = Vec::new();
    for pct in [1, 10] {
        let r = reprotect(a, pct, link)
            .with_context(|| format!("re-protection with {pct} % of the disk changed"))?;
        println!(
            "  re-protect, {} % of a 1 GiB disk changed: {} of {} blocks sent ({} changed), {:.2} MB of disk records ({:.2} % of a full copy), {:.2} MB in all, protected {:.0} ms after the hello, {:.0} ms after the backup's start",
            r.changed_pct,
            r.sent_blocks,
            r.blocks,
            r.changed,
            r.disk_bytes as f64 / 1e6,
            r.disk_bytes as f64 * 100.0 / (1u64 << 30) as f64,
            r.bytes as f64 / 1e6,
            r.protected_ms,
            r.start_ms
        );
        re.push(r);
    }
    let md = table(&rows, &re);
    println!("\n{md}");
    std::fs::write(a.out.join("disk.md"), &md)?;
    if rows.iter().any(NetRow::failed) {
        bail!(
            "the client saw violations or a history that is not linearizable: see {} and the lines above",
            a.out.join("disk.md").display()
        );
    }
    Ok(())
}

fn table(rows: &[NetRow], re: &[Reprotect]) -> String {
    let base = rows.first().map_or(0.0, |r| r.req_per_s);
    let tracked = rows
        .iter()
        .find(|r| r.setting.starts_with("dirty tracking"))
        .map_or(0.0, |r| r.req_per_s);
    let mut s = String::from(
        "| setting | epoch | durable PUTs/s | of unprotected (of tracking only) | latency p50 | p99 | pause p50 | pause p99 | bytes/epoch | of which disk | disk blocks/epoch | client-seen failover gap | violations |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let prot = r.epoch_ms.is_some();
        let dash = || "—".to_string();
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} %{} | {:.2} ms | {:.2} ms | {} | {} | {} | {} | {} | {} | {} |\n",
            r.setting,
            epoch_cell(r),
            r.req_per_s,
            if base > 0.0 { r.req_per_s * 100.0 / base } else { 0.0 },
            if prot && tracked > 0.0 {
                format!(" ({:.0} %)", r.req_per_s * 100.0 / tracked)
            } else {
                String::new()
            },
            r.p50_ms,
            r.p99_ms,
            if prot { format!("{:.2} ms", r.pause_p50_ms) } else { dash() },
            if prot { format!("{:.2} ms", r.pause_p99_ms) } else { dash() },
            if prot { format!("{:.1} KiB", r.bytes_per_epoch / 1024.0) } else { dash() },
            if prot && r.bytes_per_epoch > 0.0 {
                format!("{:.0} %", r.disk_bytes_per_epoch * 100.0 / r.bytes_per_epoch)
            } else {
                dash()
            },
            if prot { format!("{:.1}", r.disk_blocks) } else { dash() },
            r.gap_ms.map_or_else(dash, |g| format!("{g:.1} ms")),
            r.violations
        ));
    }
    if !re.is_empty() {
        s.push_str(
            "\n| re-protection after a failover (1 GiB disk) | blocks changed on the returning node | disk blocks sent | disk records | of a full copy | first checkpoint in all | hello → protected | backup's start → protected |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in re {
            s.push_str(&format!(
                "| {} % changed | {} of {} | {} | {:.2} MB | {:.2} % | {:.2} MB | {:.0} ms | {:.0} ms |\n",
                r.changed_pct,
                r.changed,
                r.blocks,
                r.sent_blocks,
                r.disk_bytes as f64 / 1e6,
                r.disk_bytes as f64 * 100.0 / (1u64 << 30) as f64,
                r.bytes as f64 / 1e6,
                r.protected_ms,
                r.start_ms
            ));
        }
    }
    s
}
