//! The guest network of a local pair: a bridge, one tap per daemon and a
//! client namespace, made and removed with the `ip` command (`castor net
//! up` / `castor net down`; needs root).
//!
//! ```text
//!   namespace castor-client: castor-cl0 10.77.0.1/24
//!                                 │ veth
//!   root namespace:          castor-cl1 ── castor0 (bridge, 10.77.0.254/24)
//!                                           ├── castor-tap-a (daemon a's guest NIC)
//!                                           └── castor-tap-b (daemon b's guest NIC)
//!   guest: 10.77.0.2, MAC 52:54:00:ca:57:02
//! ```
//!
//! The taps are persistent (`ip tuntap add … mode tap`): each daemon opens
//! its own by name. Only the daemon running the guest attaches to its tap,
//! so the other tap has no carrier and the bridge does not forward to it.
//! [`NetLab::up`] is idempotent (it completes a half-made setup) and
//! [`NetLab::down`] removes whatever of it exists. Every name and address is
//! a field of [`NetLab`], so tests can make their own with
//! [`NetLab::unique`] and run in parallel.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Names and addresses of the guest network; [`Default`] is the standard
/// lab (`castor0`, `castor-tap-a`/`-b`, `castor-client`, 10.77.0.0/24).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLab {
    /// The bridge.
    pub bridge: String,
    /// The bridge's (the host's) address on the guest network.
    pub bridge_addr: Ipv4Addr,
    /// Prefix length of the guest network.
    pub prefix_len: u8,
    /// The daemons' tap devices (a, b), enslaved to the bridge.
    pub taps: Vec<String>,
    /// The client's network namespace.
    pub netns: String,
    /// The veth end inside the client namespace.
    pub client_if: String,
    /// The veth end on the bridge.
    pub bridge_port: String,
    /// The client's address (on `client_if`).
    pub client_addr: Ipv4Addr,
    /// The guest's address (configured by the guest, not here).
    pub guest_addr: Ipv4Addr,
    /// The guest's MAC address (given to the virtio-net device).
    pub guest_mac: [u8; 6],
}

/// The guest's default MAC address.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xca, 0x57, 0x02];

/// The guest's key-value service's default UDP port.
pub const KV_PORT: u16 = 7000;

impl Default for NetLab {
    fn default() -> NetLab {
        NetLab {
            bridge: "castor0".into(),
            bridge_addr: Ipv4Addr::new(10, 77, 0, 254),
            prefix_len: 24,
            taps: vec!["castor-tap-a".into(), "castor-tap-b".into()],
            netns: "castor-client".into(),
            client_if: "castor-cl0".into(),
            bridge_port: "castor-cl1".into(),
            client_addr: Ipv4Addr::new(10, 77, 0, 1),
            guest_addr: Ipv4Addr::new(10, 77, 0, 2),
            guest_mac: GUEST_MAC,
        }
    }
}

/// Formats a MAC address as `52:54:00:ca:57:02`.
pub struct Mac<'a>(pub &'a [u8; 6]);

impl fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Runs `ip ARGS…`; the error names the command and carries ip's stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a deleting `ip ARGS…`; a device or namespace already gone is not
/// an error.
fn ip_del(args: &[&str]) -> Result<()> {
    match ip(args) {
        Err(e)
            if ["Cannot find device", "No such file", "No such device"]
                .iter()
                .any(|m| format!("{e:#}").contains(m)) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Whether `ip ARGS…` succeeds (a query such as `link show dev X`).
fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Turns IPv6 off on a device of the calling thread's namespace, if the
/// kernel has IPv6 (errors are ignored).
fn disable_ipv6(dev: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
}

/// Whether a network device exists in the current namespace.
pub fn link_exists(dev: &str) -> bool {
    Path::new("/sys/class/net").join(dev).exists() || ip_ok(&["link", "show", "dev", dev])
}

/// Whether a named network namespace (`ip netns add`) exists.
pub fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

impl NetLab {
    /// A lab with names and a subnet of its own, for tests: device names
    /// start with `prefix` (at most 8 characters, so that every name fits
    /// the kernel's 15), and the network is `10.S.T.0/24` where S.T is
    /// `subnet` (pick one no other lab on the host uses).
    pub fn unique(prefix: &str, subnet: (u8, u8)) -> NetLab {
        let (s, t) = subnet;
        NetLab {
            bridge: format!("{prefix}br"),
            bridge_addr: Ipv4Addr::new(10, s, t, 254),
            prefix_len: 24,
            taps: vec![format!("{prefix}ta"), format!("{prefix}tb")],
            netns: format!("{prefix}-client"),
            client_if: format!("{prefix}c0"),
            bridge_port: format!("{prefix}c1"),
            client_addr: Ipv4Addr::new(10, s, t, 1),
            guest_addr: Ipv4Addr::new(10, s, t, 2),
            guest_mac: GUEST_MAC,
        }
    }

    /// The guest's key-value service: guest address, port [`KV_PORT`].
    pub fn guest_service(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.guest_addr, KV_PORT))
    }

    fn check_names(&self) -> Result<()> {
        let devs = [&self.bridge, &self.client_if, &self.bridge_port]
            .into_iter()
            .chain(self.taps.iter());
        for d in devs {
            if d.is_empty() || d.len() > 15 || d.contains(['/', ' ']) {
                bail!("bad network device name {d:?} (1 to 15 characters, no '/' or space)");
            }
        }
        if self.netns.is_empty() || self.netns.contains(['/', ' ']) {
            bail!("bad namespace name {:?}", self.netns);
        }
        Ok(())
    }

    /// Creates the bridge, the taps and the client namespace with its veth
    /// link (needs root). Idempotent: what exists already is kept (and
    /// configured again), what is missing is made.
    pub fn up(&self) -> Result<()> {
        self.check_names()?;
        self.build()
            .with_context(|| format!("setting up the guest network ({})", self.bridge))
    }

    fn build(&self) -> Result<()> {
        let br = self.bridge.as_str();
        let cidr = |a: Ipv4Addr| format!("{a}/{}", self.prefix_len);
        // The bridge, with the host's address on the guest network. With
        // STP off (the default) ports forward as soon as they are up.
        if !link_exists(br) {
            ip(&["link", "add", "name", br, "type", "bridge"])?;
        }
        ip(&["addr", "replace", &cidr(self.bridge_addr), "dev", br])?;
        ip(&["link", "set", "dev", br, "up"])?;
        // The daemons' persistent taps.
        for tap in &self.taps {
            if !link_exists(tap) {
                ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            }
            ip(&["link", "set", "dev", tap, "master", br])?;
            ip(&["link", "set", "dev", tap, "up"])?;
        }
        // The client namespace and its veth link to the bridge.
        let ns = self.netns.as_str();
        if !netns_exists(ns) {
            ip(&["netns", "add", ns])?;
        }
        ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        let inner_ok = ip_ok(&["-n", ns, "link", "show", "dev", &self.client_if]);
        if !inner_ok || !link_exists(&self.bridge_port) {
            // A half-made pair (one end gone with an old namespace): remake it.
            if link_exists(&self.bridge_port) {
                ip_del(&["link", "del", "dev", &self.bridge_port])?;
            }
            if inner_ok {
                ip_del(&["-n", ns, "link", "del", "dev", &self.client_if])?;
            }
            // An end left by a deleted namespace goes away asynchronously.
            let t = Instant::now();
            while link_exists(&self.bridge_port) && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            ip(&[
                "link",
                "add",
                "name",
                &self.bridge_port,
                "type",
                "veth",
                "peer",
                "name",
                &self.client_if,
                "netns",
                ns,
            ])?;
        }
        ip(&["link", "set", "dev", &self.bridge_port, "master", br])?;
        ip(&["link", "set", "dev", &self.bridge_port, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "replace",
            &cidr(self.client_addr),
            "dev",
            &self.client_if,
        ])?;
        ip(&["-n", ns, "link", "set", "dev", &self.client_if, "up"])?;
        // No IPv6 on the guest network (best effort): its router
        // solicitations and multicast reports would only be noise for the
        // guest's IPv4-only stack and the output commit.
        for dev in [br, &self.bridge_port]
            .into_iter()
            .chain(self.taps.iter().map(String::as_str))
        {
            disable_ipv6(dev);
        }
        let inner = self.client_if.clone();
        let _ = in_netns(ns, move || disable_ipv6(&inner));
        Ok(())
    }

    /// Removes the client namespace, the veth pair, the taps and the bridge,
    /// whichever exist (needs root). Every removal is tried; the error lists
    /// those that failed.
    pub fn down(&self) -> Result<()> {
        self.check_names()?;
        let mut failed = Vec::new();
        let mut run = |args: &[&str]| {
            if let Err(e) = ip_del(args) {
                failed.push(format!("{e:#}"));
            }
        };
        // The veth pair first (deleting one end deletes both): a namespace's
        // devices are destroyed asynchronously after `ip netns del`.
        if link_exists(&self.bridge_port) {
            run(&["link", "del", "dev", &self.bridge_port]);
        }
        if netns_exists(&self.netns) {
            run(&["netns", "del", &self.netns]);
        }
        for tap in &self.taps {
            if link_exists(tap) {
                run(&["tuntap", "del", "dev", tap, "mode", "tap"]);
            }
        }
        if link_exists(&self.bridge) {
            run(&["link", "del", "dev", &self.bridge]);
        }
        if !failed.is_empty() {
            bail!(
                "removing the guest network ({}): {}",
                self.bridge,
                failed.join("; ")
            );
        }
        Ok(())
    }

    /// Whether every device and the namespace exist.
    pub fn exists(&self) -> bool {
        link_exists(&self.bridge)
            && self.taps.iter().all(|t| link_exists(t))
            && link_exists(&self.bridge_port)
            && netns_exists(&self.netns)
            && ip_ok(&["-n", &self.netns, "link", "show", "dev", &self.client_if])
    }

    /// Runs `f` on a new thread that has moved into the client namespace
    /// (sockets it makes live there) and returns its result.
    pub fn in_client_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.netns, f)
    }

    /// A human summary of the layout.
    pub fn describe(&self) -> String {
        format!(
            "bridge {} {}/{}; taps {}; namespace {} with {} {}/{} (veth peer {} on the bridge); \
             guest {} MAC {}",
            self.bridge,
            self.bridge_addr,
            self.prefix_len,
            self.taps.join(", "),
            self.netns,
            self.client_if,
            self.client_addr,
            self.prefix_len,
            self.bridge_port,
            self.guest_addr,
            Mac(&self.guest_mac)
        )
    }
}

/// A guest network that is removed when dropped (see [`NetLab::up_scoped`]).
#[derive(Debug)]
pub struct NetGuard(NetLab);

impl std::ops::Deref for NetGuard {
    type Target = NetLab;
    fn deref(&self) -> &NetLab {
        &self.0
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            tracing::warn!("{e:#}");
        }
    }
}

impl NetLab {
    /// [`NetLab::up`], removed again ([`NetLab::down`]) when the guard is
    /// dropped: for tests and drills that own their network.
    pub fn up_scoped(self) -> Result<NetGuard> {
        let g = NetGuard(self);
        g.0.up()?;
        Ok(g)
    }
}

/// Moves the calling thread into the named network namespace (`ip netns
/// add NAME`, a file in /run/netns). Only for a thread of your own that
/// stays there: sockets it makes afterwards belong to that namespace.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let f = std::fs::File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("setns(CLONE_NEWNET) into {} (needs root)", path.display()))?;
    Ok(())
}

/// Runs `f` on a new thread moved into the named network namespace and
/// returns its result.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            enter_netns(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("the thread in network namespace {ns} panicked"))?
    })
}

/// `castor net`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: NetAction,
}

/// `castor net up|down|show`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum NetAction {
    /// Create the bridge castor0 (10.77.0.254/24), the taps castor-tap-a
    /// and castor-tap-b on it, and the namespace castor-client (castor-cl0,
    /// 10.77.0.1/24) linked to it by a veth pair. Idempotent; needs root.
    Up,
    /// Remove all of it (whatever exists). Needs root.
    Down,
    /// Print the layout and whether it exists.
    Show,
}

/// Runs `castor net`.
pub fn net(args: NetArgs) -> Result<()> {
    let lab = NetLab::default();
    let root = rustix::process::geteuid().is_root();
    let hint = |r: Result<()>| {
        r.with_context(|| {
            if root {
                "castor net".to_string()
            } else {
                "castor net (not running as root: it needs root)".to_string()
            }
        })
    };
    match args.action {
        NetAction::Up => {
            hint(lab.up())?;
            println!("up: {}", lab.describe());
        }
        NetAction::Down => {
            hint(lab.down())?;
            println!(
                "down: removed {}, its taps and namespace {}",
                lab.bridge, lab.netns
            );
        }
        NetAction::Show => {
            let state = if lab.exists() { "up" } else { "not (fully) up" };
            println!("{state}: {}", lab.describe());
        }
    }
    Ok(())
}
