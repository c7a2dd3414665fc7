//! Which MSRs are part of a vCPU's saved state.
//!
//! castor saves the MSRs that KVM lists (`KVM_GET_MSR_INDEX_LIST`) and that
//! fall in the serializable ranges below — the same ranges Firecracker uses
//! (its `arch/x86_64/msr.rs`), minus `IA32_MCG_CTL`, which Linux does not
//! export. The list is sorted, so on restore `IA32_TSC` (0x10) is written
//! before `IA32_TSC_DEADLINE` (0x6E0), as KVM requires.

/// `IA32_TSC`.
pub const IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`.
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
const IA32_MCG_CTL: u32 = 0x17B;

/// (first MSR, count) of each serializable range.
const SERIALIZABLE: &[(u32, u32)] = &[
    (0x0, 2), // P5_MC_ADDR, P5_MC_TYPE
    (IA32_TSC, 1),
    (0x17, 1),         // PLATFORM_ID
    (0x1B, 1),         // APIC_BASE
    (0x2A, 1),         // EBL_CR_POWERON
    (0x2C, 1),         // EBC_FREQUENCY_ID
    (0x34, 1),         // SMI_COUNT
    (0x3A, 1),         // FEATURE_CONTROL
    (0x3B, 1),         // TSC_ADJUST
    (0x48, 2),         // SPEC_CTRL, PRED_CMD
    (0x79, 1),         // UCODE_WRITE
    (0x8B, 1),         // UCODE_REV
    (0x9E, 1),         // SMBASE
    (0xCD, 2),         // FSB_FREQ, PLATFORM_INFO
    (0xE2, 1),         // PKG_CST_CONFIG_CONTROL
    (0xE7, 2),         // MPERF, APERF
    (0xFE, 1),         // MTRRcap
    (0x11E, 1),        // BBL_CR_CTL3
    (0x174, 3),        // SYSENTER_CS/ESP/EIP
    (0x179, 2),        // MCG_CAP, MCG_STATUS
    (IA32_MCG_CTL, 1), // excluded below
    (0x198, 1),        // PERF_STATUS
    (0x1A0, 1),        // MISC_ENABLE
    (0x1A4, 1),        // MISC_FEATURE_CONTROL
    (0x1AA, 1),        // MISC_PWR_MGMT
    (0x1AD, 2),        // TURBO_RATIO_LIMIT, _1
    (0x1D9, 1),        // DEBUGCTL
    (0x1DB, 4),        // LASTBRANCH/LASTINT FROM/TO
    (0x1FC, 1),        // POWER_CTL
    (0x200, 0x100),    // MTRRs
    (0x3FC, 3),        // CORE_C3/C6/C7_RESIDENCY
    (0x400, 0x80),     // MCi banks
    (0x606, 1),        // RAPL_POWER_UNIT
    (0x60A, 3),        // PKGC3/6/7_IRTL
    (0x610, 2),        // PKG_POWER_LIMIT, PKG_ENERGY_STATUS
    (0x613, 2),        // PKG_PERF_STATUS, PKG_POWER_INFO
    (0x618, 2),        // DRAM_POWER_LIMIT, DRAM_ENERGY_STATUS
    (0x61B, 2),        // DRAM_PERF_STATUS, DRAM_POWER_INFO
    (0x648, 5),        // CONFIG_TDP_*, TURBO_ACTIVATION_RATIO
    (IA32_TSC_DEADLINE, 1),
    (0x800, 0x400),   // x2APIC
    (0x4B56_4D00, 7), // KVM paravirtual MSRs
    (0xC000_0080, 5), // EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK
    (0xC000_0100, 4), // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
    (0x140, 1),       // MISC_FEATURES_ENABLES
    (0xC001_0015, 1), // K7_HWCR
];

/// Whether MSR `index` belongs in a vCPU's saved state.
pub fn should_save(index: u32) -> bool {
    index != IA32_MCG_CTL
        && SERIALIZABLE
            .iter()
            .any(|&(base, n)| index >= base && index - base < n)
}

/// The MSRs to save, from KVM's index list: filtered and sorted.
pub fn to_save(kvm_list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = kvm_list
        .iter()
        .copied()
        .filter(|&i| should_save(i))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_orders() {
        let got = to_save(&[
            IA32_TSC_DEADLINE,
            0xC000_0080,
            IA32_MCG_CTL,
            0x38F,
            IA32_TSC,
            0x1B,
        ]);
        assert_eq!(got, vec![IA32_TSC, 0x1B, IA32_TSC_DEADLINE, 0xC000_0080]);
    }
}
