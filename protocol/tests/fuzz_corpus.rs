//! The `protocol_frames` fuzz target's checked-in seeds, replayed on stable
//! as an ordinary test through the same function the fuzz target runs
//! (`protocol::fuzzing::frames_target`), plus any local libFuzzer corpus in
//! `fuzz/corpus/protocol_frames`.
//!
//! The seeds are valid sessions made by the [`Sender`] (below), fed whole,
//! in medium pieces and byte by byte, then truncated and mutated copies.
//! `CASTOR_WRITE_SEEDS=1 cargo test -p castor-protocol --test fuzz_corpus`
//! rewrites them after a format change.

use std::path::{Path, PathBuf};

use castor_protocol::fuzzing::frames_target;
use castor_protocol::message::CAP_VERIFY;
use castor_protocol::version::Range;
use castor_protocol::{Hello, Message, Sender, VERSION};

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join("protocol_frames")
}

fn files(d: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(d) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// A valid session from a primary: a hello, two checkpoints (records, state,
/// console output, commit; with a memory digest when `verify`), a heartbeat
/// and a goodbye, its hello offering `versions` (5 alone: a v5 hello, as
/// castor 0.1 writes it). Returns the hello frame alone and the whole
/// stream.
fn session(verify: bool, versions: Range) -> (Vec<u8>, Vec<u8>) {
    let hello = Hello {
        version: VERSION,
        lowest_version: castor_protocol::version::V5,
        session: 7,
        node: "primary".into(),
        capabilities: if verify { CAP_VERIFY } else { 0 },
        mode: fgbi::Mode::Fgbi,
        block_size: 64,
        memory_bytes: 64 << 20,
        vcpus: 1,
        output_offset: 0,
        token: 1,
        beat_port: 0,
        beat_key: [0; 32],
        disk_bytes: 0,
    }
    .offering(versions);
    let (mut tx, first) = Sender::new(hello);
    if versions.highest >= castor_protocol::version::HELD {
        // The backup's answer: version 7, whose checkpoints say whether
        // they may be resumed from (the resync not, the next one so).
        tx.on_versions(versions.highest, versions.lowest, versions.highest)
            .unwrap();
    }
    let mut out = first.clone();
    for epoch in 1..=2u64 {
        tx.begin(epoch, 1, 4096, &mut out).unwrap();
        tx.records(&[1, 0, 0, 0, 16, 0, 0, 0], &mut out).unwrap();
        tx.state(b"state", &mut out).unwrap();
        tx.output(b"cpu=0 seq=1\n", &mut out).unwrap();
        if epoch > 1 && tx.marks_held() {
            tx.held(&mut out).unwrap();
        }
        tx.commit(verify.then_some([epoch as u8; 32]), None, &mut out)
            .unwrap();
    }
    Message::Heartbeat { seq: 1, sent_us: 2 }.encode(&mut out);
    Message::Goodbye {
        last_epoch: 2,
        reason: "bye".into(),
    }
    .encode(&mut out);
    (first, out)
}

fn with_selector(sel: u8, stream: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(stream);
    v
}

/// The seeds: name and bytes (the piece-size selector first).
fn seeds() -> Vec<(String, Vec<u8>)> {
    // The v5 seeds as castor 0.1 wrote them, a v6 hello and session (5 to
    // 6 offered), and a v7 one (with `Held`).
    let (hello, plain) = session(false, Range::only(5));
    let (_, verify) = session(true, Range::only(5));
    let (hello_v6, plain_v6) = session(false, Range::new(5, 6).unwrap());
    let (hello_v7, plain_v7) = session(false, castor_protocol::version::SUPPORTED);
    let mut v = vec![
        ("hello".to_string(), with_selector(3, &hello)),
        ("hello-v6".to_string(), with_selector(3, &hello_v6)),
        ("hello-v7".to_string(), with_selector(3, &hello_v7)),
        ("session".into(), with_selector(200, &plain)),
        ("session-v6".into(), with_selector(200, &plain_v6)),
        ("session-v7".into(), with_selector(200, &plain_v7)),
        ("session-bytewise".into(), with_selector(0, &plain)),
        ("session-verify".into(), with_selector(16, &verify)),
    ];
    v.push((
        "truncated-session".into(),
        with_selector(200, &plain[..plain.len() * 2 / 3]),
    ));
    let mut m = plain.clone();
    let n = m.len();
    for i in [n / 4, n / 2, 3 * n / 4] {
        m[i] ^= 0xa5;
    }
    v.push(("mutated-session".into(), with_selector(31, &m)));
    let mut big = with_selector(255, &plain[..4]);
    big[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
    v.push(("oversized-frame".into(), big));
    v
}

#[test]
fn checked_in_seeds_replay() {
    let seeds_dir = dir("seeds");
    if std::env::var_os("CASTOR_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&seeds_dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(seeds_dir.join(name), bytes).unwrap();
        }
    }
    let seeds = files(&seeds_dir);
    assert!(
        seeds.len() >= 5,
        "{}: {} seeds",
        seeds_dir.display(),
        seeds.len()
    );
    let mut sessions = 0;
    for path in seeds.iter().chain(files(&dir("corpus")).iter()) {
        let data = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // frames_target panics where the fuzz target would report a crash.
        let fed = std::panic::catch_unwind(|| frames_target(&data))
            .unwrap_or_else(|_| panic!("{}: the fuzz target panics", path.display()));
        if name.starts_with("session") {
            // A valid session reaches the receiver's deepest paths: two
            // checkpoints handed over, the stream consumed to its end.
            // (The v7 session's second checkpoint carries `Held`.)
            let held = usize::from(name == "session-v7");
            assert_eq!(
                (fed.refused.as_deref(), fed.checkpoints, fed.messages),
                (None, 2, 1 + 2 * 5 + held + 2),
                "{name}: not a valid session any more (regenerate the seeds: \
                 CASTOR_WRITE_SEEDS=1 cargo test -p castor-protocol --test fuzz_corpus)"
            );
            sessions += 1;
        }
        if name.starts_with("hello") {
            assert_eq!((fed.refused.as_deref(), fed.messages), (None, 1), "{name}");
        }
        if name == "oversized-frame" {
            let why = fed.refused.clone().unwrap_or_default();
            assert!(why.contains("exceeds the maximum"), "{name}: {why}");
        }
    }
    assert_eq!(sessions, 5);
}

#[test]
fn the_seeds_on_disk_are_the_generated_ones() {
    // So a change of the wire format is noticed here, not by a fuzzer that
    // quietly stops getting past the hello.
    for (name, bytes) in seeds() {
        let path = dir("seeds").join(&name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} differs from the generated seed (regenerate: \
             CASTOR_WRITE_SEEDS=1 cargo test -p castor-protocol --test fuzz_corpus)",
            path.display()
        );
    }
}
