//! The transport over impaired sockets (`transport::lossy`): QUIC delivers
//! a stream intact and in order through lost, duplicated and reordered
//! datagrams, and the datagrams themselves meet their faults in the
//! proportions asked.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use castor_transport::lossy::{DatagramSender, LinkFaults};
use castor_transport::{self as transport, certs, Listener, NodeTls};
use protocol::Message;

fn faults(s: &str) -> LinkFaults {
    LinkFaults::parse(s).unwrap()
}

/// A chunk's bytes: a function of its number, so the receiver can check.
fn chunk(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn certs_in(dir: &Path) {
    certs::create(dir, &["primary".into(), "backup".into()], false).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_delivers_a_stream_intact_and_in_order_through_loss_duplication_and_reordering() {
    const CHUNK: usize = 64 << 10;
    const MIB: u64 = 16;
    let chunks = MIB * (1 << 20) / CHUNK as u64;
    let tmp = tempfile::tempdir().unwrap();
    certs_in(tmp.path());
    // Other faults from CASTOR_LINK_FAULTS, to measure them (`-- --nocapture`).
    let bad = faults(
        &std::env::var("CASTOR_LINK_FAULTS")
            .unwrap_or_else(|_| "loss=5%,dup=5%,reorder=10%,seed=1".into()),
    );
    let tls = NodeTls::from_dir(tmp.path(), "backup", "primary").unwrap();
    let listener = Listener::bind_impaired("127.0.0.1:0".parse().unwrap(), &tls, &bad).unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = tokio::spawn(async move {
        let mut link = listener.accept().await.unwrap();
        assert_eq!(link.faults(), bad, "the link carries its faults");
        let mut data = link.data_rx.take().unwrap();
        let mut next = 0u64;
        while let Some(m) = data.next().await.unwrap() {
            match m {
                Message::Records { epoch, data } => {
                    assert_eq!(epoch, next, "in order");
                    assert!(data == chunk(epoch, CHUNK), "chunk {epoch} intact");
                    next += 1;
                }
                Message::Goodbye { .. } => break,
                other => panic!("unexpected {}", other.name()),
            }
        }
        link.ctl_tx
            .send_message(&Message::Ack { epoch: next })
            .await
            .unwrap();
        // Until the primary has read the ack and closed.
        let _ = link.ctl_rx.next().await;
        let _ = link.ctl_rx.next().await;
        next
    });
    let ptls = NodeTls::from_dir(tmp.path(), "primary", "backup").unwrap();
    let t0 = Instant::now();
    let mut link = transport::connect_impaired(addr, &ptls, &bad)
        .await
        .unwrap();
    let mut tx = link.data_tx.take().unwrap();
    for i in 0..chunks {
        let m = Message::Records {
            epoch: i,
            data: chunk(i, CHUNK),
        };
        tx.send_message(&m).await.unwrap();
    }
    tx.send_message(&Message::Goodbye {
        last_epoch: chunks,
        reason: "done".into(),
    })
    .await
    .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match link.ctl_rx.next().await.unwrap() {
                Some(Message::Ack { epoch }) => break epoch,
                Some(_) => continue,
                None => panic!("control stream ended"),
            }
        }
    })
    .await
    .expect("the stream got through within 60 s");
    let took = t0.elapsed();
    assert_eq!(acked, chunks);
    let stats = link.stats();
    let lost = link.conn.stats().path.lost_packets;
    link.close(&protocol::EndReason::Goodbye("done".into()));
    assert_eq!(backup.await.unwrap(), chunks);
    eprintln!(
        "{MIB} MiB in {:.2} s ({:.1} MB/s) through {bad}: {stats}",
        took.as_secs_f64(),
        (MIB << 20) as f64 / took.as_secs_f64() / 1e6
    );
    if bad.loss_ppm > 0 {
        assert!(lost > 0, "QUIC saw losses: {stats}");
    }
}

/// Receives numbered datagrams until `quiet` passes without one.
fn receive(sock: &UdpSocket, quiet: Duration) -> Vec<u32> {
    receive_counting(sock, quiet, &AtomicU64::new(0))
}

/// The same, counting them in `count` as they come.
fn receive_counting(sock: &UdpSocket, quiet: Duration, count: &AtomicU64) -> Vec<u32> {
    sock.set_read_timeout(Some(quiet)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        assert_eq!(n, 4);
        got.push(u32::from_le_bytes(buf[..4].try_into().unwrap()));
        count.fetch_add(1, Ordering::Relaxed);
    }
    got
}

#[test]
fn datagrams_are_lost_duplicated_and_reordered_in_the_proportions_asked() {
    const N: u32 = 20_000;
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = rx.local_addr().unwrap();
    let f = faults("loss=5%,dup=5%,reorder=10%,seed=7");
    let tx = DatagramSender::new(UdpSocket::bind("127.0.0.1:0").unwrap(), &f, "test");
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    let reader =
        std::thread::spawn(move || receive_counting(&rx, Duration::from_millis(500), &counted));
    for i in 0..N {
        tx.send_to(&i.to_le_bytes(), to).unwrap();
        // Short bursts, each once the receiver has nearly caught up: its
        // buffer must not overflow (a real loss the measurement would
        // count) however late its thread runs on a busy host.
        if i % 32 == 31 {
            let s = tx.stats().unwrap();
            let sent = (s.datagrams - s.lost + s.duplicated).saturating_sub(16);
            let t = Instant::now();
            while count.load(Ordering::Relaxed) < sent && t.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
    let got = reader.join().unwrap();
    let s = tx.stats().unwrap();
    assert_eq!(s.datagrams, u64::from(N));
    let mut seen = HashSet::new();
    let (mut dups, mut late, mut max) = (0u64, 0u64, None::<u32>);
    for &x in &got {
        if !seen.insert(x) {
            dups += 1;
            continue;
        }
        if max.is_some_and(|m| x < m) {
            late += 1;
        }
        max = max.max(Some(x));
    }
    let missing = u64::from(N) - seen.len() as u64;
    let pct = |n: u64| n as f64 * 100.0 / f64::from(N);
    eprintln!(
        "sender: {s}; receiver: {} datagrams, {:.2}% missing, {:.2}% duplicated, {:.2}% out of order",
        got.len(),
        pct(missing),
        pct(dups),
        pct(late)
    );
    // What the receiver sees is what the sender did (loopback loses nothing
    // at this pace)...
    assert_eq!(missing, s.lost, "missing = lost");
    assert_eq!(dups, s.duplicated, "duplicates = duplicated");
    // ... a held datagram arrives after later ones, unless every one it
    // waited for was lost, or its hold ran out first (a burst's last).
    assert!(late <= s.reordered && late as f64 >= 0.9 * s.reordered as f64);
    // ... and that is what was asked, within tolerance (N = 20 000: one
    // standard deviation of a 10 % share is 0.21 %).
    assert!((pct(s.lost) - 5.0).abs() < 1.0, "{}", pct(s.lost));
    assert!(
        (pct(s.duplicated) - 5.0).abs() < 1.0,
        "{}",
        pct(s.duplicated)
    );
    assert!((pct(late) - 10.0).abs() < 1.5, "{}", pct(late));
}

#[test]
fn without_faults_datagrams_go_as_they_come() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = rx.local_addr().unwrap();
    let tx = DatagramSender::new(
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        &LinkFaults::NONE,
        "test",
    );
    assert!(tx.stats().is_none(), "no wrapper");
    for i in 0..100u32 {
        tx.send_to(&i.to_le_bytes(), to).unwrap();
    }
    assert_eq!(
        receive(&rx, Duration::from_millis(200)),
        (0..100).collect::<Vec<_>>()
    );
}

#[test]
fn a_held_datagram_goes_after_its_hold_on_a_quiet_socket() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = rx.local_addr().unwrap();
    let tx = DatagramSender::new(
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        &faults("reorder=100%,hold=20ms,seed=3"),
        "test",
    );
    let t0 = Instant::now();
    tx.send_to(&1u32.to_le_bytes(), to).unwrap();
    assert_eq!(receive(&rx, Duration::from_secs(1)), vec![1]);
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(20), "{took:?}");
}

#[tokio::test]
async fn a_batch_is_split_into_its_segments_each_meeting_its_fate() {
    use castor_transport::lossy::ImpairedSocket;
    use quinn::{AsyncUdpSocket, Runtime};
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = rx.local_addr().unwrap();
    let inner = quinn::TokioRuntime
        .wrap_udp_socket(UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let s = std::sync::Arc::new(ImpairedSocket::new(inner, &faults("dup=100%,seed=5")));
    assert_eq!(
        s.max_transmit_segments(),
        1,
        "quinn is asked for no batches"
    );
    // A batch of three 4-byte segments, each sent twice.
    let contents: Vec<u8> = (0..3u32).flat_map(|i| i.to_le_bytes()).collect();
    let batch = quinn::udp::Transmit {
        destination: to,
        ecn: None,
        contents: &contents,
        segment_size: Some(4),
        src_ip: None,
    };
    let mut poller = s.clone().create_io_poller();
    // As quinn does: a send that would block waits for the socket.
    while let Err(e) = s.try_send(&batch) {
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
    }
    assert_eq!(
        receive(&rx, Duration::from_millis(300)),
        vec![0, 0, 1, 1, 2, 2]
    );
    assert_eq!((s.stats().datagrams, s.stats().duplicated), (3, 3));
}
