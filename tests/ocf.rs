//! The Pacemaker resource agent (`deploy/ocf/castor`) checked by Debian's
//! `ocf-tester` (resource-agents) against real daemons and a real etcd:
//! meta-data, validate-all, start (a backup), monitor, promote (a VM that
//! never ran is booted; the witness names this node), demote, stop, and
//! every action twice.

mod common;

use std::process::Command;

#[test]
fn the_ocf_agent_passes_ocf_tester() {
    let bin = common::castor_bin();
    if Command::new("ocf-tester").arg("-h").output().is_err() {
        eprintln!("ocf-tester is not installed (apt-get install resource-agents): skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = witness::server::EtcdServer::start(&tmp.path().join("etcd")).unwrap();
    let names = ["a", "b"].map(String::from);
    transport::certs::create(&tmp.path().join("pki"), &names, false).unwrap();
    let listen = witness::server::unused_port(true).unwrap();
    let peer = witness::server::unused_port(true).unwrap();
    let o = |k: &str, v: &str| ["-o".to_string(), format!("{k}={v}")];
    let mut c = Command::new("ocf-tester");
    c.args(["-v", "-n", "castor-test"]);
    for (k, v) in [
        ("castor", bin.to_string()),
        ("node", "a".into()),
        ("peer", "b".into()),
        ("listen", listen.to_string()),
        ("peer_listen", peer.to_string()),
        ("certs", tmp.path().join("pki").display().to_string()),
        ("witness", format!("etcd={}", etcd.endpoint())),
        ("vm", "ocf".into()),
        ("mem", "32M".into()),
        ("state_dir", tmp.path().join("state").display().to_string()),
        ("image_dir", tmp.path().join("img").display().to_string()),
    ] {
        c.args(o(k, &v));
    }
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ocf/castor"));
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "{text}"
    );
    // It really promoted: the witness names node a the VM's owner.
    assert!(text.contains("Testing: promote"), "{text}");
    let owner = etcd.client("ocf").unwrap().read().unwrap().unwrap().0;
    assert_eq!(owner.owner, "a");
}
