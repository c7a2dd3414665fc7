//! The virtio-net card on real KVM with a real tap: castor's guest runs its
//! key-value service, a UDP client on the host talks to it, and the machine
//! goes through a snapshot and a restore with its card in the middle of use.
//! Needs root (a tap and an address on it).

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use castor_vmm::console::{Console, MemorySink, MMIO_CONSOLE_BASE};
use castor_vmm::tap::Tap;
use castor_vmm::virtio_net::NET_MMIO_BASE;
use castor_vmm::{host_tsc_khz, snapshot, Machine, MachineConfig};
use guest::Workload;

const MAGIC: u32 = 0x4B56_5331;

/// A transient tap with the host at 10.78.N.1 and the guest at .2, removed
/// when dropped (the tap goes with its last descriptor).
struct Net {
    tap: Arc<Tap>,
    host: String,
    guest: String,
}

fn net() -> Net {
    let n = std::process::id() % 200 + 20;
    let name = format!("cvn{}", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).expect("a tap (this test needs root)"));
    let host = format!("10.78.{n}.1");
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
        guest: format!("10.78.{n}.2"),
    }
}

/// One request; the reply's (value, version), or None after a timeout.
fn kv(sock: &UdpSocket, to: &str, op: u32, req: u64, key: u64, value: u64) -> Option<(u64, u64)> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&op.to_le_bytes());
    for v in [77u64, req, key, value] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for _ in 0..20 {
        sock.send_to(&b, (to, 7000)).unwrap();
        let mut r = [0u8; 128];
        while let Ok(n) = sock.recv(&mut r) {
            let w = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
            if n == 56 && w(24) == req {
                assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), MAGIC);
                assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), op | 0x80);
                return Some((w(40), w(48)));
            }
        }
    }
    None
}

#[test]
fn the_card_serves_clients_and_survives_a_snapshot_and_restore() {
    assert_eq!(NET_MMIO_BASE, guest::NET_MMIO_BASE, "guest and VMM agree");
    let net = net();
    let mut cfg = MachineConfig::new(128 << 20, 1);
    cfg.net = Some([0x52, 0x54, 0, 0xca, 0x57, 0x10]);
    let tsc = host_tsc_khz(&cfg.kvm_device).unwrap();
    let w = Workload::parse(&format!("net,ip={}", net.guest)).unwrap();
    let sink = MemorySink::default();
    let mut m = Machine::boot(
        &cfg,
        guest::KERNEL,
        &w.cmdline(1, tsc, Some(MMIO_CONSOLE_BASE)),
        Console::new(Box::new(sink.clone()), 0),
    )
    .unwrap();
    let dev = m.net().expect("a card").clone();
    dev.attach(net.tap.clone(), Some(net.tap.clone()));

    let sock = UdpSocket::bind((net.host.as_str(), 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_eq!(kv(&sock, &net.guest, 1, 1, 5, 500), Some((500, 1)), "PUT");
    assert_eq!(kv(&sock, &net.guest, 1, 2, 5, 501), Some((501, 2)), "PUT");
    // A retried PUT (same request id) is not applied twice.
    assert_eq!(kv(&sock, &net.guest, 1, 2, 5, 501), Some((501, 2)), "retry");
    assert_eq!(kv(&sock, &net.guest, 2, 3, 5, 0), Some((501, 2)), "GET");
    let console = String::from_utf8_lossy(&sink.contents()).to_string();
    assert!(
        console.contains("net up mac=52:54:00:ca:57:10"),
        "{console}"
    );

    // Snapshot with the card in use, to files and back.
    m.pause().unwrap();
    let state = m.capture().unwrap();
    let card = state.net.clone().expect("the card's state is captured");
    assert!(card.queues.iter().all(|q| q.ready), "{card:?}");
    assert!(card.queues[1].next_avail >= 4, "{card:?}");
    assert_eq!(
        card.guest_ipv4
            .map(std::net::Ipv4Addr::from)
            .unwrap()
            .to_string(),
        net.guest
    );
    let dir = tempfile::tempdir().unwrap();
    snapshot::write(dir.path(), &state, m.memory()).unwrap();
    m.stop();
    drop(m);

    let snap = snapshot::Snapshot::open(dir.path()).unwrap();
    assert_eq!(snap.state.net.as_ref(), Some(&card));
    let sink2 = MemorySink::default();
    let mut r = Machine::restore(
        &snap.state,
        |mem| snap.fill_memory(mem).map_err(std::io::Error::other),
        Box::new(sink2.clone()),
        false,
        Path::new("/dev/kvm"),
        None,
    )
    .unwrap();
    r.net()
        .expect("the restored machine has its card")
        .attach(net.tap.clone(), Some(net.tap.clone()));
    // The table, the rings and the card all continue where they were.
    assert_eq!(
        kv(&sock, &net.guest, 2, 4, 5, 0),
        Some((501, 2)),
        "GET after restore"
    );
    assert_eq!(
        kv(&sock, &net.guest, 1, 5, 5, 502),
        Some((502, 3)),
        "PUT after restore"
    );
    for i in 0..300u64 {
        // Well past one lap of the 256-entry rings.
        assert_eq!(kv(&sock, &net.guest, 1, 10 + i, 9, i), Some((i, i + 1)));
    }
    let s = r.net().unwrap().stats();
    assert_eq!(s.bad_chains, 0, "{s:?}");
    r.stop();
}
