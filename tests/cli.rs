//! Bad input to the castor command line gets a clear error saying what to do.

mod common;

use common::{castor, outcome, run};

fn fails_with(args: &[&str], expect: &str) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "castor {args:?} succeeded");
    assert!(
        err.contains(expect),
        "castor {args:?}: expected '{expect}' in:\n{err}"
    );
}

#[test]
fn bad_workloads_and_flags_are_explained() {
    fails_with(&["run", "--workload", "spars"], "unknown workload 'spars'");
    fails_with(
        &["run", "--workload", "sparse,rate=fast"],
        "bad value 'fast' for 'rate'",
    );
    fails_with(
        &["run", "--workload", "counter,mib=3"],
        "has no parameter 'mib'",
    );
    fails_with(&["run", "--mem", "12X"], "unknown size suffix");
    fails_with(&["run", "--vcpus", "0"], "--vcpus");
    fails_with(
        &["run", "--vcpus", "17", "--duration", "1s"],
        "at most 16 vCPUs",
    );
    fails_with(
        &[
            "run",
            "--mem",
            "64M",
            "--workload",
            "sparse,mib=64",
            "--duration",
            "1s",
        ],
        "lower mib= or raise --mem",
    );
    fails_with(
        &["run", "--mem", "100000"],
        "guest memory of 100000 bytes is not supported",
    );
    fails_with(&["run", "--snapshot-at", "1s"], "--snapshot-dir");
    fails_with(
        &["run", "--frobnicate"],
        "unexpected argument '--frobnicate'",
    );
    fails_with(
        &["run", "--tap", "castor-nope9", "--duration", "1s"],
        "--tap castor-nope9: no such network device",
    );
    fails_with(&["run", "--mac", "01:00:00:00:00:01"], "multicast");
    fails_with(&["run", "--mac", "52:54:00"], "is not a MAC address");
    fails_with(
        &["run", "--workload", "net,ip=10.1.2"],
        "expected an IPv4 address",
    );
}

#[test]
fn missing_kvm_and_bad_kernels_are_explained() {
    fails_with(
        &[
            "run",
            "--kvm-device",
            "/nonexistent/kvm",
            "--duration",
            "1s",
        ],
        "castor needs KVM",
    );
    fails_with(
        &["run", "--kernel", "/nonexistent/kernel"],
        "cannot read the kernel /nonexistent/kernel",
    );
    let tmp = tempfile::tempdir().unwrap();
    let k = tmp.path().join("kernel");
    std::fs::write(&k, b"this is not a kernel").unwrap();
    fails_with(
        &["run", "--kernel", k.to_str().unwrap(), "--duration", "1s"],
        "unrecognised kernel image",
    );
    // A Linux image that ends before its header says: a bzImage cut short.
    let mut bz = vec![0u8; 1024];
    bz[0x1F1] = 4;
    bz[0x1F4..0x1F8].copy_from_slice(&0x1000u32.to_le_bytes());
    bz[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    bz[0x236] = 1;
    std::fs::write(&k, &bz).unwrap();
    fails_with(
        &["run", "--kernel", k.to_str().unwrap(), "--duration", "1s"],
        "truncated kernel image",
    );
    fails_with(
        &["run", "--initrd", k.to_str().unwrap()],
        "--kernel <KERNEL>",
    );
    fails_with(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot read the initramfs /nonexistent/initrd",
    );
}

#[test]
fn a_multiboot_kernel_given_with_kernel_boots() {
    // castor's own guest, given as a file like any other multiboot kernel.
    let tmp = tempfile::tempdir().unwrap();
    let k = tmp.path().join("castor-guest.elf");
    std::fs::write(&k, guest::KERNEL).unwrap();
    let o = run(&[
        "run",
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--duration",
        "700ms",
        "--kernel",
        k.to_str().unwrap(),
        "--cmdline",
        "castor-guest workload=counter interval_ms=50",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Without castor's console window the ring-3 guest cannot print on
    // kvm_pvm, but its ring-0 banner comes through the 8250.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("castor-guest: workload=counter cpus=1"),
        "{out}"
    );
}

#[test]
fn help_explains_the_commands() {
    let o = run(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for word in ["run", "restore", "SIGTERM"] {
        assert!(out.contains(word), "--help lacks '{word}':\n{out}");
    }
    let o = run(&["run", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for word in ["--workload", "--snapshot-at", "sparse", "--mem"] {
        assert!(out.contains(word), "run --help lacks '{word}':\n{out}");
    }
}

#[test]
fn certs_makes_a_ca_and_node_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let o = run(&[
        "certs",
        "--dir",
        dir.to_str().unwrap(),
        "--nodes",
        "alpha,beta",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "ca.pem",
        "ca/ca.key",
        "alpha.pem",
        "alpha.key",
        "beta.pem",
        "beta.key",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    assert!(
        !dir.join("ca.key").exists(),
        "the CA key is where the nodes load"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "CA private key: {}",
            dir.join("ca/ca.key").display()
        )) && out.contains("keep it offline")
            && out.contains("valid until"),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    for key in ["alpha.key", "beta.key", "ca/ca.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} is not owner-only");
    }
    // Usable by the transport.
    transport::NodeTls::from_dir(&dir, "alpha", "beta").unwrap();
    fails_with(&["certs", "--dir", dir.to_str().unwrap()], "already exists");
    fails_with(
        &[
            "certs",
            "--dir",
            dir.to_str().unwrap(),
            "--nodes",
            "bad name",
            "--force",
        ],
        "not usable as a DNS name",
    );
    for bad in ["0", "36501", "soon"] {
        let o = run(&[
            "certs",
            "--dir",
            dir.to_str().unwrap(),
            "--force",
            "--days",
            bad,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--days") && err.contains(bad),
            "--days {bad}: {err}"
        );
    }
    let o = run(&[
        "certs",
        "--dir",
        dir.to_str().unwrap(),
        "--force",
        "--days",
        "0",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("valid for 1 to 36500 days"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The sample configurations in deploy/ are accepted flag for flag, also
/// from the conventional place (/etc/castor, here $CASTOR_CONFIG_DIR): the
/// daemons get as far as loading the certificates the samples name.
#[test]
fn the_deploy_samples_are_valid_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    for role in ["primary", "backup"] {
        let sample = format!("{root}/deploy/{role}.toml");
        let o = castor().args([role, "--config", &sample]).output().unwrap();
        let (ok, out) = outcome(&o);
        assert!(!ok, "{out}");
        assert!(
            out.contains("/etc/castor/pki") && !out.contains("unexpected argument"),
            "{role}: {out}"
        );
        let o = castor()
            .arg(role)
            .env("CASTOR_CONFIG_DIR", format!("{root}/deploy"))
            .output()
            .unwrap();
        let (ok, out) = outcome(&o);
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("reading {root}/deploy/{role}.toml"))
                && out.contains("/etc/castor/pki"),
            "{role}: {out}"
        );
    }
}

#[test]
fn a_recorded_history_is_checked_again_and_a_violation_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("h.jsonl");
    let path = file.to_str().unwrap();
    // PUT 1, then PUT 2, then a read of 1: a stale read.
    let put = |v: u64, a: u64, b: u64| {
        format!(
            r#"{{"client":0,"key":7,"kind":{{"Put":{v}}},"invoke":{a},"ret":{b},"outcome":{{"Ok":null}}}}"#
        )
    };
    let get = |v: u64, a: u64, b: u64| {
        format!(
            r#"{{"client":1,"key":7,"kind":"Get","invoke":{a},"ret":{b},"outcome":{{"Ok":{v}}}}}"#
        )
    };
    std::fs::write(
        &file,
        [put(1, 0, 10), put(2, 20, 30), get(2, 40, 50)].join("\n"),
    )
    .unwrap();
    let o = run(&["linearize", "--fresh", path]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("linearizable: yes (3 ops, 1 keys)"), "{out}");
    std::fs::write(
        &file,
        [put(1, 0, 10), put(2, 20, 30), get(1, 40, 50)].join("\n"),
    )
    .unwrap();
    let o = run(&["linearize", path]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("linearizable: NO") && out.contains("get -> 0x1"),
        "{out}"
    );
    std::fs::write(&file, "{\"key\": 1}\n").unwrap();
    fails_with(
        &["linearize", path],
        "line 1: not an operation of a history",
    );
    fails_with(&["linearize", "/nonexistent/h.jsonl"], "cannot open");
}
