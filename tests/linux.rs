//! A stock Linux kernel boots on castor: Debian's cloud kernel (package
//! `linux-image-cloud-amd64`, installed here if missing) with its initramfs,
//! on two vCPUs, prints its banner and echoes its command line on castor's
//! serial console, places the initramfs and finds both vCPUs in the ACPI
//! MADT.
//!
//! On kvm_pvm (no hardware virtualization) guest ring 0 is emulated: the
//! bzImage's decompressor alone runs for minutes, so the test boots the
//! uncompressed vmlinux it extracts from the bzImage's payload, and the
//! kernel is stopped long before user space (it dies on an INT3 later
//! anyway: see the README's "Linux guests"). Set `CASTOR_LINUX_KERNEL` (a
//! bzImage or vmlinux) and `CASTOR_LINUX_INITRD` to test another kernel.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the kernel may take to print what the test waits for.
const BUDGET: Duration = Duration::from_secs(60);

/// The newest `/boot/vmlinuz-*-cloud-amd64` and its initrd, if installed.
fn installed_cloud_kernel() -> Option<(PathBuf, Option<PathBuf>)> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    let kernel = found.pop()?;
    let name = kernel
        .file_name()?
        .to_str()?
        .replacen("vmlinuz-", "initrd.img-", 1);
    let initrd = Path::new("/boot").join(name);
    Some((kernel.clone(), initrd.exists().then_some(initrd)))
}

fn apt_install(packages: &[&str]) -> bool {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    install()
        || (Command::new("apt-get")
            .args(["update", "-qq"])
            .status()
            .is_ok_and(|s| s.success())
            && install())
}

/// The kernel (and initrd) to boot, installing Debian's cloud kernel if
/// none is there; `Err` says why there is none.
fn kernel_under_test() -> Result<(PathBuf, Option<PathBuf>), String> {
    if let Some(k) = std::env::var_os("CASTOR_LINUX_KERNEL") {
        let initrd = std::env::var_os("CASTOR_LINUX_INITRD").map(PathBuf::from);
        return Ok((PathBuf::from(k), initrd));
    }
    if let Some(k) = installed_cloud_kernel() {
        return Ok(k);
    }
    eprintln!("linux-image-cloud-amd64 is not installed: installing it with apt-get");
    if !apt_install(&["linux-image-cloud-amd64"]) {
        return Err("apt-get could not install linux-image-cloud-amd64".into());
    }
    installed_cloud_kernel().ok_or_else(|| "no /boot/vmlinuz-*-cloud-amd64 after install".into())
}

/// The decompressor for a bzImage payload, by its magic: (tool, package).
fn decompressor(payload: &[u8]) -> Option<(&'static str, &'static str)> {
    let magics: [(&[u8], &str, &str); 6] = [
        (&[0x1F, 0x8B], "gzip", "gzip"),
        (&[0xFD, b'7', b'z', b'X', b'Z', 0], "xz", "xz-utils"),
        (&[0x28, 0xB5, 0x2F, 0xFD], "zstd", "zstd"),
        (&[0x02, 0x21, 0x4C, 0x18], "lz4", "lz4"),
        (b"BZh", "bzip2", "bzip2"),
        (&[0x5D, 0, 0], "lzma", "xz-utils"),
    ];
    magics
        .into_iter()
        .find(|(m, _, _)| payload.starts_with(m))
        .map(|(_, tool, pkg)| (tool, pkg))
}

/// The uncompressed vmlinux (ELF) of `kernel`: `kernel` itself if it is
/// one, else the bzImage's payload (located by the setup header's
/// payload_offset/payload_length) decompressed with the matching tool,
/// cached under the test's temporary directory.
fn vmlinux_of(kernel: &Path) -> Result<PathBuf, String> {
    let image = std::fs::read(kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    if image.starts_with(b"\x7fELF") {
        return Ok(kernel.to_path_buf());
    }
    let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap()) as usize;
    if image.len() < 0x250 || &image[0x202..0x206] != b"HdrS" {
        return Err(format!(
            "{} is neither a bzImage nor an ELF",
            kernel.display()
        ));
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{}-{}.vmlinux",
        kernel.file_name().unwrap().to_string_lossy(),
        image.len()
    ));
    if out.exists() {
        return Ok(out);
    }
    let setup = (image[0x1F1].max(4) as usize + 1) * 512;
    let (off, len) = (setup + u32_at(0x248), u32_at(0x24C));
    // The payload ends with the uncompressed size (4 bytes), which the
    // stand-alone tools would take for a truncated stream.
    let payload = image
        .get(off..off + len.saturating_sub(4))
        .ok_or("the bzImage's payload lies outside the file")?;
    let (tool, package) =
        decompressor(payload).ok_or("unknown compression of the bzImage payload")?;
    if Command::new(tool).arg("--version").output().is_err() && !apt_install(&[package]) {
        return Err(format!("{tool} is needed to extract the vmlinux"));
    }
    let tmp = out.with_extension("part");
    let mut child = Command::new(tool)
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&tmp).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("{tool}: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let payload = payload.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = writer.join();
    let mut head = [0u8; 4];
    std::fs::File::open(&tmp)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("{tool} output: {e}"))?;
    if !status.success() || &head != b"\x7fELF" {
        return Err(format!("{tool} did not yield an ELF vmlinux ({status})"));
    }
    std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A console line and when it came, since `castor` was started.
type Line = (Duration, String);

/// Runs castor with `args` until every string of `wanted` appeared in a
/// console line or `budget` passed, then kills it. Returns the console
/// lines and castor's log.
fn watch(args: &[String], wanted: &[&str], budget: Duration) -> (Vec<Line>, String) {
    let t0 = Instant::now();
    let mut child = common::castor()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn castor");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((t0.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut seen: Vec<Line> = Vec::new();
    while wanted
        .iter()
        .any(|w| !seen.iter().any(|(_, l)| l.contains(w)))
    {
        match rx.recv_timeout(budget.saturating_sub(t0.elapsed())) {
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            // castor exited (e.g. --duration ran out).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    (seen, stderr.join().unwrap())
}

fn show(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|(at, l)| format!("{:7.2}s {l}", at.as_secs_f64()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn first(lines: &[Line], w: &str) -> Option<f64> {
    lines
        .iter()
        .find(|(_, l)| l.contains(w))
        .map(|(t, _)| t.as_secs_f64())
}

/// The kernel, initrd and vmlinux to boot, or `None` (a skip, explained).
fn linux_under_test() -> Option<(PathBuf, Option<PathBuf>, PathBuf)> {
    let (kernel, initrd) = match kernel_under_test() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("SKIPPED: no Linux kernel to boot ({why})");
            return None;
        }
    };
    match vmlinux_of(&kernel) {
        Ok(v) => Some((kernel, initrd, v)),
        Err(why) => {
            eprintln!(
                "SKIPPED: cannot extract a vmlinux from {}: {why}",
                kernel.display()
            );
            None
        }
    }
}

/// noxsave, clearcpuid=smap: instructions kvm_pvm's emulator cannot run
/// (harmless with hardware virtualization). earlyprintk: the log from the
/// first lines on, before the 8250 console driver is up.
const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 noxsave clearcpuid=smap castor.test=linux";

fn run_args(vmlinux: &Path, initrd: Option<&Path>, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--mem=512M".into(),
        "--vcpus=2".into(),
        format!("--kernel={}", vmlinux.display()),
        format!("--cmdline={CMDLINE}"),
    ];
    if let Some(i) = initrd {
        args.push(format!("--initrd={}", i.display()));
    }
    args.extend_from_slice(extra);
    args
}

#[test]
fn debian_cloud_kernel_boots_and_echoes_its_command_line() {
    let Some((kernel, initrd, vmlinux)) = linux_under_test() else {
        return;
    };
    let args = run_args(
        &vmlinux,
        initrd.as_deref(),
        &[format!("--duration={}s", BUDGET.as_secs() + 5)],
    );
    let echo = format!("Command line: {CMDLINE}");
    let mut wanted: Vec<&str> = vec!["Linux version ", &echo, "smpboot: Allowing 2 CPUs"];
    if initrd.is_some() {
        wanted.push("RAMDISK: [mem ");
    }
    let (seen, stderr) = watch(&args, &wanted, BUDGET);
    for w in &wanted {
        assert!(
            first(&seen, w).is_some(),
            "no '{w}' on the console within {BUDGET:?} (a loaded machine?); console:\n{}\ncastor's log:\n{stderr}",
            show(&seen)
        );
    }
    assert!(
        stderr.contains("format=Linux vmlinux ELF"),
        "castor did not log the kernel format:\n{stderr}"
    );
    let first_line = seen.iter().find(|(_, l)| l.starts_with('[')).unwrap().0;
    eprintln!(
        "{} (vmlinux ELF, 2 vCPUs, 512 MiB, initrd {}): first kernel line {:.1} s after `castor run`, \
         'Linux version' {:.1} s, command line echoed {:.1} s, 2 CPUs from the MADT {:.1} s",
        kernel.display(),
        initrd.as_ref().map_or("none".into(), |i| i.display().to_string()),
        first_line.as_secs_f64(),
        first(&seen, "Linux version ").unwrap(),
        first(&seen, &echo).unwrap(),
        first(&seen, "smpboot: Allowing 2 CPUs").unwrap(),
    );
}

/// A Linux guest is captured like any other: snapshotted mid-boot, then
/// restored in a new castor process, it boots on where it was.
#[test]
fn a_linux_guest_snapshotted_mid_boot_boots_on_after_restore() {
    let Some((_, initrd, vmlinux)) = linux_under_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let args = run_args(
        &vmlinux,
        initrd.as_deref(),
        &[
            "--snapshot-at=5s".into(),
            format!("--snapshot-dir={}", snap.display()),
            "--duration=6s".into(),
        ],
    );
    // Runs to --duration: nothing is awaited on the console.
    let (before, stderr) = watch(&args, &["castor: never printed"], Duration::from_secs(30));
    assert!(
        stderr.contains("snapshot written"),
        "no snapshot:\n{stderr}"
    );
    // The banner and the MADT's vCPUs, on one console or the other.
    let wanted: Vec<&str> = ["Linux version ", "smpboot: Allowing 2 CPUs"]
        .into_iter()
        .filter(|w| first(&before, w).is_none())
        .collect();
    let restore = vec![
        "restore".to_string(),
        snap.display().to_string(),
        format!("--duration={}s", BUDGET.as_secs() + 5),
    ];
    let (after, stderr) = watch(&restore, &wanted, BUDGET);
    for w in &wanted {
        assert!(
            first(&after, w).is_some(),
            "no '{w}' after the restore within {BUDGET:?}; before the snapshot:\n{}\nafter the restore:\n{}\ncastor's log:\n{stderr}",
            show(&before),
            show(&after)
        );
    }
    assert!(
        wanted.is_empty() || after.iter().any(|(_, l)| l.starts_with('[')),
        "the restored kernel printed nothing"
    );
    assert!(
        stderr.contains("VM restored"),
        "castor restore failed:\n{stderr}"
    );
}

/// A protected Linux guest is replicated like any other: killed mid-boot,
/// its primary's guest boots on at the backup, from the last checkpoint.
#[test]
fn a_protected_linux_guest_boots_on_at_the_backup_after_its_primary_dies() {
    let Some((_, initrd, vmlinux)) = linux_under_test() else {
        return;
    };
    common::castor_bin();
    let tmp = tempfile::tempdir().unwrap();
    let pair = lab::pair::Pair::in_dir(tmp.path(), ["a", "b"]).unwrap();
    let mut args: Vec<String> = vec![
        "--mem=256M".into(),
        "--vcpus=2".into(),
        format!("--kernel={}", vmlinux.display()),
        format!("--cmdline={CMDLINE}"),
    ];
    if let Some(i) = &initrd {
        args.push(format!("--initrd={}", i.display()));
    }
    let (backup, mut primary) = pair.start(&[], &args, ["b.log", "a.log"]).unwrap();
    lab::pair::wait_status(
        &primary,
        "protection",
        Duration::from_secs(60),
        lab::pair::protected,
    )
    .unwrap();
    // The console is released as checkpoints commit: wait for the banner.
    let t0 = Instant::now();
    let mut stream = Vec::new();
    let mut errors = Vec::new();
    while !String::from_utf8_lossy(&stream).contains("Linux version ") && t0.elapsed() < BUDGET {
        let offset = stream.len() as u64;
        if let Err(e) = lab::pair::read_console(
            primary.console,
            offset,
            &mut stream,
            Instant::now() + Duration::from_secs(1),
            u64::MAX,
        ) {
            errors.push(format!("{:.1} s: {e:#}", t0.elapsed().as_secs_f64()));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let banner_s = t0.elapsed().as_secs_f64();
    assert!(
        String::from_utf8_lossy(&stream).contains("Linux version "),
        "no banner from the protected guest within {BUDGET:?}:\n{}\nconsole errors: {errors:?}\nprimary log:\n{}",
        String::from_utf8_lossy(&stream),
        std::fs::read_to_string(&primary.log).unwrap_or_default()
    );
    if !errors.is_empty() {
        eprintln!("console client errors while waiting for the banner: {errors:?}");
    }
    let before = stream.len();
    let t = lab::pair::kill_and_follow(&mut primary, &backup, &mut stream, Duration::from_secs(10))
        .unwrap();
    let text = String::from_utf8_lossy(&stream).into_owned();
    assert!(
        t.first.is_some(),
        "the backup's guest printed nothing after the takeover; console:\n{text}\nbackup log:\n{}",
        std::fs::read_to_string(&backup.log).unwrap_or_default()
    );
    // The kernel's clock goes on from where it was: timestamps never go back.
    let stamps: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.trim().parse().ok())
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "kernel timestamps went back across the failover:\n{text}"
    );
    eprintln!(
        "protected Linux guest: banner released {banner_s:.1} s after protection; {} console bytes \
         before the SIGKILL, {} after; takeover to the survivor's first byte {:.0} ms",
        before,
        stream.len() - before,
        t.ms().unwrap()
    );
}
