//! Two network namespaces for a pair whose replication link can be cut: a
//! real partition, made with `ip netns`, veth pairs and `ip link set … down`
//! (this kernel has veth but no netem or netfilter).
//!
//! ```text
//!   root namespace: the lab, etcd, console clients
//!      | 10.213.N.5 ─ veth ─ 10.213.N.6 |        | 10.213.N.9 ─ veth ─ 10.213.N.10 |
//!   namespace A (node a) ── 10.213.N.1 ─ replication veth ─ 10.213.N.2 ── namespace B (node b)
//! ```
//!
//! Each node reaches the witness and serves its console over its own link
//! to the root namespace; cutting the replication link partitions the pair
//! while both still reach the witness. Everything is removed when dropped.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Where a node of a pair runs.
#[derive(Debug, Clone)]
pub struct Place {
    /// Its network namespace.
    pub ns: String,
    /// Its address on the replication link (its QUIC listener).
    pub rep: IpAddr,
    /// Its address on its link to the root namespace (its console service).
    pub access: IpAddr,
    /// The root namespace's address on that link (the witness, for it).
    pub root: IpAddr,
}

/// The two namespaces and their links.
#[derive(Debug)]
pub struct Net {
    /// Node a's and node b's places.
    pub places: [Place; 2],
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// Creates the namespaces and links (needs root).
    pub fn create() -> Result<Net> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed)) % 250;
        let a4 = |last: u8| IpAddr::V4(Ipv4Addr::new(10, 213, n as u8, last));
        let places = [
            Place {
                ns: format!("castor{n}a"),
                rep: a4(1),
                access: a4(6),
                root: a4(5),
            },
            Place {
                ns: format!("castor{n}b"),
                rep: a4(2),
                access: a4(10),
                root: a4(9),
            },
        ];
        let net = Net { places };
        net.build(n)
            .with_context(|| format!("making network namespaces castor{n}a/b"))?;
        Ok(net)
    }

    fn build(&self, n: u32) -> Result<()> {
        let [a, b] = &self.places;
        for p in &self.places {
            let _ = ip(&["netns", "del", &p.ns]);
            ip(&["netns", "add", &p.ns])?;
            ip(&["-n", &p.ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", "rep", "netns", &a.ns, "type", "veth", "peer", "name", "rep", "netns",
            &b.ns,
        ])?;
        for (p, peer) in [(a, b), (b, a)] {
            let _ = peer;
            ip(&[
                "-n",
                &p.ns,
                "addr",
                "add",
                &format!("{}/30", p.rep),
                "dev",
                "rep",
            ])?;
            ip(&["-n", &p.ns, "link", "set", "rep", "up"])?;
        }
        for (i, p) in self.places.iter().enumerate() {
            let root_if = format!("castor{n}{}", ['a', 'b'][i]);
            let _ = ip(&["link", "del", &root_if]);
            ip(&[
                "link", "add", &root_if, "type", "veth", "peer", "name", "access", "netns", &p.ns,
            ])?;
            ip(&["addr", "add", &format!("{}/30", p.root), "dev", &root_if])?;
            ip(&["link", "set", &root_if, "up"])?;
            ip(&[
                "-n",
                &p.ns,
                "addr",
                "add",
                &format!("{}/30", p.access),
                "dev",
                "access",
            ])?;
            ip(&["-n", &p.ns, "link", "set", "access", "up"])?;
        }
        Ok(())
    }

    /// Cuts the replication link (both ends down): a partition.
    pub fn cut(&self) -> Result<()> {
        for p in &self.places {
            ip(&["-n", &p.ns, "link", "set", "rep", "down"])?;
        }
        Ok(())
    }

    /// Heals it.
    pub fn heal(&self) -> Result<()> {
        for p in &self.places {
            ip(&["-n", &p.ns, "link", "set", "rep", "up"])?;
        }
        Ok(())
    }

    /// The root namespace's addresses on the access links (where the
    /// witness must listen).
    pub fn root_addrs(&self) -> Vec<IpAddr> {
        self.places.iter().map(|p| p.root).collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and so their peers.
        for p in &self.places {
            let _ = ip(&["netns", "del", &p.ns]);
        }
    }
}
