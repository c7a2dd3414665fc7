//! The destination refuses a switch whose memory digest differs from its
//! own, before it runs anything (real KVM, a hand-driven source on loopback).

use std::time::Duration;

use castor_migrate as migrate;
use migrate::wire::{Decoder, Msg, MIGRATION_VERSION};
use vm_memory::{Bytes, GuestAddress};

async fn next(rx: &mut quinn::RecvStream, d: &mut Decoder) -> Msg {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Some(m) = d.next_msg().unwrap() {
            return m;
        }
        let n = rx.read(&mut buf).await.unwrap().expect("stream open");
        d.push(&buf[..n]);
    }
}

#[test]
fn a_switch_with_a_wrong_digest_is_refused_before_the_guest_runs() {
    let tmp = tempfile::tempdir().unwrap();
    transport::certs::create(tmp.path(), &["node-a".into(), "node-b".into()], false).unwrap();
    let tls_a = transport::NodeTls::from_dir(tmp.path(), "node-a", "node-b").unwrap();
    let tls_b = transport::NodeTls::from_dir(tmp.path(), "node-b", "node-a").unwrap();

    // A real machine state: boot castor's guest, pause, capture.
    let mem = 32u64 << 20;
    let w = guest::Workload::parse("counter").unwrap();
    let tsc = vmm::host_tsc_khz(std::path::Path::new("/dev/kvm")).unwrap();
    let mut m = vmm::Machine::boot(
        &vmm::MachineConfig::new(mem, 1),
        guest::KERNEL,
        &w.cmdline(1, tsc, Some(vmm::console::MMIO_CONSOLE_BASE)),
        vmm::console::Console::new(Box::new(vmm::console::MemorySink::default()), 0),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    m.pause().unwrap();
    let state = m.capture().unwrap();
    let mut page = [0u8; 4096];
    m.memory()
        .read_slice(&mut page, GuestAddress(0x100000))
        .unwrap();
    m.stop();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = transport::Listener::bind("127.0.0.1:0".parse().unwrap(), &tls_b).unwrap();
        let addr = listener.local_addr().unwrap();
        let dest = tokio::spawn(async move {
            let cfg = migrate::dest::DestConfig {
                kvm_device: "/dev/kvm".into(),
                max_memory: 1 << 30,
            };
            migrate::dest::accept_one(&listener, &cfg, &Default::default())
                .await
                .err()
        });
        let (_ep, conn) = transport::connect_connection(addr, &tls_a, migrate::source::LINK_IDLE)
            .await
            .unwrap();
        let (mut ctl, mut ctl_rx) = conn.open_bi().await.unwrap();
        let mut bulk = conn.open_uni().await.unwrap();
        let mut d = Decoder::new();
        let send = |m: Msg| m.to_frame();
        ctl.write_all(&send(Msg::Hello {
            version: MIGRATION_VERSION,
            node: "node-a".into(),
            mode: protocol::payload::mode_byte(fgbi::Mode::Remus),
            block_size: 64,
            memory_bytes: mem,
            vcpus: 1,
        }))
        .await
        .unwrap();
        assert_eq!(next(&mut ctl_rx, &mut d).await, Msg::Ready);
        // One page of RAM; the rest stays zero on the destination.
        let mut enc = fgbi::Encoder::new(
            fgbi::Config {
                mode: fgbi::Mode::Remus,
                block_size: 64,
                budget_bytes: 0,
                key: [0; 32],
            },
            mem / 4096,
        )
        .unwrap();
        let mut records = Vec::new();
        enc.encode_page(0x100, &page, &mut records);
        bulk.write_all(&send(Msg::Pages { round: 1, records }))
            .await
            .unwrap();
        bulk.write_all(&send(Msg::RoundEnd { round: 1, pages: 1 }))
            .await
            .unwrap();
        assert_eq!(next(&mut ctl_rx, &mut d).await, Msg::RoundAck { round: 1 });
        bulk.write_all(&send(Msg::Switch {
            state: protocol::payload::pack_state(&state.encode()),
            missing: Vec::new(),
            verify: true,
        }))
        .await
        .unwrap();
        // The digest of a RAM that differs from what was sent.
        bulk.write_all(&send(Msg::Digest { digest: [0x5a; 16] }))
            .await
            .unwrap();
        match next(&mut ctl_rx, &mut d).await {
            Msg::Refused { reason } => assert!(reason.contains("digest"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let err = dest.await.unwrap().expect("the destination must fail");
        assert!(
            matches!(err, migrate::MigrateError::DigestMismatch),
            "{err}"
        );
    });
}
