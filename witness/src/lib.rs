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
//! on every call: two requests is all castor needs, and the gateway spares
//! it a gRPC stack and `protoc` at build time. Endpoints are tried in order;
//! etcd's reads and transactions are linearizable whichever member answers.
//! When none answers the answer is [`Claim::Unreachable`] and nothing
//! changes: castor gives up availability, never safety.

pub mod server;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::debug;

pub use node::ha::Claim;

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
    endpoints: Vec<String>,
    key: String,
    agent: ureq::Agent,
}

/// The deadline of one request to one endpoint.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

impl Etcd {
    /// The key of VM `vm` on the etcd members at `endpoints`
    /// (`http://HOST:PORT`).
    pub fn new(endpoints: &[String], vm: &str) -> Result<Etcd, WitnessError> {
        if endpoints.is_empty() {
            return Err(WitnessError::BadEndpoint(String::new()));
        }
        for e in endpoints {
            let rest = e
                .strip_prefix("http://")
                .ok_or_else(|| WitnessError::BadEndpoint(e.clone()))?;
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                return Err(WitnessError::BadEndpoint(e.clone()));
            }
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            key: format!("/castor/vm/{vm}"),
            agent,
        })
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The endpoints, for messages.
    pub fn describe(&self) -> String {
        format!("etcd {} key {}", self.endpoints.join(","), self.key)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, WitnessError> {
        let mut last = String::new();
        for e in &self.endpoints {
            let url = format!("{e}{path}");
            let r = self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(body.to_string());
            match r {
                Ok(mut resp) => {
                    let status = resp.status();
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    if status.is_success() {
                        return serde_json::from_str(&text)
                            .map_err(|e| WitnessError::Unreachable(format!("{url}: {e}")));
                    }
                    last = format!("{url}: HTTP {status}: {}", text.trim());
                }
                Err(err) => last = format!("{url}: {err}"),
            }
            debug!("witness endpoint failed: {last}");
        }
        Err(WitnessError::Unreachable(last))
    }

    /// The owner now, with the key's revision; `None`: no owner yet.
    pub fn read(&self) -> Result<Option<(Owner, i64)>, WitnessError> {
        let v = self.post("/v3/kv/range", &json!({ "key": B64.encode(&self.key) }))?;
        let Some(kv) = v.get("kvs").and_then(|k| k.get(0)) else {
            return Ok(None);
        };
        let corrupt = |err: String| WitnessError::Corrupt {
            key: self.key.clone(),
            err,
        };
        let value = kv.get("value").and_then(Value::as_str).unwrap_or("");
        let value = B64.decode(value).map_err(|e| corrupt(e.to_string()))?;
        let owner: Owner = serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
        let rev =
            number(kv.get("mod_revision")).ok_or_else(|| corrupt("no mod_revision".into()))?;
        Ok(Some((owner, rev)))
    }

    /// Writes `new` if the key is still at revision `rev` (`None`: absent).
    /// True when written.
    fn swap(&self, rev: Option<i64>, new: &Owner) -> Result<bool, WitnessError> {
        let key = B64.encode(&self.key);
        let compare = match rev {
            Some(rev) => {
                json!({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
            }
            None => {
                json!({"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
            }
        };
        let value = B64.encode(serde_json::to_vec(new).expect("an owner serialises"));
        let v = self.post(
            "/v3/kv/txn",
            &json!({
                "compare": [compare],
                "success": [{"request_put": {"key": key, "value": value}}],
            }),
        )?;
        Ok(v.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
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
            token: expected + 1,
        };
        let decide = |cur: &Option<(Owner, i64)>| -> Option<Claim> {
            let (owner, token) = cur
                .as_ref()
                .map(|(o, _)| (o.owner.clone(), o.token))
                .unwrap_or_default();
            if owner == me && token == expected + 1 {
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
            let token = cur.as_ref().map_or(0, |(o, _)| o.token) + 1;
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

/// An int64 of the gateway's JSON (a string) or a plain number.
fn number(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
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

    #[test]
    fn gateway_numbers_are_strings_or_numbers() {
        assert_eq!(number(Some(&json!("42"))), Some(42));
        assert_eq!(number(Some(&json!(7))), Some(7));
        assert_eq!(number(Some(&json!(null))), None);
    }
}
