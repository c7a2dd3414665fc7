//! Transport on loopback, side by side in one run: streaming throughput of
//! checkpoint-sized frames over QUIC with mutual TLS (castor's transport),
//! plain TCP, and TCP with mutual TLS; and the round-trip time of a
//! heartbeat while a bulk checkpoint is in flight (QUIC: its own stream;
//! TCP: behind the bulk data on the same connection).
//!
//! Run: `cargo bench -p castor-benchmarks --bench transport`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use node::stats::percentile;
use protocol::message::MAX_RECORDS_CHUNK;
use protocol::{FrameDecoder, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use transport::{self, client_crypto, Listener, NodeTls};

const TOTAL: usize = 1 << 30; // bytes of records per run

fn chunk_frame() -> Vec<u8> {
    Message::Records {
        epoch: 1,
        data: vec![0x5A; MAX_RECORDS_CHUNK],
    }
    .to_frame()
}

fn now_us(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

/// QUIC: returns (GB/s, heartbeat RTTs in µs during the transfer).
async fn quic(dir: &std::path::Path) -> (f64, Vec<f64>) {
    let btls = NodeTls::from_dir(dir, "backup", "primary").unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &btls).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut link = listener.accept().await.unwrap();
        let mut data = link.data_rx.take().unwrap();
        let mut ctl_tx = link.ctl_tx;
        let mut ctl_rx = link.ctl_rx;
        // Echoes until the connection closes.
        tokio::spawn(async move {
            while let Ok(Some(Message::Heartbeat { seq, sent_us })) = ctl_rx.next().await {
                ctl_tx
                    .send_message(&Message::HeartbeatEcho { seq, sent_us })
                    .await
                    .unwrap();
            }
        });
        let mut got = 0usize;
        while let Some(m) = data.next().await.unwrap() {
            if let Message::Records { data, .. } = m {
                got += data.len();
            }
        }
        got
    });
    let ptls = NodeTls::from_dir(dir, "primary", "backup").unwrap();
    let mut link = transport::connect(addr, &ptls).await.unwrap();
    let mut data = link.data_tx.take().unwrap();
    data.send(&Message::Hello(hello()).to_frame())
        .await
        .unwrap();
    let frame = chunk_frame();
    let t0 = Instant::now();
    let mut ctl_tx = link.ctl_tx;
    let mut ctl_rx = link.ctl_rx;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let hb = tokio::spawn(async move {
        let mut rtts = Vec::new();
        // the connect's opening heartbeat echo
        let _ = ctl_rx.next().await;
        for seq in 1.. {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            if ctl_tx
                .send_message(&Message::Heartbeat {
                    seq,
                    sent_us: now_us(t0),
                })
                .await
                .is_err()
            {
                break;
            }
            match ctl_rx.next().await {
                Ok(Some(Message::HeartbeatEcho { sent_us, .. })) => {
                    rtts.push((now_us(t0) - sent_us) as f64)
                }
                _ => break,
            }
        }
        rtts
    });
    for _ in 0..TOTAL / MAX_RECORDS_CHUNK {
        data.send(&frame).await.unwrap();
    }
    data.0.finish().unwrap();
    let got = server.await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    // (the server's echo task ends with it; the heartbeat task sees `stop`)
    assert_eq!(got, TOTAL);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rtts = hb.await.unwrap();
    link.conn.close(0u32.into(), b"done");
    (TOTAL as f64 / secs / 1e9, rtts)
}

fn hello() -> protocol::Hello {
    protocol::Hello {
        version: protocol::VERSION,
        lowest_version: protocol::version::V5,
        session: 1,
        node: "primary".into(),
        capabilities: 0,
        mode: protocol::payload::mode_from_byte(2).unwrap(),
        block_size: 64,
        memory_bytes: 1 << 30,
        vcpus: 1,
        output_offset: 0,
        token: 0,
        beat_port: 0,
        beat_key: [0; 32],
        disk_bytes: 0,
    }
}

/// Reads frames, echoing heartbeats; returns record bytes received.
async fn tcp_server<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> usize {
    let mut d = FrameDecoder::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        d.push(&buf[..n]);
        while let Some(m) = d.next_message().unwrap() {
            match m {
                Message::Records { data, .. } => got += data.len(),
                Message::Heartbeat { seq, sent_us } => {
                    s.write_all(&Message::HeartbeatEcho { seq, sent_us }.to_frame())
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    }
}

/// Sends TOTAL bytes of records with a heartbeat every 10 ms on the same
/// connection; returns (GB/s, RTTs).
async fn tcp_client<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(s: S) -> (f64, Vec<f64>) {
    let (mut rd, mut wr) = tokio::io::split(s);
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut d = FrameDecoder::new();
        let mut buf = vec![0u8; 4096];
        let mut rtts = Vec::new();
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return rtts,
                Ok(n) => n,
            };
            d.push(&buf[..n]);
            while let Ok(Some(Message::HeartbeatEcho { sent_us, .. })) = d.next_message() {
                rtts.push((now_us(t0) - sent_us) as f64);
            }
        }
    });
    let frame = chunk_frame();
    let mut last_hb = Instant::now();
    let mut seq = 0;
    for _ in 0..TOTAL / MAX_RECORDS_CHUNK {
        wr.write_all(&frame).await.unwrap();
        if last_hb.elapsed() >= Duration::from_millis(10) {
            seq += 1;
            wr.write_all(
                &Message::Heartbeat {
                    seq,
                    sent_us: now_us(t0),
                }
                .to_frame(),
            )
            .await
            .unwrap();
            last_hb = Instant::now();
        }
    }
    wr.flush().await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    wr.shutdown().await.unwrap();
    let rtts = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    (TOTAL as f64 / secs / 1e9, rtts)
}

async fn tcp_plain() -> (f64, Vec<f64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move { tcp_server(l.accept().await.unwrap().0).await });
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let r = tcp_client(s).await;
    assert_eq!(server.await.unwrap(), TOTAL);
    r
}

async fn tcp_tls(dir: &std::path::Path) -> (f64, Vec<f64>) {
    let btls = NodeTls::from_dir(dir, "backup", "primary").unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        btls.roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(btls.chain.clone(), btls.key.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let s = acceptor.accept(l.accept().await.unwrap().0).await.unwrap();
        tcp_server(s).await
    });
    let ptls = NodeTls::from_dir(dir, "primary", "backup").unwrap();
    let mut cc = client_crypto(&ptls, true).unwrap();
    cc.alpn_protocols.clear();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let s = connector
        .connect("backup".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let r = tcp_client(s).await;
    assert_eq!(server.await.unwrap(), TOTAL);
    r
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    transport::certs::create(tmp.path(), &["primary".into(), "backup".into()], false).unwrap();
    println!("# Transport on loopback: {} MiB of 1 MiB record frames per run, heartbeat every 10 ms during the transfer\n", TOTAL >> 20);
    println!("| transport | throughput GB/s | heartbeats | RTT p50 ms | RTT p99 ms | RTT max ms |");
    println!("|---|---|---|---|---|---|");
    let rows = [
        (
            "QUIC + mutual TLS (castor; heartbeats on the control stream)",
            rt.block_on(quic(tmp.path())),
        ),
        (
            "TCP + mutual TLS (heartbeats behind the data)",
            rt.block_on(tcp_tls(tmp.path())),
        ),
        (
            "TCP plain (heartbeats behind the data)",
            rt.block_on(tcp_plain()),
        ),
    ];
    for (name, (gbs, mut rtt)) in rows {
        if rtt.is_empty() {
            println!("| {name} | {gbs:.2} | 0 | - | - | - |");
            continue;
        }
        let n = rtt.len();
        let max = rtt.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {name} | {gbs:.2} | {n} | {:.2} | {:.2} | {:.2} |",
            percentile(&mut rtt, 0.5) / 1e3,
            percentile(&mut rtt, 0.99) / 1e3,
            max / 1e3
        );
    }
}
