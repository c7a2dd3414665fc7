//! The witness: the third party that decides which node owns a protected
//! VM, so that only one node ever runs it as a primary.
//!
//! One etcd key per VM, `/castor/vm/NAME`, holds `{"owner": NODE, "token":
//! N}`. The token is the fencing token: it only grows, by one at each change
//! of owner, and every change is a compare-and-swap on the key's revision
//! ([`Etcd::claim`]): a node becomes the owner only if the token is still
//! the one it knows. A primary carries on alone after losing its backup, and
//! a backup takes over, only after winning that swap; the loser stops.
//!
//! castor talks to etcd through its v3 JSON gateway (`POST /v3/kv/range`,
//! `/v3/kv/txn`) with a small blocking HTTP client (`ureq`) and a deadline
//! on every call ([`Store`], which the fleet's other keys go through too):
//! two requests is all the witness needs, and the gateway spares castor a
//! gRPC stack and `protoc` at build time. The member that answered last is
//! asked first, then the others in order; etcd's reads and transactions are
//! linearizable whichever member answers.
//! When none answers the answer is [`Claim::Unreachable`] and nothing
//! changes: castor gives up availability, never safety.
#![forbid(unsafe_code)]

pub mod server;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::debug;

pub use node::ha::Claim;
pub use store::{requests, Kv, Store};

/// The owner of a VM and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The node that may run the VM as a primary.
    pub owner: String,
    /// The fencing token (generation of ownership).
    pub token: u64,
}

/// What went wrong talking to the witness.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// No endpoint answered in time.
    #[error("the witness does not answer ({0})")]
    Unreachable(String),
    /// The key holds something castor did not write.
    #[error("the witness key {key} holds an unreadable value: {err}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        err: String,
    },
    /// A bad witness address.
    #[error("bad witness endpoint '{0}': give http://HOST:PORT")]
    BadEndpoint(String),
    /// etcd refused the request itself (the same on every member): a lease
    /// not found (code 5), a bad argument (3), no permission (7) …
    #[error("etcd refused the request: {message} (gRPC code {code})")]
    Refused {
        /// etcd's gRPC status code (5: NotFound, as for an expired lease).
        code: i64,
        /// etcd's message, with the member that answered.
        message: String,
    },
    /// An answer of etcd that is not what its gateway answers.
    #[error("etcd answered something unexpected: {0}")]
    BadAnswer(String),
    /// Another node owns the VM: it booted it or took it over and may be
    /// running it.
    #[error("the VM is owned by {owner} (token {token}) according to the witness")]
    OwnedBy {
        /// The owner.
        owner: String,
        /// Its token.
        token: u64,
    },
}

/// The VM's key in an etcd cluster.
#[derive(Debug, Clone)]
pub struct Etcd {
    store: Store,
    key: String,
}

/// The deadline of one read to one endpoint.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// The deadline of one write to one endpoint: etcd answers a write once a
/// quorum's disks hold it (`castor drill --faults slow-etcd`: with every
/// sync a second longer, a claim won in ~1 s with this deadline; with
/// [`REQUEST_TIMEOUT`] it failed until the disks were fast again).
pub const WRITE_TIMEOUT: Duration = Duration::from_millis(2500);

impl Etcd {
    /// The key of VM `vm` on the etcd members at `endpoints`
    /// (`http://HOST:PORT`).
    pub fn new(endpoints: &[String], vm: &str) -> Result<Etcd, WitnessError> {
        Ok(Etcd {
            store: Store::new(endpoints)?,
            key: format!("/castor/vm/{vm}"),
        })
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The endpoints, for messages.
    pub fn describe(&self) -> String {
        format!("etcd {} key {}", self.store.endpoints().join(","), self.key)
    }

    /// The owner now, with the key's revision; `None`: no owner yet.
    pub fn read(&self) -> Result<Option<(Owner, i64)>, WitnessError> {
        let Some(kv) = self.store.get(&self.key)? else {
            return Ok(None);
        };
        let owner: Owner =
            serde_json::from_slice(&kv.value).map_err(|e| WitnessError::Corrupt {
                key: self.key.clone(),
                err: e.to_string(),
            })?;
        Ok(Some((owner, kv.mod_revision)))
    }

    /// Writes `new` if the key is still at revision `rev` (`None`: absent).
    /// True when written.
    fn swap(&self, rev: Option<i64>, new: &Owner) -> Result<bool, WitnessError> {
        let value = serde_json::to_vec(new).expect("an owner serialises");
        match rev {
            Some(rev) => self.store.swap(&self.key, rev, &value, None),
            None => self.store.create(&self.key, &value, None),
        }
    }

    /// The error of a token that has no next one.
    fn no_next(&self, token: u64) -> WitnessError {
        WitnessError::Corrupt {
            key: self.key.clone(),
            err: format!("token {token} has no next token"),
        }
    }

    /// Makes `me` the owner if the token is still `expected`: the one
    /// compare-and-swap every change of role goes through.
    ///
    /// A claim whose swap reached etcd but whose answer was lost is
    /// recognised on the next attempt (the key then names `me` with
    /// `expected + 1`) and answered `Won` again.
    pub fn claim(&self, me: &str, expected: u64) -> Claim {
        match self.try_claim(me, expected) {
            Ok(c) => c,
            Err(e) => {
                debug!("witness: {e}");
                Claim::Unreachable
            }
        }
    }

    fn try_claim(&self, me: &str, expected: u64) -> Result<Claim, WitnessError> {
        let mine = Owner {
            owner: me.to_string(),
            token: expected
                .checked_add(1)
                .ok_or_else(|| self.no_next(expected))?,
        };
        let decide = |cur: &Option<(Owner, i64)>| -> Option<Claim> {
            let (owner, token) = cur
                .as_ref()
                .map(|(o, _)| (o.owner.clone(), o.token))
                .unwrap_or_default();
            if owner == me && token == mine.token {
                Some(Claim::Won { token })
            } else if token != expected {
                Some(Claim::Lost { owner, token })
            } else {
                None
            }
        };
        let cur = self.read()?;
        if let Some(c) = decide(&cur) {
            return Ok(c);
        }
        if self.swap(cur.map(|(_, rev)| rev), &mine)? {
            return Ok(Claim::Won { token: mine.token });
        }
        // Someone else swapped first.
        let cur = self.read()?;
        Ok(decide(&cur).unwrap_or(Claim::Lost {
            owner: cur.map(|(o, _)| o.owner).unwrap_or_default(),
            token: expected,
        }))
    }

    /// Makes `me` the owner with the next token: a node that boots the VM
    /// afresh (`castor primary`) starts a new generation. Refused with
    /// [`WitnessError::OwnedBy`] when another node owns the VM, unless
    /// `over_another`: that node may be running the guest (it took over),
    /// and a new generation would fence it and throw its guest's state away.
    /// Returns the token.
    pub fn acquire(&self, me: &str, over_another: bool) -> Result<u64, WitnessError> {
        for _ in 0..8 {
            let cur = self.read()?;
            if let Some((o, _)) = &cur {
                if o.owner != me && !over_another {
                    return Err(WitnessError::OwnedBy {
                        owner: o.owner.clone(),
                        token: o.token,
                    });
                }
            }
            let now = cur.as_ref().map_or(0, |(o, _)| o.token);
            let token = now.checked_add(1).ok_or_else(|| self.no_next(now))?;
            let new = Owner {
                owner: me.to_string(),
                token,
            };
            if self.swap(cur.map(|(_, rev)| rev), &new)? {
                return Ok(token);
            }
        }
        Err(WitnessError::Unreachable(
            "the key kept changing while acquiring it".into(),
        ))
    }
}

/// A witness as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// No witness (`none`).
    None,
    /// etcd members (`etcd=http://HOST:PORT[,…]`).
    Etcd(Vec<String>),
}

/// Parses `none` or `etcd=http://HOST:PORT[,http://HOST:PORT…]`.
pub fn parse_spec(s: &str) -> Result<Spec, String> {
    if s == "none" {
        return Ok(Spec::None);
    }
    let Some(urls) = s.strip_prefix("etcd=") else {
        return Err(format!(
            "unknown witness '{s}': give etcd=http://HOST:PORT[,http://HOST:PORT…] or none"
        ));
    };
    let endpoints: Vec<String> = urls.split(',').map(str::to_string).collect();
    Etcd::new(&endpoints, "check").map_err(|e| e.to_string())?;
    Ok(Spec::Etcd(endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(Etcd::new(&[], "vm").is_err());
        assert!(Etcd::new(&["127.0.0.1:2379".into()], "vm").is_err());
        let e = Etcd::new(&["http://127.0.0.1:2379/".into()], "vm").unwrap();
        assert_eq!(e.key(), "/castor/vm/vm");
        assert!(e.describe().contains("http://127.0.0.1:2379 "));
    }

    #[test]
    fn an_unreachable_witness_is_unreachable_not_an_answer() {
        // Nothing listens on port 9 (discard) here; the call must come back
        // Unreachable within the deadline, not hang and not claim.
        let e = Etcd::new(&["http://127.0.0.1:9".into()], "vm").unwrap();
        let t = std::time::Instant::now();
        assert_eq!(e.claim("a", 0), Claim::Unreachable);
        assert!(e.acquire("a", false).is_err());
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn specs_parse_or_say_what_is_wrong() {
        assert_eq!(parse_spec("none").unwrap(), Spec::None);
        assert_eq!(
            parse_spec("etcd=http://a:1,http://b:2").unwrap(),
            Spec::Etcd(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert!(parse_spec("zookeeper=x")
            .unwrap_err()
            .contains("unknown witness"));
        assert!(parse_spec("etcd=a:1")
            .unwrap_err()
            .contains("http://HOST:PORT"));
    }
}
