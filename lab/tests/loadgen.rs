//! The load generator against a small UDP key-value server on 127.0.0.1
//! (tests/common: the wire format implemented from its specification): clean
//! runs with lost, duplicated and garbage datagrams pass; a server that
//! loses acknowledged state ("fails over" to an older snapshot) or answers
//! wrongly is caught.

mod common;

use std::net::SocketAddr;
use std::thread::sleep;
use std::time::Duration;

use castor_lab::loadgen::checker::ViolationKind;
use castor_lab::loadgen::{Config, LinVerdict, Loadgen, LoadgenArgs};
use clap::Parser;
use common::{Server, State};

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config(server: &Server) -> Config {
    Config {
        target: server.addr,
        rate: 2000.0,
        keys: 50,
        timeout: Duration::from_millis(20),
        concurrency: 8,
        drain_timeout: Duration::from_secs(2),
        verify_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

fn verdict(r: &castor_lab::loadgen::Report) -> LinVerdict {
    r.linearizability
        .as_ref()
        .expect("the history is checked at the stop")
        .verdict
}

fn kinds(r: &castor_lab::loadgen::Report) -> Vec<ViolationKind> {
    r.first_violations.iter().map(|v| v.kind).collect()
}

#[test]
fn clean_run_with_lost_duplicated_and_garbage_datagrams_passes() {
    let server = Server::start(
        local(),
        State {
            drop_request_every: 13,
            drop_reply_every: 17,
            duplicate_every: 7,
            garbage_every: 11,
            ..State::default()
        },
    );
    let lg = Loadgen::start(config(&server)).unwrap();
    sleep(Duration::from_millis(700));
    let so_far = lg.report_so_far();
    assert!(so_far.counts.acked > 100, "{}", so_far.summary());
    let v = lg.verify_all().unwrap();
    assert!(v.ok(), "{v:?}");
    assert!(v.keys > 10 && v.checked == v.keys, "{v:?}");
    sleep(Duration::from_millis(300));
    let r = lg.stop();
    let text = r.summary();
    eprintln!("{text}");
    assert!(r.ok(), "{text}");
    assert_eq!(r.violations, 0, "{text}");
    assert!(r.counts.retries > 0, "{text}");
    assert!(r.counts.duplicate_replies > 0, "{text}");
    assert!(r.malformed > 0, "{text}");
    assert_eq!(r.verifies.len(), 2, "{text}");
    assert_eq!(r.outstanding, 0, "{text}");
    assert!(r.counts.puts_acked > 0 && r.counts.gets_acked > 0, "{text}");
    assert!(r.latency.p50_ms > 0.0 && r.latency.p99_ms >= r.latency.p50_ms);
    assert!(r.latency.max_ms >= r.latency.p99_ms);
    // Retries every 20 ms: a lost datagram costs a gap of about that.
    assert!(r.longest_gap_ms < 500.0, "{text}");
    // The whole history (retries, duplicate replies: more reads) checks.
    assert_eq!(verdict(&r), LinVerdict::Yes, "{text}");
    assert!(text.contains("linearizable: yes ("), "{text}");
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["violations"], 0);
    assert!(json["sent"].as_u64().unwrap() > 0);
    assert_eq!(json["linearizability"]["verdict"], "Yes");
}

#[test]
fn failover_to_an_older_state_is_reported_as_lost_writes() {
    let server = Server::start(local(), State::default());
    let lg = Loadgen::start(Config {
        keys: 20,
        put_ratio: 0.7,
        ..config(&server)
    })
    .unwrap();
    sleep(Duration::from_millis(300));
    let before = server.snapshot();
    sleep(Duration::from_millis(400));
    assert_eq!(lg.report_so_far().violations, 0);
    // The "backup" takes over from a checkpoint older than replies already
    // sent: acknowledged writes are lost.
    lg.mark("failover");
    server.restore(before);
    let v = lg.verify_all().unwrap();
    assert!(!v.ok() && v.violations > 0, "{v:?}");
    let r = lg.stop();
    let text = r.summary();
    eprintln!("{text}");
    assert!(!r.ok(), "{text}");
    // The history check finds it too, with a small sub-history.
    assert_eq!(verdict(&r), LinVerdict::No, "{text}");
    let l = r.linearizability.as_ref().unwrap();
    assert!(l.line.starts_with("linearizable: NO"), "{text}");
    assert!((2..=8).contains(&l.detail.len()), "{text}");
    assert!(r.violations > 0, "{text}");
    let k = kinds(&r);
    assert!(k.contains(&ViolationKind::LostWrite), "{text}");
    assert!(k.contains(&ViolationKind::StaleReply), "{text}");
    assert!(text.contains("LostWrite"), "{text}");
    assert_eq!(r.marks.len(), 1);
    assert!(r.marks[0].first_reply_after_s.is_some(), "{text}");
}

#[test]
fn a_pause_is_a_gap_not_a_violation() {
    let server = Server::start(local(), State::default());
    let lg = Loadgen::start(config(&server)).unwrap();
    sleep(Duration::from_millis(300));
    // A correct failover: no reply for a while, then the same state.
    server.set(|s| s.paused = true);
    lg.mark("primary paused");
    sleep(Duration::from_millis(300));
    server.set(|s| s.paused = false);
    sleep(Duration::from_millis(300));
    let r = lg.stop();
    let text = r.summary();
    eprintln!("{text}");
    assert!(r.ok(), "{text}");
    assert!(r.longest_gap_ms >= 250.0, "{text}");
    let m = &r.marks[0];
    assert_eq!(m.label, "primary paused");
    let gap = m.gap_ms.unwrap();
    assert!((250.0..1000.0).contains(&gap), "{text}");
    assert!(m.last_reply_before_s.unwrap() <= m.at_s);
    assert!(m.first_reply_after_s.unwrap() > m.at_s);
    assert!(r.counts.retries >= 8, "{text}");
    assert_eq!(verdict(&r), LinVerdict::Yes, "{text}");
}

#[test]
fn wrong_put_replies_are_caught() {
    let server = Server::start(
        local(),
        State {
            corrupt_put_value: true,
            ..State::default()
        },
    );
    let lg = Loadgen::start(config(&server)).unwrap();
    sleep(Duration::from_millis(200));
    let r = lg.stop();
    assert!(
        kinds(&r).contains(&ViolationKind::BadPutReply),
        "{}",
        r.summary()
    );
}

#[test]
fn a_full_table_is_an_error_reply_not_a_violation() {
    let server = Server::start(
        local(),
        State {
            capacity: 5,
            ..State::default()
        },
    );
    let lg = Loadgen::start(config(&server)).unwrap();
    sleep(Duration::from_millis(300));
    let r = lg.stop();
    let text = r.summary();
    eprintln!("{text}");
    assert!(r.counts.error_replies > 0, "{text}");
    assert_eq!(r.violations, 0, "{text}");
    assert!(r.ok(), "{text}");
    // Failed PUTs took no effect: the keys they named stay absent.
    assert_eq!(verdict(&r), LinVerdict::Yes, "{text}");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
}

#[test]
fn the_command_passes_against_a_good_server_and_fails_without_one() {
    let server = Server::start(local(), State::default());
    let target = server.addr.to_string();
    let cli = Cli::try_parse_from([
        "loadgen",
        "--target",
        &target,
        "--duration",
        "300ms",
        "--rate",
        "500",
        "--keys",
        "100",
        "--fresh",
        "--json",
    ])
    .unwrap();
    assert_eq!(cli.args.timeout_ms, 50);
    assert_eq!(cli.args.concurrency, 16);
    castor_lab::loadgen::loadgen(cli.args).unwrap();
    drop(server);
    // Nothing listens there any more: no reply, an error.
    let cli = Cli::try_parse_from([
        "loadgen",
        "--target",
        &target,
        "--duration",
        "200ms",
        "--drain-timeout",
        "100ms",
    ])
    .unwrap();
    let e = castor_lab::loadgen::loadgen(cli.args).unwrap_err();
    assert!(format!("{e:#}").contains("no reply"), "{e:#}");
}
