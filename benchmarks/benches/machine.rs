//! The machine's costs on this host, printed as tables (not a pass/fail test):
//!
//! - start-up time to the first console line;
//! - for a 1 GiB guest idle, under `sparse` and under `pages`: the checkpoint
//!   pause (pause → dirty harvest → state capture → resume) split into its
//!   parts, p50 and p99, with the dirty pages per epoch and the time a
//!   Remus-style copy of those pages would add inside the pause;
//! - the dirty-log cost per harvest (the harvest column);
//! - restore time into a fresh VM;
//! - guest throughput with tracking off, on (harvest every epoch, no pause),
//!   and with the full epoch loop.
//!
//! Run: `cargo bench -p castor-benchmarks --bench machine` (about 1 minute).
//! `CASTOR_BENCH_EPOCHS` sets the epochs per workload (default 200).

use std::time::{Duration, Instant};

use guest::{Progress, Workload};
use node::stats::percentile;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::console::{Console, MemorySink, MMIO_CONSOLE_BASE};
use vmm::{host_tsc_khz, Machine, MachineConfig};

const GIB: u64 = 1 << 30;
const EPOCH: Duration = Duration::from_millis(25);

fn boot(workload: &str, mem: u64, vcpus: u32, tracking: bool, sink: &MemorySink) -> Machine {
    let mut cfg = MachineConfig::new(mem, vcpus);
    cfg.dirty_tracking = tracking;
    let tsc = host_tsc_khz(&cfg.kvm_device).expect("TSC");
    let w = Workload::parse(workload).expect("workload");
    Machine::boot(
        &cfg,
        guest::KERNEL,
        &w.cmdline(vcpus, tsc, Some(MMIO_CONSOLE_BASE)),
        Console::new(Box::new(sink.clone()), 0),
    )
    .expect("boot")
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn startup() {
    println!(
        "## Start-up: Machine::boot to the first console byte (castor's guest, 1 GiB, 1 vCPU)\n"
    );
    let mut v = Vec::new();
    for _ in 0..5 {
        let sink = MemorySink::default();
        let t0 = Instant::now();
        let mut m = boot("counter", GIB, 1, false, &sink);
        while sink.contents().is_empty() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_micros(200));
        }
        v.push(t0.elapsed().as_secs_f64() * 1e3);
        m.stop();
    }
    println!("| runs | p50 ms | max ms |\n|---|---|---|");
    let max = v.iter().cloned().fold(0.0, f64::max);
    println!(
        "| {} | {:.1} | {:.1} |\n",
        v.len(),
        percentile(&mut v, 0.5),
        max
    );
}

struct EpochFigures {
    pause: Vec<f64>,
    harvest: Vec<f64>,
    capture: Vec<f64>,
    resume: Vec<f64>,
    total: Vec<f64>,
    copy: Vec<f64>,
    dirty: Vec<f64>,
}

fn epochs(workload: &str, n: usize) -> EpochFigures {
    let sink = MemorySink::default();
    let mut m = boot(workload, GIB, 1, true, &sink);
    std::thread::sleep(Duration::from_millis(500)); // let the workload initialise its memory
    m.pause().unwrap();
    m.harvest_dirty().unwrap();
    m.resume().unwrap();
    let mut f = EpochFigures {
        pause: vec![],
        harvest: vec![],
        capture: vec![],
        resume: vec![],
        total: vec![],
        copy: vec![],
        dirty: vec![],
    };
    let mut staging = vec![0u8; 4096];
    for _ in 0..n {
        std::thread::sleep(EPOCH);
        let t0 = Instant::now();
        m.pause().unwrap();
        let t1 = Instant::now();
        let d = m.harvest_dirty().unwrap();
        let t2 = Instant::now();
        let _state = m.capture().unwrap();
        let t3 = Instant::now();
        m.resume().unwrap();
        let t4 = Instant::now();
        // What copying the dirty pages inside the pause would add (measured
        // after resuming, so it does not stretch this pause).
        let c0 = Instant::now();
        for fr in d.frames() {
            m.memory()
                .read_slice(&mut staging, GuestAddress(fr * 4096))
                .unwrap();
        }
        f.copy.push(us(c0.elapsed()));
        f.pause.push(us(t1 - t0));
        f.harvest.push(us(t2 - t1));
        f.capture.push(us(t3 - t2));
        f.resume.push(us(t4 - t3));
        f.total.push(us(t4 - t0));
        f.dirty.push(d.count() as f64);
    }
    m.stop();
    f
}

fn pause_table(n: usize) {
    println!(
        "## Checkpoint pause, 1 GiB guest, 1 vCPU, {} ms epochs, {n} epochs each (µs)\n",
        EPOCH.as_millis()
    );
    println!("pause = all vCPUs out of KVM_RUN; harvest = KVM dirty log + castor's own writes; capture = vCPU + VM + device state; total = pause → resume. copy = memcpy of the dirty pages (not in total; a Remus-style pause adds it).\n");
    println!("| workload | dirty pages p50 | pause p50/p99 | harvest p50/p99 | capture p50/p99 | resume p50/p99 | **total p50/p99** | copy p50/p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, w) in [
        ("idle", "counter,interval_ms=1000"),
        ("sparse 200k/s, 256 MiB", "sparse,rate=200000,mib=256"),
        ("pages 5k/s, 256 MiB", "pages,rate=5000,mib=256"),
    ] {
        let mut f = epochs(w, n);
        let pp =
            |v: &mut Vec<f64>| format!("{:.0} / {:.0}", percentile(v, 0.5), percentile(v, 0.99));
        println!(
            "| {name} | {:.0} | {} | {} | {} | {} | **{}** | {} |",
            percentile(&mut f.dirty, 0.5),
            pp(&mut f.pause),
            pp(&mut f.harvest),
            pp(&mut f.capture),
            pp(&mut f.resume),
            pp(&mut f.total),
            pp(&mut f.copy)
        );
    }
    println!();
}

fn restore_table() {
    println!("## Restore into a fresh VM (1 GiB, 2 vCPUs, counter)\n");
    let sink = MemorySink::default();
    let mut m = boot("counter", GIB, 2, false, &sink);
    std::thread::sleep(Duration::from_millis(300));
    m.pause().unwrap();
    let state = m.capture().unwrap();
    let ram: Vec<(u64, Vec<u8>)> = m
        .memory()
        .iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            m.memory().read_slice(&mut v, r.start_addr()).unwrap();
            (r.start_addr().0, v)
        })
        .collect();
    m.stop();
    drop(m);
    let mut total = Vec::new();
    let mut fill = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut fill_time = Duration::ZERO;
        let mut r = Machine::restore(
            &state,
            |mem| {
                let f0 = Instant::now();
                for (base, bytes) in &ram {
                    mem.write_slice(bytes, GuestAddress(*base))
                        .map_err(std::io::Error::other)?;
                }
                fill_time = f0.elapsed();
                Ok(())
            },
            Box::new(MemorySink::default()),
            false,
            std::path::Path::new("/dev/kvm"),
            None,
        )
        .unwrap();
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        fill.push(fill_time.as_secs_f64() * 1e3);
        r.stop();
    }
    let mut kvm_only: Vec<f64> = total.iter().zip(&fill).map(|(t, f)| t - f).collect();
    println!("| restore total p50 ms | of which RAM fill (1 GiB copy) p50 ms | KVM restore (VM, vCPUs, state) p50 ms |\n|---|---|---|");
    println!(
        "| {:.1} | {:.1} | {:.1} |\n",
        percentile(&mut total, 0.5),
        percentile(&mut fill, 0.5),
        percentile(&mut kvm_only, 0.5)
    );
}

/// Guest operations per second over `secs`, from its progress lines.
fn throughput(workload: &str, mode: &str, secs: f64) -> f64 {
    let sink = MemorySink::default();
    let mut m = boot(workload, GIB, 1, mode != "off", &sink);
    std::thread::sleep(Duration::from_millis(500));
    let start = sink.contents().len();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        std::thread::sleep(EPOCH);
        match mode {
            "harvest" => {
                m.harvest_dirty().unwrap();
            }
            "epochs" => {
                m.pause().unwrap();
                m.harvest_dirty().unwrap();
                m.capture().unwrap();
                m.resume().unwrap();
            }
            _ => {}
        }
    }
    m.stop();
    let out = sink.contents();
    let lines: Vec<Progress> = String::from_utf8_lossy(&out[start..])
        .lines()
        .filter_map(Progress::parse)
        .collect();
    match (lines.first(), lines.last()) {
        (Some(a), Some(b)) if b.t_us > a.t_us => {
            (b.ops - a.ops) as f64 / ((b.t_us - a.t_us) as f64 / 1e6)
        }
        _ => f64::NAN,
    }
}

fn throughput_table() {
    println!("## Guest throughput, 1 GiB, 1 vCPU, unlimited rate, 3 s each (operations/s)\n");
    println!("off = no dirty log; harvest = dirty log harvested every 25 ms while running (the platform's cost of tracking); epochs = pause + harvest + capture + resume every 25 ms.\n");
    println!("| workload | off | harvest | vs off | epochs | vs off |\n|---|---|---|---|---|---|");
    for (name, w) in [
        ("sparse, 256 MiB", "sparse,rate=0,mib=256"),
        ("pages, 256 MiB", "pages,rate=0,mib=256"),
    ] {
        let off = throughput(w, "off", 3.0);
        let h = throughput(w, "harvest", 3.0);
        let e = throughput(w, "epochs", 3.0);
        println!(
            "| {name} | {off:.3e} | {h:.3e} | {:.1} % | {e:.3e} | {:.1} % |",
            100.0 * h / off,
            100.0 * e / off
        );
    }
    println!();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("CASTOR_BENCH_EPOCHS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!(
        "# castor machine benchmark ({})\n",
        vmm::KvmKind::detect().describe()
    );
    startup();
    pause_table(n);
    restore_table();
    throughput_table();
}
