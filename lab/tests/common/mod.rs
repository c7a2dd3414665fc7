//! A small UDP key-value server for the tests only: a faithful
//! implementation of the guest service's wire format (written from the
//! specification, not from the load generator's code), with knobs to drop,
//! duplicate and corrupt traffic and to lose its state ("fail over" to an
//! older snapshot).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const MAGIC: u32 = 0x4B56_5331;

#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    pub value: u64,
    pub version: u64,
    pub last_client: u64,
    pub last_req: u64,
}

/// The server's state and knobs.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub table: HashMap<u64, Entry>,
    /// Keys at most (0: unlimited); a PUT of a new key beyond gets status 1.
    pub capacity: usize,
    /// Drop every Nth request before applying it (0: never).
    pub drop_request_every: u64,
    /// Apply but drop the reply of every Nth request (0: never).
    pub drop_reply_every: u64,
    /// Send every Nth reply twice (0: never).
    pub duplicate_every: u64,
    /// Send junk datagrams before every Nth reply (0: never).
    pub garbage_every: u64,
    /// Ignore every request (a dead or paused primary).
    pub paused: bool,
    /// Reply to a PUT with this value instead of the one applied.
    pub corrupt_put_value: bool,
    pub requests: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Handles one datagram; returns the datagrams to send back.
pub fn handle(st: &mut State, b: &[u8]) -> Vec<Vec<u8>> {
    if st.paused {
        return vec![];
    }
    if b.len() != 40 || u32_at(b, 0) != MAGIC {
        return vec![];
    }
    st.requests += 1;
    let n = st.requests;
    let every = |e: u64| n.checked_rem(e) == Some(0);
    if every(st.drop_request_every) {
        return vec![];
    }
    let op = u32_at(b, 4);
    let client = u64_at(b, 8);
    let req = u64_at(b, 16);
    let key = u64_at(b, 24);
    let value = u64_at(b, 32);
    let (status, value, version) = match op {
        1 => {
            let full = st.capacity != 0 && st.table.len() >= st.capacity;
            if full && !st.table.contains_key(&key) {
                (1, 0, 0)
            } else {
                let e = st.table.entry(key).or_default();
                if !(e.last_client == client && e.last_req == req) {
                    e.value = value;
                    e.version += 1;
                    e.last_client = client;
                    e.last_req = req;
                }
                let v = if st.corrupt_put_value {
                    e.value ^ 1
                } else {
                    e.value
                };
                (0, v, e.version)
            }
        }
        2 => {
            let e = st.table.get(&key).copied().unwrap_or_default();
            (0, e.value, e.version)
        }
        _ => (2, 0, 0),
    };
    if every(st.drop_reply_every) {
        return vec![];
    }
    let mut r = Vec::with_capacity(56);
    r.extend_from_slice(&MAGIC.to_le_bytes());
    r.extend_from_slice(&(op | 0x80).to_le_bytes());
    r.extend_from_slice(&(status as u32).to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    for v in [client, req, key, value, version] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    let mut out = vec![];
    if every(st.garbage_every) {
        out.push(vec![0xff; 13]);
        out.push(vec![0; 56]);
        let mut bad_op = r.clone();
        bad_op[4] = 0x07;
        out.push(bad_op);
        out.push(b[..].to_vec()); // the request echoed: not a reply
    }
    out.push(r.clone());
    if every(st.duplicate_every) {
        out.push(r);
    }
    out
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(bind: SocketAddr, state: State) -> Server {
        let sock = UdpSocket::bind(bind).expect("binding the test KV server");
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stp.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let out = handle(&mut st.lock().unwrap(), &buf[..n]);
                for d in out {
                    let _ = sock.send_to(&d, from);
                }
            }
        });
        Server {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// A copy of the table.
    pub fn snapshot(&self) -> HashMap<u64, Entry> {
        self.state.lock().unwrap().table.clone()
    }

    /// Replaces the table (a failover to an older state).
    pub fn restore(&self, table: HashMap<u64, Entry>) {
        self.state.lock().unwrap().table = table;
    }

    pub fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
