//! The QUIC transport: one long-lived connection per pair, mutual TLS.
//!
//! - Both sides present a certificate signed by the pair's CA; each checks
//!   that the peer's certificate names the peer it expects. Anyone else fails
//!   the TLS handshake: no stream, no checkpoint byte, is ever read from them.
//! - The primary opens a unidirectional **data** stream (hello, then the
//!   checkpoints) and a bidirectional **control** stream (heartbeats both
//!   ways, acks from the backup). QUIC streams do not block each other, so a
//!   heartbeat never waits behind a checkpoint.
//! - Flow control: the receive windows are bounded; a primary that outruns
//!   the backup waits in `write_all` — backpressure, not buffering.
//! - A session ends with a typed [`EndReason`], sent as the QUIC close code
//!   and read back as [`TransportError::Ended`].
//!
//! [`certs`] makes the pair's CA and node certificates; [`link`] emulates a
//! slower link (rate and delay) for benchmarks; [`lossy`] loses, duplicates
//! and reorders the datagrams a node sends (`--link-faults`).
#![forbid(unsafe_code)]

pub mod certs;
pub mod link;
pub mod lossy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tracing::{info, warn};

use crate::certs::CertError;
use crate::lossy::LinkFaults;
use protocol::{EndReason, FrameDecoder, Message, WireError};

/// ALPN protocol id.
pub const ALPN: &[u8] = b"castor/1";
/// Send priority of the control stream (data streams have 0): heartbeats
/// and acks go out before queued checkpoint bytes.
pub const CONTROL_PRIORITY: i32 = 100;

/// Bytes of data a receiver buffers per stream before the sender waits.
pub const STREAM_WINDOW: u32 = 32 << 20;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Certificates or keys.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding or socket errors.
    #[error("{what}: {err}")]
    Io {
        /// What castor was doing.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// The connection could not be established (includes refused handshakes).
    #[error("connection to {addr} failed: {err}")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        err: String,
    },
    /// A peer was refused or the handshake failed on accept.
    #[error("refused a connection from {addr}: {err}")]
    Refused {
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        err: String,
    },
    /// The session ended: the peer closed it with a reason, or the
    /// connection broke.
    #[error("session ended: {0}")]
    Ended(EndReason),
    /// The peer sent bytes that are not valid frames.
    #[error("peer sent an invalid frame: {0}")]
    Wire(#[from] WireError),
    /// The endpoint was closed.
    #[error("the endpoint is closed")]
    Closed,
}

/// A node's TLS material and whom it accepts.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// This node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// The pair's CA.
    pub roots: Arc<RootCertStore>,
    /// The only name the peer's certificate may have.
    pub peer_name: String,
}

impl NodeTls {
    /// Loads `NODE.pem`, `NODE.key` and `ca.pem` from a `castor certs`
    /// directory ([`certs::node_files`]), and nothing else. Warns when a CA
    /// private key lies in that directory (the layout of older castors: the
    /// daemons never need it).
    pub fn from_dir(
        dir: &std::path::Path,
        node: &str,
        peer_name: &str,
    ) -> Result<Self, TransportError> {
        let stray = dir.join(certs::CA_KEY);
        if stray.exists() {
            tracing::warn!(
                file = %stray.display(),
                "a CA private key is in the directory this node loads; no daemon needs it: \
                 move it offline (`castor certs` now keeps it in a separate CA directory)"
            );
        }
        let [cert, key, ca] = certs::node_files(dir, node);
        Self::from_files(&cert, &key, &ca, peer_name)
    }

    /// Loads from explicit files.
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
        peer_name: &str,
    ) -> Result<Self, TransportError> {
        certs::check_name(peer_name)?;
        let mut roots = RootCertStore::empty();
        for c in certs::load_certs(ca)? {
            roots.add(c)?;
        }
        let chain = certs::load_certs(cert)?;
        certs::check_validity(cert, &chain[0], std::time::SystemTime::now())?;
        Ok(NodeTls {
            chain,
            key: Arc::new(certs::load_key(key)?),
            roots: Arc::new(roots),
            peer_name: peer_name.to_string(),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts client certificates from the CA that name one expected peer.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("unparsable client certificate: {e}")))?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|_| {
                rustls::Error::General(format!(
                    "client certificate does not name the expected peer '{}'",
                    match &self.name {
                        ServerName::DnsName(d) => d.as_ref().to_string(),
                        other => format!("{other:?}"),
                    }
                ))
            })?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How long a connection lives without hearing from its peer (quinn's
/// keep-alives go every 500 ms).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

fn transport_config() -> Arc<quinn::TransportConfig> {
    transport_config_idle(IDLE_TIMEOUT)
}

fn transport_config_idle(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(2 * STREAM_WINDOW));
    t.send_window(2 * STREAM_WINDOW as u64);
    t.max_concurrent_uni_streams(4u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(
        idle.max(Duration::from_secs(1))
            .try_into()
            .expect("an idle timeout fits"),
    ));
    Arc::new(t)
}

fn server_config(tls: &NodeTls) -> Result<quinn::ServerConfig, TransportError> {
    let inner = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let name = ServerName::try_from(tls.peer_name.clone())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let verifier = Arc::new(NamedClientVerifier { inner, name });
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    let qc = QuicServerConfig::try_from(c).map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qc));
    sc.transport_config(transport_config());
    Ok(sc)
}

/// A rustls client configuration presenting `tls`'s certificate (or none,
/// for tests of refusal) and trusting its CA.
pub fn client_crypto(
    tls: &NodeTls,
    present_cert: bool,
) -> Result<rustls::ClientConfig, TransportError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(tls.roots.clone());
    let mut c = if present_cert {
        b.with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())?
    } else {
        b.with_no_client_auth()
    };
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

fn client_config(crypto: rustls::ClientConfig) -> Result<quinn::ClientConfig, TransportError> {
    client_config_idle(crypto, IDLE_TIMEOUT)
}

fn client_config_idle(
    crypto: rustls::ClientConfig,
    idle: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let qc =
        QuicClientConfig::try_from(crypto).map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    cc.transport_config(transport_config_idle(idle));
    Ok(cc)
}

/// The backup's listening endpoint.
#[derive(Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    faults: LinkFaults,
}

impl Listener {
    /// Binds `addr` (port 0 picks one).
    pub fn bind(addr: SocketAddr, tls: &NodeTls) -> Result<Self, TransportError> {
        Self::bind_impaired(addr, tls, &LinkFaults::NONE)
    }

    /// Binds `addr`; what the endpoint sends meets `faults` ([`lossy`]).
    /// The links it accepts carry the faults for their heartbeat path
    /// ([`Link::faults`]).
    pub fn bind_impaired(
        addr: SocketAddr,
        tls: &NodeTls,
        faults: &LinkFaults,
    ) -> Result<Self, TransportError> {
        let endpoint = lossy::endpoint(addr, Some(server_config(tls)?), faults).map_err(|err| {
            TransportError::Io {
                what: format!("binding UDP {addr}"),
                err,
            }
        })?;
        Ok(Listener {
            endpoint,
            faults: *faults,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|err| TransportError::Io {
                what: "local address".into(),
                err,
            })
    }

    /// Waits for the next peer that completes mutual TLS and opens its
    /// streams. Refused handshakes are returned as [`TransportError::Refused`]
    /// (and logged); call again to keep listening.
    pub async fn accept(&self) -> Result<Link, TransportError> {
        let incoming = self.endpoint.accept().await.ok_or(TransportError::Closed)?;
        let addr = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                warn!(%addr, "refused connection: {e}");
                return Err(TransportError::Refused {
                    addr,
                    err: e.to_string(),
                });
            }
        };
        info!(%addr, "peer authenticated");
        let lost = ended;
        let (ctl_tx, ctl_rx) = conn.accept_bi().await.map_err(lost)?;
        // Control before bulk data whenever both have bytes to send.
        let _ = ctl_tx.set_priority(CONTROL_PRIORITY);
        let data_rx = conn.accept_uni().await.map_err(lost)?;
        Ok(Link {
            conn,
            faults: self.faults,
            data_tx: None,
            data_rx: Some(FrameReader::new(data_rx)),
            ctl_tx: FrameWriter(ctl_tx),
            ctl_rx: FrameReader::new(ctl_rx),
        })
    }

    /// Waits for the next peer that completes mutual TLS and returns the
    /// bare connection, without accepting the pair's two streams: for
    /// protocols of their own on the same authenticated channel (live
    /// migration opens its own streams). Refused handshakes are returned as
    /// [`TransportError::Refused`].
    pub async fn accept_connection(&self) -> Result<quinn::Connection, TransportError> {
        let incoming = self.endpoint.accept().await.ok_or(TransportError::Closed)?;
        let addr = incoming.remote_address();
        incoming.await.map_err(|e| {
            warn!(%addr, "refused connection: {e}");
            TransportError::Refused {
                addr,
                err: e.to_string(),
            }
        })
    }

    /// Stops listening.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// Connects to the backup at `addr` as `tls` (the primary's side).
pub async fn connect(addr: SocketAddr, tls: &NodeTls) -> Result<Link, TransportError> {
    connect_impaired(addr, tls, &LinkFaults::NONE).await
}

/// Connects to the backup at `addr` as `tls`; what this end sends meets
/// `faults` ([`lossy`]), which the link carries for its heartbeat path.
pub async fn connect_impaired(
    addr: SocketAddr,
    tls: &NodeTls,
    faults: &LinkFaults,
) -> Result<Link, TransportError> {
    connect_inner(addr, &tls.peer_name, client_crypto(tls, true)?, faults).await
}

/// Connects with an explicit rustls configuration (tests use it to try
/// connections that must be refused).
pub async fn connect_with(
    addr: SocketAddr,
    peer_name: &str,
    crypto: rustls::ClientConfig,
) -> Result<Link, TransportError> {
    connect_inner(addr, peer_name, crypto, &LinkFaults::NONE).await
}

async fn connect_inner(
    addr: SocketAddr,
    peer_name: &str,
    crypto: rustls::ClientConfig,
    faults: &LinkFaults,
) -> Result<Link, TransportError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let mut endpoint = lossy::endpoint(bind, None, faults).map_err(|err| TransportError::Io {
        what: "binding a UDP socket".into(),
        err,
    })?;
    endpoint.set_default_client_config(client_config(crypto)?);
    let err = |e: String| TransportError::Connect { addr, err: e };
    let conn = endpoint
        .connect(addr, peer_name)
        .map_err(|e| err(e.to_string()))?
        .await
        .map_err(|e| {
            warn!(%addr, "connection refused or failed: {e}");
            err(e.to_string())
        })?;
    let (mut ctl_tx, ctl_rx) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
    // Control before bulk data whenever both have bytes to send.
    let _ = ctl_tx.set_priority(CONTROL_PRIORITY);
    let data_tx = conn.open_uni().await.map_err(|e| err(e.to_string()))?;
    // Streams appear to the peer with their first byte: a heartbeat opens
    // the control stream at once. (A refused client learns it here at the
    // latest: TLS 1.3 client auth fails after the client's handshake ends.)
    let mut f = Vec::new();
    Message::Heartbeat { seq: 0, sent_us: 0 }.encode(&mut f);
    ctl_tx.write_all(&f).await.map_err(|e| err(e.to_string()))?;
    Ok(Link {
        conn,
        faults: *faults,
        data_tx: Some(FrameWriter(data_tx)),
        data_rx: None,
        ctl_tx: FrameWriter(ctl_tx),
        ctl_rx: FrameReader::new(ctl_rx),
    })
}

/// Connects to `addr` as `tls` with mutual TLS and returns the bare
/// connection, no stream opened: for protocols of their own on the pair's
/// authenticated channel (live migration). The returned endpoint must be
/// kept alive as long as the connection is used.
///
/// `idle`: the connection ends after this long without a packet from the
/// peer (at least 1 s). QUIC uses the smaller of both ends' limits, so a
/// short one here bounds how long the listener waits for a dead client
/// too (a migration's destination for a dead source).
pub async fn connect_connection(
    addr: SocketAddr,
    tls: &NodeTls,
    idle: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
    let bind = any_addr_for(addr);
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|err| TransportError::Io {
        what: "binding a UDP socket".into(),
        err,
    })?;
    endpoint.set_default_client_config(client_config_idle(client_crypto(tls, true)?, idle)?);
    let conn = endpoint
        .connect(addr, &tls.peer_name)
        .map_err(|e| TransportError::Connect {
            addr,
            err: e.to_string(),
        })?
        .await
        .map_err(|e| {
            warn!(%addr, "connection refused or failed: {e}");
            TransportError::Connect {
                addr,
                err: e.to_string(),
            }
        })?;
    Ok((endpoint, conn))
}

/// Writes frames to a stream.
#[derive(Debug)]
pub struct FrameWriter(pub quinn::SendStream);

impl FrameWriter {
    /// Sends encoded frames; waits while the peer's window is full.
    pub async fn send(&mut self, frames: &[u8]) -> Result<(), TransportError> {
        self.0.write_all(frames).await.map_err(|e| match e {
            // Keep the peer's close reason (e.g. "taken over").
            quinn::WriteError::ConnectionLost(c) => ended(c),
            other => TransportError::Ended(EndReason::Broken(other.to_string())),
        })
    }

    /// Sends one message.
    pub async fn send_message(&mut self, m: &Message) -> Result<(), TransportError> {
        self.send(&m.to_frame()).await
    }
}

impl TransportError {
    /// Why the session ended: the peer's typed reason; bytes that are not
    /// valid frames are refused (the peer is alive and sent them: a hello
    /// field such as an unknown mode as [`EndReason::Incompatible`]);
    /// otherwise a broken session.
    pub fn end_reason(self) -> EndReason {
        match self {
            TransportError::Ended(r) => r,
            TransportError::Wire(w) => {
                EndReason::for_protocol_error(&protocol::ProtocolError::Wire(w))
            }
            other => EndReason::Broken(other.to_string()),
        }
    }
}

/// The unspecified address of `peer`'s family, port 0: where to bind a
/// socket that talks to `peer` (the heartbeat path).
pub fn any_addr_for(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    }
}

/// What a connection's end means to castor: the peer's typed reason when it
/// closed the connection on purpose, otherwise a broken session.
fn ended(e: quinn::ConnectionError) -> TransportError {
    TransportError::Ended(match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            EndReason::from_close(c.error_code.into_inner() as u32, &c.reason)
        }
        quinn::ConnectionError::TimedOut => EndReason::Broken("the connection timed out".into()),
        other => EndReason::Broken(other.to_string()),
    })
}

fn close(conn: &quinn::Connection, reason: &EndReason) {
    let text = reason.to_string();
    let text = &text.as_bytes()[..text.len().min(512)];
    conn.close(quinn::VarInt::from_u32(reason.code()), text);
}

/// Ends a session from outside the task that owns its [`Link`], and reads
/// the connection's liveness.
#[derive(Debug, Clone)]
pub struct Closer(quinn::Connection);

impl Closer {
    /// Ends the session with `reason`.
    pub fn close(&self, reason: &EndReason) {
        close(&self.0, reason);
    }

    /// UDP datagrams received on this connection so far: any packet from
    /// the peer proves it alive, even while its heartbeat waits behind
    /// checkpoint data.
    pub fn datagrams_received(&self) -> u64 {
        self.0.stats().udp_rx.datagrams
    }

    /// The certificate the peer presented in the handshake is valid for the
    /// DNS name `name`. (The backup's verifier already pinned the expected
    /// primary's name; this checks a name the peer claims, such as its
    /// hello's, against the certificate itself.)
    pub fn peer_is_named(&self, name: &str) -> bool {
        let Some(identity) = self.0.peer_identity() else {
            return false;
        };
        let Ok(certs) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
            return false;
        };
        let Some(leaf) = certs.first() else {
            return false;
        };
        let (Ok(cert), Ok(name)) = (
            webpki::EndEntityCert::try_from(leaf),
            ServerName::try_from(name.to_string()),
        ) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }
}

/// Reads messages from a stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(stream: quinn::RecvStream) -> Self {
        FrameReader {
            stream,
            decoder: FrameDecoder::new(),
            buf: vec![0; 256 << 10],
        }
    }

    /// The next message; `None` when the peer finished the stream.
    pub async fn next(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            match self.stream.read(&mut self.buf).await {
                Ok(Some(n)) => self.decoder.push(&self.buf[..n]),
                Ok(None) => return Ok(None),
                Err(quinn::ReadError::ConnectionLost(c)) => return Err(ended(c)),
                Err(e) => return Err(TransportError::Ended(EndReason::Broken(e.to_string()))),
            }
        }
    }
}

/// An authenticated connection between the pair, with its two streams.
#[derive(Debug)]
pub struct Link {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// The faults its endpoint's sends meet, for the heartbeat path.
    faults: LinkFaults,
    /// Primary: the data stream it writes.
    pub data_tx: Option<FrameWriter>,
    /// Backup: the data stream it reads.
    pub data_rx: Option<FrameReader>,
    /// Control stream, outgoing.
    pub ctl_tx: FrameWriter,
    /// Control stream, incoming.
    pub ctl_rx: FrameReader,
}

impl Link {
    /// The faults the datagrams this end sends meet ([`lossy`]): the
    /// heartbeat path applies the same.
    pub fn faults(&self) -> LinkFaults {
        self.faults
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Ends the session: closes the connection with `reason` (its close
    /// code and text), which the peer reads as a [`TransportError::Ended`].
    pub fn close(&self, reason: &EndReason) {
        close(&self.conn, reason);
    }

    /// A handle that can end the session from elsewhere (a watchdog).
    pub fn closer(&self) -> Closer {
        Closer(self.conn.clone())
    }

    /// Round-trip time as QUIC estimates it.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The connection's loss and congestion figures, for logs.
    pub fn stats(&self) -> String {
        let s = self.conn.stats();
        format!(
            "rtt {:?}, cwnd {} B, congestion events {}, lost {} packets ({} B) of {} sent, {} datagrams received",
            s.path.rtt,
            s.path.cwnd,
            s.path.congestion_events,
            s.path.lost_packets,
            s.path.lost_bytes,
            s.path.sent_packets,
            s.udp_rx.datagrams
        )
    }
}
