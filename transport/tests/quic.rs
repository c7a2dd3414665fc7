//! The transport on loopback: a session over mutual-TLS QUIC, and every kind
//! of peer that must be refused before any checkpoint byte is read.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use castor_transport::certs;
use castor_transport::{self as transport, client_crypto, Listener, NodeTls, TransportError};
use protocol::{Event, Hello, Message, Receiver, Sender, VERSION};

fn pair(dir: &Path) {
    certs::create(
        dir,
        &["primary".into(), "backup".into(), "mallory".into()],
        false,
    )
    .unwrap();
}

fn hello() -> Hello {
    Hello {
        version: VERSION,
        lowest_version: protocol::version::V5,
        session: 7,
        node: "primary".into(),
        capabilities: 0,
        mode: protocol::payload::mode_from_byte(2).unwrap(),
        block_size: 64,
        memory_bytes: 64 << 20,
        vcpus: 1,
        output_offset: 0,
        token: 0,
        beat_port: 0,
        beat_key: [0; 32],
        disk_bytes: 0,
    }
}

fn listen(dir: &Path) -> (Listener, SocketAddr) {
    let tls = NodeTls::from_dir(dir, "backup", "primary").unwrap();
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &tls).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_mutual_tls_quic() {
    let tmp = tempfile::tempdir().unwrap();
    pair(tmp.path());
    let (listener, addr) = listen(tmp.path());
    let backup = tokio::spawn(async move {
        let mut link = listener.accept().await.unwrap();
        // The certificate the primary presented is valid for its name only:
        // what a hello's node name is checked against.
        let cert = link.closer();
        assert!(cert.peer_is_named("primary"));
        assert!(!cert.peer_is_named("mallory") && !cert.peer_is_named("backup"));
        assert!(!cert.peer_is_named("not a name"));
        let mut data = link.data_rx.take().unwrap();
        let mut rx = Receiver::new(64 << 20);
        let mut committed = Vec::new();
        while let Some(m) = data.next().await.unwrap() {
            match rx.on_message(m).unwrap() {
                Event::Checkpoint(c) => {
                    committed.push((c.epoch, c.records.len()));
                    link.ctl_tx.send(&rx.ack(c.epoch)).await.unwrap();
                }
                Event::Goodbye(_) => break,
                _ => {}
            }
        }
        // Echo the primary's heartbeats until it goes.
        while let Ok(Some(m)) = link.ctl_rx.next().await {
            if let Message::Heartbeat { seq, sent_us } = m {
                let _ = link
                    .ctl_tx
                    .send_message(&Message::HeartbeatEcho { seq, sent_us })
                    .await;
            }
        }
        committed
    });
    let tls = NodeTls::from_dir(tmp.path(), "primary", "backup").unwrap();
    let mut link = transport::connect(addr, &tls).await.unwrap();
    let mut data = link.data_tx.take().unwrap();
    let (mut tx, h) = Sender::new(hello());
    data.send(&h).await.unwrap();
    let records = vec![0xABu8; 3 << 20];
    for epoch in 1..=3 {
        let mut f = Vec::new();
        tx.begin(epoch, 768, 3 << 20, &mut f).unwrap();
        tx.records(&records, &mut f).unwrap();
        tx.state(b"state", &mut f).unwrap();
        tx.commit(None, None, &mut f).unwrap();
        data.send(&f).await.unwrap();
    }
    data.send_message(&Message::Goodbye {
        last_epoch: 3,
        reason: "done".into(),
    })
    .await
    .unwrap();
    // Acks come back on the control stream (the backup echoes heartbeats only
    // once the data stream is done, in this test).
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match link.ctl_rx.next().await.unwrap().unwrap() {
            Message::Ack { epoch } => acked.push(tx.on_ack(epoch).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, vec![1, 2, 3]);
    link.ctl_tx
        .send_message(&Message::Heartbeat { seq: 1, sent_us: 5 })
        .await
        .unwrap();
    // The opening heartbeat (seq 0) is echoed too; wait for ours.
    loop {
        match link.ctl_rx.next().await.unwrap() {
            Some(Message::HeartbeatEcho { seq: 1, sent_us }) => {
                assert_eq!(sent_us, 5);
                break;
            }
            Some(Message::HeartbeatEcho { seq: 0, .. }) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    link.close(&protocol::EndReason::Local("done".into()));
    let committed = tokio::time::timeout(Duration::from_secs(10), backup)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed, vec![(1, 3 << 20), (2, 3 << 20), (3, 3 << 20)]);
}

/// Tries a connection that must fail; returns (client error, server error).
async fn refused(dir: &Path, crypto: rustls::ClientConfig, server_name: &str) -> (String, String) {
    let (listener, addr) = listen(dir);
    let server = tokio::spawn(async move { listener.accept().await });
    let client = transport::connect_with(addr, server_name, crypto).await;
    let client_err = match client {
        Err(e) => e.to_string(),
        Ok(mut link) => {
            // TLS 1.3: a refused client may only learn it at its first read.
            let mut data = link.data_tx.take().unwrap();
            let _ = data.send(&Sender::new(hello()).1).await;
            match tokio::time::timeout(Duration::from_secs(5), link.ctl_rx.next()).await {
                Ok(Err(e)) => e.to_string(),
                other => panic!("refused client kept a usable connection: {other:?}"),
            }
        }
    };
    let server_err = match tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
    {
        Err(e @ TransportError::Refused { .. }) => e.to_string(),
        Err(other) => panic!("server failed otherwise: {other}"),
        Ok(_) => panic!("server accepted a peer it must refuse"),
    };
    (client_err, server_err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_before_any_checkpoint_byte() {
    let tmp = tempfile::tempdir().unwrap();
    pair(tmp.path());
    let other = tmp.path().join("other-ca");
    certs::create(&other, &["primary".into()], false).unwrap();

    // No client certificate.
    let tls = NodeTls::from_dir(tmp.path(), "primary", "backup").unwrap();
    let (c, s) = refused(tmp.path(), client_crypto(&tls, false).unwrap(), "backup").await;
    assert!(s.contains("refused a connection"), "server: {s}");
    assert!(!c.is_empty(), "client: {c}");

    // A certificate named "primary" from another CA (trusting ours, to get that far).
    let mut stranger = NodeTls::from_dir(&other, "primary", "backup").unwrap();
    stranger.roots = tls.roots.clone();
    let (c, s) = refused(
        tmp.path(),
        client_crypto(&stranger, true).unwrap(),
        "backup",
    )
    .await;
    assert!(s.contains("refused a connection"), "server: {s}");
    assert!(!c.is_empty());

    // Our CA, but the wrong name.
    let mallory = NodeTls::from_dir(tmp.path(), "mallory", "backup").unwrap();
    let (_, s) = refused(tmp.path(), client_crypto(&mallory, true).unwrap(), "backup").await;
    assert!(
        s.contains("does not name the expected peer 'primary'"),
        "server: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_refuses_a_backup_with_the_wrong_name() {
    let tmp = tempfile::tempdir().unwrap();
    pair(tmp.path());
    // A listener presenting mallory's certificate.
    let evil = NodeTls::from_dir(tmp.path(), "mallory", "primary").unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &evil).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { listener.accept().await });
    let tls = NodeTls::from_dir(tmp.path(), "primary", "backup").unwrap();
    let e = transport::connect(addr, &tls)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("connection to") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
}

#[test]
fn certificate_files_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(certs::create(tmp.path(), &["bad name!".into()], false).is_err());
    pair(tmp.path());
    assert!(matches!(
        certs::create(tmp.path(), &["x".into()], false),
        Err(certs::CertError::Exists(_))
    ));
    std::fs::write(tmp.path().join("broken.pem"), "not pem").unwrap();
    let e = NodeTls::from_files(
        &tmp.path().join("broken.pem"),
        &tmp.path().join("primary.key"),
        &tmp.path().join("ca.pem"),
        "backup",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("broken.pem") && e.contains("no certificate"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_stops_reading_holds_the_primary_back() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    pair(tmp.path());
    let (listener, addr) = listen(tmp.path());
    // The backup accepts and then reads nothing.
    let server = tokio::spawn(async move {
        let link = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(link);
    });
    let tls = NodeTls::from_dir(tmp.path(), "primary", "backup").unwrap();
    let mut link = transport::connect(addr, &tls).await.unwrap();
    let mut data = link.data_tx.take().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        data.send(&Sender::new(hello()).1).await.unwrap();
        let frame = Message::Records {
            epoch: 1,
            data: vec![7; 1 << 20],
        }
        .to_frame();
        for _ in 0..256 {
            if data.send(&frame).await.is_err() {
                return;
            }
            counter.fetch_add(1 << 20, Ordering::Relaxed);
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = sent.load(Ordering::Relaxed);
    // At most the stream window (32 MiB) plus what is in flight can be sent.
    assert!(
        n <= (transport::STREAM_WINDOW as usize) + (4 << 20),
        "sent {n} bytes to a backup that reads nothing"
    );
    assert!(n > 0, "nothing sent at all");
    writer.abort();
    link.close(&protocol::EndReason::Local("done".into()));
    let _ = server.await;
}

/// The mode bits of a file.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_key_written_over_a_world_readable_file_ends_0600() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    pair(tmp.path());
    let key = tmp.path().join("primary.key");
    let ca_key = tmp.path().join("ca").join("ca.key");
    for k in [&key, &ca_key] {
        std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(mode(k), 0o644);
    }
    let old = std::fs::read(&key).unwrap();
    certs::create(tmp.path(), &["primary".into(), "backup".into()], true).unwrap();
    assert_ne!(
        std::fs::read(&key).unwrap(),
        old,
        "the key was not replaced"
    );
    for k in [&key, &ca_key, &tmp.path().join("backup.key")] {
        assert_eq!(mode(k), 0o600, "{}", k.display());
    }
    assert_eq!(mode(&tmp.path().join("ca")), 0o700);
    // No temporary file is left behind.
    for d in [tmp.path().to_path_buf(), tmp.path().join("ca")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            assert!(!name.contains(".tmp"), "left behind: {name}");
        }
    }
    NodeTls::from_dir(tmp.path(), "primary", "backup").unwrap();
}

#[test]
fn the_ca_key_is_not_in_what_a_node_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let made = certs::create(tmp.path(), &["primary".into(), "backup".into()], false).unwrap();
    let ca_key = std::fs::read_to_string(&made.ca_key).unwrap();
    assert!(ca_key.contains("PRIVATE KEY"));
    assert_ne!(
        made.ca_key.parent(),
        Some(tmp.path()),
        "the CA key is in the node directory: {}",
        made.ca_key.display()
    );
    // Nothing in the node directory itself holds the CA key.
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                !text.contains(ca_key.trim()),
                "{} holds the CA key",
                p.display()
            );
        }
    }
    // What a node loads is exactly its own files and ca.pem: copied alone to
    // a fresh directory, they are enough.
    let node = tmp.path().join("node-only");
    std::fs::create_dir(&node).unwrap();
    for f in certs::node_files(tmp.path(), "primary") {
        assert!(!f.starts_with(tmp.path().join("ca")), "{}", f.display());
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains(ca_key.trim()),
            "{} holds the CA key",
            f.display()
        );
        std::fs::copy(&f, node.join(f.file_name().unwrap())).unwrap();
    }
    NodeTls::from_dir(&node, "primary", "backup").unwrap();
    assert!(made
        .node_files
        .iter()
        .all(|f| f.parent() == Some(tmp.path())));

    // A separate --ca-dir.
    let tmp2 = tempfile::tempdir().unwrap();
    let offline = tmp2.path().join("offline-ca");
    let made = certs::create_with(&certs::Options {
        ca_dir: Some(offline.clone()),
        ..certs::Options::new(&tmp2.path().join("nodes"), &["primary".into()])
    })
    .unwrap();
    assert_eq!(made.ca_key, offline.join("ca.key"));
    assert!(!tmp2.path().join("nodes").join("ca").exists());
    assert_eq!(mode(&made.ca_key), 0o600);

    // The old layout's CA key, left in the node directory, is removed by --force.
    std::fs::write(tmp.path().join("ca.key"), "old CA key").unwrap();
    let made = certs::create(tmp.path(), &["primary".into()], true).unwrap();
    assert_eq!(made.removed_legacy_ca_key, Some(tmp.path().join("ca.key")));
    assert!(!tmp.path().join("ca.key").exists());
}

#[test]
fn certificates_expire_after_the_days_asked_for() {
    use x509_parser::prelude::*;
    for days in [1u32, 30, 365] {
        let tmp = tempfile::tempdir().unwrap();
        let made = certs::create_with(&certs::Options {
            days,
            ..certs::Options::new(tmp.path(), &["primary".into()])
        })
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let want = now + i64::from(days) * 86_400;
        for f in ["primary.pem", "ca.pem"] {
            let path = tmp.path().join(f);
            let der = certs::load_certs(&path).unwrap().remove(0);
            let (_, cert) = parse_x509_certificate(der.as_ref()).unwrap();
            let v = cert.validity();
            let until = v.not_after.timestamp();
            assert!(
                (until - want).abs() < 120,
                "{f} with --days {days}: notAfter {} is {} s from now + {days} days",
                v.not_after,
                until - want
            );
            assert!(v.not_before.timestamp() <= now, "{f} not yet valid");
            assert!(cert.validity().is_valid(), "{f} is not valid now");
        }
        let reported = made
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((reported - want).abs() < 120);
    }
}

#[test]
fn bad_days_and_expired_certificates_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    for days in [0, certs::MAX_DAYS + 1] {
        let e = certs::create_with(&certs::Options {
            days,
            ..certs::Options::new(tmp.path(), &["primary".into()])
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("--days {days}")) && e.contains("valid for 1 to"),
            "{e}"
        );
    }
    assert!(!tmp.path().join("ca.pem").exists(), "nothing is written");
    // A node's own certificate checked at load: expired or not yet valid.
    pair(tmp.path());
    let path = tmp.path().join("primary.pem");
    let cert = certs::load_certs(&path).unwrap().remove(0);
    let now = std::time::SystemTime::now();
    certs::check_validity(&path, &cert, now).unwrap();
    let later = now + std::time::Duration::from_secs(400 * 86_400);
    let e = certs::check_validity(&path, &cert, later)
        .unwrap_err()
        .to_string();
    assert!(e.contains("primary.pem") && e.contains("expired on"), "{e}");
    let earlier = now - std::time::Duration::from_secs(2 * 86_400);
    let e = certs::check_validity(&path, &cert, earlier)
        .unwrap_err()
        .to_string();
    assert!(e.contains("valid only from"), "{e}");
}
