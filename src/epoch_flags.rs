//! The flags of the epoch's length (`--epoch-ms MS|auto` and the knobs of
//! `auto`), parsed into the primary's [`primary::EpochLength`].

use std::time::Duration;

use anyhow::{bail, Result};

use super::ProtectArgs;

/// `--epoch-ms`: a length, or chosen by the working-set model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EpochMs {
    /// Every epoch this many milliseconds.
    Fixed(u64),
    /// `auto`.
    Auto,
}

pub(crate) fn parse_epoch_ms(s: &str) -> Result<EpochMs, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(EpochMs::Auto);
    }
    match t.parse::<u64>() {
        Ok(ms @ 1..=10_000) => Ok(EpochMs::Fixed(ms)),
        Ok(_) => Err(format!("{t} ms is outside 1..=10000")),
        Err(_) => Err(format!(
            "'{s}' is neither a number of milliseconds (1..=10000) nor auto"
        )),
    }
}

/// A positive number of milliseconds (fractions allowed).
pub(crate) fn parse_positive_ms(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 10_000.0 => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of milliseconds above 0 (at most 10000), e.g. 2 or 0.5"
        )),
    }
}

/// A percentage above 0, below 100.
pub(crate) fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 100.0 => Ok(v),
        _ => Err(format!(
            "'{s}' is not a percentage above 0 and below 100, e.g. 5"
        )),
    }
}

/// The primary's epoch length from the flags: fixed, or auto with its
/// target (the auto-only flags are refused with a fixed length).
pub(crate) fn epoch_length(p: &ProtectArgs) -> Result<primary::EpochLength> {
    let ms = Duration::from_millis;
    match p.epoch_ms {
        EpochMs::Fixed(e) => {
            let auto_only = [
                ("--pause-target-ms", p.pause_target_ms.is_some()),
                ("--link-budget", p.link_budget.is_some()),
                ("--pause-share-pct", p.pause_share_pct.is_some()),
                ("--epoch-min-ms", p.epoch_min_ms.is_some()),
                ("--epoch-max-ms", p.epoch_max_ms.is_some()),
            ];
            if let Some((flag, _)) = auto_only.iter().find(|(_, given)| *given) {
                bail!(
                    "{flag} applies to --epoch-ms auto only (here the epochs are fixed at {e} ms)"
                );
            }
            Ok(primary::EpochLength::Fixed(ms(e)))
        }
        EpochMs::Auto => {
            let d = node::wws::EpochTarget::default();
            let min = p.epoch_min_ms.map_or(d.min, ms);
            let max = p.epoch_max_ms.map_or(d.max, ms);
            if min > max {
                bail!(
                    "--epoch-min-ms {} is longer than --epoch-max-ms {}",
                    min.as_millis(),
                    max.as_millis()
                );
            }
            let link_budget = match p.link_budget {
                Some(lab::cli::LinkRate(Some(r))) if r > 0 => r as f64,
                Some(_) => bail!("--link-budget needs a rate above 0, e.g. 800mbit or 50MB"),
                None => 0.8 * p.link_rate.0.filter(|&r| r > 0).map_or(125e6, |r| r as f64),
            };
            Ok(primary::EpochLength::Auto(node::wws::EpochTarget {
                pause: p
                    .pause_target_ms
                    .map_or(d.pause, |v| Duration::from_secs_f64(v / 1e3)),
                link_budget,
                pause_share: p.pause_share_pct.map_or(d.pause_share, |v| v / 100.0),
                min,
                max,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{expand_config, Cli, Command, PrimaryArgs};
    use clap::Parser;

    const MS: Duration = Duration::from_millis(1);

    /// `castor primary` with the pair's required flags and `args`.
    fn primary(args: &[&str]) -> Result<PrimaryArgs, clap::Error> {
        let mut v = vec![
            "castor",
            "primary",
            "--certs",
            "pki",
            "--node",
            "a",
            "--peer",
            "b",
            "--witness",
            "none",
            "--backup",
            "127.0.0.1:7400",
        ];
        v.extend(args);
        match Cli::try_parse_from(v)?.command {
            Command::Primary(a) => Ok(a),
            _ => unreachable!("castor primary"),
        }
    }

    fn epoch(args: &[&str]) -> Result<primary::EpochLength> {
        epoch_length(&primary(args)?.protect)
    }

    #[test]
    fn epoch_ms_is_a_number_or_auto() {
        assert_eq!(epoch(&[]).unwrap(), primary::EpochLength::Fixed(25 * MS));
        assert_eq!(
            epoch(&["--epoch-ms", "40"]).unwrap(),
            primary::EpochLength::Fixed(40 * MS)
        );
        let primary::EpochLength::Auto(t) = epoch(&["--epoch-ms", "auto"]).unwrap() else {
            panic!("auto");
        };
        // The model's defaults; the budget 80 % of 1 Gbit/s without a link rate.
        assert_eq!(t, node::wws::EpochTarget::default());
        assert_eq!(t.link_budget, 100e6);
        assert_eq!(t.pause, 2 * MS);
        assert_eq!((t.min, t.max), (10 * MS, 200 * MS));
    }

    #[test]
    fn auto_takes_its_knobs_and_the_budget_follows_the_link_rate() {
        let primary::EpochLength::Auto(t) = epoch(&[
            "--epoch-ms",
            "auto",
            "--pause-target-ms",
            "0.5",
            "--pause-share-pct",
            "2%",
            "--epoch-min-ms",
            "20",
            "--epoch-max-ms",
            "80",
            "--link-budget",
            "400mbit",
        ])
        .unwrap() else {
            panic!("auto");
        };
        assert_eq!(t.pause, Duration::from_micros(500));
        assert!((t.pause_share - 0.02).abs() < 1e-12);
        assert_eq!((t.min, t.max), (20 * MS, 80 * MS));
        assert_eq!(t.link_budget, 50e6);
        let primary::EpochLength::Auto(t) =
            epoch(&["--epoch-ms", "auto", "--link-rate", "100mbit"]).unwrap()
        else {
            panic!("auto");
        };
        assert_eq!(t.link_budget, 0.8 * 12.5e6);
    }

    /// The error of a refused command line, rendered.
    fn refused(args: &[&str]) -> String {
        match primary(args) {
            Err(e) => e.to_string(),
            Ok(a) => format!("{:#}", epoch_length(&a.protect).expect_err("refused")),
        }
    }

    #[test]
    fn bad_epoch_values_are_named() {
        for (args, want) in [
            (&["--epoch-ms", "fast"][..], "--epoch-ms"),
            (&["--epoch-ms", "fast"], "nor auto"),
            (&["--epoch-ms", "0"], "outside 1..=10000"),
            (&["--epoch-ms", "20000"], "--epoch-ms"),
            (&["--epoch-ms", "-5"], "--epoch-ms"),
            (&["--epoch-ms", "auto", "--pause-target-ms", "0"], "--pause-target-ms"),
            (&["--epoch-ms", "auto", "--pause-share-pct", "100"], "--pause-share-pct"),
            (&["--epoch-ms", "auto", "--epoch-min-ms", "0"], "--epoch-min-ms"),
            (
                &["--epoch-ms", "auto", "--epoch-min-ms", "50", "--epoch-max-ms", "20"],
                "--epoch-min-ms 50 is longer than --epoch-max-ms 20",
            ),
            (&["--epoch-ms", "auto", "--link-budget", "none"], "--link-budget needs a rate"),
            (&["--epoch-ms", "auto", "--link-budget", "fast"], "--link-budget"),
            (
                &["--pause-target-ms", "3"],
                "--pause-target-ms applies to --epoch-ms auto only (here the epochs are fixed at 25 ms)",
            ),
            (&["--epoch-ms", "30", "--epoch-max-ms", "90"], "--epoch-max-ms applies to --epoch-ms auto only"),
        ] {
            let e = refused(args);
            assert!(e.contains(want), "{args:?}: expected '{want}' in: {e}");
        }
    }

    #[test]
    fn a_config_file_may_say_auto() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("primary.toml");
        std::fs::write(
            &file,
            "epoch-ms = \"auto\"\npause-target-ms = 1.5\nepoch-max-ms = 100\n",
        )
        .unwrap();
        let args: Vec<std::ffi::OsString> = [
            "castor",
            "primary",
            "--config",
            file.to_str().unwrap(),
            "--certs",
            "pki",
            "--node",
            "a",
            "--peer",
            "b",
            "--witness",
            "none",
            "--backup",
            "127.0.0.1:7400",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let Command::Primary(a) = Cli::try_parse_from(expand_config(args.clone()).unwrap())
            .unwrap()
            .command
        else {
            unreachable!("castor primary");
        };
        let primary::EpochLength::Auto(t) = epoch_length(&a.protect).unwrap() else {
            panic!("auto from the file");
        };
        assert_eq!((t.pause, t.max), (Duration::from_micros(1500), 100 * MS));
        // The command line wins over the file.
        let mut args = args;
        args.extend(["--epoch-ms".into(), "30".into()]);
        let Command::Primary(a) = Cli::try_parse_from(expand_config(args).unwrap())
            .unwrap()
            .command
        else {
            unreachable!("castor primary");
        };
        // ... and a fixed length refuses the file's auto-only settings.
        let e = format!("{:#}", epoch_length(&a.protect).unwrap_err());
        assert!(
            e.contains("--pause-target-ms applies to --epoch-ms auto only"),
            "{e}"
        );
    }
}
