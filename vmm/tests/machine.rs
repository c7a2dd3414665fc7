//! The machine on the real KVM of this host: dirty tracking against a
//! ground-truth memory diff, and capture/restore continuity.

use std::time::Duration;

use castor_vmm::console::{Console, MemorySink, MMIO_CONSOLE_BASE};
use castor_vmm::memory::{GuestMem, PAGE_SIZE};
use castor_vmm::{host_tsc_khz, Machine, MachineConfig};
use guest::{Progress, Workload};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn boot(workload: &str, vcpus: u32, mem: u64, tracking: bool, sink: &MemorySink) -> Machine {
    let mut cfg = MachineConfig::new(mem, vcpus);
    cfg.dirty_tracking = tracking;
    let tsc = host_tsc_khz(&cfg.kvm_device).expect("TSC");
    let w = Workload::parse(workload).unwrap();
    Machine::boot(
        &cfg,
        guest::KERNEL,
        &w.cmdline(vcpus, tsc, Some(MMIO_CONSOLE_BASE)),
        Console::new(Box::new(sink.clone()), 0),
    )
    .expect("boot")
}

fn copy_ram(mem: &GuestMem) -> Vec<(u64, Vec<u8>)> {
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).unwrap();
            (r.start_addr().0, v)
        })
        .collect()
}

fn changed_frames(a: &[(u64, Vec<u8>)], b: &[(u64, Vec<u8>)]) -> Vec<u64> {
    let mut out = Vec::new();
    for ((base, x), (_, y)) in a.iter().zip(b) {
        for (i, (p, q)) in x
            .chunks(PAGE_SIZE as usize)
            .zip(y.chunks(PAGE_SIZE as usize))
            .enumerate()
        {
            if p != q {
                out.push(base / PAGE_SIZE + i as u64);
            }
        }
    }
    out
}

fn lines(sink: &MemorySink) -> Vec<Progress> {
    String::from_utf8_lossy(&sink.contents())
        .lines()
        .filter_map(Progress::parse)
        .collect()
}

#[test]
fn harvest_contains_every_page_the_guest_or_the_vmm_changed() {
    let sink = MemorySink::default();
    let mut m = boot("sparse,rate=50000,mib=4", 2, 64 << 20, true, &sink);
    std::thread::sleep(Duration::from_millis(300));
    m.pause().unwrap();
    m.harvest_dirty().unwrap();
    let mut before = copy_ram(m.memory());
    let mut total_changed = 0;
    for epoch in 0..5 {
        m.resume().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        m.pause().unwrap();
        // castor's own write into guest memory during the pause
        let vmm_frame = 0x9_0000 / PAGE_SIZE + epoch;
        m.memory()
            .write_obj(0xC0FFEE_u64 + epoch, GuestAddress(vmm_frame * PAGE_SIZE))
            .unwrap();
        let dirty = m.harvest_dirty().unwrap();
        let after = copy_ram(m.memory());
        let changed = changed_frames(&before, &after);
        for f in &changed {
            assert!(
                dirty.contains(*f),
                "epoch {epoch}: frame {f:#x} changed but was not harvested"
            );
        }
        assert!(
            dirty.contains(vmm_frame),
            "epoch {epoch}: the VMM's own write was not harvested"
        );
        total_changed += changed.len();
        before = after;
    }
    assert!(
        total_changed > 500,
        "the workload changed only {total_changed} pages"
    );
    // Nothing runs while paused: a second harvest is empty.
    assert_eq!(m.harvest_dirty().unwrap().count(), 0);
    m.stop();
    let p = lines(&sink);
    assert!(
        p.iter().any(|l| l.cpu == 1 && l.ops > 0),
        "both vCPUs ran the workload"
    );
}

#[test]
fn dirty_tracking_can_be_switched_off_and_on() {
    let sink = MemorySink::default();
    let mut m = boot("sparse,rate=20000,mib=2", 1, 32 << 20, false, &sink);
    std::thread::sleep(Duration::from_millis(100));
    assert!(m.harvest_dirty().is_err(), "harvest needs tracking on");
    m.set_dirty_tracking(true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    m.pause().unwrap();
    let d = m.harvest_dirty().unwrap();
    assert!(
        d.count() > 50,
        "only {} dirty pages after turning tracking on",
        d.count()
    );
    m.stop();
}

fn assert_continuous(stream: &[Progress], vcpus: u32, from_seq: &[u64]) {
    for cpu in 0..vcpus {
        let seqs: Vec<u64> = stream
            .iter()
            .filter(|p| p.cpu == cpu)
            .map(|p| p.seq)
            .collect();
        assert!(!seqs.is_empty(), "no lines from vCPU {cpu}");
        assert_eq!(
            seqs[0], from_seq[cpu as usize],
            "vCPU {cpu} first sequence number"
        );
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "vCPU {cpu}: gap or repeat in {seqs:?}");
        }
    }
}

fn restore_continues(workload: &str) {
    let sink = MemorySink::default();
    let mut m = boot(workload, 2, 64 << 20, false, &sink);
    std::thread::sleep(Duration::from_millis(400));
    m.pause().unwrap();
    let state = m.capture().unwrap();
    let ram = copy_ram(m.memory());
    let offset = m.console().offset();
    assert_eq!(state.console_offset, offset);
    m.stop();
    drop(m);
    let first = sink.contents()[..offset as usize].to_vec();

    let encoded = state.encode();
    let state = castor_vmm::MachineState::decode(&encoded).unwrap();
    let sink2 = MemorySink::default();
    let mut r = Machine::restore(
        &state,
        |mem| {
            for (base, bytes) in &ram {
                mem.write_slice(bytes, GuestAddress(*base))
                    .map_err(std::io::Error::other)?;
            }
            Ok(())
        },
        Box::new(sink2.clone()),
        false,
        std::path::Path::new("/dev/kvm"),
        None,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    r.stop();
    let before: Vec<Progress> = String::from_utf8_lossy(&first)
        .lines()
        .filter_map(Progress::parse)
        .collect();
    let mut all = first;
    all.extend_from_slice(&sink2.contents());
    let stream: Vec<Progress> = String::from_utf8_lossy(&all)
        .lines()
        .filter_map(Progress::parse)
        .collect();
    assert_continuous(&stream, 2, &[1, 1]);
    for cpu in 0..2 {
        let last_before = before
            .iter()
            .filter(|p| p.cpu == cpu)
            .map(|p| p.seq)
            .max()
            .unwrap_or(0);
        let after: Vec<&Progress> = stream
            .iter()
            .filter(|p| p.cpu == cpu && p.seq > last_before + 1)
            .collect();
        assert!(
            after.len() >= 5,
            "vCPU {cpu}: only {} lines after the restore",
            after.len()
        );
    }
}

#[test]
fn restore_in_a_fresh_vm_continues_the_counter() {
    restore_continues("counter");
}

#[test]
fn restore_in_a_fresh_vm_continues_the_interrupt_driven_counter() {
    restore_continues("counter,irq=1");
}

#[test]
fn every_workload_makes_progress_and_verify_finds_no_corruption() {
    for w in [
        "sparse,mib=4",
        "pages,mib=4",
        "kv,mib=4",
        "log,mib=2",
        "verify,mib=2",
        "counter",
    ] {
        let sink = MemorySink::default();
        let mut m = boot(&format!("{w},interval_ms=50"), 2, 64 << 20, true, &sink);
        // Harvest epochs while it runs, as a checkpointing primary would: at
        // least eight, and until every vCPU printed four lines. A workload
        // first fills its memory, which under dirty tracking takes a few
        // hundred milliseconds on this platform (kv,mib=4: its first line
        // ~270 ms after it starts), so a fixed number of epochs would test
        // the platform's speed rather than the workload's progress.
        let lines = |sink: &MemorySink, cpu: u32| {
            String::from_utf8_lossy(&sink.contents())
                .lines()
                .filter_map(Progress::parse)
                .filter(|p| p.cpu == cpu)
                .count()
        };
        let start = std::time::Instant::now();
        let mut epochs = 0;
        while epochs < 8 || (0..2).any(|cpu| lines(&sink, cpu) < 4) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{w}: {epochs} epochs in 20 s, and a vCPU printed fewer than 4 lines: {}",
                String::from_utf8_lossy(&sink.contents())
            );
            std::thread::sleep(Duration::from_millis(40));
            m.pause().unwrap();
            m.harvest_dirty().unwrap();
            m.resume().unwrap();
            epochs += 1;
        }
        m.stop();
        let out = String::from_utf8_lossy(&sink.contents()).to_string();
        assert!(!out.contains("CORRUPT"), "{w}: {out}");
        assert!(
            !out.contains("error:") && !out.contains("exception"),
            "{w}: {out}"
        );
        if w.starts_with("verify") {
            assert!(out.contains("errors=0"), "{w}: {out}");
        }
        for cpu in 0..2 {
            let ops: Vec<u64> = out
                .lines()
                .filter_map(Progress::parse)
                .filter(|p| p.cpu == cpu)
                .map(|p| p.ops)
                .collect();
            assert!(
                ops.len() >= 3,
                "{w}: vCPU {cpu} printed {} lines",
                ops.len()
            );
            assert!(
                ops.last() > ops.first(),
                "{w}: vCPU {cpu} made no progress: {ops:?}"
            );
        }
    }
}

/// The backup's use of the replica: a standby VM registered over the RAM while
/// checkpoints are written into it through `with_ram_mut`, then a failover.
#[test]
fn replica_slice_coexists_with_a_standby_but_not_with_running_vcpus() {
    let sink = MemorySink::default();
    let mut m = boot("counter", 1, 64 << 20, false, &sink);
    std::thread::sleep(Duration::from_millis(200));
    m.pause().unwrap();
    let state = m.capture().unwrap();
    let ram = copy_ram(m.memory());
    // While a machine runs over its RAM, no slice of it is lent.
    let mut running = m.memory().clone();
    assert!(matches!(
        castor_vmm::memory::with_ram_mut(&mut running, |_| ()),
        Err(castor_vmm::memory::MemoryError::InUse(_))
    ));
    drop(m);
    castor_vmm::memory::with_ram_mut(&mut running, |_| ()).unwrap();

    let mut replica = castor_vmm::memory::create(state.memory_size()).unwrap();
    let kvm = std::path::Path::new("/dev/kvm");
    let standby = Machine::prepare_standby(replica.clone(), kvm).unwrap();
    castor_vmm::memory::with_ram_mut(&mut replica, |r| {
        r.copy_from_slice(&ram[0].1);
    })
    .unwrap();
    // A machine cannot start over RAM whose slice is lent.
    let sink2 = MemorySink::default();
    let mut standby = Some(standby);
    let refused = castor_vmm::memory::with_ram_mut(&mut replica, |_| {
        let sb = standby.take().unwrap();
        Machine::restore_standby(sb, &state, Box::new(sink2.clone()), false, None).err()
    })
    .unwrap();
    assert!(
        matches!(
            refused,
            Some(castor_vmm::MachineError::Memory(
                castor_vmm::memory::MemoryError::InUse(_)
            ))
        ),
        "{refused:?}"
    );
    let r = Machine::restore_on(
        &state,
        replica.clone(),
        Box::new(sink2.clone()),
        false,
        kvm,
        None,
    )
    .unwrap();
    assert!(matches!(
        castor_vmm::memory::with_ram_mut(&mut replica, |_| ()),
        Err(castor_vmm::memory::MemoryError::InUse(_))
    ));
    std::thread::sleep(Duration::from_millis(300));
    drop(r);
    castor_vmm::memory::with_ram_mut(&mut replica, |_| ()).unwrap();
    assert!(!sink2.contents().is_empty(), "the restored guest ran");
}
