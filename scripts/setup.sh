#!/usr/bin/env bash
# What castor's two commands need on a fresh machine of this kind (Debian,
# Rust, /dev/kvm): gcc and binutils build castor's guest from source, and
# Debian's etcd-server is the witness that the demo, the drills and the
# tests start; Debian's cloud kernel is the Linux guest of tests/linux.rs;
# resource-agents' ocf-tester checks castor's Pacemaker agent (tests/ocf.rs).
# strace slows etcd's disk for the slow-etcd fault drill (lab/src/faults.rs).
# Sourced by scripts/demo.sh and scripts/test.sh.
need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need gcc && need ld && need objcopy || missing+=(gcc binutils)
need etcd || missing+=(etcd-server)
need ocf-tester || missing+=(resource-agents)
need strace || missing+=(strace)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (castor's guest is built from source; etcd is the witness)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# Debian's cloud kernel (and its initramfs): tests/linux.rs boots it (the
# test installs it too if missing, and the decompressor its payload needs).
if ! ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1; then
    echo "installing linux-image-cloud-amd64 (the Linux guest test boots it)"
    kernel=(apt-get install -y -qq --no-install-recommends linux-image-cloud-amd64)
    DEBIAN_FRONTEND=noninteractive "${kernel[@]}" ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${kernel[@]}"; } ||
        echo "warning: could not install linux-image-cloud-amd64: the Linux guest test will be skipped" >&2
fi
if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm is missing: castor runs real KVM guests" >&2
    exit 1
fi
