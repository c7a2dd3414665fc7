//! castor's host agent (`castor agent`): one per host of a fleet.
//!
//! Every tick ([`Config::tick`], 500 ms by default) the agent
//! 1. renews its lease in etcd, under which its host is registered
//!    ([`keys::HostRecord`]: name, address, RAM and vCPUs offered, its
//!    failure domain, the VM images it keeps); a host whose agent stops
//!    renewing disappears from the fleet when the lease expires;
//! 2. reads the whole fleet in one request ([`keys::FleetView`]);
//! 3. if it is the leader (the agent that holds `/castor/fleet/leader`
//!    under its lease), computes the next placement with the pure
//!    [`node::fleet::place`] and writes what changed, each entry by
//!    compare-and-swap;
//! 4. does what [`plan::decide`] says its host should: start the roles the
//!    placement gives it (`castor primary`, `castor backup --reuse`, a
//!    migration's destination), tell a primary which backup to protect
//!    toward (after a takeover or a move), ask for a drain's migrations,
//!    and stop roles it no longer has — never one that runs a guest;
//! 5. reports each primary it runs ([`keys::Report`]) when it changes and
//!    every [`REPORT_EVERY`].
//!
//! The agent decides nothing about ownership: a takeover is still its
//! backup's, decided by the witness's compare-and-swap, and the placement
//! follows the witness. So an agent, a leader or etcd being lost changes
//! no role: the daemons run on as they are (see docs/design.md, "The
//! fleet").
#![forbid(unsafe_code)]

pub mod children;
pub mod keys;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use node::control::{MigrateRequest, ProtectRequest, Request, Response};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use witness::store::Store;

use children::{Children, Layout};
use keys::{FleetView, HostRecord, Report};
use plan::{Action, Child, Kind};

/// A primary's figures are written to its report at least this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// A destination has this long to start listening before its source is
/// asked to migrate.
pub const MIGRATION_SETTLE: Duration = Duration::from_secs(2);

/// An agent's settings (`castor agent --help`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Files, ports and flags of its roles.
    pub layout: Layout,
    /// etcd's members.
    pub endpoints: Vec<String>,
    /// Failure-domain label.
    pub domain: String,
    /// RAM offered to VMs.
    pub mem_bytes: u64,
    /// vCPUs offered to VMs.
    pub vcpus: u32,
    /// The lease's time to live: a host is lost this long after its agent
    /// last renewed it.
    pub lease_ttl: Duration,
    /// How often it looks at the fleet.
    pub tick: Duration,
    /// Placement limits (the leader's).
    pub policy: node::fleet::Policy,
    /// The agent's control socket: `status` (an [`AgentStatus`] as JSON)
    /// and any request for one of its VMs ([`Request::Vm`]).
    pub control: std::path::PathBuf,
}

/// What the agent's control socket answers to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Its host.
    pub host: String,
    /// It is the fleet's leader.
    pub leader: bool,
    /// Its roles, by VM: kind and what their control socket said.
    pub roles: BTreeMap<String, String>,
    /// etcd requests so far.
    pub etcd_requests: u64,
    /// Ticks so far.
    pub ticks: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Long control requests (migrations, a change of backup) under way, by VM.
type Busy = Arc<Mutex<BTreeSet<String>>>;

struct Agent {
    cfg: Config,
    store: Store,
    lease: Option<i64>,
    children: Children,
    busy: Busy,
    /// When each VM's move was first seen (for [`MIGRATION_SETTLE`]).
    moves_seen: BTreeMap<String, Instant>,
    /// Reports written: what and when.
    reported: BTreeMap<String, (Report, Instant)>,
    /// The host each VM's primary was placed on last tick.
    last_primary: BTreeMap<String, String>,
    /// Failovers seen here.
    failovers: BTreeMap<String, keys::Failover>,
    status: Arc<Mutex<AgentStatus>>,
    told_unreachable: bool,
    /// When the lease was last renewed.
    renewed: Instant,
    /// The VMs of the last view.
    known_vms: BTreeSet<String>,
    /// VMs seen deleted whose files here are not removed yet.
    deleted: BTreeSet<String>,
    /// The host record last written.
    registered: Vec<u8>,
}

/// Runs the agent until `stop`; then stops its roles.
pub fn run(cfg: Config, stop: Arc<AtomicBool>) -> Result<(), witness::WitnessError> {
    let store = Store::new(&cfg.endpoints)?;
    let status = Arc::new(Mutex::new(AgentStatus {
        host: cfg.layout.host.clone(),
        leader: false,
        roles: BTreeMap::new(),
        etcd_requests: 0,
        ticks: 0,
    }));
    let mut a = Agent {
        cfg,
        store,
        lease: None,
        children: Children::default(),
        busy: Arc::default(),
        moves_seen: BTreeMap::new(),
        reported: BTreeMap::new(),
        last_primary: BTreeMap::new(),
        failovers: BTreeMap::new(),
        status: status.clone(),
        told_unreachable: false,
        renewed: Instant::now(),
        known_vms: BTreeSet::new(),
        deleted: BTreeSet::new(),
        registered: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| {
            witness::WitnessError::Unreachable(format!("a runtime for the control socket: {e}"))
        })?;
    let _bound = {
        let _g = rt.enter();
        let run_dir = a.cfg.layout.run_dir.clone();
        let status = status.clone();
        let handler: node::control::Handler = Arc::new(move |req: &Request| match req {
            Request::Status => Response::Ok(status_json(&status)),
            Request::Vm(v) => {
                if !keys::valid_name(&v.vm) {
                    return Response::Error(format!("{}: not a VM's name", v.vm));
                }
                let path = run_dir.join(format!("{}.sock", v.vm));
                match node::control::request(&path, &v.request, Duration::from_secs(300)) {
                    Ok(r) => r,
                    Err(e) => Response::Error(format!(
                        "this host runs no role of {} that answers: {e}",
                        v.vm
                    )),
                }
            }
            _ => Response::Error(
                "this is a host's agent: it answers status, and requests for a VM (--vm NAME)"
                    .into(),
            ),
        });
        match node::control::serve(&a.cfg.control, node::control::Control::new(handler)) {
            Ok(b) => Some(b),
            Err(e) => {
                warn!("the agent's control socket: {e}");
                None
            }
        }
    };
    info!(
        host = a.cfg.layout.host,
        addr = %a.cfg.layout.addr,
        etcd = a.cfg.endpoints.join(","),
        "agent starting"
    );
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        a.tick();
        let left = a.cfg.tick.saturating_sub(t.elapsed());
        let until = Instant::now() + left;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(left));
        }
    }
    info!("agent stopping: its roles stop (drain a host first to keep its VMs running elsewhere)");
    a.children.stop_all(children::STOP_GRACE);
    if let Some(l) = a.lease {
        let _ = a.store.revoke(l);
    }
    Ok(())
}

impl Agent {
    fn tick(&mut self) {
        for (vm, how) in self.children.reap() {
            debug!(vm, "role ended: {how}");
        }
        if let Err(e) = self.renew() {
            if !self.told_unreachable {
                warn!("etcd does not answer ({e}): the roles run on as they are; retrying");
                self.told_unreachable = true;
            }
            return;
        }
        let view = match FleetView::read(&self.store) {
            Ok(v) => v,
            Err(e) => {
                if !self.told_unreachable {
                    warn!("etcd does not answer ({e}): the roles run on as they are; retrying");
                    self.told_unreachable = true;
                }
                return;
            }
        };
        if self.told_unreachable {
            info!("etcd answers again");
            self.told_unreachable = false;
        }
        let (leader, wrote) = self.lead(&view);
        let view = if wrote {
            // Act on what was just written.
            FleetView::read(&self.store).unwrap_or(view)
        } else {
            view
        };
        let (kids, statuses) = self.observe();
        let now = Instant::now();
        for (vm, a) in &view.placements {
            if a.value.moving_to.is_some() {
                self.moves_seen.entry(vm.clone()).or_insert(now);
            } else {
                self.moves_seen.remove(vm);
            }
        }
        let seen = &self.moves_seen;
        let ready = |vm: &str| {
            seen.get(vm)
                .is_some_and(|t| t.elapsed() >= MIGRATION_SETTLE)
        };
        let actions = plan::decide(&self.cfg.layout.host, &view, &kids, &ready);
        for act in actions {
            self.act(&view, act);
        }
        self.report(&view, &statuses);
        // Images of VMs seen deleted are removed (those of VMs that still
        // exist are kept for reuse, whatever this host's role; those of
        // VMs this agent never saw are left alone: an etcd that is not
        // the fleet's must not cost anyone a disk).
        for vm in &self.known_vms {
            if !view.vms.contains_key(vm) {
                self.deleted.insert(vm.clone());
            }
        }
        self.deleted.retain(|vm| !view.vms.contains_key(vm));
        let ready: BTreeSet<String> = self
            .deleted
            .iter()
            .filter(|vm| !self.children.by_vm.contains_key(*vm))
            .cloned()
            .collect();
        if !ready.is_empty() {
            for vm in self.cfg.layout.remove_stale(&|vm| !ready.contains(vm)) {
                info!(vm, "removed this host's image of a deleted VM");
            }
            self.deleted.retain(|vm| !ready.contains(vm));
        }
        self.known_vms = view.vms.keys().cloned().collect();
        for (vm, a) in &view.placements {
            if let Some(p) = &a.value.primary {
                self.last_primary.insert(vm.clone(), p.clone());
            }
        }
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.leader = leader;
        s.ticks += 1;
        s.etcd_requests = witness::store::requests();
        s.roles = kids
            .iter()
            .map(|(vm, c)| {
                (
                    vm.clone(),
                    format!(
                        "{:?} {}",
                        c.kind,
                        c.role
                            .map_or("(not answering)".to_string(), |r| r.to_string())
                    ),
                )
            })
            .collect();
    }

    /// Keeps the host registered under a live lease (a new one if it
    /// expired), renewed three times a lease period.
    fn renew(&mut self) -> Result<(), witness::WitnessError> {
        if let Some(l) = self.lease {
            if self.renewed.elapsed() < self.cfg.lease_ttl / 3 {
                return self.register(l, false);
            }
            self.renewed = Instant::now();
            match self.store.keep_alive(l)? {
                Some(_) => {
                    // The images kept change as roles come and go.
                    return self.register(l, false);
                }
                None => {
                    warn!("this host's lease expired: registering again");
                    self.lease = None;
                }
            }
        }
        let ttl = self.cfg.lease_ttl.as_secs().max(1) as i64;
        let l = self.store.grant(ttl)?;
        self.register(l, true)?;
        self.lease = Some(l);
        self.renewed = Instant::now();
        info!(lease = l, ttl, "host registered");
        Ok(())
    }

    fn register(&mut self, lease: i64, always: bool) -> Result<(), witness::WitnessError> {
        let rec = HostRecord {
            name: self.cfg.layout.host.clone(),
            addr: self.cfg.layout.addr,
            domain: self.cfg.domain.clone(),
            mem_bytes: self.cfg.mem_bytes,
            vcpus: self.cfg.vcpus,
            images: self.cfg.layout.images(),
            port_base: self.cfg.layout.port_base,
        };
        let value = serde_json::to_vec(&rec).expect("a host record serialises");
        if always || value != self.registered {
            self.store
                .put(&keys::host_key(&self.cfg.layout.host), &value, Some(lease))?;
            self.registered = value;
        }
        Ok(())
    }

    /// Leads if it can; as the leader, writes the next placement. Returns
    /// (leads, wrote something).
    fn lead(&mut self, view: &FleetView) -> (bool, bool) {
        let me = &self.cfg.layout.host;
        let Some(lease) = self.lease else {
            return (false, false);
        };
        match &view.leader {
            Some(l) if &l.value == me => {}
            Some(_) => return (false, false),
            None => match self
                .store
                .create(&keys::leader_key(), me.as_bytes(), Some(lease))
            {
                Ok(true) => info!("this agent leads the fleet's placement"),
                _ => return (false, false),
            },
        }
        let mut wrote = false;
        let hosts = view.host_views();
        let vms = view.vm_views();
        let current = view.assignments();
        let next = node::fleet::place(&hosts, &vms, &current, &self.cfg.policy);
        for (vm, a) in &next {
            let old = view.placements.get(vm);
            if old.map(|o| &o.value) == Some(a) {
                continue;
            }
            let value = serde_json::to_vec(a).expect("an assignment serialises");
            let key = keys::placement_key(vm);
            let wrote_one = match old {
                Some(o) => self.store.swap(&key, o.rev, &value, None),
                None => self.store.create(&key, &value, None),
            };
            match wrote_one {
                Ok(true) => {
                    wrote = true;
                    info!(
                        vm,
                        primary = a.primary.as_deref().unwrap_or("-"),
                        backup = a.backup.as_deref().unwrap_or("-"),
                        moving_to = a.moving_to.as_deref().unwrap_or("-"),
                        "placement"
                    )
                }
                Ok(false) => debug!(vm, "placement changed meanwhile; next tick"),
                Err(e) => debug!(vm, "placement not written: {e}"),
            }
        }
        // Deleted VMs: their placement, slot and witness key go.
        for (vm, a) in &view.placements {
            if !view.vms.contains_key(vm) {
                if let Ok(true) = self.store.delete_if(&keys::placement_key(vm), a.rev) {
                    wrote = true;
                    let _ = self.store.delete(&keys::owner_key(vm));
                    let _ = self.store.delete(&keys::report_key(vm));
                    // Its port slot is free again (a slot whose create
                    // died half-way stays taken: harmless).
                    for (slot, holder) in &view.slots {
                        if holder == vm {
                            let _ = self.store.delete(&keys::slot_key(*slot));
                        }
                    }
                    info!(vm, "deleted VM: its placement and witness key removed");
                }
            }
        }
        (true, wrote)
    }

    /// What each role's control socket says now (asked once a tick):
    /// the plan's view of each role, and the statuses for the reports.
    fn observe(&self) -> (BTreeMap<String, Child>, BTreeMap<String, node::Status>) {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut kids = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        for (vm, r) in &self.children.by_vm {
            let st = status_of(&self.cfg.layout.control(vm));
            kids.insert(
                vm.clone(),
                Child {
                    kind: r.kind.clone(),
                    role: st.as_ref().map(|s| s.role),
                    backup: st.as_ref().and_then(|s| s.primary.as_ref()?.backup.clone()),
                    migrating: busy.contains(vm) || r.stopping.is_some(),
                },
            );
            if let Some(st) = st {
                statuses.insert(vm.clone(), st);
            }
        }
        (kids, statuses)
    }

    fn act(&mut self, view: &FleetView, act: Action) {
        let layout = self.cfg.layout.clone();
        let spec = |vm: &str| view.vms.get(vm).map(|s| s.value.clone());
        match act {
            Action::StartPrimary { vm, backup } => {
                if let Some(s) = spec(&vm) {
                    if let Err(e) = self
                        .children
                        .start(&layout, &s, Kind::Primary, backup.as_ref())
                    {
                        warn!(vm, "cannot start its primary: {e}");
                    }
                }
            }
            Action::StartBackup { vm, peer } => {
                if let Some(s) = spec(&vm) {
                    if let Err(e) = self
                        .children
                        .start(&layout, &s, Kind::Backup { peer }, None)
                    {
                        warn!(vm, "cannot start its backup: {e}");
                    }
                }
            }
            Action::StartIncoming { vm, from, backup } => {
                if let Some(s) = spec(&vm) {
                    if let Err(e) =
                        self.children
                            .start(&layout, &s, Kind::Incoming { from }, Some(&backup))
                    {
                        warn!(vm, "cannot start a migration's destination: {e}");
                    }
                }
            }
            Action::Stop { vm, why } => self.children.stop(&vm, &why),
            Action::Takeover { vm } => {
                self.ask(
                    &vm,
                    Request::Takeover,
                    Duration::from_secs(20),
                    "take over (a drain's switchover: its disk does not migrate)".into(),
                );
            }
            Action::Protect { vm, peer, to } => {
                let req = Request::Protect(ProtectRequest {
                    to,
                    peer: peer.clone(),
                });
                self.ask(
                    &vm,
                    req,
                    Duration::from_secs(20),
                    format!("protect toward {peer}@{to}"),
                );
            }
            Action::Migrate { vm, dest, to } => {
                let req = Request::Migrate(MigrateRequest {
                    to,
                    dest: dest.clone(),
                    mode: "fgbi".into(),
                    block_size: 64,
                    max_downtime_ms: 300,
                    postcopy: false,
                    verify: false,
                    max_rounds: 30,
                    budget: None,
                    link_rate: None,
                    link_delay_us: 0,
                });
                self.ask(
                    &vm,
                    req,
                    Duration::from_secs(300),
                    format!("migrate to {dest}"),
                );
            }
        }
    }

    /// A long control request to `vm`'s role, answered on a thread.
    fn ask(&self, vm: &str, req: Request, timeout: Duration, what: String) {
        {
            let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            if !b.insert(vm.to_string()) {
                return;
            }
        }
        let path = self.cfg.layout.control(vm);
        let busy = self.busy.clone();
        let vm = vm.to_string();
        info!(vm, "asking its role to {what}");
        std::thread::spawn(move || {
            match node::control::request(&path, &req, timeout) {
                Ok(Response::Ok(done)) => info!(vm, "{what}: {}", short(&done)),
                Ok(Response::Error(why)) => warn!(vm, "{what}: refused: {why}"),
                Ok(other) => warn!(vm, "{what}: unexpected answer {other:?}"),
                Err(e) => warn!(vm, "{what}: {e}"),
            }
            // A refused request is asked again next tick: not at once.
            std::thread::sleep(Duration::from_secs(1));
            busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm);
        });
    }

    /// Reports the primaries this host runs.
    fn report(&mut self, view: &FleetView, statuses: &BTreeMap<String, node::Status>) {
        let Some(lease) = self.lease else {
            return;
        };
        let me = self.cfg.layout.host.clone();
        for (vm, st) in statuses {
            if !st.role.runs_guest() {
                continue;
            }
            if st.role == node::Role::TakenOver && !self.failovers.contains_key(vm) {
                let from = self
                    .last_primary
                    .get(vm)
                    .filter(|p| **p != me)
                    .cloned()
                    .unwrap_or_default();
                let f = keys::Failover {
                    at_unix_ms: now_ms(),
                    from,
                    to: me.clone(),
                };
                info!(vm, from = f.from, "this host runs the VM after a failover");
                self.failovers.insert(vm.clone(), f);
            }
            let Some(spec) = view.vms.get(vm) else {
                continue;
            };
            let p = st.figures();
            let ports = keys::ports(self.cfg.layout.port_base, spec.value.slot);
            let r = Report {
                host: me.clone(),
                role: st.role,
                protected: p.protected,
                backup: p.backup.clone(),
                console: std::net::SocketAddr::new(self.cfg.layout.addr, ports.console),
                console_released: st.console_released,
                epochs: p.epochs,
                pause_p50_us: p.pause_p50_us,
                pause_p99_us: p.pause_p99_us,
                bytes_per_epoch: p.bytes_per_epoch,
                resync: p
                    .last_resync
                    .as_ref()
                    .map(|r| (r.reused, r.pages_sent, r.pages)),
                failover: self
                    .failovers
                    .get(vm)
                    .cloned()
                    .or_else(|| view.reports.get(vm).and_then(|r| r.failover.clone())),
                at_unix_ms: now_ms(),
            };
            let material = |a: &Report, b: &Report| {
                a.host == b.host
                    && a.role == b.role
                    && a.protected == b.protected
                    && a.backup == b.backup
                    && a.resync == b.resync
                    && a.failover == b.failover
            };
            let due = match self.reported.get(vm) {
                Some((old, at)) => !material(old, &r) || at.elapsed() >= REPORT_EVERY,
                None => true,
            };
            if due {
                let value = serde_json::to_vec(&r).expect("a report serialises");
                if self
                    .store
                    .put(&keys::report_key(vm), &value, Some(lease))
                    .is_ok()
                {
                    self.reported.insert(vm.clone(), (r, Instant::now()));
                }
            }
        }
    }
}

fn status_of(path: &std::path::Path) -> Option<node::Status> {
    match node::control::request(path, &Request::Status, Duration::from_millis(500)) {
        Ok(Response::Status(s)) => Some(*s),
        _ => None,
    }
}

fn short(s: &str) -> String {
    s.chars().take(300).collect()
}

/// This host's first IPv4 address that is not loopback, for `--addr`'s default.
pub fn default_addr() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Serves the agent's status.
pub fn status_json(s: &Arc<Mutex<AgentStatus>>) -> String {
    serde_json::to_string(&*s.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or_default()
}
