//! `castor bench` plots (PNG, plotters): pause vs dirty pages, bytes per
//! epoch per mode, throughput per workload, failover time distribution.
//! Text is drawn with the DejaVu Sans font shipped in `assets/fonts`.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::model::{Point, Results};

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn pe<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut r = Ok(());
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            r = Err(anyhow!("the embedded font does not load"));
        }
    });
    r
}

/// Colour of a configuration.
fn colour(config: &str) -> RGBColor {
    match config {
        "remus" => RGBColor(214, 39, 40),
        "xbzrle" => RGBColor(255, 127, 14),
        "fgbi" => RGBColor(31, 119, 180),
        "tracking" => RGBColor(127, 127, 127),
        "unprotected" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// Draws every plot into `out`.
pub fn draw_all(out: &Path, r: &Results) -> Result<()> {
    register_font()?;
    pause_vs_dirty(&out.join("pause_vs_dirty.png"), r)?;
    bytes_per_epoch(&out.join("bytes_per_epoch.png"), r)?;
    overhead(&out.join("throughput.png"), r)?;
    failover(&out.join("failover.png"), r)?;
    Ok(())
}

fn pause_vs_dirty(path: &Path, r: &Results) -> Result<()> {
    let pts: Vec<&Point> = r
        .points
        .iter()
        .filter(|p| p.protected() && p.ok() && p.pause_p50_us.is_finite())
        .collect();
    let xmax = pts.iter().map(|p| p.dirty_pages).fold(10.0, f64::max) * 2.0;
    let ymax = pts.iter().map(|p| p.pause_p99_us / 1e3).fold(1.0, f64::max) * 2.0;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Pause per checkpoint vs dirty pages per epoch (filled: p50, hollow: p99)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((0.5f64..xmax).log_scale(), (0.05f64..ymax).log_scale())
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("dirty pages per epoch (4 KiB)")
        .y_desc("pause (ms)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(pe)?;
    for m in r.modes() {
        let c = colour(&m);
        let mine: Vec<(f64, f64, f64)> = pts
            .iter()
            .filter(|p| p.config == m)
            .map(|p| {
                (
                    p.dirty_pages.max(0.6),
                    p.pause_p50_us / 1e3,
                    p.pause_p99_us / 1e3,
                )
            })
            .collect();
        chart
            .draw_series(
                mine.iter()
                    .map(|&(x, y, _)| Circle::new((x, y.max(0.05)), 5, c.filled())),
            )
            .map_err(pe)?
            .label(m.clone())
            .legend(move |(x, y)| Circle::new((x, y), 5, c.filled()));
        chart
            .draw_series(
                mine.iter()
                    .map(|&(x, _, y)| Circle::new((x, y.max(0.05)), 5, c.stroke_width(2))),
            )
            .map_err(pe)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}

/// A logarithmic value axis.
struct LogAxis<'a> {
    desc: &'a str,
    /// Lowest value shown.
    lo: f64,
    label: &'a dyn Fn(&f64) -> String,
}

/// Grouped bars on a log axis: one group per workload, one bar per series.
fn grouped_bars(
    path: &Path,
    caption: &str,
    y: LogAxis<'_>,
    groups: &[String],
    series: &[String],
    value: &dyn Fn(&str, &str) -> Option<f64>,
) -> Result<()> {
    let (y_desc, ylo, ylabel) = (y.desc, y.lo, y.label);
    let vals: Vec<f64> = groups
        .iter()
        .flat_map(|g| series.iter().filter_map(move |s| value(g, s)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let ymax = vals.iter().cloned().fold(ylo * 10.0, f64::max) * 3.0;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let n = groups.len().max(1);
    let names = groups.to_vec();
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, (ylo..ymax).log_scale())
        .map_err(pe)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(ylabel)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(pe)?;
    let k = series.len().max(1) as f64;
    let width = 0.8 / k;
    for (si, s) in series.iter().enumerate() {
        let c = colour(s);
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, g)| {
                let v = value(g, s)?;
                if !(v.is_finite() && v > 0.0) {
                    return None;
                }
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                Some(Rectangle::new(
                    [(x0, ylo), (x0 + width * 0.92, v.max(ylo))],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(pe)?
            .label(s.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}

fn bytes_per_epoch(path: &Path, r: &Results) -> Result<()> {
    let e = r.main_epoch();
    let mut series = vec!["raw".to_string()];
    series.extend(r.modes());
    let get = |w: &str, s: &str| -> Option<f64> {
        if s == "raw" {
            // The dirty pages raw, as the fgbi run saw them (a link-bound
            // mode stretches its epochs and so dirties more per epoch).
            let mut runs: Vec<&Point> = r
                .points
                .iter()
                .filter(|p| p.workload == w && p.epoch_ms == e && p.protected() && p.ok())
                .collect();
            runs.sort_by_key(|p| p.config != "fgbi");
            return runs.first().map(|p| p.raw_per_epoch);
        }
        r.point(w, s, e).map(|p| p.bytes_per_epoch)
    };
    grouped_bars(
        path,
        &format!("Bytes on the wire per epoch ({e} ms epochs; raw = fgbi's dirty pages)"),
        LogAxis {
            desc: "bytes per epoch",
            lo: 10.0,
            label: &|v| {
                if *v >= 1e6 {
                    format!("{:.0} MB", v / 1e6)
                } else if *v >= 1e3 {
                    format!("{:.0} KB", v / 1e3)
                } else {
                    format!("{v:.0} B")
                }
            },
        },
        &r.workloads(),
        &series,
        &get,
    )
}

fn overhead(path: &Path, r: &Results) -> Result<()> {
    let e = r.main_epoch();
    let mut series = vec!["tracking".to_string()];
    series.extend(r.modes());
    let get = |w: &str, s: &str| -> Option<f64> { r.point(w, s, e).map(|p| p.vs_unprotected) };
    grouped_bars(
        path,
        &format!("Guest throughput as a share of the unprotected guest ({e} ms epochs)"),
        LogAxis {
            desc: "share of unprotected throughput",
            lo: 0.001,
            label: &|v| {
                if *v >= 0.01 {
                    format!("{:.0} %", v * 100.0)
                } else {
                    format!("{:.1} %", v * 100.0)
                }
            },
        },
        &r.workloads(),
        &series,
        &get,
    )
}

fn failover(path: &Path, r: &Results) -> Result<()> {
    let xmax = r.failovers.iter().map(|f| f.ms).fold(10.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Failover time: SIGKILL of the primary to the survivor's first console byte",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..1.02)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("failover time (ms)")
        .y_desc("fraction of failovers (CDF)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(pe)?;
    for m in r.failover_modes() {
        let mut v = r.failover_ms(Some(&m));
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len() as f64;
        let mut steps = vec![(0.0, 0.0)];
        for (i, x) in v.iter().enumerate() {
            steps.push((*x, i as f64 / n));
            steps.push((*x, (i + 1) as f64 / n));
        }
        let c = colour(&m);
        chart
            .draw_series(LineSeries::new(steps, c.stroke_width(2)))
            .map_err(pe)?
            .label(format!("{m} ({} failovers)", v.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            vec![(50.0, 0.0), (50.0, 1.02)],
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(pe)?
        .label("50 ms target")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.4)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}
