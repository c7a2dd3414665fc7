//! The wire format and the session state machines, without sockets.

use castor_protocol::message::{CAP_VERIFY, MAX_FRAME, MAX_RECORDS_CHUNK, MAX_STATE};
use castor_protocol::{
    staging_bound, EndReason, Event, FrameDecoder, Hello, Limits, Message, ProtocolError, Receiver,
    Sender, WireError, VERSION,
};
use proptest::prelude::*;

fn hello(caps: u64) -> Hello {
    Hello {
        version: VERSION,
        lowest_version: castor_protocol::version::V5,
        session: 42,
        node: "primary".into(),
        capabilities: caps,
        mode: fgbi::Mode::Fgbi,
        block_size: 64,
        memory_bytes: 1 << 30,
        vcpus: 2,
        output_offset: 100,
        token: 3,
        beat_port: 7,
        beat_key: [9; 32],
        disk_bytes: 0,
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u64>(),
            "[a-z0-9.-]{0,40}",
            any::<u64>(),
            (0u8..3).prop_map(|b| castor_protocol::payload::mode_from_byte(b).unwrap()),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            (any::<u64>(), any::<u64>(), any::<u16>(), any::<[u8; 32]>())
        )
            .prop_map(
                |(
                    session,
                    node,
                    capabilities,
                    mode,
                    block_size,
                    memory_bytes,
                    vcpus,
                    (output_offset, token, beat_port, beat_key),
                )| {
                    Message::Hello(Hello {
                        version: VERSION,
                        lowest_version: castor_protocol::version::V5,
                        session,
                        node,
                        capabilities,
                        mode,
                        block_size,
                        memory_bytes,
                        vcpus,
                        output_offset,
                        token,
                        beat_port,
                        beat_key,
                        disk_bytes: beat_port as u64 * 4096,
                    })
                }
            ),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(epoch, dirty_pages, raw_bytes)| {
            Message::EpochStart {
                epoch,
                dirty_pages,
                raw_bytes,
            }
        }),
        (any::<u64>(), bytes(3000)).prop_map(|(epoch, data)| Message::Records { epoch, data }),
        (any::<u64>(), bytes(3000)).prop_map(|(epoch, data)| Message::State { epoch, data }),
        (any::<u64>(), any::<u64>(), bytes(300)).prop_map(|(epoch, offset, data)| {
            Message::Output {
                epoch,
                offset,
                data,
            }
        }),
        (any::<u64>(), any::<[u8; 32]>(), any::<Option<[u8; 32]>>()).prop_map(
            |(epoch, digest, memory_digest)| Message::Commit {
                epoch,
                digest,
                memory_digest,
                disk: (epoch % 3 != 0).then_some(castor_protocol::disk::DiskCommit {
                    sum: epoch.rotate_left(7),
                    flushed: epoch % 2 == 0,
                }),
            }
        ),
        any::<u64>().prop_map(|epoch| Message::Held { epoch }),
        any::<u64>().prop_map(|epoch| Message::Ack { epoch }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_us)| Message::Heartbeat { seq, sent_us }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(seq, sent_us)| Message::HeartbeatEcho { seq, sent_us }),
        (any::<u64>(), "[ -~]{0,100}")
            .prop_map(|(last_epoch, reason)| Message::Goodbye { last_epoch, reason }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips_through_a_split_stream(
        msgs in prop::collection::vec(message(), 1..20),
        cuts in prop::collection::vec(1usize..500, 1..50),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode(&mut stream);
        }
        // Feed the stream in arbitrary pieces.
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < stream.len() {
            let n = cuts[i % cuts.len()].min(stream.len() - pos);
            d.push(&stream[pos..pos + n]);
            pos += n;
            i += 1;
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn random_bytes_never_panic(data in bytes(2000)) {
        let mut d = FrameDecoder::new();
        d.push(&data);
        for _ in 0..100 {
            match d.next_message() {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
    }
}

/// Runs frames through a decoder into a receiver.
fn deliver(rx: &mut Receiver, frames: &[u8]) -> Result<Vec<Event>, ProtocolError> {
    let mut d = FrameDecoder::new();
    d.push(frames);
    let mut events = Vec::new();
    while let Some(m) = d.next_message()? {
        events.push(rx.on_message(m)?);
    }
    Ok(events)
}

#[test]
fn a_session_in_memory() {
    let (mut tx, hello_frame) = Sender::new(hello(CAP_VERIFY));
    let mut rx = Receiver::new(64 << 20);
    assert_eq!(
        deliver(&mut rx, &hello_frame).unwrap(),
        vec![Event::Hello(hello(CAP_VERIFY))]
    );
    let mut offset = 100;
    for epoch in 1..=5u64 {
        let mut f = Vec::new();
        let records: Vec<u8> = (0..(MAX_RECORDS_CHUNK + 777 * epoch as usize))
            .map(|i| (i % 251) as u8)
            .collect();
        let out = format!("line {epoch}\n").into_bytes();
        tx.begin(epoch, 10, 40960, &mut f).unwrap();
        tx.records(&records, &mut f).unwrap();
        tx.state(b"machine state", &mut f).unwrap();
        tx.output(&out, &mut f).unwrap();
        assert_eq!(
            tx.commit(Some([epoch as u8; 32]), None, &mut f).unwrap(),
            epoch
        );
        let events = deliver(&mut rx, &f).unwrap();
        let Some(Event::Checkpoint(c)) = events.last() else {
            panic!("no checkpoint: {events:?}")
        };
        assert_eq!(c.epoch, epoch);
        assert_eq!(c.records, records, "records reassembled from 2 chunks");
        assert_eq!(c.state, b"machine state");
        assert_eq!((c.output_offset, c.output.clone()), (offset, out.clone()));
        assert_eq!(c.memory_digest, Some([epoch as u8; 32]));
        offset += out.len() as u64;
        // The ack flows back.
        let mut d = FrameDecoder::new();
        d.push(&rx.ack(epoch));
        let Some(Message::Ack { epoch: e }) = d.next_message().unwrap() else {
            panic!()
        };
        assert_eq!(tx.on_ack(e).unwrap(), epoch);
    }
    assert_eq!(tx.last_acked(), 5);
    assert!(
        matches!(tx.on_ack(5), Err(ProtocolError::BadAck { .. })),
        "duplicate ack"
    );
    assert!(
        matches!(tx.on_ack(9), Err(ProtocolError::BadAck { .. })),
        "ack ahead of commits"
    );
}

fn epoch_frames(tx: &mut Sender, epoch: u64) -> Vec<u8> {
    let mut f = Vec::new();
    tx.begin(epoch, 1, 4096, &mut f).unwrap();
    tx.records(b"rec", &mut f).unwrap();
    tx.state(b"st", &mut f).unwrap();
    tx.commit(None, None, &mut f).unwrap();
    f
}

#[test]
fn out_of_order_and_oversized_input_is_refused() {
    // Content before Hello.
    let mut rx = Receiver::new(1 << 20);
    let e = deliver(&mut rx, &Message::Ack { epoch: 1 }.to_frame()).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::Unexpected {
            message: "Ack",
            state: "before Hello"
        }
    );

    // A version older than any hello this castor reads: refused by the
    // decoder with both named.
    let mut f = Message::Hello(hello(0)).to_frame();
    f[5] = 4; // version field follows length (4) and type (1)
    let e = deliver(&mut Receiver::new(1 << 20), &f).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::Wire(WireError::UnsupportedVersion {
            got: 4,
            supported: castor_protocol::version::SUPPORTED
        })
    );
    assert!(e.to_string().contains("version 4"), "{e}");
    // A newer castor's hello (version 9, speaking 9 only) reads, and is
    // refused with both ranges named.
    let h = Hello {
        version: 9,
        lowest_version: 9,
        ..hello(0)
    };
    let e = deliver(&mut Receiver::new(1 << 20), &Message::Hello(h).to_frame()).unwrap_err();
    assert!(
        matches!(e, ProtocolError::NoCommonVersion { .. }) && e.is_incompatible(),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("9 only") && e.to_string().contains("5 to 7"),
        "{e}"
    );

    let (mut tx, h) = Sender::new(hello(0));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &h).unwrap();
    for epoch in 1..=3 {
        deliver(&mut rx, &epoch_frames(&mut tx, epoch)).unwrap();
    }
    // A replayed (old) epoch.
    let e = deliver(&mut rx, &frames_of(2)).unwrap_err();
    assert_eq!(e, ProtocolError::EpochNotNext { got: 2, last: 3 });

    // Tampered content: the commit digest no longer matches.
    let mut f = epoch_frames(&mut tx, 4);
    let pos = f.windows(3).position(|w| w == b"rec").unwrap();
    f[pos] = b'X';
    assert_eq!(
        deliver(&mut rx, &f).unwrap_err(),
        ProtocolError::DigestMismatch(4)
    );

    // Over the staging limit.
    let mut rx = Receiver::new(100);
    let (mut tx, h) = Sender::new(hello(0));
    deliver(&mut rx, &h).unwrap();
    let mut f = Vec::new();
    tx.begin(1, 1, 1, &mut f).unwrap();
    tx.records(&[0u8; 101], &mut f).unwrap();
    assert_eq!(
        deliver(&mut rx, &f).unwrap_err(),
        ProtocolError::EpochTooLarge { limit: 100 }
    );

    // A frame length beyond the maximum is refused before buffering it.
    let mut d = FrameDecoder::new();
    d.push(&((MAX_FRAME as u32 + 1).to_le_bytes()));
    assert!(matches!(
        d.next_message(),
        Err(WireError::FrameTooLarge { .. })
    ));
    // A byte-string length beyond its limit.
    let mut f = Message::Records {
        epoch: 1,
        data: vec![1, 2, 3],
    }
    .to_frame();
    f[13..17].copy_from_slice(&(u32::MAX).to_le_bytes());
    let mut d = FrameDecoder::new();
    d.push(&f);
    assert!(matches!(
        d.next_message(),
        Err(WireError::TooLong {
            field: "Records.data",
            ..
        })
    ));
    // Unknown type, trailing bytes.
    let mut d = FrameDecoder::new();
    d.push(&[1, 0, 0, 0, 99]);
    assert_eq!(d.next_message(), Err(WireError::UnknownType(99)));
    let mut f = Message::Ack { epoch: 1 }.to_frame();
    f[0] += 1;
    f.push(0);
    let mut d = FrameDecoder::new();
    d.push(&f);
    assert!(matches!(
        d.next_message(),
        Err(WireError::TrailingBytes { .. })
    ));

    // Sender misuse is an error, not a panic.
    let (mut tx, _) = Sender::new(hello(0));
    let mut f = Vec::new();
    assert!(tx.records(b"x", &mut f).is_err());
    tx.begin(1, 0, 0, &mut f).unwrap();
    assert!(
        tx.commit(None, None, &mut f).is_err(),
        "commit without state"
    );
    assert!(tx.begin(2, 0, 0, &mut f).is_err(), "nested epoch");
}

#[test]
fn output_must_be_contiguous() {
    let (mut tx, h) = Sender::new(hello(0));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &h).unwrap();
    let mut f = Vec::new();
    tx.begin(1, 0, 0, &mut f).unwrap();
    tx.state(b"s", &mut f).unwrap();
    f.extend(
        Message::Output {
            epoch: 1,
            offset: 150,
            data: b"gap".to_vec(),
        }
        .to_frame(),
    );
    assert_eq!(
        deliver(&mut rx, &f).unwrap_err(),
        ProtocolError::OutputGap {
            got: 150,
            expected: 100
        }
    );
}

/// Epoch `epoch`'s frames as a sender that has committed every epoch
/// before it would send them.
fn frames_of(epoch: u64) -> Vec<u8> {
    let (mut tx, _) = Sender::new(hello(0));
    for e in 1..epoch {
        epoch_frames(&mut tx, e);
    }
    epoch_frames(&mut tx, epoch)
}

#[test]
fn an_epoch_gap_is_refused_and_the_next_session_starts_from_a_full_resync() {
    let (mut tx, h) = Sender::new(hello(0));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &h).unwrap();
    for epoch in 1..=3 {
        deliver(&mut rx, &epoch_frames(&mut tx, epoch)).unwrap();
    }
    // Epoch 4 never arrives; epoch 5 is whole and its digest matches.
    let e = deliver(&mut rx, &frames_of(5)).unwrap_err();
    assert_eq!(e, ProtocolError::EpochNotNext { got: 5, last: 3 });
    let text = e.to_string();
    assert!(
        text.contains("epoch 5") && text.contains("epoch 3") && text.contains("only epoch 4"),
        "{text}"
    );
    // Nothing of epoch 5 was staged or handed over: the replica stays at 3.
    assert_eq!((rx.last_committed(), rx.in_epoch()), (3, None));
    // The backup ends the session with a refusal (the primary is alive).
    let why = EndReason::for_protocol_error(&e);
    assert!(
        matches!(why, EndReason::Refused(_)) && why.peer_alive(),
        "{why:?}"
    );
    // The first epoch of a session must be 1 too: a session never starts
    // from a delta.
    let mut fresh = Receiver::new(1 << 20);
    deliver(&mut fresh, &h).unwrap();
    assert_eq!(
        deliver(&mut fresh, &frames_of(2)).unwrap_err(),
        ProtocolError::EpochNotNext { got: 2, last: 0 }
    );
    // The next session: a new hello, and its full resync (epoch 1) commits.
    let (mut tx2, h2) = Sender::new(Hello {
        session: 43,
        ..hello(0)
    });
    let mut rx2 = Receiver::new(1 << 20);
    deliver(&mut rx2, &h2).unwrap();
    let ev = deliver(&mut rx2, &epoch_frames(&mut tx2, 1)).unwrap();
    assert!(
        matches!(ev.last(), Some(Event::Checkpoint(c)) if c.epoch == 1),
        "{ev:?}"
    );
    // The sender cannot produce a gap either.
    let mut f = Vec::new();
    assert_eq!(
        tx2.begin(3, 0, 0, &mut f).unwrap_err(),
        ProtocolError::EpochNotNext { got: 3, last: 1 }
    );
}

fn limits() -> Limits {
    Limits {
        max_epoch_bytes: 4 << 30,
        max_memory_bytes: 1 << 30,
        max_vcpus: 4,
        peer_name: Some("primary".into()),
        disk_bytes: 0,
    }
}

#[test]
fn a_hello_beyond_the_backups_limits_is_refused_as_incompatible() {
    let refused = |h: Hello| {
        let mut rx = Receiver::with_limits(limits());
        let e = rx.on_message(Message::Hello(h)).unwrap_err();
        assert!(rx.hello().is_none());
        let why = EndReason::for_protocol_error(&e);
        assert!(
            matches!(why, EndReason::Incompatible(_)) && why.peer_alive() && !why.fences(),
            "{why:?}"
        );
        // The primary reads the same reason back from the close code.
        assert_eq!(
            EndReason::from_close(why.code(), why.to_string().as_bytes()),
            why
        );
        e
    };
    // Within the limits: accepted.
    let mut rx = Receiver::with_limits(limits());
    assert_eq!(
        rx.on_message(Message::Hello(hello(0))).unwrap(),
        Event::Hello(hello(0))
    );
    // Another node's name than the certificate's.
    let e = refused(Hello {
        node: "mallory".into(),
        ..hello(0)
    });
    assert_eq!(
        e,
        ProtocolError::WrongNode {
            hello: "mallory".into(),
            certificate: "primary".into()
        }
    );
    assert!(e.to_string().contains("'mallory'") && e.to_string().contains("'primary'"));
    // More RAM than --max-memory.
    let e = refused(Hello {
        memory_bytes: (1 << 30) + 4096,
        ..hello(0)
    });
    assert_eq!(
        e,
        ProtocolError::MemoryOverLimit {
            memory_bytes: (1 << 30) + 4096,
            limit: 1 << 30
        }
    );
    assert!(e.to_string().contains("--max-memory"), "{e}");
    // No RAM, or not whole pages.
    for m in [0, 4097] {
        assert_eq!(
            refused(Hello {
                memory_bytes: m,
                ..hello(0)
            }),
            ProtocolError::BadMemorySize(m)
        );
    }
    // More vCPUs than --max-vcpus.
    let e = refused(Hello {
        vcpus: 5,
        ..hello(0)
    });
    assert_eq!(e, ProtocolError::VcpusOverLimit { vcpus: 5, limit: 4 });
    assert!(e.to_string().contains("--max-vcpus"), "{e}");
    // Unknown capabilities.
    assert_eq!(
        refused(hello(1 << 9)),
        ProtocolError::UnknownCapabilities(1 << 9)
    );
    // An unknown mode never decodes: refused, naming the field.
    let mut f = Message::Hello(hello(0)).to_frame();
    // length(4) type(1) version(2) lowest_version(2) session(8) node(4 + 7)
    // capabilities(8)
    let mode_at = 4 + 1 + 2 + 2 + 8 + 4 + "primary".len() + 8;
    assert_eq!(f[mode_at], 2, "the fgbi mode byte");
    f[mode_at] = 7;
    let e = refused_frame(&f);
    assert_eq!(
        e,
        ProtocolError::Wire(WireError::BadValue {
            field: "Hello.mode",
            value: 7
        })
    );
    assert!(matches!(
        EndReason::for_protocol_error(&e),
        EndReason::Incompatible(_)
    ));
    // Other malformed bytes are a plain refusal.
    assert!(matches!(
        EndReason::for_protocol_error(&ProtocolError::Wire(WireError::UnknownType(99))),
        EndReason::Refused(_)
    ));
}

fn refused_frame(f: &[u8]) -> ProtocolError {
    deliver(&mut Receiver::with_limits(limits()), f).unwrap_err()
}

#[test]
fn staging_is_bounded_by_the_protected_machine() {
    // A 16 MiB guest: a full resync of raw pages, the largest state and the
    // output allowance fit; the backup's 4 GiB limit does not apply.
    let small = Hello {
        memory_bytes: 16 << 20,
        ..hello(0)
    };
    let bound = staging_bound(16 << 20, 0);
    let raw_resync = (16 << 20) / 4096 * (4096 + 11);
    assert!(
        (raw_resync + MAX_STATE..4 << 30).contains(&bound),
        "{bound}"
    );
    let mut rx = Receiver::with_limits(limits());
    rx.on_message(Message::Hello(small.clone())).unwrap();
    assert_eq!(rx.max_epoch_bytes(), bound);
    // One byte over the bound is refused, naming the bound.
    let (mut tx, _) = Sender::new(small);
    let mut f = Vec::new();
    tx.begin(1, 0, 0, &mut f).unwrap();
    tx.records(&vec![0u8; bound + 1], &mut f).unwrap();
    assert_eq!(
        deliver(&mut rx, &f).unwrap_err(),
        ProtocolError::EpochTooLarge { limit: bound }
    );
    // A backup limit below the machine's bound stays in force.
    let mut rx = Receiver::with_limits(Limits {
        max_epoch_bytes: 1 << 20,
        ..limits()
    });
    rx.on_message(Message::Hello(hello(0))).unwrap();
    assert_eq!(rx.max_epoch_bytes(), 1 << 20);
    // Every page raw fits the bound of a 1 GiB machine.
    assert!(staging_bound(1 << 30, 0) >= (1 << 30) / 4096 * (4096 + 4));
}

#[test]
fn a_goodbye_takes_effect_only_once_its_last_epoch_is_committed() {
    let (mut tx, h) = Sender::new(hello(0));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &h).unwrap();
    deliver(&mut rx, &epoch_frames(&mut tx, 1)).unwrap();
    let (e2, e3) = (epoch_frames(&mut tx, 2), epoch_frames(&mut tx, 3));
    // The goodbye (control stream) overtakes epochs 2 and 3 (data stream).
    let bye = Message::Goodbye {
        last_epoch: 3,
        reason: "stopping".into(),
    };
    assert_eq!(
        rx.on_message(bye.clone()).unwrap(),
        Event::Leaving { last_epoch: 3 }
    );
    assert_eq!(rx.goodbye(), Some("stopping"));
    assert_eq!(rx.goodbye_due(), None);
    deliver(&mut rx, &e2).unwrap();
    assert_eq!(rx.goodbye_due(), None, "epoch 3 is still on its way");
    let ev = deliver(&mut rx, &e3).unwrap();
    assert!(matches!(ev.last(), Some(Event::Checkpoint(c)) if c.epoch == 3));
    assert_eq!(rx.goodbye_due(), Some("stopping"));
    // Nothing after the goodbye's last epoch.
    assert_eq!(
        deliver(&mut rx, &epoch_frames(&mut tx, 4)).unwrap_err(),
        ProtocolError::EpochAfterGoodbye {
            got: 4,
            last_epoch: 3
        }
    );

    // A goodbye after everything it names is committed ends at once.
    let (mut tx, h) = Sender::new(hello(0));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &h).unwrap();
    deliver(&mut rx, &epoch_frames(&mut tx, 1)).unwrap();
    assert_eq!(
        rx.on_message(Message::Goodbye {
            last_epoch: 1,
            reason: "bye".into()
        })
        .unwrap(),
        Event::Goodbye("bye".into())
    );
    // A goodbye naming less than what was committed is a violation.
    let mut rx = Receiver::new(1 << 20);
    let (mut tx, h) = Sender::new(hello(0));
    deliver(&mut rx, &h).unwrap();
    deliver(&mut rx, &epoch_frames(&mut tx, 1)).unwrap();
    deliver(&mut rx, &epoch_frames(&mut tx, 2)).unwrap();
    assert_eq!(
        rx.on_message(Message::Goodbye {
            last_epoch: 1,
            reason: "bye".into()
        })
        .unwrap_err(),
        ProtocolError::GoodbyeBehind {
            last_epoch: 1,
            committed: 2
        }
    );
}

#[test]
fn a_long_goodbye_reason_is_cut_at_a_character_boundary() {
    let reason = "é".repeat(1000); // 2000 bytes
    let f = Message::Goodbye {
        last_epoch: 9,
        reason,
    }
    .to_frame();
    let mut d = FrameDecoder::new();
    d.push(&f);
    let Some(Message::Goodbye { last_epoch, reason }) = d.next_message().unwrap() else {
        panic!()
    };
    assert_eq!(last_epoch, 9);
    assert_eq!(reason, "é".repeat(512));
}

#[test]
fn a_session_with_a_disk_carries_its_blocks_and_sum_and_refuses_a_mismatch() {
    use castor_protocol::disk::{self, DiskCommit, BLOCK};
    let h = Hello {
        disk_bytes: 64 << 20,
        ..hello(0)
    };
    // A backup without a disk, or with one of another size, refuses the
    // hello as incompatible, naming both sizes.
    for backup in [0u64, 32 << 20] {
        let mut rx = Receiver::with_limits(Limits {
            disk_bytes: backup,
            ..limits()
        });
        let (_, frame) = Sender::new(h.clone());
        let e = deliver(&mut rx, &frame).unwrap_err();
        assert!(e.is_incompatible(), "{e}");
        assert!(
            e.to_string().contains(&format!("{backup} (0: none)")),
            "{e}"
        );
    }
    let mut rx = Receiver::with_limits(Limits {
        disk_bytes: 64 << 20,
        ..limits()
    });
    let (mut tx, frame) = Sender::new(h.clone());
    deliver(&mut rx, &frame).unwrap();
    // 300 blocks: more than one 1 MiB chunk of raw records.
    let mut records = Vec::new();
    for b in 0..300u64 {
        let mut data = [0u8; BLOCK];
        for (i, x) in data.iter_mut().enumerate() {
            *x = (b as usize * 31 + i * 7 + (i * i) % 251) as u8;
        }
        disk::encode_block(b * 3, &data, &mut records);
    }
    let mut f = Vec::new();
    tx.begin(1, 0, 0, &mut f).unwrap();
    tx.state(b"st", &mut f).unwrap();
    tx.disk(&records, &mut f).unwrap();
    let commit = DiskCommit {
        sum: 77,
        flushed: true,
    };
    // The disk part is required in a session with a disk.
    assert!(tx.commit(None, None, &mut Vec::new()).is_err());
    tx.commit(None, Some(commit), &mut f).unwrap();
    let chunks = {
        let mut d = FrameDecoder::new();
        d.push(&f);
        let mut n = 0;
        while let Some(m) = d.next_message().unwrap() {
            n += matches!(m, Message::Disk { .. }) as usize;
        }
        n
    };
    assert!(chunks >= 2, "{chunks} chunks");
    let events = deliver(&mut rx, &f).unwrap();
    let Some(Event::Checkpoint(c)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(c.disk, records);
    assert_eq!(c.disk_commit, Some(commit));
    assert_eq!(disk::parse(&c.disk, (64 << 20) / 4096).unwrap().len(), 300);

    // Disk records in a session without a disk are refused.
    let mut rx = Receiver::new(64 << 20);
    let (_, frame) = Sender::new(hello(0));
    deliver(&mut rx, &frame).unwrap();
    let mut f = Vec::new();
    Message::EpochStart {
        epoch: 1,
        dirty_pages: 0,
        raw_bytes: 0,
    }
    .encode(&mut f);
    Message::Disk {
        epoch: 1,
        data: records[..100].to_vec(),
    }
    .encode(&mut f);
    assert!(matches!(deliver(&mut rx, &f), Err(ProtocolError::Disk(_))));
}

/// One epoch's frames: records, state and, if `held`, the `Held` mark.
fn epoch_frames_held(tx: &mut Sender, epoch: u64, held: bool) -> Result<Vec<u8>, ProtocolError> {
    let mut f = Vec::new();
    tx.begin(epoch, 1, 4096, &mut f)?;
    tx.records(b"rec", &mut f)?;
    tx.state(b"st", &mut f)?;
    if held {
        tx.held(&mut f)?;
    }
    tx.commit(None, None, &mut f)?;
    Ok(f)
}

fn checkpoint_of(events: Vec<Event>) -> castor_protocol::Checkpoint {
    match events.into_iter().last() {
        Some(Event::Checkpoint(c)) => c,
        other => panic!("no checkpoint: {other:?}"),
    }
}

#[test]
fn from_version_7_a_checkpoint_may_be_resumed_from_only_if_its_output_was_held() {
    let (mut tx, hello_frame) = Sender::new(hello(0));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &hello_frame).unwrap();
    assert_eq!(rx.version(), Some(7));
    tx.on_versions(7, 5, 7).unwrap();
    assert!(tx.marks_held());
    // The full resync, while output was released: not to be resumed from.
    let f = epoch_frames_held(&mut tx, 1, false).unwrap();
    assert!(!checkpoint_of(deliver(&mut rx, &f).unwrap()).resumable);
    // Held from the next pause on.
    let f = epoch_frames_held(&mut tx, 2, true).unwrap();
    assert!(checkpoint_of(deliver(&mut rx, &f).unwrap()).resumable);
    assert_eq!(tx.held_since(), Some(2));
    // Once held, always: the sender refuses to commit an unheld one ...
    assert!(matches!(
        epoch_frames_held(&mut tx, 3, false),
        Err(ProtocolError::Order(_))
    ));
    // ... and a receiver refuses one from a sender that does not.
    let (mut loose, _) = Sender::new(hello(0));
    loose.on_versions(7, 5, 7).unwrap();
    let mut f = Vec::new();
    for epoch in 1..=2 {
        f.extend(epoch_frames_held(&mut loose, epoch, true).unwrap());
    }
    let mut rx2 = Receiver::new(1 << 20);
    deliver(&mut rx2, &hello_frame).unwrap();
    deliver(&mut rx2, &f).unwrap();
    let mut f3 = Vec::new();
    Message::EpochStart {
        epoch: 3,
        dirty_pages: 0,
        raw_bytes: 0,
    }
    .encode(&mut f3);
    Message::State {
        epoch: 3,
        data: b"st".to_vec(),
    }
    .encode(&mut f3);
    let mut h = blake3::Hasher::new();
    // The digest of a State-only epoch (the sender's own rule).
    h.update(b"State");
    h.update(&3u64.to_le_bytes());
    h.update(&0u64.to_le_bytes());
    h.update(&2u64.to_le_bytes());
    h.update(b"st");
    Message::Commit {
        epoch: 3,
        digest: *h.finalize().as_bytes(),
        memory_digest: None,
        disk: None,
    }
    .encode(&mut f3);
    assert!(matches!(
        deliver(&mut rx2, &f3),
        Err(ProtocolError::Order(_))
    ));
}

#[test]
fn the_held_mark_is_part_of_the_digest_and_refused_below_version_7() {
    // Taking the mark out of a held checkpoint breaks its digest: a
    // checkpoint cannot be made resumable, or not, on the way.
    let (mut tx, hello_frame) = Sender::new(hello(0));
    tx.on_versions(7, 5, 7).unwrap();
    let f = epoch_frames_held(&mut tx, 1, true).unwrap();
    let mut d = FrameDecoder::new();
    d.push(&f);
    let mut stripped = Vec::new();
    while let Some(m) = d.next_message().unwrap() {
        if !matches!(m, Message::Held { .. }) {
            m.encode(&mut stripped);
        }
    }
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &hello_frame).unwrap();
    assert_eq!(
        deliver(&mut rx, &stripped).unwrap_err(),
        ProtocolError::DigestMismatch(1)
    );

    // A v6 session: every checkpoint may be resumed from, and the mark is
    // refused both ways.
    let v6 = hello(0).offering(castor_protocol::version::Range::new(5, 6).unwrap());
    let (mut tx, hello_frame) = Sender::new(v6);
    tx.on_versions(6, 5, 7).unwrap();
    assert!(!tx.marks_held());
    assert!(matches!(
        epoch_frames_held(&mut tx, 1, true),
        Err(ProtocolError::Unexpected {
            message: "Held",
            ..
        })
    ));
    let mut rx = Receiver::new(1 << 20);
    deliver(&mut rx, &hello_frame).unwrap();
    assert_eq!(rx.version(), Some(6));
    let (mut tx, _) =
        Sender::new(hello(0).offering(castor_protocol::version::Range::new(5, 6).unwrap()));
    tx.on_versions(6, 5, 6).unwrap();
    let f = epoch_frames_held(&mut tx, 1, false).unwrap();
    assert!(checkpoint_of(deliver(&mut rx, &f).unwrap()).resumable);
    let mut held = Vec::new();
    Message::EpochStart {
        epoch: 2,
        dirty_pages: 0,
        raw_bytes: 0,
    }
    .encode(&mut held);
    Message::Held { epoch: 2 }.encode(&mut held);
    assert!(matches!(
        deliver(&mut rx, &held),
        Err(ProtocolError::Unexpected {
            message: "Held",
            ..
        })
    ));
}
