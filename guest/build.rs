//! Builds castor's guest kernel from `c/` with the machine's gcc and binutils.
//!
//! The kernel is compiled as 64-bit code, linked at 1 MiB, and converted to an
//! ELF32 container (`objcopy -O elf32-i386`) so that any multiboot v1 loader,
//! QEMU's `-kernel` included, accepts it.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["boot.S", "kernel.c", "user.c", "lib.c", "net.c", "blk.c"];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install gcc and binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let src = Path::new("c");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cc = std::env::var("CASTOR_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    println!("cargo:rerun-if-env-changed=CASTOR_GUEST_CC");
    println!("cargo:rerun-if-changed=c/guest.h");
    println!("cargo:rerun-if-changed=c/linker.ld");
    let mut objects = Vec::new();
    for s in SOURCES {
        println!("cargo:rerun-if-changed=c/{s}");
        let obj = out.join(format!("{s}.o"));
        run(Command::new(&cc)
            .args([
                "-m64",
                "-O2",
                "-g0",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-ffreestanding",
                "-fno-builtin",
                "-fno-pic",
                "-fno-pie",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-fcf-protection=none",
                "-mno-red-zone",
                "-mgeneral-regs-only",
                "-mcmodel=small",
                "-c",
            ])
            .arg(src.join(s))
            .arg("-o")
            .arg(&obj));
        objects.push(obj);
    }
    let elf64 = out.join("castor-guest.elf64");
    run(Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "--no-warn-rwx-segments",
            "-T",
        ])
        .arg(src.join("linker.ld"))
        .arg("-o")
        .arg(&elf64)
        .args(&objects));
    let elf32 = out.join("castor-guest.elf");
    run(Command::new("objcopy")
        .args(["-O", "elf32-i386"])
        .arg(&elf64)
        .arg(&elf32));
}
