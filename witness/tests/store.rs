//! The fleet's etcd client ([`Store`]) and local etcd clusters, against a
//! real etcd (Debian's etcd-server, started here).

use std::net::TcpListener;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use castor_witness::server::{EtcdCluster, EtcdServer};
use castor_witness::{requests, Claim, Etcd, Store, WitnessError, REQUEST_TIMEOUT, WRITE_TIMEOUT};

/// Whether etcd is installed; says so when it is not (the test is skipped).
fn have_etcd() -> bool {
    match std::process::Command::new("etcd").arg("--version").output() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: etcd is not installed ({e})");
            false
        }
    }
}

/// A single-member etcd (etcd's default timings) and a client of it.
fn single() -> (tempfile::TempDir, EtcdServer, Store) {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(dir.path()).expect("etcd starts");
    let store = Store::new(&[etcd.endpoint()]).unwrap();
    (dir, etcd, store)
}

fn value(s: &Store, key: &str) -> Option<Vec<u8>> {
    s.get(key).unwrap().map(|kv| kv.value)
}

#[test]
fn create_is_exactly_once() {
    if !have_etcd() {
        return;
    }
    let (_dir, _etcd, s) = single();
    assert!(s.create("/c/k", b"first", None).unwrap());
    assert!(!s.create("/c/k", b"second", None).unwrap());
    assert_eq!(value(&s, "/c/k").unwrap(), b"first");
    let kv = s.get("/c/k").unwrap().unwrap();
    assert_eq!(kv.key, "/c/k");
    assert_eq!(kv.create_revision, kv.mod_revision);
    assert_eq!(kv.lease, 0);

    // Threads racing to create the same key: exactly one wins, and the
    // key holds its value.
    for round in 0..5 {
        let key = format!("/c/race{round}");
        let barrier = Barrier::new(8);
        let won: Vec<usize> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let (s, key, barrier) = (s.clone(), &key, &barrier);
                    sc.spawn(move || {
                        barrier.wait();
                        s.create(key, format!("t{i}").as_bytes(), None).unwrap()
                    })
                })
                .collect();
            hs.into_iter()
                .enumerate()
                .filter_map(|(i, h)| h.join().unwrap().then_some(i))
                .collect()
        });
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        assert_eq!(value(&s, &key).unwrap(), format!("t{}", won[0]).as_bytes());
    }
}

#[test]
fn swap_and_delete_if_compare_the_mod_revision() {
    if !have_etcd() {
        return;
    }
    let (_dir, _etcd, s) = single();
    assert!(s.create("/s/k", b"1", None).unwrap());
    let one = s.get("/s/k").unwrap().unwrap();
    s.put("/s/k", b"2", None).unwrap();
    let two = s.get("/s/k").unwrap().unwrap();
    assert!(two.mod_revision > one.mod_revision);
    assert_eq!(two.create_revision, one.create_revision);

    // A stale revision fails and changes nothing; the current one swaps.
    assert!(!s.swap("/s/k", one.mod_revision, b"3", None).unwrap());
    assert_eq!(value(&s, "/s/k").unwrap(), b"2");
    assert!(s.swap("/s/k", two.mod_revision, b"3", None).unwrap());
    let three = s.get("/s/k").unwrap().unwrap();
    assert_eq!(three.value, b"3");
    assert!(!s.swap("/s/k", two.mod_revision, b"4", None).unwrap());
    // No key, no revision to match.
    assert!(!s.swap("/s/absent", two.mod_revision, b"x", None).unwrap());
    assert_eq!(s.get("/s/absent").unwrap(), None);

    // delete_if likewise.
    assert!(!s.delete_if("/s/k", two.mod_revision).unwrap());
    assert_eq!(value(&s, "/s/k").unwrap(), b"3");
    assert!(s.delete_if("/s/k", three.mod_revision).unwrap());
    assert_eq!(s.get("/s/k").unwrap(), None);
    assert!(!s.delete_if("/s/k", three.mod_revision).unwrap());
    assert!(!s.delete_if("/s/k", 0).unwrap(), "nothing to delete");

    // delete: absent is fine.
    s.delete("/s/k").unwrap();
    s.put("/s/k", b"", None).unwrap();
    assert_eq!(value(&s, "/s/k").unwrap(), b"", "an empty value");
    s.delete("/s/k").unwrap();
    assert_eq!(s.get("/s/k").unwrap(), None);

    // etcd's verdict on a bad request is not "unreachable".
    let e = s.put("", b"x", None).unwrap_err();
    assert!(matches!(&e, WitnessError::Refused { code: 3, .. }), "{e}");
}

#[test]
fn list_is_the_prefix_sorted() {
    if !have_etcd() {
        return;
    }
    let (_dir, _etcd, s) = single();
    for k in ["/l/b", "/l/", "/l0", "/l/a/x", "/k", "/l/a", "/lz", "/l"] {
        s.put(k, k.as_bytes(), None).unwrap();
    }
    let last = s.get("/l").unwrap().unwrap().mod_revision;
    let (kvs, rev) = s.list("/l/").unwrap();
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/l/", "/l/a", "/l/a/x", "/l/b"]);
    assert!(kvs.iter().all(|kv| kv.value == kv.key.as_bytes()));
    assert_eq!(rev, last, "the store's revision at the read");

    let (kvs, rev) = s.list("/nothing/").unwrap();
    assert!(kvs.is_empty());
    assert_eq!(rev, last);

    let (all, _) = s.list("").unwrap();
    let keys: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/k", "/l", "/l/", "/l/a", "/l/a/x", "/l/b", "/l0", "/lz"]
    );
}

#[test]
fn leases_expire_are_renewed_and_revoked() {
    if !have_etcd() {
        return;
    }
    let (_dir, _etcd, s) = single();
    // etcd's minimum TTL is ceil(1.5 x election timeout): 2 s at its
    // default 1000 ms. A TTL of 1 comes back 2.
    let short = s.grant(1).unwrap();
    assert_eq!(s.keep_alive(short).unwrap(), Some(2));
    s.revoke(short).unwrap();

    let lease = s.grant(2).unwrap();
    s.put("/lease/k", b"v", Some(lease)).unwrap();
    assert_eq!(s.get("/lease/k").unwrap().unwrap().lease, lease);
    // Kept alive, it outlives its TTL.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(s.keep_alive(lease).unwrap(), Some(2));
    }
    assert!(s.get("/lease/k").unwrap().is_some());
    // Not kept alive, it expires and its key goes.
    let stopped = Instant::now();
    while s.get("/lease/k").unwrap().is_some() {
        assert!(
            stopped.elapsed() < Duration::from_secs(4),
            "the key outlived its lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = stopped.elapsed();
    eprintln!("a key of a 2 s lease went {gone:?} after the last keep-alive");
    assert!(gone > Duration::from_millis(1500), "{gone:?}");
    // An expired lease, or one that never was: None.
    assert_eq!(s.keep_alive(lease).unwrap(), None);
    assert_eq!(s.keep_alive(12345).unwrap(), None);
    // Nothing can be written under it.
    for e in [
        s.put("/lease/k", b"v", Some(lease)).unwrap_err(),
        s.create("/lease/k", b"v", Some(lease))
            .map(drop)
            .unwrap_err(),
    ] {
        assert!(matches!(&e, WitnessError::Refused { code: 5, .. }), "{e}");
    }
    assert_eq!(s.get("/lease/k").unwrap(), None);
    s.revoke(lease).unwrap();

    // Revoked, its keys go at once.
    let lease = s.grant(60).unwrap();
    assert!(s.create("/lease/a", b"a", Some(lease)).unwrap());
    let a = s.get("/lease/a").unwrap().unwrap();
    s.put("/lease/b", b"b", Some(lease)).unwrap();
    assert!(s
        .swap("/lease/a", a.mod_revision, b"a2", Some(lease))
        .unwrap());
    assert_eq!(s.list("/lease/").unwrap().0.len(), 2);
    s.revoke(lease).unwrap();
    assert_eq!(s.get("/lease/a").unwrap(), None);
    assert_eq!(s.get("/lease/b").unwrap(), None);
    assert_eq!(s.keep_alive(lease).unwrap(), None);
    s.revoke(lease).unwrap();
}

#[test]
fn requests_are_counted() {
    if !have_etcd() {
        return;
    }
    let (_dir, etcd, s) = single();
    let before = requests();
    for _ in 0..3 {
        s.get("/r").unwrap();
    }
    etcd.client("vm").unwrap().read().unwrap();
    assert!(requests() >= before + 4, "{before} -> {}", requests());
}

#[test]
fn a_hung_member_costs_one_timeout_not_one_per_request() {
    if !have_etcd() {
        return;
    }
    let (_dir, etcd, _) = single();
    // Accepts connections (the kernel does) and never answers.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = format!("http://{}", hung.local_addr().unwrap());
    let s = Store::new(&[hung.clone(), etcd.endpoint()]).unwrap();
    let t = Instant::now();
    assert!(s.create("/h/k", b"v", None).unwrap());
    let first = t.elapsed();
    for i in 0..19 {
        assert!(s.get("/h/k").unwrap().is_some(), "request {i}");
    }
    let all = t.elapsed();
    eprintln!("hung member first: the first request {first:?}, 20 requests {all:?}");
    // A write waits for a member's disk: its deadline is the longer one.
    assert!(first >= WRITE_TIMEOUT, "{first:?}");
    assert!(all < WRITE_TIMEOUT + REQUEST_TIMEOUT * 2, "{all:?}");

    // Only the hung one: unreachable within its deadline.
    let t = Instant::now();
    let e = Store::new(&[hung]).unwrap().get("/h/k").unwrap_err();
    assert!(matches!(e, WitnessError::Unreachable(_)), "{e}");
    assert!(t.elapsed() < REQUEST_TIMEOUT * 3, "{:?}", t.elapsed());
}

/// Until a read answers through `s` (a new leader elected), at most 10 s.
fn until_answered(s: &Store) {
    let t = Instant::now();
    while let Err(e) = s.get("/probe") {
        assert!(t.elapsed() < Duration::from_secs(10), "no leader: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts `r` is Unreachable, not an answer.
fn unreachable<T: std::fmt::Debug>(what: &str, r: Result<T, WitnessError>) {
    assert!(
        matches!(r, Err(WitnessError::Unreachable(_))),
        "{what}: {r:?}"
    );
}

#[test]
fn a_three_member_cluster_survives_one_member_and_refuses_without_quorum() {
    if !have_etcd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut c = EtcdCluster::start(dir.path(), 3, &[]).expect("the cluster starts");
    eprintln!("3 members started in {:?}", t.elapsed());
    assert_eq!(c.members(), 3);
    let endpoints = c.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(c.spec_on(None), format!("etcd={}", endpoints.join(",")));
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    assert_eq!(c.endpoints_on(ip), endpoints);
    assert!(c.log(2).ends_with("m2/etcd.log"));
    assert!(castor_witness::parse_spec(&c.spec_on(Some(ip))).is_ok());

    let s = Store::new(&endpoints).unwrap();
    assert!(s.create("/f/a", b"1", None).unwrap());
    // One cluster: every member answers the same.
    for e in &endpoints {
        let one = Store::new(std::slice::from_ref(e)).unwrap();
        assert_eq!(value(&one, "/f/a").unwrap(), b"1", "through {e}");
    }
    // The short timings of a local cluster make etcd's minimum TTL 1 s.
    let lease = s.grant(1).unwrap();
    assert_eq!(s.keep_alive(lease).unwrap(), Some(1));
    let lease = s.grant(60).unwrap();

    // The Etcd witness on the cluster.
    let w = Etcd::new(&endpoints, "vm1").unwrap();
    assert_eq!(w.claim("node-a", 0), Claim::Won { token: 1 });
    assert_eq!(w.claim("node-b", 1), Claim::Won { token: 2 });
    assert_eq!(
        w.claim("node-a", 1),
        Claim::Lost {
            owner: "node-b".into(),
            token: 2
        }
    );

    // One member down (the first of the list, perhaps the leader): once a
    // leader is elected, everything works, and the dead member costs one
    // failed attempt, not one per request.
    c.kill(0);
    until_answered(&Store::new(&endpoints[1..]).unwrap());
    let s = Store::new(&endpoints).unwrap();
    let t = Instant::now();
    let mut rev = s.get("/f/a").unwrap().unwrap().mod_revision;
    for i in 0..19 {
        match i % 3 {
            0 => assert!(s.create(&format!("/f/n{i}"), b"n", None).unwrap()),
            1 => {
                assert!(s
                    .swap("/f/a", rev, format!("{i}").as_bytes(), None)
                    .unwrap());
                rev = s.get("/f/a").unwrap().unwrap().mod_revision;
            }
            _ => assert!(s.get(&format!("/f/n{}", i - 2)).unwrap().is_some()),
        }
    }
    let took = t.elapsed();
    eprintln!("member 0 dead: 26 requests in {took:?}");
    assert!(took < REQUEST_TIMEOUT * 4, "{took:?}");
    assert_eq!(s.keep_alive(lease).unwrap(), Some(60));
    let w = Etcd::new(&endpoints, "vm1").unwrap();
    assert_eq!(w.claim("node-c", 2), Claim::Won { token: 3 });

    // Two down: no quorum. Unreachable, within about one deadline per
    // request, never an answer (not even "expired" for the lease).
    c.kill(1);
    let t = Instant::now();
    unreachable("get", s.get("/f/a"));
    unreachable("list", s.list("/f/"));
    unreachable("create", s.create("/f/q", b"q", None));
    unreachable("swap", s.swap("/f/s", 0, b"s", None));
    unreachable("put", s.put("/f/p", b"p", None));
    unreachable("delete_if", s.delete_if("/f/n0", 1));
    unreachable("keep_alive", s.keep_alive(lease));
    unreachable("grant", s.grant(5));
    assert_eq!(w.claim("node-d", 3), Claim::Unreachable);
    let took = t.elapsed();
    eprintln!("no quorum: 9 requests unreachable in {took:?}");
    // One deadline each: a read's for get, list, keep_alive and the claim
    // (which reads first), a write's for the five that etcd commits through
    // its log (create, swap, put and delete_if are transactions or puts,
    // grant a lease's grant): 4 × 0.5 s + 5 × 2.5 s = 14.5 s.
    let deadlines = REQUEST_TIMEOUT * 4 + WRITE_TIMEOUT * 5;
    assert!(
        took < deadlines + deadlines / 5,
        "{took:?} (deadlines {deadlines:?})"
    );

    // Back: it works again, and nothing was decided while it was down.
    let t = Instant::now();
    c.restart(0).unwrap();
    c.restart(1).unwrap();
    eprintln!("2 members restarted in {:?}", t.elapsed());
    until_answered(&s);
    assert!(s.get("/f/a").unwrap().is_some());
    assert!(s.create("/f/after", b"x", None).unwrap());
    for e in &endpoints {
        let one = Store::new(std::slice::from_ref(e)).unwrap();
        assert_eq!(value(&one, "/f/after").unwrap(), b"x", "through {e}");
    }
    assert_eq!(w.claim("node-e", 3), Claim::Won { token: 4 });
    s.revoke(lease).unwrap();
}

#[test]
fn clusters_are_one_three_or_five() {
    let dir = tempfile::tempdir().unwrap();
    for n in [0, 2, 4, 6] {
        assert!(EtcdCluster::start(dir.path(), n, &[]).is_err(), "{n}");
    }
}

#[test]
fn the_leader_is_found_and_a_slow_disk_slows_every_write() {
    if !have_etcd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = EtcdCluster::start(dir.path(), 3, &[]).expect("the cluster starts");
    let s = Store::new(&c.endpoints()).unwrap();
    let leader = c.leader().expect("a three-member cluster has a leader");
    // A write at full speed.
    let t = Instant::now();
    s.put("/castor/test/fast", b"1", None).unwrap();
    let fast = t.elapsed();
    // Every member's fsyncs take 300 ms longer: a write waits for them.
    let slow: Vec<_> = (0..3)
        .map(|i| c.slow_disk(i, Duration::from_millis(300)).unwrap())
        .collect();
    let t = Instant::now();
    s.put("/castor/test/slow", b"2", None).unwrap();
    let slowed = t.elapsed();
    drop(slow);
    assert!(
        slowed >= Duration::from_millis(300) && slowed > fast * 3,
        "a write took {slowed:?} with slow disks, {fast:?} without"
    );
    // Full speed again once the guards are gone.
    let t = Instant::now();
    s.put("/castor/test/again", b"3", None).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // The leader killed: another member leads.
    c.kill(leader);
    let t = Instant::now();
    let next = loop {
        if let Some(l) = c.leader().filter(|&l| l != leader) {
            break l;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no new leader");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(next, leader);
}
