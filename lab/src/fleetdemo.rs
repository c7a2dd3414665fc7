//! `castor fleet-demo`: a fleet on this machine ([`crate::fleetlab`]),
//! several protected VMs, a host lost, and the report: for every VM how
//! long its clients saw no console output (from the loss to the first
//! byte its new primary produced) and how long it was unprotected; then
//! the fleet's steady-state etcd traffic and the agents' own cost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::fleetlab::{describe, protected, FleetLab, FleetSpec};
use crate::pair::{first_past, follow_console};
use node::stats::percentile;

/// `castor fleet-demo`'s flags.
#[derive(Args, Debug, Clone)]
pub struct FleetDemoArgs {
    /// Hosts (network namespaces, each with its agent).
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// VMs (castor's guest, counter workload).
    #[arg(long, default_value_t = 6)]
    pub vms: usize,
    /// Each VM's RAM.
    #[arg(long, default_value = "32M", value_parser = crate::cli::parse_size)]
    pub mem: u64,
    /// Each VM's epoch length (ms).
    #[arg(long, default_value = "50")]
    pub epoch_ms: String,
    /// The backups' failure detector (ms without a heartbeat). Above the
    /// ~100 ms stalls a host that is itself a VM shows under load (its
    /// hypervisor's steal time), so that a stalled primary is not taken over.
    #[arg(long, default_value_t = 400)]
    pub heartbeat_timeout_ms: u64,
    /// etcd members.
    #[arg(long, default_value_t = 3)]
    pub etcd_members: usize,
    /// The agents' lease, s.
    #[arg(long, default_value_t = 2)]
    pub lease_ttl: u64,
    /// How long the steady state is measured (etcd traffic, agents' CPU).
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub steady: Duration,
    /// Where the lab's files go (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// One VM's recovery from the host's loss.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The VM.
    pub vm: String,
    /// Its primary was on the lost host.
    pub moved: bool,
    /// Loss → first console byte of its new primary, ms (0: its primary
    /// was elsewhere and served on).
    pub serve_ms: Option<f64>,
    /// Loss → protected again (a backup holds a committed checkpoint), ms.
    pub protected_ms: Option<f64>,
}

/// Runs the demo.
pub fn fleet_demo(a: FleetDemoArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "castor fleet demo: {} hosts (network namespaces), {} VMs of {} MiB, etcd ×{}",
        a.hosts,
        a.vms,
        a.mem >> 20,
        a.etcd_members
    );
    let mut lab = FleetLab::start(
        &dir,
        &FleetSpec {
            hosts: a.hosts,
            etcd_members: a.etcd_members,
            host_mem: (a.mem * a.vms as u64 * 2 / (a.hosts.max(2) as u64 - 1)).max(256 << 20) * 2,
            agent_flags: vec![
                "--lease-ttl".into(),
                a.lease_ttl.to_string(),
                "--tick-ms".into(),
                "250".into(),
                format!(
                    "--backup-flag=--heartbeat-timeout-ms={}",
                    a.heartbeat_timeout_ms
                ),
            ],
        },
    )?;
    let names: Vec<String> = (0..a.vms).map(|i| format!("vm{i}")).collect();
    for n in &names {
        lab.castor(&[
            "vm",
            "create",
            n,
            "--mem",
            &format!("{}M", a.mem >> 20),
            "--workload",
            "counter,interval_ms=10",
            "--epoch-ms",
            &a.epoch_ms,
        ])?;
    }
    let t = lab.wait_vms("every VM protected", Duration::from_secs(180), |v| {
        v.len() == a.vms && v.iter().all(protected)
    })?;
    println!(
        "all {} VMs protected {:.1} s after creation",
        a.vms,
        t.as_secs_f64()
    );
    print!("{}", lab.castor(&["host", "list"])?);
    print!("{}", lab.castor(&["vm", "list"])?);

    let steady = steady_state(&lab, a.steady)?;
    let rec = lose_host(&mut lab, 0, Duration::from_secs(120))?;
    println!("\nhost h0 lost (agent and roles SIGKILLed, link down):");
    println!(
        "{:<6} {:>6} {:>12} {:>16}",
        "VM", "moved", "serve (ms)", "protected (ms)"
    );
    for r in &rec {
        println!(
            "{:<6} {:>6} {:>12} {:>16}",
            r.vm,
            if r.moved { "yes" } else { "no" },
            r.serve_ms.map_or("-".into(), |m| format!("{m:.0}")),
            r.protected_ms.map_or("NOT".into(), |m| format!("{m:.0}"))
        );
    }
    let mut serve: Vec<f64> = rec
        .iter()
        .filter(|r| r.moved)
        .filter_map(|r| r.serve_ms)
        .collect();
    let mut prot: Vec<f64> = rec.iter().filter_map(|r| r.protected_ms).collect();
    println!(
        "\nmoved VMs serving again: p50 {:.0} ms, p99 {:.0} ms ({} of {} moved); every VM protected again: p50 {:.0} ms, p99 {:.0} ms",
        percentile(&mut serve, 0.5),
        percentile(&mut serve, 0.99),
        serve.len(),
        rec.iter().filter(|r| r.moved).count(),
        percentile(&mut prot, 0.5),
        percentile(&mut prot, 0.99),
    );
    println!(
        "steady state: {:.2} etcd requests/s per VM ({:.1} per agent), agent RSS {:.1} MiB, agent CPU {:.2} % of a core",
        steady.etcd_per_vm_s, steady.etcd_per_agent_s, steady.agent_rss_mib, steady.agent_cpu_pct
    );
    print!("{}", lab.castor(&["vm", "list"])?);
    Ok(())
}

/// The fleet's cost at rest.
#[derive(Debug, Clone)]
pub struct Steady {
    /// etcd requests a second per VM (all agents).
    pub etcd_per_vm_s: f64,
    /// etcd requests a second per agent.
    pub etcd_per_agent_s: f64,
    /// An agent's resident memory, mean, MiB.
    pub agent_rss_mib: f64,
    /// An agent's CPU, mean, percent of one core.
    pub agent_cpu_pct: f64,
}

fn agent_status(lab: &FleetLab, i: usize) -> Option<agent::AgentStatus> {
    let path = lab.host_dir(i).join("agent.sock");
    match node::control::request(
        &path,
        &node::control::Request::Status,
        Duration::from_secs(2),
    ) {
        Ok(node::control::Response::Ok(s)) => serde_json::from_str(&s).ok(),
        _ => None,
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Measures etcd traffic and the agents' cost over `for_`.
pub fn steady_state(lab: &FleetLab, for_: Duration) -> Result<Steady> {
    let n = lab.hosts.len();
    let vms = lab.view()?.vms.len().max(1);
    let pids: Vec<u32> = lab
        .hosts
        .iter()
        .filter_map(|h| h.agent.as_ref().map(|c| c.id()))
        .collect();
    let req0: Vec<u64> = (0..n)
        .map(|i| agent_status(lab, i).map_or(0, |s| s.etcd_requests))
        .collect();
    let cpu0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let t = Instant::now();
    std::thread::sleep(for_);
    let secs = t.elapsed().as_secs_f64();
    let req1: Vec<u64> = (0..n)
        .map(|i| agent_status(lab, i).map_or(0, |s| s.etcd_requests))
        .collect();
    let cpu1: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let reqs: u64 = req1
        .iter()
        .zip(&req0)
        .map(|(b, a)| b.saturating_sub(*a))
        .sum();
    let hz = 100.0; // USER_HZ
    let cpu: f64 = cpu1
        .iter()
        .zip(&cpu0)
        .map(|(b, a)| b.saturating_sub(*a) as f64 / hz)
        .sum::<f64>();
    let rss: Vec<f64> = pids
        .iter()
        .filter_map(|p| rss_kib(*p))
        .map(|k| k as f64 / 1024.0)
        .collect();
    Ok(Steady {
        etcd_per_vm_s: reqs as f64 / secs / vms as f64,
        etcd_per_agent_s: reqs as f64 / secs / n as f64,
        agent_rss_mib: rss.iter().sum::<f64>() / rss.len().max(1) as f64,
        agent_cpu_pct: cpu / secs / pids.len().max(1) as f64 * 100.0,
    })
}

/// Loses host `i` and measures every VM's recovery, as its clients see it.
pub fn lose_host(lab: &mut FleetLab, i: usize, within: Duration) -> Result<Vec<Recovery>> {
    let view = lab.view()?;
    let lost = lab.hosts[i].name.clone();
    // Where each VM will serve from: its primary, or its backup if the
    // primary is on the lost host; followed from its console's end now.
    struct Watch {
        vm: String,
        moved: bool,
        at: SocketAddr,
        control: PathBuf,
        offset: u64,
    }
    let mut watches = Vec::new();
    for (vm, a) in &view.placements {
        let Some(spec) = view.vms.get(vm) else {
            continue;
        };
        let moved = a.value.primary.as_deref() == Some(lost.as_str());
        let serve = if moved {
            a.value.backup.clone()
        } else {
            a.value.primary.clone()
        };
        let Some(host) = serve else { continue };
        let Some(rec) = view.hosts.get(&host) else {
            continue;
        };
        let at = SocketAddr::new(
            rec.addr,
            agent::keys::ports(rec.port_base, spec.value.slot).console,
        );
        let j = lab.index(&host).context("a host of the lab")?;
        let control = lab.host_dir(j).join("run").join(format!("{vm}.sock"));
        let offset = view.reports.get(vm).map_or(0, |r| r.console_released);
        watches.push(Watch {
            vm: vm.clone(),
            moved,
            at,
            control,
            offset,
        });
    }
    let killed = Instant::now();
    let until = killed + Duration::from_secs(10);
    let followers: Vec<_> = watches
        .iter()
        .map(|w| {
            let (at, offset) = (w.at, w.offset);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; offset as usize];
                follow_console(at, offset, &mut buf, until).unwrap_or_default()
            })
        })
        .collect();
    lab.kill_host(i)?;
    // Protected again: polled from the fleet's view.
    let mut protected_at: BTreeMap<String, f64> = BTreeMap::new();
    let names: Vec<String> = watches.iter().map(|w| w.vm.clone()).collect();
    while killed.elapsed() < within && protected_at.len() < names.len() {
        if let Ok(v) = lab.vms() {
            for l in &v {
                if protected(l)
                    && l.placement.backup.as_deref() != Some(lost.as_str())
                    && l.placement.primary.as_deref() != Some(lost.as_str())
                {
                    protected_at
                        .entry(l.name.clone())
                        .or_insert(killed.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if protected_at.len() < names.len() {
        eprintln!(
            "not every VM was protected again: {}",
            describe(&lab.vms()?)
        );
    }
    let mut out = Vec::new();
    for (w, f) in watches.iter().zip(followers) {
        let arrivals = f.join().unwrap_or_default();
        let serve_ms = if w.moved {
            let resumed = crate::pair::status(&w.control).and_then(|s| s.resumed_at);
            resumed
                .and_then(|r| first_past(&arrivals, r))
                .map(|t| (t - killed).as_secs_f64() * 1e3)
        } else {
            Some(0.0)
        };
        out.push(Recovery {
            vm: w.vm.clone(),
            moved: w.moved,
            serve_ms,
            protected_ms: protected_at.get(&w.vm).copied(),
        });
    }
    Ok(out)
}
