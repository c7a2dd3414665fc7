//! TEMPORARY compile stub (the real device comes from the disk-dev branch).
#![allow(missing_docs, dead_code)]
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::disk::Disk;

#[derive(Debug, Default)]
pub struct DiskWrites {
    pub blocks: BTreeMap<u64, Box<[u8; 4096]>>,
    pub flushed: bool,
    pub bytes: u64,
}

pub struct BlockDevice {
    disk: Arc<Disk>,
}

impl BlockDevice {
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
    pub fn record(&self, _on: bool, _max_bytes: u64) {}
    pub fn take_writes(&self) -> DiskWrites {
        DiskWrites::default()
    }
}
