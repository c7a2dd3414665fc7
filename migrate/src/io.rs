//! What both shells share: framed streams (with the link emulation on the
//! sending side) and the memory digest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use transport::link::{LinkShape, Pacer, PIECE};

use crate::wire::{Decoder, Msg};
use crate::MigrateError;

/// Writes migration frames to a QUIC stream, paced to the emulated link.
/// Several writers (the bulk stream and the control stream of the source)
/// share one pacer: they share one link.
#[derive(Debug)]
pub(crate) struct Tx {
    stream: quinn::SendStream,
    pacer: Arc<Mutex<Pacer>>,
    delay: Duration,
    /// Bytes written so far.
    pub bytes: u64,
}

impl Tx {
    pub fn new(stream: quinn::SendStream, pacer: Arc<Mutex<Pacer>>, link: LinkShape) -> Tx {
        Tx {
            stream,
            pacer,
            delay: link.delay,
            bytes: 0,
        }
    }

    /// A pacer for the link.
    pub fn pacer(link: LinkShape) -> Arc<Mutex<Pacer>> {
        Arc::new(Mutex::new(Pacer::new(link.rate_bytes_per_s)))
    }

    /// Sends frames, in pieces no faster than the link.
    pub async fn send(&mut self, frames: &[u8]) -> Result<(), MigrateError> {
        for piece in frames.chunks(PIECE) {
            let at = {
                let mut p = self.pacer.lock().unwrap_or_else(|e| e.into_inner());
                p.book(piece.len(), tokio::time::Instant::now())
            };
            tokio::time::sleep_until(at).await;
            self.stream.write_all(piece).await.map_err(|e| {
                MigrateError::Link(match e {
                    // Why it was lost (e.g. "timed out": the peer went silent).
                    quinn::WriteError::ConnectionLost(why) => format!("connection lost: {why}"),
                    e => e.to_string(),
                })
            })?;
            self.bytes += piece.len() as u64;
        }
        Ok(())
    }

    /// Sends one message.
    pub async fn msg(&mut self, m: &Msg) -> Result<(), MigrateError> {
        if !self.delay.is_zero() && !matches!(m, Msg::Pages { .. } | Msg::Page { .. }) {
            // The one-way delay, on the messages that end a step.
            tokio::time::sleep(self.delay).await;
        }
        self.send(&m.to_frame()).await
    }

    /// Finishes the stream.
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }
}

/// Reads migration messages from a QUIC stream.
#[derive(Debug)]
pub(crate) struct Rx {
    stream: quinn::RecvStream,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Rx {
    pub fn new(stream: quinn::RecvStream) -> Rx {
        Rx {
            stream,
            decoder: Decoder::new(),
            buf: vec![0; 256 << 10],
        }
    }

    /// The next message; an error when the stream or connection ends.
    pub async fn next(&mut self) -> Result<Msg, MigrateError> {
        loop {
            if let Some(m) = self
                .decoder
                .next_msg()
                .map_err(|e| MigrateError::Protocol(e.to_string()))?
            {
                return Ok(m);
            }
            match self.stream.read(&mut self.buf).await {
                Ok(Some(n)) => self.decoder.push(&self.buf[..n]),
                Ok(None) => return Err(MigrateError::Link("the peer ended the stream".into())),
                Err(e) => return Err(MigrateError::Link(e.to_string())),
            }
        }
    }
}

/// The digest of one page: xxh3-128 seeded with its frame number.
pub fn page_hash(frame: u64, page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(page, frame)
}
