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

/// The preference of a one-way partition's policy rule.
const ONE_WAY_PREF: &str = "10";

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
            // The local table's rule moves from preference 0 to 100, so
            // that a one-way partition's rule (preference 10) can drop what
            // arrives from the peer before it is delivered.
            ip(&["-n", &p.ns, "rule", "add", "pref", "100", "table", "local"])?;
            ip(&["-n", &p.ns, "rule", "del", "pref", "0"])?;
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

    /// A one-way partition: whatever node `from` sends node `to` over the
    /// replication link is dropped on arrival, silently, as a broken link
    /// would; the other direction still flows. (A policy rule in `to`'s
    /// namespace, checked before the local table: this kernel has no
    /// netfilter.)
    pub fn cut_one_way(&self, from: usize, to: usize) -> Result<()> {
        let src = self.places[from].rep.to_string();
        ip(&[
            "-n",
            &self.places[to].ns,
            "rule",
            "add",
            "pref",
            ONE_WAY_PREF,
            "from",
            &src,
            "iif",
            "rep",
            "blackhole",
        ])
    }

    /// Ends every one-way partition.
    pub fn heal_one_way(&self) -> Result<()> {
        for p in &self.places {
            // Absent when this node's side was not cut.
            let _ = ip(&["-n", &p.ns, "rule", "del", "pref", ONE_WAY_PREF]);
        }
        Ok(())
    }

    /// Gives each node a path to the guest network of `lab` (whose bridge
    /// exists in the root namespace): in each node's namespace a bridge
    /// joins that node's tap (`lab.taps[i]`, made there) and a veth to
    /// `lab`'s bridge. Both bridges forward every frame to every port
    /// (ageing 0: no learning), so the guest's traffic reaches whichever
    /// node runs it after a takeover without waiting for a stale address
    /// to age out; the node whose guest is stopped drops it at its tap.
    pub fn attach_guest_net(&self, lab: &crate::netlab::NetLab) -> Result<()> {
        let hub = |ns: Option<&str>, br: &str| -> Result<()> {
            let mut a: Vec<&str> = Vec::new();
            if let Some(ns) = ns {
                a.extend(["-n", ns]);
            }
            a.extend([
                "link",
                "set",
                "dev",
                br,
                "type",
                "bridge",
                "ageing_time",
                "0",
            ]);
            ip(&a)
        };
        hub(None, &lab.bridge)?;
        for (i, p) in self.places.iter().enumerate() {
            let tap = &lab.taps[i];
            let root_if = format!(
                "{}g{}",
                &lab.bridge[..lab.bridge.len().min(10)],
                ['a', 'b'][i]
            );
            let _ = ip(&["link", "del", &root_if]);
            ip(&["-n", &p.ns, "link", "add", "gbr", "type", "bridge"])?;
            hub(Some(&p.ns), "gbr")?;
            ip(&["-n", &p.ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["-n", &p.ns, "link", "set", "dev", tap, "master", "gbr"])?;
            ip(&[
                "link", "add", &root_if, "type", "veth", "peer", "name", "gnet", "netns", &p.ns,
            ])?;
            ip(&["-n", &p.ns, "link", "set", "dev", "gnet", "master", "gbr"])?;
            ip(&["link", "set", "dev", &root_if, "master", &lab.bridge])?;
            for dev in ["gbr", "gnet", tap.as_str()] {
                ip(&["-n", &p.ns, "link", "set", "dev", dev, "up"])?;
            }
            ip(&["link", "set", "dev", &root_if, "up"])?;
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
