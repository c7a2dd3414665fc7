//! The witness against a real etcd (Debian's etcd-server, started here).

use castor_witness::server::EtcdServer;
use castor_witness::{Claim, Owner};

#[test]
fn claims_are_compare_and_swap_on_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdServer::start(dir.path()).expect("etcd starts");
    let a = etcd.client("vm1").unwrap();
    assert_eq!(a.read().unwrap(), None);
    // A primary boots: token 1.
    assert_eq!(a.acquire("node-a", false).unwrap(), 1);
    let (owner, _) = a.read().unwrap().unwrap();
    assert_eq!(
        owner,
        Owner {
            owner: "node-a".into(),
            token: 1
        }
    );
    // Its backup takes over from token 1: it wins, token 2.
    assert_eq!(a.claim("node-b", 1), Claim::Won { token: 2 });
    // The old primary, which still thinks token 1, loses and learns the owner.
    assert_eq!(
        a.claim("node-a", 1),
        Claim::Lost {
            owner: "node-b".into(),
            token: 2
        }
    );
    // A retried claim whose swap had landed is recognised as won.
    assert_eq!(a.claim("node-b", 1), Claim::Won { token: 2 });
    // Another VM's key is independent.
    let other = etcd.client("vm2").unwrap();
    assert_eq!(other.claim("node-a", 0), Claim::Won { token: 1 });

    // Racing claims from the same token: exactly one wins.
    let winners: Vec<Claim> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let c = etcd.client("vm1").unwrap();
                s.spawn(move || c.claim(&format!("racer-{i}"), 2))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = winners
        .iter()
        .filter(|c| matches!(c, Claim::Won { token: 3 }))
        .count();
    assert_eq!(won, 1, "{winners:?}");

    // Witness down: claims are unreachable, nothing changes; back: it goes on.
    etcd.kill();
    assert_eq!(a.claim("node-z", 3), Claim::Unreachable);
    etcd.restart().unwrap();
    let (owner, _) = a.read().unwrap().unwrap();
    assert_eq!(owner.token, 3);
    assert!(owner.owner.starts_with("racer-"));
}

#[test]
fn a_primary_does_not_boot_over_a_node_that_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(dir.path()).expect("etcd starts");
    let a = etcd.client("vm1").unwrap();
    assert_eq!(a.acquire("node-a", false).unwrap(), 1);
    // Booting again on the same node is a new generation of its own.
    assert_eq!(a.acquire("node-a", false).unwrap(), 2);
    // Its backup takes over.
    assert_eq!(a.claim("node-b", 2), Claim::Won { token: 3 });
    // node-a restarted as a primary (by hand, or a service manager) must
    // not fence the survivor by booting a new generation.
    let e = a.acquire("node-a", false).unwrap_err();
    assert!(
        matches!(&e, castor_witness::WitnessError::OwnedBy { owner, token: 3 } if owner == "node-b"),
        "{e}"
    );
    assert_eq!(a.read().unwrap().unwrap().0.token, 3, "nothing changed");
    // Only when told to.
    assert_eq!(a.acquire("node-a", true).unwrap(), 4);
}
