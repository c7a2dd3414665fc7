//! The virtio-blk disk on real KVM: castor's guest runs the kvdisk workload
//! (the UDP key-value service with a durable log on the disk), a client on
//! the host PUTs keys, the VM is stopped, a fresh guest on the same disk
//! replays the log and answers every acknowledged key; a snapshot and a
//! restore with the disk continue the log. Needs root (a tap).

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use castor_vmm::console::{Console, MemorySink, MMIO_CONSOLE_BASE};
use castor_vmm::disk::Disk;
use castor_vmm::tap::Tap;
use castor_vmm::{host_tsc_khz, snapshot, Machine, MachineConfig, MachineError};
use guest::Workload;

const MAGIC: u32 = 0x4B56_5331;

struct Net {
    tap: Arc<Tap>,
    host: String,
    guest: String,
}

fn net() -> Net {
    let n = std::process::id() % 200 + 20;
    let name = format!("cvd{}", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).expect("a tap (this test needs root)"));
    let host = format!("10.79.{n}.1");
    for args in [
        vec!["addr", "add", &format!("{host}/24"), "dev", &name],
        vec!["link", "set", &name, "up"],
    ] {
        let st = std::process::Command::new("ip")
            .args(&args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    }
    Net {
        tap,
        host,
        guest: format!("10.79.{n}.2"),
    }
}

/// One request: the reply's (status, value, version), or None.
fn kv(
    sock: &UdpSocket,
    to: &str,
    op: u32,
    req: u64,
    key: u64,
    value: u64,
) -> Option<(u32, u64, u64)> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&op.to_le_bytes());
    for v in [77u64, req, key, value] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for _ in 0..50 {
        sock.send_to(&b, (to, 7000)).unwrap();
        let mut r = [0u8; 128];
        while let Ok(n) = sock.recv(&mut r) {
            let w = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
            if n == 56 && w(24) == req {
                let status = u32::from_le_bytes(r[8..12].try_into().unwrap());
                return Some((status, w(40), w(48)));
            }
        }
    }
    None
}

fn boot(disk: &Arc<Disk>, net: &Net, sink: &MemorySink) -> Machine {
    let mut cfg = MachineConfig::new(128 << 20, 1);
    cfg.net = Some([0x52, 0x54, 0, 0xca, 0x57, 0x11]);
    cfg.disk = Some(disk.clone());
    let tsc = host_tsc_khz(&cfg.kvm_device).unwrap();
    let w = Workload::parse(&format!("kvdisk,ip={}", net.guest)).unwrap();
    let m = Machine::boot(
        &cfg,
        guest::KERNEL,
        &w.cmdline(1, tsc, Some(MMIO_CONSOLE_BASE)),
        Console::new(Box::new(sink.clone()), 0),
    )
    .unwrap();
    m.net()
        .unwrap()
        .attach(net.tap.clone(), Some(net.tap.clone()));
    m
}

fn wait_console(sink: &MemorySink, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let c = String::from_utf8_lossy(&sink.contents()).to_string();
        if c.contains(what) {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no '{what}' in: {c}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_kvdisk_log_survives_a_new_boot_and_a_snapshot_restore() {
    let net = net();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = UdpSocket::bind((net.host.as_str(), 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    // First boot: an empty log; 100 keys, 20 of them written twice.
    let disk = Arc::new(Disk::open(&img).unwrap());
    let sink = MemorySink::default();
    let mut m = boot(&disk, &net, &sink);
    wait_console(&sink, "kvdisk replayed 0 records");
    let mut req = 0;
    let mut acked = std::collections::BTreeMap::new();
    for key in 1..=100u64 {
        req += 1;
        let r = kv(&sock, &net.guest, 1, req, key, key * 10).expect("PUT answered");
        assert_eq!(r, (0, key * 10, 1));
        acked.insert(key, (key * 10, 1));
    }
    for key in 1..=20u64 {
        req += 1;
        let r = kv(&sock, &net.guest, 1, req, key, key * 100).expect("PUT answered");
        assert_eq!(r, (0, key * 100, 2));
        acked.insert(key, (key * 100, 2));
    }
    // A retry (same request id) is answered, not logged again.
    assert_eq!(kv(&sock, &net.guest, 1, req, 20, 2000), Some((0, 2000, 2)));
    let s = m.disk().unwrap().stats();
    assert!(s.flushes >= 1 && s.writes >= 1, "{s:?}");
    assert_eq!((s.bad_requests, s.io_errors), (0, 0), "{s:?}");
    m.stop();
    drop(m);
    drop(disk);

    // A fresh guest on the same disk replays 120 records.
    let disk = Arc::new(Disk::open(&img).unwrap());
    let sink = MemorySink::default();
    let mut m = boot(&disk, &net, &sink);
    wait_console(&sink, "kvdisk replayed 120 records");
    for (key, (v, ver)) in &acked {
        req += 1;
        assert_eq!(
            kv(&sock, &net.guest, 2, req, *key, 0),
            Some((0, *v, *ver)),
            "GET {key} after a new boot"
        );
    }
    // The retry of a request applied before the reboot is still recognised.
    assert_eq!(kv(&sock, &net.guest, 1, 120, 20, 2000), Some((0, 2000, 2)));
    for key in 101..=110u64 {
        req += 1;
        assert_eq!(kv(&sock, &net.guest, 1, req, key, key), Some((0, key, 1)));
        acked.insert(key, (key, 1));
    }

    // Snapshot (paused: no disk request is half done), restore with the disk.
    m.pause().unwrap();
    let state = m.capture().unwrap();
    assert_eq!(state.disk.as_ref().unwrap().capacity_bytes, 4 << 20);
    let snap_dir = tempfile::tempdir().unwrap();
    snapshot::write(snap_dir.path(), &state, m.memory()).unwrap();
    m.stop();
    drop(m);
    let snap = snapshot::Snapshot::open(snap_dir.path()).unwrap();
    let fill =
        |mem: &castor_vmm::memory::GuestMem| snap.fill_memory(mem).map_err(std::io::Error::other);
    let e = Machine::restore(
        &snap.state,
        fill,
        Box::new(MemorySink::default()),
        false,
        Path::new("/dev/kvm"),
        None,
    )
    .err()
    .expect("a state with a disk needs one");
    assert!(
        matches!(e, MachineError::Config(ref s) if s.contains("no disk was given")),
        "{e}"
    );
    let sink = MemorySink::default();
    let mut r = Machine::restore(
        &snap.state,
        fill,
        Box::new(sink.clone()),
        false,
        Path::new("/dev/kvm"),
        Some(disk.clone()),
    )
    .unwrap();
    r.net()
        .unwrap()
        .attach(net.tap.clone(), Some(net.tap.clone()));
    for key in 111..=130u64 {
        req += 1;
        assert_eq!(
            kv(&sock, &net.guest, 1, req, key, key),
            Some((0, key, 1)),
            "PUT after restore"
        );
        acked.insert(key, (key, 1));
    }
    r.stop();
    drop(r);
    drop(disk);

    // Every record, before and after the restore, is in the log.
    let disk = Arc::new(Disk::open(&img).unwrap());
    let sink = MemorySink::default();
    let mut m = boot(&disk, &net, &sink);
    wait_console(&sink, "kvdisk replayed 150 records");
    for (key, (v, ver)) in &acked {
        req += 1;
        assert_eq!(
            kv(&sock, &net.guest, 2, req, *key, 0),
            Some((0, *v, *ver)),
            "GET {key}"
        );
    }
    m.stop();
}
