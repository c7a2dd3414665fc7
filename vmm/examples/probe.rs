//! Boots castor's guest for a moment and prints its console (a smoke probe).
use castor_vmm::console::{Console, MemorySink};
use castor_vmm::{Machine, MachineConfig};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let wl = args.get(1).cloned().unwrap_or("counter".into());
    let vcpus: u32 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(2);
    let w = guest::Workload::parse(&wl).unwrap();
    let sink = MemorySink::default();
    let t0 = Instant::now();
    let mut cfg = MachineConfig::new(256 << 20, vcpus);
    cfg.dirty_tracking = true;
    let mut m = Machine::boot(
        &cfg,
        guest::KERNEL,
        &w.cmdline(
            vcpus,
            2_600_000,
            Some(castor_vmm::console::MMIO_CONSOLE_BASE),
        ),
        Console::new(Box::new(sink.clone()), 0),
    )
    .unwrap();
    println!("booted in {:?}", t0.elapsed());
    let r = m.wait_exit(Duration::from_millis(1500));
    println!("exit: {r:?}");
    let p = m.pause().unwrap();
    let d = m.harvest_dirty().unwrap();
    let s = m.capture().unwrap();
    println!("pause {p:?} dirty {}", d.count());
    for v in &s.vcpus {
        println!(
            "rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} cr0 {:#x} efer {:#x}",
            v.regs.rip, v.sregs.cs.selector, v.regs.rflags, v.regs.rsp, v.sregs.cr0, v.sregs.efer
        );
    }
    let out = String::from_utf8_lossy(&sink.contents()).to_string();
    let lines: Vec<&str> = out.lines().collect();
    println!(
        "{} lines; first: {:?}",
        lines.len(),
        &lines[..lines.len().min(4)]
    );
    println!("last: {:?}", &lines[lines.len().saturating_sub(3)..]);
}
