//! The results model of `castor bench`: what a run measured ([`Results`]:
//! its [`Settings`], the matrix's [`Point`]s, the drills' [`Failover`]s).
//! The bench produces it; the report and the plots read only this.

use serde::{Deserialize, Serialize};

/// Figures of one point of the matrix.
/// (Figures not measured are NaN, written as `null` in JSON.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Point {
    /// Workload label.
    pub workload: String,
    /// `unprotected`, `tracking`, or the mode of a protected run.
    pub config: String,
    /// Epoch length (0 when unprotected).
    pub epoch_ms: u64,
    /// Guest operations per second in the window (sum over vCPUs).
    pub ops_per_s: f64,
    /// Throughput / unprotected throughput.
    pub vs_unprotected: f64,
    /// Throughput / tracking-only throughput at the same epoch length.
    pub vs_tracking: f64,
    /// Checkpoints in the window.
    pub epochs: f64,
    /// Pause p50, µs.
    pub pause_p50_us: f64,
    /// Pause p99, µs.
    pub pause_p99_us: f64,
    /// Pause max, µs.
    pub pause_max_us: f64,
    /// Harvest p50, µs.
    pub harvest_p50_us: f64,
    /// Page copy p50, µs.
    pub copy_p50_us: f64,
    /// State capture p50, µs.
    pub capture_p50_us: f64,
    /// Encode p50, µs (after resume).
    pub encode_p50_us: f64,
    /// Encode p99, µs.
    pub encode_p99_us: f64,
    /// Dirty pages per epoch.
    pub dirty_pages: f64,
    /// Bytes sent per epoch.
    pub bytes_per_epoch: f64,
    /// Raw bytes of the dirty pages per epoch.
    pub raw_per_epoch: f64,
    /// Ack latency p50, µs (commit sent → ack).
    pub ack_p50_us: f64,
    /// Ack latency p99, µs.
    pub ack_p99_us: f64,
    /// Output-commit delay p50, µs (end of epoch → output released).
    pub release_p50_us: f64,
    /// Output-commit delay p99, µs.
    pub release_p99_us: f64,
    /// Epochs that waited for acks (link or backup too slow).
    pub epochs_waited: f64,
    /// Dirty pages per epoch copied before the pause (pre-copy).
    pub precopied: f64,
    /// Share of the window the guest's vCPU threads ran on a CPU (from
    /// /proc/PID/task/TID/schedstat; per vCPU, summed).
    pub vcpu_ran: f64,
    /// Share of the window they were runnable but waited for a CPU.
    pub vcpu_waited: f64,
    /// The window's real length, ms: longer than the plan's when the link
    /// could not carry the mode's checkpoints (they stretched past it) and
    /// the bench read on until [`crate::bench::MIN_POINT_CHECKPOINTS`] were in.
    pub window_ms: f64,
    /// Why the point failed, if it did.
    pub error: Option<String>,
}

impl Default for Point {
    fn default() -> Self {
        let nan = f64::NAN;
        Point {
            workload: String::new(),
            config: String::new(),
            epoch_ms: 0,
            ops_per_s: nan,
            vs_unprotected: nan,
            vs_tracking: nan,
            epochs: nan,
            pause_p50_us: nan,
            pause_p99_us: nan,
            pause_max_us: nan,
            harvest_p50_us: nan,
            copy_p50_us: nan,
            capture_p50_us: nan,
            encode_p50_us: nan,
            encode_p99_us: nan,
            dirty_pages: nan,
            bytes_per_epoch: nan,
            raw_per_epoch: nan,
            ack_p50_us: nan,
            ack_p99_us: nan,
            release_p50_us: nan,
            release_p99_us: nan,
            epochs_waited: nan,
            precopied: nan,
            vcpu_ran: nan,
            vcpu_waited: nan,
            window_ms: nan,
            error: None,
        }
    }
}

impl Point {
    /// A point of `workload` in `config` at `epoch_ms`, nothing measured yet.
    pub fn new(workload: &str, config: &str, epoch_ms: u64) -> Self {
        Point {
            workload: workload.into(),
            config: config.into(),
            epoch_ms,
            ..Point::default()
        }
    }

    /// Whether this is a protected (pair) point.
    pub fn protected(&self) -> bool {
        !matches!(self.config.as_str(), "unprotected" | "tracking")
    }

    /// Whether it was measured (did not fail).
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// One failover of the drills.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failover {
    /// Mode.
    pub mode: String,
    /// Round.
    pub round: u32,
    /// SIGKILL → first console byte from the survivor, ms.
    pub ms: f64,
}

/// Everything a run produced.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    /// The command line.
    pub command: String,
    /// When it ran (UTC, from the system clock).
    pub started: String,
    /// KVM flavour and host.
    pub host: String,
    /// Settings.
    pub settings: Settings,
    /// The matrix.
    pub points: Vec<Point>,
    /// The drills.
    pub failovers: Vec<Failover>,
    /// Failed drills.
    pub failover_errors: Vec<String>,
    /// Wall time of the whole run, s.
    pub wall_s: f64,
}

impl Results {
    /// The modes of the protected points, in the order they ran.
    pub fn modes(&self) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        for p in self.points.iter().filter(|p| p.protected()) {
            if !m.contains(&p.config) {
                m.push(p.config.clone());
            }
        }
        m
    }

    /// The epoch lengths of the protected points, ascending.
    pub fn epochs(&self) -> Vec<u64> {
        let mut e: Vec<u64> = self
            .points
            .iter()
            .filter(|p| p.protected())
            .map(|p| p.epoch_ms)
            .collect();
        e.sort_unstable();
        e.dedup();
        e
    }

    /// The epoch length the targets and plots are about: 25 ms if it ran.
    pub fn main_epoch(&self) -> u64 {
        let e = self.epochs();
        if e.contains(&25) {
            25
        } else {
            e.first().copied().unwrap_or(25)
        }
    }

    /// The workloads of the points, in the order they ran.
    pub fn workloads(&self) -> Vec<String> {
        let mut l: Vec<String> = Vec::new();
        for p in &self.points {
            if !l.contains(&p.workload) {
                l.push(p.workload.clone());
            }
        }
        l
    }

    /// The measured point (not failed) of `workload` in `config` at `epoch_ms`.
    pub fn point(&self, workload: &str, config: &str, epoch_ms: u64) -> Option<&Point> {
        self.points.iter().find(|p| {
            p.workload == workload && p.config == config && p.epoch_ms == epoch_ms && p.ok()
        })
    }

    /// The modes of the failover drills, in the order they ran.
    pub fn failover_modes(&self) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        for f in &self.failovers {
            if !m.contains(&f.mode) {
                m.push(f.mode.clone());
            }
        }
        m
    }

    /// The failover times (ms) of drills in `mode`, or of all of them.
    pub fn failover_ms(&self, mode: Option<&str>) -> Vec<f64> {
        self.failovers
            .iter()
            .filter(|f| mode.is_none_or(|m| f.mode == m))
            .map(|f| f.ms)
            .collect()
    }

    /// Reads the `points.json` of a run (figures not measured were written
    /// as `null` and read back as NaN).
    pub fn from_json(text: &str) -> serde_json::Result<Results> {
        let mut v: serde_json::Value = serde_json::from_str(text)?;
        if let Some(points) = v.get_mut("points").and_then(|p| p.as_array_mut()) {
            for p in points.iter_mut().filter_map(|p| p.as_object_mut()) {
                p.retain(|_, x| !x.is_null());
            }
        }
        serde_json::from_value(v)
    }
}

/// The run's settings, as recorded with the results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Emulated link.
    pub link: String,
    /// Warm-up per point, ms.
    pub warmup_ms: u64,
    /// Window per point, ms.
    pub measure_ms: u64,
    /// Workloads: label → spec.
    pub workloads: Vec<(String, String)>,
    /// The backup's failure detector in the checkpoint points, ms (0: the
    /// daemon's default, in results recorded before it was set).
    #[serde(default)]
    pub point_detector_ms: u64,
}

impl Settings {
    /// The kind of each workload (sparse, pages, ...; `kernel` for a
    /// kernel of one's own), label → kind, from the recorded guest
    /// arguments (`--workload KIND,...`).
    pub fn kinds(&self) -> Vec<(String, String)> {
        self.workloads
            .iter()
            .map(|(label, args)| {
                let kind = args
                    .strip_prefix("--workload ")
                    .and_then(|w| w.split(',').next())
                    .unwrap_or("kernel");
                (label.clone(), kind.to_string())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(workload: &str, config: &str, epoch_ms: u64) -> Point {
        Point {
            bytes_per_epoch: 100.0,
            ..Point::new(workload, config, epoch_ms)
        }
    }

    #[test]
    fn reads_back_what_it_wrote_and_answers_questions() {
        let mut failed = point("sparse-50k", "fgbi", 50);
        failed.error = Some("boom".into());
        let r = Results {
            command: "castor bench".into(),
            started: "now".into(),
            host: "here".into(),
            settings: Settings {
                mem_mib: 256,
                vcpus: 1,
                link: "none".into(),
                warmup_ms: 1,
                measure_ms: 2,
                workloads: vec![
                    ("sparse-50k".into(), "--workload sparse,rate=50000".into()),
                    ("k".into(), "--kernel /k --cmdline ".into()),
                ],
                point_detector_ms: 1000,
            },
            points: vec![
                point("sparse-50k", "unprotected", 0),
                point("sparse-50k", "remus", 50),
                point("sparse-50k", "fgbi", 25),
                failed,
                point("k", "remus", 25),
            ],
            failovers: vec![
                Failover {
                    mode: "fgbi".into(),
                    round: 1,
                    ms: 20.0,
                },
                Failover {
                    mode: "remus".into(),
                    round: 1,
                    ms: 30.0,
                },
            ],
            failover_errors: vec![],
            wall_s: 1.0,
        };
        let back = Results::from_json(&serde_json::to_string(&r).unwrap()).unwrap();
        assert!(back.points[0].pause_p50_us.is_nan(), "null reads as NaN");
        assert_eq!(back.points[0].bytes_per_epoch, 100.0);
        assert_eq!(back.modes(), ["remus", "fgbi"]);
        assert_eq!(back.epochs(), [25, 50]);
        assert_eq!(back.main_epoch(), 25);
        assert_eq!(back.workloads(), ["sparse-50k", "k"]);
        assert!(back.point("sparse-50k", "fgbi", 50).is_none(), "failed");
        assert!(back.point("sparse-50k", "fgbi", 25).is_some());
        assert_eq!(back.failover_modes(), ["fgbi", "remus"]);
        assert_eq!(back.failover_ms(Some("remus")), [30.0]);
        assert_eq!(back.failover_ms(None).len(), 2);
        assert_eq!(
            back.settings.kinds(),
            [
                ("sparse-50k".to_string(), "sparse".to_string()),
                ("k".to_string(), "kernel".to_string())
            ]
        );
    }
}
